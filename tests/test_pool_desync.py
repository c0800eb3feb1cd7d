"""
No response crosses from one client to another through the origin pool (issue 19, item 1).

A buggy origin answers a request with a response that has no body by rule (to HEAD, a 204,
a 304) and then, a moment later, writes more: a body, or a whole second response. Through
a shared proxy, the next request that reuses that connection would read those bytes as its
own answer: another client's. Each shape below runs with the timing of the report (the
second client asks 0.1 s after the first, the stray bytes come 0.3 s after the answer), and
the second client must get its own answer, from its own request.

In process: a pooled connection with bytes waiting unread in its socket is never handed out.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from gateway.proxy.origin import QUARANTINE, OriginConnection, OriginPool
from tests.support import LOOPBACK_INI, readResponse

STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Evil: 1\r\n\r\nEVIL!"


def _origin(first: bytes, stray: bytes, delay: float = 0.3):
    """
    Answers the first request it gets with C{first}, then C{stray} after C{delay} (the
    bug: a request that came meanwhile on that connection is answered after it); every
    other request gets an honest response naming its path.
    """
    answered = 0
    lock = threading.Lock()

    def handle(srv, conn: socket.socket) -> None:
        nonlocal answered
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                with lock:
                    answered += 1
                    buggy = answered == 1
                if buggy:
                    # and on this connection, the next request waits for the stray bytes
                    # (a sequential origin busy writing the body it should not have)
                    conn.sendall(first)
                    time.sleep(delay)
                    _send(conn, stray)
                else:
                    body = b"for " + path
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
                    )

    return handle


def _send(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass


def _ask(port: int, method: bytes, url: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"%b %b HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n" % (method, url))
        if method == b"HEAD":
            s.settimeout(2)
            data = s.recv(65536)
            status = int(data.split(b" ", 2)[1])
            return status, {}, b""
        return readResponse(s)


SHAPES = {
    # HEAD answered with a length and no body (correct), then a stray response
    "head": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 54\r\n\r\n", STRAY, 0.3),
    # a 204 and a 304 whose bodies come later
    "204-with-body": (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", STRAY, 0.3),
    "304-with-body": (
        b"GET",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        b"EVIL!",
        0.3,
    ),
    # a complete 200, then extra bytes in a later segment, while the connection is idle
    # (an ordinary 200 is not held back: bytes that come after its connection served the
    # next request are that request's answer, as through any HTTP/1.1 pool; README)
    "200-then-extra": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", STRAY, 0.05),
    # two 102s, then a 204, then a stray response
    "1xx-then-204": (
        b"GET",
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n",
        STRAY,
        0.3,
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_aStrayResponseNeverReachesAnotherClient(startProxy, server, shape) -> None:
    method, first, stray, delay = SHAPES[shape]
    origin = server(_origin(first, stray, delay))
    proxy = startProxy(LOOPBACK_INI)
    base = f"http://127.0.0.1:{origin.port}".encode()
    results: dict[str, tuple] = {}

    def clientB() -> None:
        time.sleep(0.1)  # A's answer is in; its stray bytes come at 0.3 s
        results["B"] = _ask(proxy.port, b"GET", base + b"/victim")

    b = threading.Thread(target=clientB)
    b.start()
    results["A"] = _ask(proxy.port, method, base + b"/x")
    b.join(15)
    status, headers, body = results["B"]
    assert (status, body) == (200, b"for /victim"), results
    assert "x-evil" not in headers
    # and later: the connection the stray bytes came on is gone, the proxy still serves
    time.sleep(0.5)
    status, headers, body = _ask(proxy.port, b"GET", base + b"/after")
    assert (status, body) == (200, b"for /after")


# -- in process ----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay, f, *args):
        class _Call:
            def active(self) -> bool:
                return False

        return _Call()


def _pooled(pool: OriginPool, quarantined: bool = False):
    """A pooled origin connection over a real socket pair: (connection, its peer socket)."""
    from twisted.internet import tcp
    from twisted.internet.abstract import FileDescriptor

    a, b = socket.socketpair()
    a.setblocking(False)
    transport = tcp.Connection.__new__(tcp.Connection)
    FileDescriptor.__init__(transport)
    transport.socket = a
    transport.connected = True
    transport.aborted = False

    def abort() -> None:
        transport.aborted = True
        transport.connected = False

    transport.abortConnection = abort
    conn = OriginConnection(("http", "o", 80), "the origin o")
    conn.transport = transport
    conn.reusable = True
    conn.quarantined = quarantined
    pool.adopt(conn)
    pool.put(conn)
    return conn, b


def test_bytesWaitingUnreadKeepAConnectionOutOfUse() -> None:
    pool = OriginPool(_Clock())
    conn, peer = _pooled(pool)
    peer.sendall(STRAY)  # arrived, not yet delivered by the reactor
    assert pool.get(("http", "o", 80)) is None
    assert conn.transport.aborted
    clean, cleanPeer = _pooled(pool)
    assert pool.get(("http", "o", 80)) is clean
    cleanPeer.close()


def test_aStrayByteAfterTheEndIsSeenToo() -> None:
    pool = OriginPool(_Clock())
    conn, peer = _pooled(pool)
    peer.sendall(b"x")
    peer.shutdown(socket.SHUT_WR)
    assert pool.get(("http", "o", 80)) is None
    assert conn.transport.aborted


def test_aQuarantinedConnectionWaitsItsTurn() -> None:
    clock = _Clock()
    pool = OriginPool(clock)
    older, olderPeer = _pooled(pool)
    newer, newerPeer = _pooled(pool, quarantined=True)
    assert pool.get(("http", "o", 80)) is older, "the newest is in quarantine: skipped"
    assert pool.get(("http", "o", 80)) is None
    clock.now += QUARANTINE
    assert pool.get(("http", "o", 80)) is newer
    assert olderPeer.fileno() > 0 and newerPeer.fileno() > 0  # (held open until here)
