"""
CONNECT tunnels end to end: real clients (curl, requests, openssl s_client) through the
proxy under twistd to loopback origins, the refusals and their exact statuses, byte-exact
relaying both ways, early data, half-close, timeouts, backpressure and many tunnels at once.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
import requests

from tests.support import LOOPBACK_INI, ProxyProcess, payloadChunks, payloadDigest, rss, waitFor
from tests.support.tlsorigin import HELLO, HTTPSOrigin, makeCA
from tests.support.tunnel import TCPServer, echoHandler, openTunnel, readHead, recvAll, recvExactly

MB = 1 << 20


def sourceHandler(n: int):
    """An origin that sends n payload bytes as fast as it can, then closes."""

    def handler(server: TCPServer, conn: socket.socket) -> None:
        for chunk in payloadChunks(n):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(10)
        try:
            conn.recv(1)  # wait for the other side's close
        except OSError:
            pass

    return handler


def recordHandler(server: TCPServer, conn: socket.socket) -> None:
    """Read everything until EOF, record it, answer its length and digest, close."""
    data = recvAll(conn)
    server.seen.append(data)
    conn.sendall(b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))


def headerNames(headers) -> set[str]:
    return {name.lower() for name, _ in headers}


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return makeCA(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https(tls):
    o = HTTPSOrigin(tls)
    yield o
    o.close()


@pytest.fixture(scope="module")
def echo():
    s = TCPServer(echoHandler)
    yield s
    s.close()


# -- real clients -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_curlHTTPSThroughConnect(proxy, https, tls, host):
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-x",
            proxy.url,
            "--cacert",
            str(tls.caCert),
            f"https://{host}:{https.port}/",
        ],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == HELLO


def test_curlLargeHTTPSBody(proxy, https, tls):
    n = 5 * MB
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-x",
            proxy.url,
            "--cacert",
            str(tls.caCert),
            f"https://localhost:{https.port}/bytes/{n}",
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).hexdigest() == payloadDigest(n)


def test_requestsHTTPSThroughConnect(proxy, https, tls):
    proxies = {"https": proxy.url, "http": proxy.url}
    with requests.Session() as s:
        r = s.get(
            f"https://localhost:{https.port}/", proxies=proxies, verify=str(tls.caCert), timeout=10
        )
        assert r.status_code == 200
        assert r.content == HELLO
        # Same session, same tunnel: a second request rides the kept-alive TLS connection.
        r = s.get(
            f"https://localhost:{https.port}/bytes/{MB}",
            proxies=proxies,
            verify=str(tls.caCert),
            timeout=10,
        )
        assert hashlib.sha256(r.content).hexdigest() == payloadDigest(MB)


def test_opensslSClientHandshake(proxy, https, tls):
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-proxy",
            f"127.0.0.1:{proxy.port}",
            "-connect",
            f"localhost:{https.port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(tls.caCert),
            "-verify_return_error",
        ],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    text = out.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in text, text + out.stderr.decode(errors="replace")


# -- the 200 and the relay ------------------------------------------------------------------


def test_establishedHasNoLengthHeaders(proxy, echo):
    sock, status, headers, rest = openTunnel(proxy.port, echo.authority)
    with sock:
        assert status == 200
        names = headerNames(headers)
        assert "content-length" not in names
        assert "transfer-encoding" not in names
        assert rest == b""
        sock.sendall(b"ping")
        assert recvExactly(sock, 4) == b"ping"


def test_byteExactBothWays(proxy, echo):
    data = random.Random(7).randbytes(8 * MB + 12345)
    sock, status, _, rest = openTunnel(proxy.port, echo.authority)
    assert status == 200 and rest == b""
    with sock:
        sock.settimeout(20)
        received = bytearray()

        def reader():
            while len(received) < len(data):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                received.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        sock.sendall(data)
        t.join(30)
        assert bytes(received) == data
        # every byte value, both directions
        allBytes = bytes(range(256)) * 4
        sock.sendall(allBytes)
        assert recvExactly(sock, len(allBytes)) == allBytes


def test_ipv6LiteralTarget(proxy, server):
    try:
        s = server(echoHandler, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    sock, status, _, _ = openTunnel(proxy.port, f"[::1]:{s.port}")
    with sock:
        assert status == 200
        sock.sendall(b"over v6")
        assert recvExactly(sock, 7) == b"over v6"


def test_serverSpeaksFirst(proxy, server):
    """An origin that talks before the client (SMTP, SSH banners) is relayed too."""

    def banner(srv, conn):
        conn.sendall(b"220 hello\r\n")
        data = conn.recv(100)
        conn.sendall(b"got " + data)

    s = server(banner)
    sock, status, _, rest = openTunnel(proxy.port, s.authority)
    with sock:
        assert status == 200
        got = rest + recvExactly(sock, len(b"220 hello\r\n") - len(rest))
        assert got == b"220 hello\r\n"
        sock.sendall(b"x")
        assert recvAll(sock) == b"got x"


# -- early data -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [517, 200_000])
def test_earlyDataArrivesFirstAndIntact(proxy, server, size):
    s = server(recordHandler)
    early = random.Random(size).randbytes(size)
    sock, status, _, rest = openTunnel(proxy.port, s.authority, early=early)
    with sock:
        assert status == 200
        assert rest == b""
        sock.sendall(b"after")
        sock.shutdown(socket.SHUT_WR)
        reply = recvAll(sock)
    assert waitFor(lambda: s.seen, 5)
    assert s.seen[0] == early + b"after"
    assert reply == b"%d %s" % (size + 5, hashlib.sha256(early + b"after").hexdigest().encode())


def test_earlyTLSClientHello(proxy, https, tls):
    """A client that sends its ClientHello in the same write as the CONNECT head."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tlsObj = tls.clientContext().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tlsObj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    sock, status, headers, rest = openTunnel(proxy.port, f"localhost:{https.port}", early=hello)
    with sock:
        assert status == 200
        assert "content-length" not in headerNames(headers)
        incoming.write(rest)

        def pump():
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during TLS")
            incoming.write(data)

        while True:
            try:
                tlsObj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        tlsObj.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        response = b""
        while HELLO not in response:
            try:
                response += tlsObj.read(65536)
            except ssl.SSLWantReadError:
                pump()
        assert response.startswith(b"HTTP/1.1 200")


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/x",
        "http://127.0.0.1:443",
        "http://127.0.0.1:443/",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:abc",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:99999",
        "[::1",
        "[::1]",
        "[::1]x:443",
        "user@127.0.0.1:443",
        ":443",
        "*",
    ],
)
def test_badConnectTargetIs400(proxy, target):
    sock, status, _headers, _ = openTunnel(proxy.port, target)
    with sock:
        assert status == 400
        assert recvAll(sock) is not None  # then closed


