"""
TLS interception (MITM) end to end: the real ``twistd proxygate`` with ``[mitm] enabled = on``,
real clients (curl, openssl s_client, requests, websockets) and loopback HTTPS/WSS origins
whose certificates come from a throwaway CA (tests/support/mitmorigin.py).

What is checked: the CA's life cycle (created on first start with a 0600 key, relative paths,
served at /ca.pem and /ca.der, a mismatched or unreadable pair stops start-up with one line),
per-host certificates (SNI, CONNECT host without SNI, IP SANs, ALPN http/1.1 only) that
verifying clients accept, intercept/passthrough patterns, clients that refuse the CA,
verification of the origin (502 + reason + metric; ``verify_upstream = off``), and the
decrypted traffic on the forward path: keep-alive and pooling, 100 MB each way byte for
byte, backpressure, hop-by-hop rules, access log, WebSockets, per-API metrics.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import websocket
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.tls.ca import createCA
from tests.support import (
    LOOPBACK_INI,
    REPO,
    TWISTD,
    ProxyProcess,
    payload,
    payloadChunks,
    payloadDigest,
    rss,
    waitFor,
)
from tests.support.mitmorigin import HTTPSOrigin, OriginPKI, WSSEcho

# Subprocesses (curl, openssl) must not pick up the box's proxy or CA settings.
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    and k not in ("CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
}


def mitmIni(extra: str = "", bundle: Path | str | None = None) -> str:
    text = LOOPBACK_INI + "\n[mitm]\nenabled = on\n"
    if bundle is not None:
        text += f"upstream_ca_bundle = {bundle}\n"
    return text + extra


def fetchCA(proxy: ProxyProcess, folder: Path, name: str = "proxy-ca.pem") -> Path:
    """The proxy's CA as users get it: from /ca.pem on the metrics listener."""
    url = f"http://127.0.0.1:{proxy.metricsPort}/ca.pem"
    with urllib.request.urlopen(url, timeout=5) as r:
        data = r.read()
    path = folder / name
    path.write_bytes(data)
    return path


_sessions: list[requests.Session] = []


def session(proxy: ProxyProcess) -> requests.Session:
    """
    A requests session through the proxy, deaf to the environment (a REQUESTS_CA_BUNDLE
    there would win over C{Session.verify}); closed after the test (L{_closeSessions}).
    """
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"http": proxy.url, "https": proxy.url}
    _sessions.append(s)
    return s


@pytest.fixture(autouse=True)
def _closeSessions(startProxy):
    """
    Close the test's sessions before its proxies stop (this fixture depends on startProxy,
    so it is torn down first): a proxy stopping with idle decrypted connections waits for
    their clients' TLS close_notify until its drain grace runs out (10 s). A response kept
    alive by a reference cycle (a test's frame held by a requests exception's traceback)
    still holds its socket after its session is closed: collect those too.
    """
    yield
    while _sessions:
        _sessions.pop().close()
    gc.collect()


def connectTunnel(proxy: ProxyProcess, target: str, timeout: float = 10) -> socket.socket:
    """A raw CONNECT tunnel through the proxy, after its 200."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"proxy closed the CONNECT: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def tlsThroughProxy(
    proxy: ProxyProcess,
    target: str,
    cafile: Path | None,
    serverHostname: str | None,
    alpn: list[str] | None = None,
) -> ssl.SSLSocket:
    """A TLS connection through a CONNECT tunnel; C{cafile=None} accepts any certificate."""
    ctx = (
        ssl.create_default_context(cafile=str(cafile))
        if cafile
        else ssl._create_unverified_context()
    )
    if cafile is not None and serverHostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    sock = connectTunnel(proxy, target)
    return ctx.wrap_socket(sock, server_hostname=serverHostname)


def peerCertificate(tls: ssl.SSLSocket) -> x509.Certificate:
    return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in ext]


def httpOverSocket(sock, request: bytes) -> tuple[int, bytes]:
    """One request on an open (TLS) socket; the response must have a Content-Length."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed mid-head: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), body


