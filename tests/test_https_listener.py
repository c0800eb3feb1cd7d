"""
The HTTPS proxy listener: an C{ssl:} endpoint in C{[proxy] listen} serves the same proxy
with TLS between the client and proxygate.

Driven with real clients the way users would: curl's C{--proxy https://...
--proxy-cacert ca.pem} and requests with an C{https://} proxy URL, for plain HTTP
(absolute form inside the TLS connection), CONNECT tunnels (TLS inside TLS) and an
intercepted (MITM) CONNECT on that listener (the intercepting TLS layered inside the
listener's TLS). Certificates come from a throwaway CA (L{tlsorigin.makeCA}); the proxy runs
as the real C{twistd -n proxygate} subprocess, stopped by PID.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import LOOPBACK_INI, ProxyProcess, freePort, payload
from tlsorigin import HELLO, HTTPSOrigin, TLSFiles, makeCA

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


def sslListen(port: int, files: TLSFiles) -> str:
    return f"ssl:{port}:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}"


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
        port = freePort()
        p = ProxyProcess(tmp_path, ini, listen=f"{sslListen(port, files)} {extra}".strip())
        p.port = port  # wait for, and talk to, the TLS port
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


def httpsProxy(p: ProxyProcess) -> str:
    return f"https://127.0.0.1:{p.port}"


# -- plain HTTP and CONNECT over a TLS connection to the proxy --------------------------------


@needsCurl
def test_curl_http_through_https_proxy(startTLSProxy, pki, origin) -> None:
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
def test_curl_connect_through_https_proxy(startTLSProxy, pki, httpsOrigin) -> None:
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
def test_curl_refuses_untrusted_proxy_certificate(startTLSProxy, pki, origin) -> None:
    """The client really verifies the proxy: without the CA it cannot even send a request."""
    p = startTLSProxy(pki)
    r = curl("--proxy", httpsProxy(p), origin.url("/echo"))
    assert r.returncode == 60, (r.returncode, r.stderr.decode())  # CURLE_PEER_FAILED_VERIFICATION
    assert not [line for line in p.accessLines() if "GET http://" in line]


# requests does not verify an https:// proxy for http:// URLs (it hands C{verify} to the
# origin's pool only, and urllib3 warns); for https:// URLs it verifies both with C{verify}.
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_requests_through_https_proxy(startTLSProxy, pki, origin, httpsOrigin, tmp_path) -> None:
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
def test_tls_and_plain_listeners_side_by_side(startTLSProxy, pki, origin) -> None:
    """One service, two listeners: ssl: and tcp: serve the same proxy."""
    plainPort = freePort()
    p = startTLSProxy(pki, extra=f"tcp:{plainPort}:interface=127.0.0.1")
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
def test_mitm_on_https_listener(startTLSProxy, pki, httpsOrigin, tmp_path) -> None:
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