def expectStatus(port: int, target: str, status: int) -> list[tuple[str, str]]:
    sock, got, headers, rest = openTunnel(port, target)
    with sock:
        assert got == status, f"CONNECT {target}: {got}"
        length = dict((n.lower(), v) for n, v in headers).get("content-length")
        body = rest + recvAll(sock)
        if length is not None:
            assert len(body) == int(length)
        assert b"Traceback" not in body
    return headers


def test_connectPortsDefault443Only(startProxy, echo):
    p = startProxy("[proxy]\ndeny_destinations = 169.254.0.0/16\n")
    expectStatus(p.port, echo.authority, 403)
    assert p.metric("proxygate_denied_total", reason="port") == 1
    assert p.metric("proxygate_tunnels_total", result="denied") == 1


@pytest.mark.parametrize("size", [517, 200_000])
def test_refusalWithEarlyDataStillAnswers(startProxy, echo, size):
    """A ClientHello sent behind a refused CONNECT does not turn the 403 into a reset."""
    p = startProxy("[proxy]\ndeny_destinations = 169.254.0.0/16\n")
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        with sock:
            head = f"CONNECT {echo.authority} HTTP/1.1\r\nHost: {echo.authority}\r\n\r\n"
            try:
                sock.sendall(head.encode() + os.urandom(size))
            except OSError:
                pass  # the proxy may close before reading it all: the 403 is still there
            status, _, _ = readHead(sock)
            assert status == 403


def test_connectPortsNumbersAndRanges(startProxy, server):
    allowedSingle = server(echoHandler)
    inRange = server(echoHandler)
    outside = server(echoHandler)
    low = inRange.port - 1
    ini = (
        "[proxy]\ndeny_destinations = 169.254.0.0/16\n"
        f"connect_ports = 443 {allowedSingle.port}, {low}-{inRange.port + 1}\n"
    )
    assert not (low <= outside.port <= inRange.port + 1) and outside.port != allowedSingle.port
    p = startProxy(ini)
    for s in (allowedSingle, inRange):
        sock, status, _, _ = openTunnel(p.port, s.authority)
        with sock:
            assert status == 200
            sock.sendall(b"ok")
            assert recvExactly(sock, 2) == b"ok"
    expectStatus(p.port, outside.authority, 403)
    assert outside.accepted == 0