class Body:
    """A streamed request body of payload(n) with a known length (Content-Length, not chunked)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.chunks = payloadChunks(n)
        self.buf = b""

    def __len__(self) -> int:
        return self.n

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buf) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buf += chunk
        out, self.buf = (self.buf, b"") if size < 0 else (self.buf[:size], self.buf[size:])
        return out


# -- origins and the shared proxy -----------------------------------------------------------


@pytest.fixture(scope="module")
def pkiDir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mitm-pki")


@pytest.fixture(scope="module")
def pki(pkiDir) -> OriginPKI:
    """The origins' CA, and leaves for 127.0.0.1 (no SNI) and localhost."""
    return OriginPKI(pkiDir / "good")


@pytest.fixture(scope="module")
def httpsOrigin(pki):
    o = HTTPSOrigin(pki)
    yield o
    o.close()


@pytest.fixture(scope="module")
def wrongNameOrigin(pkiDir, pki):
    """Signed by the trusted CA, but for another name."""
    o = HTTPSOrigin(OriginPKI(pkiDir / "wrong-name", names=("wrong.example",), ca=pki.ca))
    yield o
    o.close()


@pytest.fixture(scope="module")
def otherCAOrigin(pkiDir):
    """The right names, from a CA nobody trusts."""
    o = HTTPSOrigin(OriginPKI(pkiDir / "other-ca"))
    yield o
    o.close()


@pytest.fixture(scope="module")
def wssOrigin(pki):
    o = WSSEcho(pki)
    yield o
    o.close()


@pytest.fixture(scope="module")
def mitmProxy(tmp_path_factory, pki):
    """One intercepting proxy for the tests that only add traffic (metrics are deltas)."""
    folder = tmp_path_factory.mktemp("mitm-proxy")
    p = ProxyProcess(folder, mitmIni(bundle=pki.caCert)).start()
    p.ca = fetchCA(p, folder)
    yield p
    p.stop()


# -- the CA ---------------------------------------------------------------------------------


def test_caCreatedOnFirstStartAndServed(startProxy, tmp_path, pki):
    """Relative paths land next to the INI file; the key is 0600; /ca.pem and /ca.der serve it."""
    proxy = startProxy(mitmIni("ca_cert = ca/proxy.pem\nca_key = ca/private/proxy.key\n"))
    certFile = tmp_path / "ca" / "proxy.pem"
    keyFile = tmp_path / "ca" / "private" / "proxy.key"
    assert certFile.is_file() and keyFile.is_file()
    assert keyFile.stat().st_mode & 0o777 == 0o600
    assert not (REPO / "ca").exists()
    onDisk = x509.load_pem_x509_certificate(certFile.read_bytes())
    assert onDisk.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    base = f"http://127.0.0.1:{proxy.metricsPort}"
    with urllib.request.urlopen(base + "/ca.pem", timeout=5) as r:
        assert r.headers["Content-Type"] == "application/x-pem-file"
        assert x509.load_pem_x509_certificate(r.read()) == onDisk
    with urllib.request.urlopen(base + "/ca.der", timeout=5) as r:
        assert x509.load_der_x509_certificate(r.read()) == onDisk

    # A second start loads the same pair instead of creating a new one.
    proxy.stop()  # twistd re-raises SIGTERM after a clean shutdown: -15
    again = startProxy(mitmIni("ca_cert = ca/proxy.pem\nca_key = ca/private/proxy.key\n"))
    served = fetchCA(again, tmp_path, "again.pem")
    assert x509.load_pem_x509_certificate(served.read_bytes()) == onDisk


