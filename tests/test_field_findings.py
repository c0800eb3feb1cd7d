"""
Field findings of issue 19 that live in the request core, end to end with real clients:

- item 2: an intercepted CONNECT whose client closes before its first byte is released at
  once (not left in CLOSE-WAIT for idle_timeout, holding a max_connections slot);
- item 4: a client that rejects the proxy's CA is visible: tunnels_total{client_tls_error}
  and the TLS alert as the reason in the access log;
- item 8: a CONNECT sent inside an intercepted tunnel is refused (405), not a blind tunnel;
- item 9: an origin sending 1xx without end gets a 502, not an endless relay;
- item 10: every refusal says why (Proxy-Status on 407, on 403 for a port, on 400; the user
  of a denied request in the JSON log; the reason a code, the sentence in detail; the bytes
  of the body sent).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import bcrypt
import pytest

from tests.support import LOOPBACK_INI, readResponse, waitFor
from tests.support.mitmorigin import HTTPSOrigin, OriginPKI
from tests.test_mitm import CLEAN_ENV, fetchCA, mitmIni


def _connect(port: int, target: str, extra: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + extra + b"\r\n")
    return s


def _head(s) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _records(proxy) -> list[dict]:
    return [json.loads(line.partition("] ")[2]) for line in proxy.accessLines()]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> OriginPKI:
    return OriginPKI(tmp_path_factory.mktemp("findings-pki"))


@pytest.fixture(scope="module")
def httpsOrigin(pki):
    o = HTTPSOrigin(pki)
    yield o
    o.close()


def test_interceptedConnectClosedBeforeAByteIsReleasedAtOnce(startProxy, httpsOrigin, pki):
    """200 of them: none lingers, and the next client is served, not told 503."""
    proxy = startProxy(
        mitmIni("[log]\nformat = json\n", bundle=pki.caCert).replace(
            "[proxy]", "[proxy]\nmax_connections = 50\nidle_timeout = 300", 1
        )
    )
    target = f"localhost:{httpsOrigin.port}"
    for _ in range(200):
        s = _connect(proxy.port, target)
        assert _head(s).startswith(b"HTTP/1.1 200 ")
        s.shutdown(socket.SHUT_WR)  # the client leaves before its first byte
        s.close()
    assert waitFor(lambda: proxy.metric("proxygate_client_connections") == 0, 5)
    assert proxy.metric("proxygate_tunnels_total", result="client_gone") == 200
    s = _connect(proxy.port, target)
    assert _head(s).startswith(b"HTTP/1.1 200 "), "not 503: no slot was held"
    s.close()


def test_aClientRejectingTheCAIsCountedAndLogged(startProxy, httpsOrigin, pki, tmp_path):
    proxy = startProxy(mitmIni("[log]\nformat = json\n", bundle=pki.caCert))
    # curl without the proxy's CA: it rejects the certificate and says so with an alert
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", proxy.url, f"https://localhost:{httpsOrigin.port}/"],
        capture_output=True,
        env=CLEAN_ENV,
        timeout=30,
    )  # fmt: skip
    assert out.returncode == 60, out.stderr  # SSL certificate problem
    assert waitFor(
        lambda: proxy.metric("proxygate_tunnels_total", result="client_tls_error") == 1, 5
    )
    assert proxy.metric("proxygate_tunnels_total", result="intercepted") == 0
    (record,) = [r for r in _records(proxy) if r["method"] == "CONNECT"]
    assert record["reason"] == "client_tls"
    assert "unknown ca" in record["detail"].lower() or "certificate" in record["detail"].lower()
    # trusting the CA, the same client is intercepted
    ca = fetchCA(proxy, tmp_path)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(ca), "-x", proxy.url,
         f"https://localhost:{httpsOrigin.port}/"],
        capture_output=True,
        env=CLEAN_ENV,
        timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert waitFor(lambda: proxy.metric("proxygate_tunnels_total", result="intercepted") == 1, 5)


def test_aConnectInsideAnInterceptedTunnelIs405(startProxy, httpsOrigin, pki, tmp_path):
    proxy = startProxy(mitmIni(bundle=pki.caCert))
    ca = fetchCA(proxy, tmp_path)
    s = _connect(proxy.port, f"localhost:{httpsOrigin.port}")
    assert _head(s).startswith(b"HTTP/1.1 200 ")
    context = ssl.create_default_context(cafile=str(ca))
    with context.wrap_socket(s, server_hostname="localhost") as tls:
        tls.sendall(
            b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n"
        )
        status, headers, body = readResponse(tls)
    assert status == 405
    assert headers["proxy-status"] == "proxygate; error=http_request_denied"
    assert b"inspection" in body


def test_endless1xxIsCutWith502(startProxy, server):
    def processing(srv, conn) -> None:
        conn.recv(65536)
        try:
            for _ in range(20000):
                conn.sendall(b"HTTP/1.1 102 Processing\r\n\r\n")
        except OSError:
            pass

    origin = server(processing)
    proxy = startProxy(LOOPBACK_INI)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"GET http://{origin.authority}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 10
        while b"HTTP/1.1 502 " not in data and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"HTTP/1.1 102 Processing") == 50
    assert b"HTTP/1.1 502 " in data
    assert b"over 50 1xx" in data


@pytest.fixture
def authProxy(startProxy, tmp_path):
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "users").write_text(f"alice:{hashed}\n")
    return startProxy(
        LOOPBACK_INI.replace("connect_ports = 1-65535", "connect_ports = 443")
        + "allow_destinations = allowed.example\n"
        + f"[auth]\nhtpasswd = {tmp_path / 'users'}\n[log]\nformat = json\n"
    )


ALICE = b"Proxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n"


@pytest.mark.parametrize(
    "request_, status, proxyStatus, reason",
    [
        (b"GET http://allowed.example/ HTTP/1.1\r\nHost: allowed.example\r\n", 407,
         "http_request_denied", "auth"),
        (b"CONNECT allowed.example:25 HTTP/1.1\r\nHost: allowed.example:25\r\n" + ALICE, 403,
         "http_request_denied", "port"),
        (b"GET http://denied.example/ HTTP/1.1\r\nHost: denied.example\r\n" + ALICE, 403,
         "http_request_denied", "destination"),
        (b"GET http://allowed.example/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + ALICE, 400,
         "http_request_error", "bad_request"),
    ],
)  # fmt: skip
def test_everyRefusalSaysWhy(authProxy, request_, status, proxyStatus, reason) -> None:
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=10) as s:
        s.sendall(request_ + b"\r\n")
        got, headers, body = readResponse(s)
    assert got == status
    assert headers["proxy-status"] == f"proxygate; error={proxyStatus}"
    assert b"Traceback" not in body and b"YWxpY2U6c2VjcmV0" not in body
    record = _records(authProxy)[-1]
    assert (record["code"], record["reason"], record["bytes"]) == (status, reason, len(body))
    assert record["detail"] and record["detail"][0].isupper()
    # a request the credentials passed is logged with its user, refused or not
    assert record["user"] == (None if status == 407 else "alice")
