"""
Draining on SIGTERM (twistd stops the service): the proxy stops accepting at once, closes
idle keep-alive connections, lets tunnels run for the grace period (GatewayService
drainGrace, 10 s by default), then closes every one of them on both sides, and exits 0.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import time

import pytest
import websocket

from tests.support import LOOPBACK_INI, payloadChunks, waitFor
from tests.support.tlsorigin import WebSocketEcho
from tests.support.tunnel import openTunnel, readHead, recvAll, recvExactly
from tests.support.wsframes import FrameReader, upgradeRequest

GRACE = 4.0  # [proxy] drain_grace of these proxies (10 by default)
INI = LOOPBACK_INI + f"drain_grace = {GRACE:g}\n"


def eofWatcher(events: list):
    """An echo origin that notes when its side of the tunnel was closed (EOF or reset)."""

    def handler(srv, conn):
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            events.append(("eof", time.monotonic()))
        except OSError:
            events.append(("reset", time.monotonic()))

    return handler


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def stalled(sent: list[int], quiet: float = 0.3) -> bool:
    """Whether the count in C{sent[0]} stays the same for C{quiet} seconds."""
    before = sent[0]
    time.sleep(quiet)
    return before > 0 and sent[0] == before


@pytest.fixture(scope="module")
def wsEcho():
    s = WebSocketEcho()
    yield s
    s.close()


def test_sigtermDrainsBusyTunnelsThenClosesThem(startProxy, server, origin, wsEcho):
    events: list = []
    s = server(eofWatcher(events))
    p = startProxy(INI)

    tunnel, status, _, _ = openTunnel(p.port, s.authority)
    assert status == 200
    tunnel.settimeout(GRACE + 10)

    # An absolute-form WebSocket upgrade: a pipe that drains like a tunnel.
    key = base64.b64encode(os.urandom(16)).decode()
    ws = socket.create_connection(("127.0.0.1", p.port), timeout=GRACE + 10)
    ws.sendall(upgradeRequest(wsEcho.port, key))
    status, _, rest = readHead(ws)
    assert status == 101
    frames = FrameReader(ws, rest)

    # An idle keep-alive client connection: closed at once on SIGTERM.
    idle = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    idle.sendall(f"GET {origin.url('/bytes/5')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, rest = readHead(idle)
    assert status == 200
    recvExactly(idle, 5 - len(rest))

    p.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    # New connections are refused promptly...
    assert waitFor(lambda: refused(p.port), 3), "still accepting after SIGTERM"
    # ... the idle keep-alive connection is closed ...
    idle.settimeout(3)
    assert recvAll(idle) == b""
    idle.close()
    # ... while the busy tunnel and the WebSocket keep working for a while.
    i = 0
    # (Half the grace period: a loaded machine must not reach its end inside this loop.)
    while time.monotonic() - signalled < GRACE / 2:
        message = b"tick %d " % i * 64
        tunnel.sendall(message)
        assert recvExactly(tunnel, len(message)) == message
        ws.sendall(websocket.ABNF.create_frame(message, websocket.ABNF.OPCODE_BINARY).format())
        assert frames.message() == (websocket.ABNF.OPCODE_BINARY, message)
        i += 1
        time.sleep(0.1)
    assert p.proc.poll() is None, "exited before the grace period"

    # Keep the tunnel busy until the proxy closes it at the end of the grace period.
    closedAt = None
    while closedAt is None:
        try:
            tunnel.sendall(b"busy")
            data = tunnel.recv(4)
            if not data:
                closedAt = time.monotonic()
        except (ConnectionResetError, BrokenPipeError):
            closedAt = time.monotonic()
        else:
            time.sleep(0.05)
        assert time.monotonic() - signalled < GRACE + 8, "tunnel never closed"
    elapsed = closedAt - signalled
    assert GRACE - 1 <= elapsed <= GRACE + 4, elapsed
    # The WebSocket pipe was closed too, not left half-open.
    try:
        assert recvAll(ws) == b""
    except ConnectionResetError:
        pass
    ws.close()
    tunnel.close()

    assert p.proc.wait(timeout=10) == 0
    # The origin side of the tunnel was closed as well: no half-open tunnel left behind.
    assert waitFor(lambda: events, 3), "origin side of the tunnel still open"


def test_drainEndsEarlyOnceTunnelsClose(startProxy, server):
    events: list = []
    s = server(eofWatcher(events))
    p = startProxy(INI)
    tunnel, status, _, _ = openTunnel(p.port, s.authority)
    assert status == 200
    p.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert waitFor(lambda: refused(p.port), 3), "not draining"
    tunnel.sendall(b"still open")
    assert recvExactly(tunnel, 10) == b"still open"
    tunnel.shutdown(socket.SHUT_WR)  # the client is done: the origin echoes EOF back
    assert recvAll(tunnel) == b""
    tunnel.close()
    assert p.proc.wait(timeout=GRACE) == 0
    assert time.monotonic() - signalled < GRACE / 2, "waited for the grace period needlessly"
    assert events and events[0][0] == "eof"


def test_drainClosesStuckTunnel(startProxy, server):
    """A tunnel whose client stopped reading (every buffer full) is still closed, both
    sides, after the grace period, and the proxy exits 0."""
    events: list = []
    sent = [0]

    def flood(srv, conn):
        try:
            for chunk in payloadChunks(1 << 30):
                conn.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            events.append(("closed", time.monotonic()))

    s = server(flood)
    p = startProxy(INI)
    tunnel, status, _, _ = openTunnel(p.port, s.authority)
    assert status == 200
    # Until every buffer is full (the client never reads): the origin's sends stall.
    assert waitFor(lambda: stalled(sent), 10), "the origin never stalled"
    p.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert p.proc.wait(timeout=GRACE + 8) == 0
    assert time.monotonic() - signalled >= GRACE - 1
    assert waitFor(lambda: events, 5), "origin side of the stuck tunnel still open"
    tunnel.close()


def test_tunnelOpenedDuringDrainIsRefused(startProxy, server):
    """While draining the listener is closed: a CONNECT cannot even reach the proxy."""
    s = server(eofWatcher([]))
    p = startProxy(INI)
    keep, status, _, _ = openTunnel(p.port, s.authority)  # keeps the proxy draining
    assert status == 200
    p.proc.send_signal(signal.SIGTERM)
    assert waitFor(lambda: refused(p.port), 3)
    with pytest.raises(ConnectionRefusedError):
        openTunnel(p.port, s.authority, timeout=2)
    keep.shutdown(socket.SHUT_WR)
    assert recvAll(keep) == b""
    keep.close()
    assert p.proc.wait(timeout=GRACE) == 0


def test_stopWithNothingOpenIsQuick(startProxy):
    p = startProxy(INI)
    # The port listens before twistd's reactor runs and installs its SIGTERM handler: make
    # sure it is serving (a metrics scrape) before signalling, or the default action kills it.
    assert p.metric("proxygate_tunnels") == 0
    started = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 3