def runTwistd(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "proxygate", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _writeCA(certPath: Path, keyPath: Path, certFrom, keyFrom) -> None:
    certPath.write_bytes(certFrom.pem())
    keyPath.write_bytes(
        keyFrom.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyPath.chmod(0o600)


@pytest.mark.parametrize("problem", ["mismatch", "unreadable"])
def test_badCAPairStopsStartup(tmp_path, problem):
    one, two = createCA("one"), createCA("two")
    certPath, keyPath = tmp_path / "ca.pem", tmp_path / "ca.key"
    if problem == "mismatch":
        _writeCA(certPath, keyPath, one, two)
        expected = "does not match"
    else:
        _writeCA(certPath, tmp_path / "unused.key", one, one)
        keyPath.mkdir()  # exists, but cannot be read as a file (root ignores chmod 000)
        expected = "cannot read"
    config = tmp_path / "proxy.ini"
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    config.write_text(
        f"[proxy]\nlisten = tcp:{free}:interface=127.0.0.1\n"
        "[metrics]\nlisten =\n[mitm]\nenabled = on\nca_cert = ca.pem\nca_key = ca.key\n"
    )
    result = runTwistd(config)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if expected in line]
    assert len(lines) == 1, output
    assert str(keyPath) in lines[0] and "[mitm]" in lines[0]
    assert "Traceback" not in output


# -- minted certificates --------------------------------------------------------------------


def test_curlVerifiesAgainstProxyCA(mitmProxy, httpsOrigin):
    url = f"https://localhost:{httpsOrigin.port}/echo"
    ok = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(mitmProxy.ca),
            "-x",
            mitmProxy.url,
            url,
        ],
        capture_output=True,
        env=CLEAN_ENV,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["path"] == "/echo"
    # CURL_CA_BUNDLE works as well as --cacert.
    viaEnv = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-x",
            mitmProxy.url,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ],
        capture_output=True,
        env={**CLEAN_ENV, "CURL_CA_BUNDLE": str(mitmProxy.ca)},
        timeout=30,
    )
    assert viaEnv.stdout == b"200", viaEnv.stderr


def test_requestsVerifiesAgainstProxyCA(mitmProxy, httpsOrigin):
    s = session(mitmProxy)
    for host in ("localhost", "127.0.0.1"):
        r = s.get(
            f"https://{host}:{httpsOrigin.port}/echo?q=1", verify=str(mitmProxy.ca), timeout=10
        )
        assert r.status_code == 200
        assert r.json()["path"] == "/echo?q=1"


def test_sClientVerifyAndALPN(mitmProxy, httpsOrigin):
    """openssl s_client through the proxy: verified against the CA, ALPN http/1.1, never h2."""
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-proxy",
            f"127.0.0.1:{mitmProxy.port}",
            "-connect",
            f"localhost:{httpsOrigin.port}",
            "-servername",
            "localhost",
            "-verify_hostname",
            "localhost",
            "-alpn",
            "h2,http/1.1",
            "-CAfile",
            str(mitmProxy.ca),
        ],
        input=b"",
        capture_output=True,
        env=CLEAN_ENV,
        timeout=30,
    )
    out = result.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in out, out
    assert "ALPN protocol: http/1.1" in out, out
    assert "issuer=O = proxygate, CN = proxygate CA" in out, out


def test_certificateNames(mitmProxy, httpsOrigin):
    """SNI name; the CONNECT host when no SNI; an IP SAN for an IP literal."""
    port = httpsOrigin.port
    with tlsThroughProxy(mitmProxy, f"localhost:{port}", mitmProxy.ca, "localhost") as tls:
        assert sans(peerCertificate(tls)) == ["localhost"]
    # No SNI at all: the certificate is for the CONNECT host.
    with tlsThroughProxy(mitmProxy, f"localhost:{port}", mitmProxy.ca, None) as tls:
        assert sans(peerCertificate(tls)) == ["localhost"]
    # An IP literal: no SNI is sent, the leaf carries an IP SAN that verifies.
    with tlsThroughProxy(mitmProxy, f"127.0.0.1:{port}", mitmProxy.ca, "127.0.0.1") as tls:
        assert sans(peerCertificate(tls)) == ["127.0.0.1"]
        status, body = httpOverSocket(
            tls, f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        )
        assert status == 200 and json.loads(body)["path"] == "/echo"
    # The leaf chains to the CA the proxy serves.
    with tlsThroughProxy(mitmProxy, f"localhost:{port}", None, "localhost", ["h2"]) as tls:
        leaf = peerCertificate(tls)
        ca = x509.load_pem_x509_certificate(mitmProxy.ca.read_bytes())
        assert leaf.issuer == ca.subject
        leaf.verify_directly_issued_by(ca)
        assert tls.selected_alpn_protocol() is None  # h2 alone is never agreed