def test_destinationPolicyApplies(startProxy, echo):
    # Default deny list: loopback names and addresses are refused before any dial.
    p = startProxy("[proxy]\nconnect_ports = 1-65535\n")
    expectStatus(p.port, echo.authority, 403)
    expectStatus(p.port, f"localhost:{echo.port}", 403)
    expectStatus(p.port, f"[::1]:{echo.port}", 403)
    assert p.metric("proxygate_denied_total", reason="destination") == 3


def test_allowDestinationsApplies(startProxy, server):
    s = server(echoHandler)
    p = startProxy(
        "[proxy]\nconnect_ports = 1-65535\ndeny_destinations =\nallow_destinations = example.com\n"
    )
    expectStatus(p.port, s.authority, 403)
    assert s.accepted == 0


def test_clientAllowListApplies(startProxy, server):
    s = server(echoHandler)
    p = startProxy(LOOPBACK_INI + "allowed_client_cidrs = 10.0.0.0/8\n")
    before = p.metric("proxygate_denied_total", reason="client")  # start-up probe counted
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    with sock:
        sock.sendall(f"CONNECT {s.authority} HTTP/1.1\r\nHost: {s.authority}\r\n\r\n".encode())
        data = recvAll(sock)
    # A 403, or a plain close, never a tunnel.
    assert data == b"" or data.startswith(b"HTTP/1.1 403 ")
    assert s.accepted == 0
    assert p.metric("proxygate_denied_total", reason="client") == before + 1


def test_refusedIs502(startProxy):
    p = startProxy()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    expectStatus(p.port, f"127.0.0.1:{port}", 502)
    assert p.metric("proxygate_upstream_errors_total", reason="refused") == 1
    assert p.metric("proxygate_tunnels_total", result="refused") == 1


def test_dnsFailureIs502(startProxy):
    p = startProxy()
    expectStatus(p.port, "no-such-host.invalid:443", 502)
    assert p.metric("proxygate_upstream_errors_total", reason="dns") == 1


def test_connectTimeoutIs504(startProxy, blackhole):
    p = startProxy(LOOPBACK_INI + "connect_timeout = 1\n")
    started = time.monotonic()
    expectStatus(p.port, f"127.0.0.1:{blackhole}", 504)
    elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 4, elapsed
    assert p.metric("proxygate_upstream_errors_total", reason="timeout") == 1
    assert p.metric("proxygate_tunnels_total", result="timeout") == 1


def test_clientGoneWhileDialling(startProxy, blackhole):
    """The client hangs up before the origin answers: nothing is left behind."""
    p = startProxy(LOOPBACK_INI + "connect_timeout = 2\n")
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    target = f"127.0.0.1:{blackhole}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    time.sleep(0.3)
    # A reset: a plain FIN is a half-close, which CONNECT must honour (the reply and
    # the tunnel may still be wanted), so only a reset says "gone" for sure.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert waitFor(lambda: p.metric("proxygate_tunnels_total", result="client_gone") == 1, 5)
    assert waitFor(lambda: p.metric("proxygate_client_connections") == 0, 5)
    assert p.metric("proxygate_tunnels") == 0


@pytest.mark.parametrize("first", ["ok", "origin-closed"])
def test_connectAfterARequestOnTheSameConnection(proxy, origin, server, echo, first):
    """A keep-alive connection whose previous request succeeded, or got a 502 because its
    origin closed without answering, still opens a working tunnel."""

    def hangUp(srv, conn):
        conn.recv(65536)

    url = origin.url("/bytes/3") if first == "ok" else f"http://{server(hangUp).authority}/"
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, rest = readHead(sock)
        assert status == (200 if first == "ok" else 502)
        length = int(dict((n.lower(), v) for n, v in headers)["content-length"])
        recvExactly(sock, length - len(rest))
        sock.sendall(
            f"CONNECT {echo.authority} HTTP/1.1\r\nHost: {echo.authority}\r\n\r\n".encode()
        )
        status, _, rest = readHead(sock)
        assert status == 200 and rest == b""
        sock.sendall(b"through")
        assert recvExactly(sock, 7) == b"through"


# -- half-close, idle, metrics --------------------------------------------------------------


