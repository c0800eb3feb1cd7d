"""
TLS key exchange groups (issue 19, item 13): X25519, P-256 and P-384 only, on every TLS
context proxygate makes (see gateway/tls/groups.py for how).

- The ClientHello parser, and L{offeredGroups} in a process started with the shipped
  OpenSSL configuration (exactly the three) and without it (OpenSSL's longer default list).
- The re-execution: a process that calls L{ensureLimited} runs again, with the same pid,
  limited; one with an OPENSSL_CONF of its own is left alone and warned about.
- End to end, as sslyze probes: ``openssl s_client -groups`` against an ``ssl:`` listener
  and against the certificate minted for an intercepted tunnel: X448 and secp521r1 (and a
  finite-field group) are refused, each of the three is accepted (TLS 1.3); and
  the origin leg: an origin that speaks only X448 or P-521 gets no connection from
  proxygate (502), one that speaks only P-384 does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from twisted.logger import LogLevel, capturedLogs

from gateway.tls.groups import CONFIG, checkGroups, offeredGroups, parseSupportedGroups
from tests.support import LOOPBACK_INI, PYTHON, REPO, ProxyProcess, sslListen
from tests.support.tlsorigin import HTTPSOrigin, TLSFiles, makeCA

LIMITED = (0x001D, 0x0017, 0x0018)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, timeout=30, env={**base, **env}
    )


def test_parseSupportedGroupsOfARealClientHello():
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ecdh_curve("secp384r1")  # one group: a known list to find
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="x.invalid")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    assert parseSupportedGroups(outgoing.read()) == (0x0018,)
    assert parseSupportedGroups(b"") is None
    assert parseSupportedGroups(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None
    assert parseSupportedGroups(b"\x16\x03\x01\x00\x30\x01" + b"\x00" * 20) is None


def test_shippedConfigurationLimitsTheGroups():
    code = "from gateway.tls.groups import offeredGroups; print(offeredGroups())"
    limited = _run(code, OPENSSL_CONF=CONFIG)
    assert limited.stdout.strip() == str(LIMITED), limited.stderr
    default = _run(code)
    assert {0x001E, 0x0019} <= set(eval(default.stdout))  # X448, P-521: OpenSSL's defaults


def test_ensureLimitedReExecutesOnce():
    code = (
        "import os; print('start', os.getpid(), flush=True); "
        "from gateway.tls.groups import ensureLimited, offeredGroups; ensureLimited(); "
        "print('groups', offeredGroups())"
    )
    result = _run(code)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result
    assert lines[0] == lines[1]  # the same process, started again
    assert lines[2] == f"groups {LIMITED}"


def test_ensureLimitedLeavesAnOwnConfigurationAlone(tmp_path):
    own = tmp_path / "own.cnf"
    own.write_text("# nothing about groups\n")
    code = (
        "import os; print('start', os.getpid(), flush=True); "
        "from gateway.tls.groups import ensureLimited; ensureLimited(); print('done')"
    )
    result = _run(code, OPENSSL_CONF=str(own))
    assert result.stdout.count("start") == 1 and "done" in result.stdout


def test_checkGroupsWarnsAnEmbeddingProcess():
    if set(offeredGroups()) <= set(LIMITED):
        pytest.skip("this test process was started with the groups limited")
    with capturedLogs() as events:
        assert checkGroups() is False
    [event] = [e for e in events if e["log_level"] == LogLevel.warn]
    assert "X448" in event["groups"] and "OPENSSL_CONF=" in event["how"]


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> TLSFiles:
    return makeCA(tmp_path_factory.mktemp("groups-pki"))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, files):
    """An ssl: listener and a tcp: one, interception on, under twistd."""
    p = ProxyProcess(
        tmp_path_factory.mktemp("groups"),
        LOOPBACK_INI + f"\n[mitm]\nenabled = on\nupstream_ca_bundle = {files.caCert}\n",
        listen=f"tcp:0:interface=127.0.0.1 {sslListen(files)}",
    )
    p.start()
    p.tlsPort = p.ports[1][1]
    yield p
    p.stop()


def _sClient(*args: str) -> bool:
    result = subprocess.run(
        ["openssl", "s_client", "-brief", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    return result.returncode == 0 and "CONNECTION ESTABLISHED" in result.stderr + result.stdout


GOOD = ("X25519", "P-256", "P-384")
BAD = ("X448", "P-521", "ffdhe2048")


def test_proxyProcessIsLimited(proxy):
    environ = Path(f"/proc/{proxy.pid}/environ").read_bytes().split(b"\0")
    assert f"OPENSSL_CONF={CONFIG}".encode() in environ
    assert "TLS: this process offers" not in proxy.log()


def test_sslListenerGroups(proxy):
    # TLS 1.3, where the key share is independent of the certificate: in TLS 1.2 an ECDSA
    # P-256 certificate needs P-256 offered anyway (RFC 8422 §5.1), whatever the groups.
    target = ("-connect", f"127.0.0.1:{proxy.tlsPort}", "-tls1_3")
    for group in GOOD:
        assert _sClient(*target, "-groups", group), group
    for group in BAD:
        assert not _sClient(*target, "-groups", group), group


def test_interceptedTunnelGroups(proxy, files):
    origin = HTTPSOrigin(files)
    try:
        target = (
            "-proxy", f"127.0.0.1:{proxy.port}",
            "-connect", f"localhost:{origin.port}", "-servername", "localhost",
        )  # fmt: skip
        for group in GOOD:
            assert _sClient(*target, "-groups", group), group
        for group in BAD:
            assert not _sClient(*target, "-groups", group), group
    finally:
        origin.close()


class _OneGroup(TLSFiles):
    """The L{makeCA} leaf on a server context that speaks one group only."""

    def __init__(self, files: TLSFiles, curve: str) -> None:
        super().__init__(files.folder)
        self.curve = curve

    def serverContext(self):
        context = super().serverContext()
        context.set_ecdh_curve(self.curve)
        return context


@pytest.mark.parametrize(
    ("curve", "status"), [("X448", 502), ("secp521r1", 502), ("secp384r1", 200)]
)
def test_originLegGroups(proxy, files, curve, status):
    origin = HTTPSOrigin(_OneGroup(files, curve))
    try:
        result = subprocess.run(
            [
                "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                "-k", "-x", proxy.url, f"https://localhost:{origin.port}/bytes/3",
            ],
            capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert result.stdout == str(status), (curve, result.stdout, result.stderr)
    finally:
        origin.close()