def test_certificateMetrics(mitmProxy, httpsOrigin):
    issued = mitmProxy.metric("proxygate_mitm_certificates_issued_total")
    hits = mitmProxy.metric("proxygate_mitm_certificate_cache_hits_total")
    name = "mint-once.localhost"  # a fresh SNI name: one leaf, then cache hits
    for _ in range(3):
        with tlsThroughProxy(mitmProxy, f"localhost:{httpsOrigin.port}", mitmProxy.ca, name):
            pass
    assert mitmProxy.metric("proxygate_mitm_certificates_issued_total") == issued + 1
    assert mitmProxy.metric("proxygate_mitm_certificate_cache_hits_total") == hits + 2


def test_untrustingClientFailsProxyKeepsServing(mitmProxy, httpsOrigin):
    url = f"https://localhost:{httpsOrigin.port}/echo"
    with pytest.raises(requests.exceptions.SSLError):
        # verify=True: requests' own (certifi) store, which does not hold the proxy's CA.
        session(mitmProxy).get(url, verify=True, timeout=10)
    # Not TLS at all after the 200: the proxy drops that tunnel only.
    sock = connectTunnel(mitmProxy, f"localhost:{httpsOrigin.port}")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    sock.close()
    r = session(mitmProxy).get(url, verify=str(mitmProxy.ca), timeout=10)
    assert r.status_code == 200


