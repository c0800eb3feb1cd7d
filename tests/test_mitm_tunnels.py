"""
Intercepted tunnels that carry no TLS from the client, end to end (issue 19): protocols whose
server speaks first (FTP through ``curl --proxytunnel``, an SMTP-like banner) reach their
client through an intercepting ``twistd proxygate``, and ``passthrough``/``intercept`` take
``host:port`` and ``*:port`` patterns.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from tests.support import LOOPBACK_INI, ProxyProcess
from tests.support.ftpserver import FTPServerProcess, layout
from tests.support.mitmorigin import HTTPSOrigin, OriginPKI
from tests.support.tunnel import TCPServer, openTunnel

CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
}

HELLO = b"hello through an intercepting proxy\n"


def mitmProxy(folder: Path, extra: str = "") -> ProxyProcess:
    proxy = ProxyProcess(folder, LOOPBACK_INI + f"\n[mitm]\nenabled = on\n{extra}").start()
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metricsPort}/ca.pem", timeout=5) as r:
        proxy.ca = folder / f"ca-{proxy.port}.pem"
        proxy.ca.write_bytes(r.read())
    return proxy


@pytest.fixture
def started(tmp_path):
    proxies: list[ProxyProcess] = []

    def start(extra: str = "") -> ProxyProcess:
        p = mitmProxy(tmp_path, extra)
        proxies.append(p)
        return p

    yield start
    for p in proxies:
        p.stop()


@pytest.fixture(scope="module")
def ftpServer(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftp")
    anonymous, _ = layout(root)
    (anonymous / "hello.txt").write_bytes(HELLO)
    server = FTPServerProcess(root)
    yield server
    server.stop()


def test_ftpThroughAnInterceptingProxy(started, ftpServer):
    """curl's FTP through CONNECT: the control and data tunnels both wait for the server."""
    proxy = started()
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--proxytunnel", "-x", proxy.url,
         ftpServer.url("/hello.txt")],
        capture_output=True, timeout=30, env=CLEAN_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == HELLO
    assert proxy.metric("proxygate_tunnels_total", result="ok") >= 1


def test_ftpPassthroughByPortNeedsNoWait(started, ftpServer):
    """passthrough = *:PORT: the control tunnel is blind at once (no server-first wait)."""
    proxy = started(f"passthrough = *:{ftpServer.port}\n")
    sock, status, _, _ = openTunnel(proxy.port, f"127.0.0.1:{ftpServer.port}")
    with sock:
        assert status == 200
        sock.settimeout(0.8)  # less than the server-first wait
        assert sock.recv(100).startswith(b"220")


def bannerHandler(server: TCPServer, conn: socket.socket) -> None:
    """An SMTP-like server: a greeting first, then an answer to each line."""
    conn.sendall(b"220 smtp.test ESMTP ready\r\n")
    buf = b""
    while True:
        data = conn.recv(4096)
        if not data:
            return
        buf += data
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if line.upper().startswith(b"QUIT"):
                conn.sendall(b"221 bye\r\n")
                return
            conn.sendall(b"250 " + line + b"\r\n")


def test_aServerBannerReachesTheClient(started):
    server = TCPServer(bannerHandler)
    proxy = started()
    try:
        sock, status, _, rest = openTunnel(proxy.port, server.authority)
        with sock:
            assert (status, rest) == (200, b"")
            sock.settimeout(10)
            started_at = time.monotonic()
            banner = sock.recv(100)
            waited = time.monotonic() - started_at
            assert banner == b"220 smtp.test ESMTP ready\r\n"
            assert 0.5 < waited < 5, waited  # the server-first wait, then the relay
            sock.sendall(b"EHLO client.test\r\n")
            assert sock.recv(100) == b"250 EHLO client.test\r\n"
            sock.sendall(b"QUIT\r\n")
            assert sock.recv(100) == b"221 bye\r\n"
    finally:
        server.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return OriginPKI(tmp_path_factory.mktemp("tunnels-pki"))


def certificateThrough(proxy: ProxyProcess, port: int) -> x509.Certificate:
    sock, status, _, _ = openTunnel(proxy.port, f"localhost:{port}")
    assert status == 200
    ctx = ssl._create_unverified_context()
    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_passthroughAndInterceptByPort(started, pki):
    """One host, two ports: passthrough = localhost:A leaves A blind and B intercepted."""
    blind, decrypted = HTTPSOrigin(pki), HTTPSOrigin(pki)
    try:
        proxy = started(
            f"upstream_ca_bundle = {pki.caCert}\npassthrough = localhost:{blind.port}\n"
        )
        assert certificateThrough(proxy, blind.port).issuer == pki.ca.cert.subject
        assert certificateThrough(proxy, decrypted.port).issuer != pki.ca.cert.subject
        only = started(f"upstream_ca_bundle = {pki.caCert}\nintercept = *:{decrypted.port}\n")
        assert certificateThrough(only, blind.port).issuer == pki.ca.cert.subject
        assert certificateThrough(only, decrypted.port).issuer != pki.ca.cert.subject
    finally:
        blind.close()
        decrypted.close()