def test_clientHalfCloseStillGetsReply(proxy, server):
    s = server(recordHandler)
    sock, status, _, _ = openTunnel(proxy.port, s.authority)
    with sock:
        assert status == 200
        sock.sendall(b"question")
        sock.shutdown(socket.SHUT_WR)
        assert recvAll(sock) == b"8 " + hashlib.sha256(b"question").hexdigest().encode()


def test_originHalfCloseClientCanStillSend(proxy, server):
    def speakThenListen(srv, conn):
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        srv.seen.append(recvAll(conn))

    s = server(speakThenListen)
    sock, status, _, rest = openTunnel(proxy.port, s.authority)
    with sock:
        assert status == 200
        got = rest + recvAll(sock)  # EOF from the origin arrives as EOF here
        assert got == b"banner"
        sock.sendall(b"still talking")
        sock.shutdown(socket.SHUT_WR)
        assert waitFor(lambda: s.seen, 5)
        assert s.seen[0] == b"still talking"


def test_originCloseAfterFastBurstReachesSlowClient(proxy, server):
    """
    The origin sends a burst larger than every buffer and closes; the client reads slowly.
    Its EOF must arrive right after the last byte, not at the idle timeout.
    """
    n = 32 * MB
    s = server(sourceHandler(n))
    sock, status, _, rest = openTunnel(proxy.port, s.authority, timeout=30)
    with sock:
        assert status == 200
        h = hashlib.sha256(rest)
        total = len(rest)
        time.sleep(1.0)  # let every buffer fill up
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            h.update(data)
            total += len(data)
        assert total == n
        assert h.hexdigest() == payloadDigest(n)


def test_tunnelEndOverHTTPSProxyIsATLSClose(tmp_path, tls, server):
    """
    Through an HTTPS proxy (an ssl: listener) the end of the origin's stream reaches the
    client as a TLS close_notify, not a bare TCP FIN under TLS (which a TLS client must
    treat as a truncation); the client may still send after it.
    """

    def speakThenListen(srv, conn):
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        srv.seen.append(recvAll(conn))

    s = server(speakThenListen)
    p = ProxyProcess(tmp_path, LOOPBACK_INI, sslFiles=tls).start()
    port = p.port
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock = tls.clientContext().wrap_socket(
            raw, server_hostname="localhost", suppress_ragged_eofs=False
        )
        with sock:
            sock.sendall(f"CONNECT {s.authority} HTTP/1.1\r\nHost: {s.authority}\r\n\r\n".encode())
            status, _, rest = readHead(sock)
            assert status == 200
            got = rest
            while True:
                data = sock.recv(65536)  # SSLEOFError here if the TLS stream were cut
                if not data:
                    break
                got += data
            assert got == b"banner"
            sock.sendall(b"after close_notify")
            time.sleep(0.2)
        assert waitFor(lambda: s.seen, 5)
        assert s.seen[0] == b"after close_notify"
    finally:
        p.stop()


def test_idleTimeoutClosesSilentTunnel(startProxy, server):
    closedAt: list[float] = []

    def waitForEOF(srv, conn):
        conn.settimeout(10)
        recvAll(conn)
        closedAt.append(time.monotonic())

    s = server(waitForEOF)
    p = startProxy(LOOPBACK_INI + "idle_timeout = 1\n")
    sock, status, _, _ = openTunnel(p.port, s.authority)
    with sock:
        assert status == 200
        started = time.monotonic()
        sock.settimeout(6)
        assert recvAll(sock) == b""
        elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 3.5, elapsed
    assert waitFor(lambda: closedAt, 3), "origin side of the tunnel left open"
    assert waitFor(lambda: p.metric("proxygate_tunnels") == 0, 3)


def test_idleTimeoutClosesStuckTunnel(startProxy, server):
    """A client that stops reading altogether: buffers are full, nothing moves, so the
    tunnel is idle and must still be closed, both sides, not left waiting to drain."""
    s = server(sourceHandler(64 * MB))
    p = startProxy(LOOPBACK_INI + "idle_timeout = 1\n")
    sock, status, _, _ = openTunnel(p.port, s.authority)
    with sock:
        assert status == 200
        time.sleep(0.5)
        assert p.metric("proxygate_tunnels") == 1
        assert waitFor(lambda: p.metric("proxygate_tunnels") == 0, 8), "stuck tunnel never closed"
        assert waitFor(lambda: p.metric("proxygate_client_connections") == 0, 3)


