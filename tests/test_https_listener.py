"""
The HTTPS proxy listener: an C{ssl:} endpoint in C{[proxy] listen} serves the same proxy
with TLS between the client and proxygate.

Driven with real clients the way users would: curl's C{--proxy https://...
--proxy-cacert ca.pem} and requests with an C{https://} proxy URL, for plain HTTP
(absolute form inside the TLS connection), CONNECT tunnels (TLS inside TLS) and an
intercepted (MITM) CONNECT on that listener (the intercepting TLS layered inside the
listener's TLS). Certificates come from a throwaway CA (L{tests.support.tlsorigin.makeCA});
the proxy runs as the real C{twistd -n proxygate} subprocess, stopped by PID.
"""

from __future__ import annotations

import datetime
import gc
import ipaddress
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import ConfigError, parseConfig
from tests.support import (
    LOOPBACK_INI,
    TWISTD_WITHOUT_PYOPENSSL,
    ProxyProcess,
    payload,
    sslListen,
)
from tests.support.tlsorigin import HELLO, HTTPSOrigin, TLSFiles, commonName, keyPEM, makeCA

CURL = shutil.which("curl")
needsCurl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt: curl)")


def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """curl with bounded times; never reads ~/.curlrc or the proxy environment."""
    return subprocess.run(
        [CURL, "-q", "--silent", "--show-error", "--noproxy", "", "--max-time", "20", *args],
        capture_output=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TLSFiles:
    """One throwaway CA with a localhost / 127.0.0.1 leaf, for the proxy and the origin."""
    return makeCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def httpsOrigin(pki):
    o = HTTPSOrigin(pki)
    yield o
    o.close()


@pytest.fixture
def startTLSProxy(tmp_path):
    """Like C{startProxy}, but listening with an C{ssl:} endpoint (plus C{extra} listeners)."""
    started: list[ProxyProcess] = []

    def start(files: TLSFiles, ini: str = LOOPBACK_INI, extra: str = "") -> ProxyProcess:
        p = ProxyProcess(tmp_path, ini, listen=f"{sslListen(files)} {extra}".strip())
        started.append(p)
        return p.start()  # p.port: the first listener's, the TLS one

    yield start
    for p in started:
        p.stop()


def httpsProxy(p: ProxyProcess) -> str:
    return f"https://127.0.0.1:{p.port}"


# -- plain HTTP and CONNECT over a TLS connection to the proxy --------------------------------


@needsCurl
def test_curlHTTPThroughHTTPSProxy(startTLSProxy, pki, origin) -> None:
    """curl --proxy https://...: an absolute-form request inside TLS to the proxy."""
    p = startTLSProxy(pki)
    r = curl(
        "--proxy", httpsProxy(p), "--proxy-cacert", str(pki.caCert), origin.url("/echo?over=tls")
    )
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["path"] == "/echo?over=tls"
    headers = {k.lower(): v for k, v in doc["headers"]}
    assert headers["via"] == "1.1 proxygate"
    assert "proxy-authorization" not in headers
    assert any(
        "TCP_MISS/200" in line and "GET http://127.0.0.1" in line for line in p.accessLines()
    ), p.accessLines()


@needsCurl
def test_curlConnectThroughHTTPSProxy(startTLSProxy, pki, httpsOrigin) -> None:
    """A CONNECT tunnel inside TLS to the proxy, with TLS to the origin inside that."""
    p = startTLSProxy(pki)
    base = f"https://127.0.0.1:{httpsOrigin.port}"
    r = curl(
        "--proxy",
        httpsProxy(p),
        "--proxy-cacert",
        str(pki.caCert),
        "--cacert",
        str(pki.caCert),
        f"{base}/",
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == HELLO
    # A larger body: every byte through two TLS layers and the splice.
    size = 3 * 1024 * 1024 + 17
    r = curl(
        "--proxy",
        httpsProxy(p),
        "--proxy-cacert",
        str(pki.caCert),
        "--cacert",
        str(pki.caCert),
        f"{base}/bytes/{size}",
    )
    assert r.returncode == 0, r.stderr.decode()
    assert len(r.stdout) == size
    assert r.stdout == payload(size)
    # A tunnel is logged when it ends, which may be just after curl is done.
    deadline = time.monotonic() + 10
    while len([ln for ln in p.accessLines() if "CONNECT 127.0.0.1:" in ln]) < 2:
        assert time.monotonic() < deadline, p.accessLines()
        time.sleep(0.05)


@needsCurl
def test_curlRefusesUntrustedProxyCertificate(startTLSProxy, pki, origin) -> None:
    """The client really verifies the proxy: without the CA it cannot even send a request."""
    p = startTLSProxy(pki)
    r = curl("--proxy", httpsProxy(p), origin.url("/echo"))
    assert r.returncode == 60, (r.returncode, r.stderr.decode())  # CURLE_PEER_FAILED_VERIFICATION
    assert not [line for line in p.accessLines() if "GET http://" in line]


# requests does not verify an https:// proxy for http:// URLs (it hands C{verify} to the
# origin's pool only, and urllib3 warns); for https:// URLs it verifies both with C{verify}.
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_requestsThroughHTTPSProxy(startTLSProxy, pki, origin, httpsOrigin, tmp_path) -> None:
    """requests (urllib3 2) with an https:// proxy URL: HTTP and HTTPS origins."""
    p = startTLSProxy(pki)
    proxies = {"http": httpsProxy(p), "https": httpsProxy(p)}
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(origin.url("/echo"), proxies=proxies, verify=str(pki.caCert), timeout=10)
        assert r.status_code == 200
        assert r.json()["method"] == "GET"
        r = s.get(
            f"https://127.0.0.1:{httpsOrigin.port}/",
            proxies=proxies,
            verify=str(pki.caCert),
            timeout=10,
        )
        assert r.status_code == 200
        assert r.content == HELLO
    # urllib3 keeps a socket tunnelled through an https:// proxy open until it is garbage
    # collected, even after the session is closed: let it go, so the tunnel ends now.
    del r
    gc.collect()
    other = makeCA(tmp_path / "other")
    with (
        requests.Session() as s,
        pytest.raises(requests.exceptions.ProxyError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        s.trust_env = False
        s.get(
            f"https://127.0.0.1:{httpsOrigin.port}/",
            proxies=proxies,
            verify=str(other.caCert),
            timeout=10,
        )


@needsCurl
def test_tlsAndPlainListenersSideBySide(startTLSProxy, pki, origin) -> None:
    """One service, two listeners: ssl: and tcp: serve the same proxy."""
    p = startTLSProxy(pki, extra="tcp:0:interface=127.0.0.1")
    _, plainPort = p.ports[1]
    r = curl("--proxy", httpsProxy(p), "--proxy-cacert", str(pki.caCert), origin.url("/echo"))
    assert r.returncode == 0, r.stderr.decode()
    r = curl("--proxy", f"http://127.0.0.1:{plainPort}", origin.url("/echo"))
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["path"] == "/echo"


# -- an intercepted CONNECT on the TLS listener -----------------------------------------------


def mitmINI(folder: Path, pki: TLSFiles) -> str:
    return LOOPBACK_INI + (
        "\n[mitm]\nenabled = on\n"
        f"ca_cert = {folder / 'mitm-ca.pem'}\nca_key = {folder / 'mitm-ca.key'}\n"
        f"upstream_ca_bundle = {pki.caCert}\n"
    )


@needsCurl
def test_mitmOnHTTPSListener(startTLSProxy, pki, httpsOrigin, tmp_path) -> None:
    """
    Client->proxy TLS, then an intercepted CONNECT inside it: proxygate layers its own TLS
    server (certificate minted by its MITM CA) inside the listener's TLS, and serves the
    decrypted requests, several on one tunnel.
    """
    p = startTLSProxy(pki, ini=mitmINI(tmp_path, pki))
    mitmCA = tmp_path / "mitm-ca.pem"
    assert mitmCA.exists()
    base = f"https://127.0.0.1:{httpsOrigin.port}"
    # Trusting only the MITM CA for the origin proves the answer was intercepted.
    r = curl(
        "--proxy",
        httpsProxy(p),
        "--proxy-cacert",
        str(pki.caCert),
        "--cacert",
        str(mitmCA),
        f"{base}/",
        f"{base}/bytes/100000",
    )
    assert r.returncode == 0, (r.stderr.decode(), p.log()[-3000:])
    assert r.stdout[: len(HELLO)] == HELLO
    assert r.stdout[len(HELLO) :] == payload(100000)
    lines = p.accessLines()
    assert sum(f"GET https://127.0.0.1:{httpsOrigin.port}/" in line for line in lines) == 2, lines
    assert p.metric("proxygate_requests_total", mode="mitm", method="GET", code="200") == 2
    # A client trusting the origin's CA only refuses the minted certificate (curl 7.88
    # reports that as 35 SSL_ERROR_SYSCALL when it happens inside an HTTPS proxy, 60 else).
    r = curl(
        "--verbose",
        "--proxy",
        httpsProxy(p),
        "--proxy-cacert",
        str(pki.caCert),
        "--cacert",
        str(pki.caCert),
        f"{base}/",
    )
    assert r.returncode in (35, 60), r.stderr.decode()
    assert r.stdout == b""
    assert b"unknown CA" in r.stderr or b"unable to get local issuer" in r.stderr


# -- the listener is proxygate's own (standard library TLS), not Twisted's --------------------


@needsCurl
def test_httpsListenerAndMITMWithoutPyOpenSSL(pki, httpsOrigin, tmp_path) -> None:
    """
    An install from the README has no pyOpenSSL (proxygate's TLS is the standard library's):
    the ssl: listener, an intercepted CONNECT inside it and the verified origin leg all work
    in a process that cannot import it.
    """
    ini = mitmINI(tmp_path, pki)
    p = ProxyProcess(tmp_path, ini, sslFiles=pki, twistd=TWISTD_WITHOUT_PYOPENSSL).start()
    try:
        base = f"https://127.0.0.1:{httpsOrigin.port}"
        r = curl(
            "--proxy", httpsProxy(p), "--proxy-cacert", str(pki.caCert),
            "--cacert", str(tmp_path / "mitm-ca.pem"), f"{base}/",
        )  # fmt: skip
        assert r.returncode == 0, (r.stderr.decode(), p.log()[-3000:])
        assert r.stdout == HELLO
        assert p.metric("proxygate_requests_total", mode="mitm", method="GET", code="200") == 1
        assert "Traceback" not in p.log()
    finally:
        p.stop()


def _chainFiles(folder: Path) -> tuple[Path, Path, Path, Path]:
    """A root, an intermediate CA and a 127.0.0.1 leaf signed by the intermediate (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(subject: str, key, issuer: str, issuerKey, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(commonName(subject))
            .issuer_name(commonName(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            builder = builder.add_extension(x509.SubjectAlternativeName([ip]), critical=False)
        return builder.sign(issuerKey, hashes.SHA256())

    rootKey, midKey, leafKey = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    paths = [folder / name for name in ("root.pem", "mid.pem", "leaf.pem", "leaf.key")]
    certificates = (
        issue("chain test root", rootKey, "chain test root", rootKey, True),
        issue("chain test intermediate", midKey, "chain test root", rootKey, True),
        issue("127.0.0.1", leafKey, "chain test intermediate", midKey, False),
    )
    for path, certificate in zip(paths, certificates, strict=False):
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[3].write_bytes(keyPEM(leafKey))
    return tuple(paths)


@needsCurl
def test_extraCertChainIsSent(tmp_path, origin) -> None:
    """extraCertChain= (as with Twisted's ssl: endpoint): a client trusting only the root works."""
    root, mid, leaf, key = _chainFiles(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={leaf}:extraCertChain={mid}"
    p = ProxyProcess(tmp_path, LOOPBACK_INI, listen=listen).start()
    try:
        r = curl("--proxy", httpsProxy(p), "--proxy-cacert", str(root), origin.url("/echo"))
        assert r.returncode == 0, (r.stderr.decode(), p.log()[-3000:])
    finally:
        p.stop()


def _listenerProblem(tmp_path: Path, options: str) -> str:
    with pytest.raises(ConfigError) as e:
        parseConfig(f"[proxy]\nlisten = ssl:0:interface=127.0.0.1:{options}\n", "t.ini")
    return str(e.value)


@pytest.mark.parametrize(
    "options, problem",
    [
        ("privateKey={key}:certKey={cert}:sslmethod=TLSv1_2_METHOD", "sslmethod= is not supported"),
        ("privateKey={key}:certKey={cert}:dhParameters={key}", "dhParameters= is not supported"),
        ("privateKey={key}:certKey={cert}:ciphers=ALL", "unknown option ciphers="),
        ("privateKey={other}:certKey={cert}", "key values mismatch"),
        ("privateKey={encrypted}:certKey={cert}", "is encrypted (a service cannot type"),
        ("privateKey={key}:certKey={key}", "no PEM certificate in {key}"),
        ("privateKey={cert}:certKey={cert}", "no PEM private key in {cert}"),
        ("privateKey={folder}/absent.key:certKey={cert}", "cannot read {folder}/absent.key"),
        ("privateKey={key}", "no PEM certificate in {key}"),  # certKey defaults to privateKey
    ],
)
def test_listenerFilesCheckedAtStartUp(pki, tmp_path, options, problem) -> None:
    """A bad ssl: listener stops start-up with one line that names the file and the problem."""
    otherKey = ec.generate_private_key(ec.SECP256R1())
    other, encrypted = tmp_path / "other.key", tmp_path / "encrypted.key"
    other.write_bytes(keyPEM(otherKey))
    encrypted.write_bytes(
        otherKey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    names = dict(key=pki.key, cert=pki.cert, other=other, encrypted=encrypted, folder=tmp_path)
    message = _listenerProblem(tmp_path, options.format(**names))
    assert message.startswith("t.ini: [proxy] listen: invalid endpoint 'ssl:0:"), message
    assert problem.format(**names) in message, message
    assert "\n" not in message


def test_listenerKeyAndCertificateInOneFile(pki, tmp_path) -> None:
    """Twisted's default: certKey is privateKey, one PEM file holding both."""
    both = tmp_path / "both.pem"
    both.write_bytes(pki.cert.read_bytes() + pki.key.read_bytes())
    config = parseConfig(f"[proxy]\nlisten = ssl:0:interface=127.0.0.1:privateKey={both}\n")
    assert config.proxy.listen[0].startswith("ssl:0:")