def test_eagerClientHelloBehindConnect(mitmProxy, httpsOrigin):
    """CONNECT head and ClientHello in one packet: the hello is not lost."""
    ctx = ssl.create_default_context(cafile=str(mitmProxy.ca))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    target = f"localhost:{httpsOrigin.port}"
    sock = socket.create_connection(("127.0.0.1", mitmProxy.port), timeout=10)
    with sock:
        sock.sendall(
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + outgoing.read()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        incoming.write(rest)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "proxy closed during the handshake"
                incoming.write(data)
        if outgoing.pending:
            sock.sendall(outgoing.read())
        tls.write(f"GET /echo HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        response = b""
        while True:
            try:
                response += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if b"}" in response:
                break
    assert response.startswith(b"HTTP/1.1 200"), response


# -- which tunnels are decrypted ------------------------------------------------------------


def test_interceptAndPassthroughPatterns(startProxy, tmp_path, pki, httpsOrigin):
    """passthrough wins over intercept; hosts matching no intercept pattern stay blind."""
    proxy = startProxy(
        mitmIni("intercept = 127.0.0.1 *.example\npassthrough = localhost\n", bundle=pki.caCert)
    )
    proxyCA = fetchCA(proxy, tmp_path)
    port = httpsOrigin.port
    origin = x509.load_pem_x509_certificate(pki.certFiles["localhost"].read_bytes())
    # passthrough: the client sees the origin's own certificate, verified by the origin's CA.
    with tlsThroughProxy(proxy, f"localhost:{port}", pki.caCert, "localhost") as tls:
        assert peerCertificate(tls) == origin
    with pytest.raises(ssl.SSLCertVerificationError):
        tlsThroughProxy(proxy, f"localhost:{port}", proxyCA, "localhost")
    # intercepted: the proxy's leaf.
    with tlsThroughProxy(proxy, f"127.0.0.1:{port}", proxyCA, "127.0.0.1") as tls:
        assert peerCertificate(tls).issuer.rfc4514_string() == "CN=proxygate CA,O=proxygate"
    assert waitFor(lambda: any(f"CONNECT localhost:{port}" in x for x in proxy.accessLines()))
    assert not any(f"https://localhost:{port}" in line for line in proxy.accessLines())

    # Only the listed host is intercepted; everything else is a blind tunnel.
    only = startProxy(mitmIni("intercept = localhost\n", bundle=pki.caCert))
    onlyCA = fetchCA(only, tmp_path, "only.pem")
    with tlsThroughProxy(only, f"127.0.0.1:{port}", pki.caCert, "127.0.0.1") as tls:
        assert sans(peerCertificate(tls)) == ["127.0.0.1"]
        assert peerCertificate(tls).issuer == pki.ca.cert.subject
    with tlsThroughProxy(only, f"localhost:{port}", onlyCA, "localhost") as tls:
        assert peerCertificate(tls).issuer != pki.ca.cert.subject


# -- verifying the origin -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["wrongName", "otherCA"])
def test_badOriginCertificateIs502(mitmProxy, request, which):
    origin = request.getfixturevalue(f"{which}Origin")
    before = mitmProxy.metric("proxygate_upstream_errors_total", reason="tls")
    r = session(mitmProxy).get(
        f"https://localhost:{origin.port}/echo", verify=str(mitmProxy.ca), timeout=15
    )
    assert r.status_code == 502
    assert "TLS to the origin localhost failed" in r.text
    reason = "does not match" if which == "wrongName" else "verify failed"
    assert reason in r.text
    assert mitmProxy.metric("proxygate_upstream_errors_total", reason="tls") == before + 1
    assert origin.requests == []  # nothing was sent to an unverified origin


def test_systemTrustRejectsPrivateOrigin(startProxy, tmp_path, httpsOrigin):
    """No upstream_ca_bundle: the system store, which does not know the test CA."""
    proxy = startProxy(mitmIni())
    ca = fetchCA(proxy, tmp_path)
    r = session(proxy).get(f"https://localhost:{httpsOrigin.port}/echo", verify=str(ca), timeout=15)
    assert r.status_code == 502
    assert proxy.metric("proxygate_upstream_errors_total", reason="tls") == 1


def test_verifyUpstreamOff(startProxy, tmp_path, wrongNameOrigin, otherCAOrigin):
    proxy = startProxy(mitmIni("verify_upstream = off\n"))
    ca = fetchCA(proxy, tmp_path)
    s = session(proxy)
    for origin in (wrongNameOrigin, otherCAOrigin):
        r = s.get(f"https://localhost:{origin.port}/echo", verify=str(ca), timeout=15)
        assert r.status_code == 200
    assert proxy.metric("proxygate_upstream_errors_total", reason="tls") == 0


# -- the decrypted traffic ------------------------------------------------------------------


def test_keepAliveInsideTunnelAndPooledOrigin(mitmProxy, pki):
    origin = HTTPSOrigin(pki)
    try:
        tunnels = mitmProxy.metric("proxygate_tunnels_total", result="intercepted")
        s = session(mitmProxy)
        peers = set()
        for i in range(10):
            r = s.get(
                f"https://localhost:{origin.port}/echo?i={i}", verify=str(mitmProxy.ca), timeout=10
            )
            assert r.status_code == 200
            peers.add(r.json()["port"])
            r = s.post(
                f"https://localhost:{origin.port}/sink",
                data=payload(10000 + i),
                verify=str(mitmProxy.ca),
                timeout=10,
            )
            assert r.json()["bytes"] == 10000 + i
        # One tunnel from the client, one TLS connection to the origin.
        assert mitmProxy.metric("proxygate_tunnels_total", result="intercepted") == tunnels + 1
        assert len(peers) == 1
        assert origin.handshakes == 1
        s.close()
        # A new tunnel to the same origin reuses the pooled origin connection.
        r = session(mitmProxy).get(
            f"https://localhost:{origin.port}/echo", verify=str(mitmProxy.ca), timeout=10
        )
        assert r.json()["port"] in peers
        assert origin.handshakes == 1
    finally:
        origin.close()


def test_hopByHopAndRouting(mitmProxy, httpsOrigin):
    port = httpsOrigin.port
    with tlsThroughProxy(mitmProxy, f"localhost:{port}", mitmProxy.ca, "localhost") as tls:
        status, body = httpOverSocket(
            tls,
            f"GET /echo HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: keep-alive, X-Hop\r\n"
            "X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n"
            "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
            "Upgrade-Insecure-Requests: 1\r\nX-End: 2\r\n\r\n".encode(),
        )
        assert status == 200
        headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        for gone in ("x-hop", "keep-alive", "te", "proxy-connection", "proxy-authorization"):
            assert gone not in headers, headers
        assert headers["x-end"] == "2" and headers["upgrade-insecure-requests"] == "1"
        assert headers["via"] == "1.1 proxygate"
        # A Host naming somewhere else does not move the request: the CONNECT target wins.
        status, body = httpOverSocket(tls, b"GET /echo HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
        assert status == 200 and json.loads(body)["path"] == "/echo"
        # Absolute form for another origin inside the tunnel is refused.
        status, _ = httpOverSocket(
            tls, b"GET https://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"
        )
        assert status == 400


def test_accessLogHasHttpsURLs(mitmProxy, httpsOrigin):
    port = httpsOrigin.port
    r = session(mitmProxy).get(
        f"https://localhost:{port}/echo?secret=1", verify=str(mitmProxy.ca), timeout=10
    )
    assert r.status_code == 200
    lines = waitFor(
        lambda: [
            line for line in mitmProxy.accessLines() if f"https://localhost:{port}/echo" in line
        ]
    )
    assert lines and " GET " in lines[-1] and "/200 " in lines[-1]
    assert any(f"CONNECT localhost:{port}" in line for line in mitmProxy.accessLines())


@pytest.mark.slow
def test_100MBDownloadAndUploadByteIdentical(mitmProxy, httpsOrigin):
    n = 100 * 1024 * 1024
    s = session(mitmProxy)
    url = f"https://localhost:{httpsOrigin.port}"
    with s.get(f"{url}/bytes/{n}", verify=str(mitmProxy.ca), stream=True, timeout=60) as r:
        assert r.status_code == 200
        h = hashlib.sha256()
        got = 0
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
            got += len(chunk)
    assert got == n and h.hexdigest() == payloadDigest(n)

    r = s.post(f"{url}/sink", data=Body(n), verify=str(mitmProxy.ca), timeout=120)
    assert r.json() == {"bytes": n, "sha256": payloadDigest(n)}
    # Chunked upload (no length known in advance) on the same tunnel.
    m = 8 * 1024 * 1024
    r = s.post(f"{url}/sink", data=payloadChunks(m), verify=str(mitmProxy.ca), timeout=60)
    assert r.json() == {"bytes": m, "sha256": payloadDigest(m)}


@pytest.mark.slow
def test_slowReaderKeepsMemoryFlat(mitmProxy, httpsOrigin):
    n = 100 * 1024 * 1024
    url = f"https://localhost:{httpsOrigin.port}/bytes/{n}"
    s = session(mitmProxy)
    s.get(f"https://localhost:{httpsOrigin.port}/bytes/1000", verify=str(mitmProxy.ca))
    baseline = rss(mitmProxy.pid)
    with s.get(url, verify=str(mitmProxy.ca), stream=True, timeout=60) as r:
        raw = r.raw
        h = hashlib.sha256()
        got = 0
        peak = 0
        # Read 4 MB, then stall: a proxy without backpressure would buffer the rest.
        while got < n:
            chunk = raw.read(256 * 1024)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
            if got == 4 * 1024 * 1024:
                time.sleep(2)
                peak = max(peak, rss(mitmProxy.pid))
        peak = max(peak, rss(mitmProxy.pid))
    assert got == n and h.hexdigest() == payloadDigest(n)
    assert peak - baseline < 32 * 1024 * 1024, (baseline, peak)


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 1024 * 1024], ids=lambda s: f"{s}B")
def test_websocketThroughMitm(mitmProxy, wssOrigin, size):
    """
    wss:// through a decrypted tunnel: the Upgrade goes on the forward path, the 101 is
    relayed and both legs become one spliced pipe of TLS records re-encrypted each way.

    (websocket-client, not the websockets sync client: the latter reads and writes one
    SSL socket from two threads, and about one connection in a few hundred then never
    sends its handshake request, through this proxy, a blind tunnel or none at all.)
    """
    before = mitmProxy.metric("proxygate_websocket_upgrades_total", result="ok")
    ws = websocket.create_connection(
        f"wss://localhost:{wssOrigin.port}/chat",
        http_proxy_host="127.0.0.1",
        http_proxy_port=mitmProxy.port,
        proxy_type="http",
        sslopt={"ca_certs": str(mitmProxy.ca)},
        timeout=10,
    )
    try:
        data = payload(size)
        ws.send_binary(data)
        assert ws.recv() == data
        text = "é" * (size // 2) or "x"
        ws.send(text)
        assert ws.recv() == text
    finally:
        ws.close()
    assert mitmProxy.metric("proxygate_websocket_upgrades_total", result="ok") == before + 1


def test_perAPIMetrics(mitmProxy, pki):
    origin = HTTPSOrigin(pki)
    try:
        s = session(mitmProxy)
        base = f"https://localhost:{origin.port}"
        for path, size in (("/v1/write/123", 100), ("/v1/write/456?precision=ns", 250)):
            r = s.post(base + path, data=payload(size), verify=str(mitmProxy.ca), timeout=10)
            assert r.status_code == 200
        r = s.get(base + "/status/404", verify=str(mitmProxy.ca), timeout=10)
        assert r.status_code == 404
        labels = {"host": "localhost", "api": "/v1/write/:id"}
        assert mitmProxy.metric("proxygate_api_requests_total", code="200", **labels) >= 2
        assert mitmProxy.metric("proxygate_api_request_bytes_total", **labels) >= 350
        assert mitmProxy.metric("proxygate_api_latency_seconds_count", **labels) >= 2
        assert (
            mitmProxy.metric(
                "proxygate_api_requests_total", host="localhost", api="/status/:id", code="404"
            )
            >= 1
        )
        text = mitmProxy.metrics()
        assert "precision" not in text and "/v1/write/123" not in text
    finally:
        origin.close()


def test_perAPISeriesAreCapped(startProxy, tmp_path, pki, httpsOrigin):
    proxy = startProxy(mitmIni(bundle=pki.caCert))
    ca = fetchCA(proxy, tmp_path)
    s = session(proxy)
    base = f"https://localhost:{httpsOrigin.port}"
    for i in range(520):
        r = s.get(f"{base}/api{chr(97 + i % 26)}{i}/x", verify=str(ca), timeout=10)
        assert r.status_code == 200
    text = proxy.metrics()
    series = {
        line.split("{", 1)[1].split("}")[0]
        for line in text.splitlines()
        if line.startswith("proxygate_api_requests_total{")
    }
    assert len(series) <= 501
    assert proxy.metric("proxygate_api_requests_total", api="other", code="200") >= 19


def test_concurrentClientsThroughMitm(mitmProxy, httpsOrigin):
    """A few clients at once, each on its own keep-alive tunnel, all bodies intact."""
    errors: list = []

    def client(k: int) -> None:
        try:
            s = session(mitmProxy)
            for i in range(10):
                body = payload(170_000 + k * 10 + i)
                r = s.post(
                    f"https://localhost:{httpsOrigin.port}/v1/write/x",
                    data=body,
                    verify=str(mitmProxy.ca),
                    timeout=30,
                )
                doc = r.json()
                assert doc["body_length"] == len(body)
                assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_pipelinedRequestsInsideTunnel(mitmProxy, httpsOrigin):
    port = httpsOrigin.port
    with tlsThroughProxy(mitmProxy, f"localhost:{port}", mitmProxy.ca, "localhost") as tls:
        tls.sendall(
            f"GET /echo?n=1 HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
            f"POST /echo?n=2 HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: 3\r\n\r\nabc"
            f"GET /echo?n=3 HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()
        )
        for n in (1, 2, 3):
            status, body = httpOverSocket(tls, b"")
            assert status == 200 and json.loads(body)["path"] == f"/echo?n={n}"


def test_unreachableOriginInsideTunnel(mitmProxy):
    """The tunnel is decrypted before the origin is dialled: the failure is a 502 inside it."""
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()
    before = mitmProxy.metric("proxygate_upstream_errors_total", reason="refused")
    r = session(mitmProxy).get(f"https://localhost:{closed}/", verify=str(mitmProxy.ca), timeout=10)
    assert r.status_code == 502 and "refused" in r.text
    assert mitmProxy.metric("proxygate_upstream_errors_total", reason="refused") == before + 1


def test_deniedAddressesStayDeniedWhenDecrypted(startProxy, tmp_path, pki, httpsOrigin):
    """Default deny_destinations (loopback): interception must not become a way around it."""
    proxy = startProxy(
        "[proxy]\nconnect_ports = 1-65535\n"
        f"[mitm]\nenabled = on\nupstream_ca_bundle = {pki.caCert}\n"
    )
    ca = fetchCA(proxy, tmp_path)
    seen = len(httpsOrigin.requests)
    for host in ("localhost", "127.0.0.1"):
        try:
            r = session(proxy).get(
                f"https://{host}:{httpsOrigin.port}/echo", verify=str(ca), timeout=10
            )
        except requests.exceptions.ProxyError as e:
            assert "403" in str(e)  # refused at the CONNECT already
        else:
            assert r.status_code == 403  # refused inside the tunnel
    assert len(httpsOrigin.requests) == seen


def test_tunnelIdleBeforeFirstRequestIsNotA408(startProxy, tmp_path, pki, httpsOrigin):
    """A tunnel opened ahead of use waits idle_timeout, not header_timeout, for a request."""
    proxy = startProxy(
        mitmIni(bundle=pki.caCert).replace("[proxy]", "[proxy]\nheader_timeout = 1\n", 1)
    )
    ca = fetchCA(proxy, tmp_path)
    port = httpsOrigin.port
    with tlsThroughProxy(proxy, f"localhost:{port}", ca, "localhost") as tls:
        time.sleep(1.5)  # past header_timeout
        status, _ = httpOverSocket(
            tls, f"GET /echo HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()
        )
        assert status == 200


def test_clientIgnoringCloseNotifyIsDropped(startProxy, tmp_path, pki, httpsOrigin):
    """After Connection: close the proxy's TLS close waits for the client's close_notify;
    a client that never sends it (nor closes) must not hold the connection for ever."""
    proxy = startProxy(
        mitmIni(bundle=pki.caCert).replace("[proxy]", "[proxy]\nidle_timeout = 1\n", 1)
    )
    ca = fetchCA(proxy, tmp_path)
    port = httpsOrigin.port
    held = []
    try:
        for _ in range(3):
            tls = tlsThroughProxy(proxy, f"localhost:{port}", ca, "localhost")
            status, _ = httpOverSocket(
                tls,
                (
                    f"GET /echo HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
                ).encode(),
            )
            assert status == 200
            held.append(tls)  # neither read further nor closed
        assert waitFor(lambda: proxy.metric("proxygate_client_connections") == 0, timeout=8)
    finally:
        for tls in held:
            tls.close()


@pytest.mark.slow
def test_slowOriginUploadKeepsMemoryFlat(mitmProxy, httpsOrigin):
    """The origin stops reading for 3 s: the proxy stops reading the client, not buffering."""
    n = 64 * 1024 * 1024
    s = session(mitmProxy)
    s.get(f"https://localhost:{httpsOrigin.port}/echo", verify=str(mitmProxy.ca), timeout=10)
    baseline = rss(mitmProxy.pid)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(mitmProxy.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = s.post(
            f"https://localhost:{httpsOrigin.port}/slowsink",
            data=Body(n),
            verify=str(mitmProxy.ca),
            timeout=60,
        )
    finally:
        done.set()
        sampler.join(5)
    assert r.json() == {"bytes": n}
    assert peak[0] - baseline < 32 * 1024 * 1024, (baseline, peak[0])


def test_flowingDownloadOutlivesIdleTimeout(startProxy, tmp_path, pki, httpsOrigin):
    """idle_timeout is about silence: a response still flowing after it is not cut."""
    proxy = startProxy(
        mitmIni(bundle=pki.caCert).replace("[proxy]", "[proxy]\nidle_timeout = 1\n", 1)
    )
    ca = fetchCA(proxy, tmp_path)
    n = 8 * 1024 * 1024
    got = 0
    with session(proxy).get(
        f"https://localhost:{httpsOrigin.port}/bytes/{n}", verify=str(ca), stream=True, timeout=30
    ) as r:
        for chunk in r.iter_content(256 * 1024):
            got += len(chunk)
            time.sleep(0.08)  # ~3 s in all, data flowing all along
    assert got == n


def test_nonTLSInsideInterceptedTunnelIsRelayedBlind(mitmProxy, origin):
    """
    Only TLS can be decrypted: a tunnel whose first byte is not a TLS handshake record
    (plain HTTP, ws://, SSH...) is relayed blind to the CONNECT target, as mitmproxy does,
    instead of being dropped by a failed handshake.
    """
    sock = connectTunnel(mitmProxy, f"127.0.0.1:{origin.port}")
    sock.settimeout(10)
    with sock:
        status, body = httpOverSocket(sock, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200
        assert json.loads(body)["path"] == "/echo"
        # Still a tunnel, not the proxy's HTTP: a second request on it reaches the origin.
        status, body = httpOverSocket(sock, b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, len(body)) == (200, 10)