def test_halfCloseBeforeEstablished(proxy, server):
    """CONNECT, data and FIN in one go, before the 200: the tunnel still runs both ways."""
    s = server(recordHandler)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with sock:
        head = f"CONNECT {s.authority} HTTP/1.1\r\nHost: {s.authority}\r\n\r\n".encode()
        sock.sendall(head + b"all at once")
        sock.shutdown(socket.SHUT_WR)
        status, _headers, rest = readHead(sock)
        assert status == 200
        reply = rest + recvAll(sock)
    assert reply == b"11 " + hashlib.sha256(b"all at once").hexdigest().encode()


def test_activityKeepsTunnelAlive(startProxy, echo):
    p = startProxy(LOOPBACK_INI + "idle_timeout = 1\n")
    sock, status, _, _ = openTunnel(p.port, echo.authority)
    with sock:
        assert status == 200
        for i in range(10):  # 3 s of traffic every 0.3 s
            sock.sendall(b"%d" % i)
            assert recvExactly(sock, 1) == b"%d" % i
            time.sleep(0.3)


def test_tunnelMetricsAndAccessLog(startProxy, echo):
    p = startProxy()
    socks = []
    for _ in range(3):
        sock, status, _, _ = openTunnel(p.port, echo.authority)
        assert status == 200
        sock.sendall(b"12345")
        assert recvExactly(sock, 5) == b"12345"
        socks.append(sock)
    assert p.metric("proxygate_tunnels") == 3
    for sock in socks:
        sock.close()
    assert waitFor(lambda: p.metric("proxygate_tunnels") == 0, 5)
    assert p.metric("proxygate_tunnels_total", result="ok") == 3
    assert p.metric("proxygate_requests_total", mode="forward", method="CONNECT", code="200") == 3
    assert p.metric("proxygate_transferred_bytes_total", direction="from_client") >= 15
    assert p.metric("proxygate_transferred_bytes_total", direction="to_client") >= 15
    lines = waitFor(lambda: [ln for ln in p.accessLines() if "CONNECT" in ln], 5)
    assert len(lines) == 3
    assert all(f"127.0.0.1:{echo.port}" in ln for ln in lines)


# -- backpressure and volume -----------------------------------------------------------------


#: How long the slow side of a memory test stays slow. A proxy without backpressure fills
#: with what loopback delivers at hundreds of MB/s, over the 30 MB budget in well under a
#: second; the rest of the transfer then runs at full speed, still watched.
SLOW_SECONDS = 3


def _warmIdle(p, echo) -> int:
    """The proxy's RSS after one small tunnel has run (imports and pools warmed up)."""
    sock, status, _, _ = openTunnel(p.port, echo.authority)
    with sock:
        assert status == 200
        data = os.urandom(MB)
        threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()
        assert recvExactly(sock, MB) == data
    time.sleep(0.5)
    return rss(p.pid)


def test_slowReaderKeepsMemoryFlat(startProxy, server, echo):
    n = 200 * MB
    s = server(sourceHandler(n))
    p = startProxy()
    idle = _warmIdle(p, echo)
    sock, status, _, rest = openTunnel(p.port, s.authority, timeout=30)
    peak = idle
    with sock:
        assert status == 200
        h = hashlib.sha256(rest)
        total = len(rest)
        slowUntil = time.monotonic() + SLOW_SECONDS
        while time.monotonic() < slowUntil:  # ~1.6 MB/s
            data = sock.recv(16384)
            h.update(data)
            total += len(data)
            peak = max(peak, rss(p.pid))
            time.sleep(0.01)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            h.update(data)
            total += len(data)
        peak = max(peak, rss(p.pid))
    print(
        f"\nslow reader: proxy RSS idle {idle / MB:.1f} MB, peak {peak / MB:.1f} MB "
        f"(+{(peak - idle) / MB:.1f} MB) for a {n // MB} MB tunnel"
    )
    assert total == n
    assert h.hexdigest() == payloadDigest(n)
    assert peak - idle < 30 * MB


def test_slowOriginKeepsMemoryFlat(startProxy, server, echo):
    """The other way: a fast uploader into a tunnel whose origin reads slowly."""
    n = 200 * MB

    def slowSink(srv, conn):
        h = hashlib.sha256()
        total = 0
        slowUntil = time.monotonic() + SLOW_SECONDS
        while True:
            slow = time.monotonic() < slowUntil
            data = conn.recv(16384 if slow else 1 << 20)
            if not data:
                break
            h.update(data)
            total += len(data)
            if slow:
                time.sleep(0.01)
        conn.sendall(b"%d %s" % (total, h.hexdigest().encode()))

    s = server(slowSink)
    p = startProxy()
    idle = _warmIdle(p, echo)
    sock, status, _, _ = openTunnel(p.port, s.authority, timeout=60)
    peak = idle
    done = threading.Event()

    def upload():
        for chunk in payloadChunks(n):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        done.set()

    with sock:
        assert status == 200
        t = threading.Thread(target=upload, daemon=True)
        t.start()
        while not done.wait(0.1):
            peak = max(peak, rss(p.pid))
        reply = recvAll(sock)
        t.join(5)
    print(
        f"\nslow origin: proxy RSS idle {idle / MB:.1f} MB, peak {peak / MB:.1f} MB "
        f"(+{(peak - idle) / MB:.1f} MB) for a {n // MB} MB upload"
    )
    assert reply == b"%d %s" % (n, payloadDigest(n).encode())
    assert peak - idle < 30 * MB


@pytest.mark.slow
def test_oneGigabyteTunnel(startProxy, server, echo):
    n = 1 << 30
    s = server(sourceHandler(n))
    p = startProxy()
    idle = _warmIdle(p, echo)
    expected = payloadDigest(n)
    sock, status, _, rest = openTunnel(p.port, s.authority, timeout=60)
    peak = idle
    with sock:
        assert status == 200
        h = hashlib.sha256(rest)
        total = len(rest)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        started = time.monotonic()
        lastSample = started
        while True:
            got = sock.recv_into(buf)
            if not got:
                break
            h.update(view[:got])
            total += got
            now = time.monotonic()
            if now - lastSample > 0.25:
                peak = max(peak, rss(p.pid))
                lastSample = now
            assert now - started < 120, "1 GB tunnel took too long"
        elapsed = time.monotonic() - started
    rate = total / MB / elapsed
    print(
        f"\n1 GiB tunnel: {elapsed:.1f} s, {rate:.0f} MB/s; proxy RSS idle {idle / MB:.1f} MB, "
        f"peak {peak / MB:.1f} MB"
    )
    assert total == n
    assert h.hexdigest() == expected
    assert peak - idle < 30 * MB


@pytest.mark.slow
def test_manyIdleTunnels(startProxy):
    n = 5000
    need = 2 * n + 1024  # this process holds both ends' test sockets; the proxy as many
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"open-files hard limit {hard} is below the {need} this test needs")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    s = TCPServer(None, backlog=4096)  # accepts and holds, never reads
    socks: list[socket.socket] = []
    try:
        p = startProxy()
        with open(f"/proc/{p.pid}/limits") as f:
            limit = next(line for line in f if line.startswith("Max open files"))
        assert int(limit.split()[3]) >= need, limit  # the proxy inherited the soft limit
        idle = rss(p.pid)
        started = time.monotonic()
        head = f"CONNECT {s.authority} HTTP/1.1\r\nHost: {s.authority}\r\n\r\n".encode()
        batch = 50
        while len(socks) < n:
            assert time.monotonic() - started < 120, f"only {len(socks)} tunnels in 120 s"
            fresh = []
            for _ in range(min(batch, n - len(socks))):
                c = socket.create_connection(("127.0.0.1", p.port), timeout=20)
                c.sendall(head)
                fresh.append(c)
            for c in fresh:
                status, _headers, rest = readHead(c)
                assert status == 200 and rest == b""
            socks.extend(fresh)
        opened = time.monotonic() - started
        assert waitFor(lambda: s.accepted >= n, 10)
        assert p.metric("proxygate_tunnels") == n
        time.sleep(1)
        used = rss(p.pid)
        print(
            f"\n{n} idle tunnels opened in {opened:.1f} s; proxy RSS {used / MB:.1f} MB "
            f"(idle {idle / MB:.1f} MB, {(used - idle) / n / 1024:.1f} KiB per tunnel)"
        )
        assert used < 250 * MB
        # With all of them open, the proxy still relays a new tunnel promptly.
        echo = TCPServer(echoHandler)
        try:
            sock, status, _, _ = openTunnel(p.port, echo.authority, timeout=10)
            with sock:
                assert status == 200
                sock.sendall(b"still here")
                assert recvExactly(sock, 10) == b"still here"
        finally:
            echo.close()
        for c in socks:
            c.close()
        socks.clear()
        s.close()  # a client FIN is a half-close: the origin's close ends each tunnel
        assert waitFor(lambda: p.metric("proxygate_tunnels") == 0, 60, 0.5)
        assert p.metric("proxygate_tunnels_total", result="ok") == n + 1  # + the check
    finally:
        for c in socks:
            c.close()
        s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
