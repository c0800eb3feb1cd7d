"""
WebSocket through the proxy: over CONNECT (ws:// and wss://, with websocket-client) and as an
absolute-form Upgrade (a hand-written client on a raw socket), with messages from 1 byte to
10 MB; the upgrade handshake kept for its hop, a refused upgrade continuing as plain HTTP,
and no byte of HTTP ever written into the pipe after the 101.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time

import pytest
import websocket

from tests.support import LOOPBACK_INI, waitFor
from tests.support.tlsorigin import WebSocketEcho, makeCA
from tests.support.tunnel import readHead, recvAll, recvExactly
from tests.support.wsframes import FrameReader, acceptFor, frameBytes, upgradeRequest

SIZES = [1, 1024, 1 << 20, 10_000_000]


def headerMap(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return makeCA(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def wsEcho():
    s = WebSocketEcho()
    yield s
    s.close()


@pytest.fixture(scope="module")
def wssEcho(tls):
    s = WebSocketEcho(tls)
    yield s
    s.close()


def upgrade(proxyPort: int, originPort: int, path: str = "/", early: bytes = b""):
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", proxyPort), timeout=30)
    sock.sendall(upgradeRequest(originPort, key, path) + early)
    status, headers, rest = readHead(sock)
    return sock, status, headers, rest, key


# -- through CONNECT (websocket-client) ----------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_websocketThroughConnect(proxy, wsEcho, wssEcho, tls, scheme, size):
    echo = wsEcho if scheme == "ws" else wssEcho
    before = proxy.metric("proxygate_requests_total", mode="forward", method="CONNECT", code="200")
    ws = websocket.create_connection(
        echo.url("localhost"),
        http_proxy_host="127.0.0.1",
        http_proxy_port=proxy.port,
        proxy_type="http",
        sslopt={"ca_certs": str(tls.caCert)},
        timeout=30,
    )
    try:
        data = os.urandom(size)
        ws.send_binary(data)
        assert ws.recv() == data
        ws.send("text ✓")
        assert ws.recv() == "text ✓"
    finally:
        ws.close()
    # The CONNECT is counted when its tunnel ends, a moment after the close.
    assert waitFor(
        lambda: (
            proxy.metric("proxygate_requests_total", mode="forward", method="CONNECT", code="200")
            == before + 1
        ),
        5,
    ), "the client did not go through the proxy"


# -- absolute-form Upgrade (hand-written client) -------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_websocketAbsoluteFormUpgrade(proxy, wsEcho, size):
    before = proxy.metric("proxygate_websocket_upgrades_total", result="ok")
    sock, status, headers, rest, key = upgrade(proxy.port, wsEcho.port)
    with sock:
        assert status == 101
        h = headerMap(headers)
        assert h["upgrade"].lower() == "websocket"
        assert "upgrade" in h["connection"].lower()
        assert h["sec-websocket-accept"] == acceptFor(key)
        assert "content-length" not in h and "transfer-encoding" not in h
        reader = FrameReader(sock, rest)
        data = os.urandom(size)
        sock.sendall(frameBytes(data))
        opcode, got = reader.message()
        assert opcode == websocket.ABNF.OPCODE_BINARY
        assert got == data
        sock.sendall(frameBytes("hé".encode(), websocket.ABNF.OPCODE_TEXT))
        assert reader.message() == (websocket.ABNF.OPCODE_TEXT, "hé".encode())
        # A clean close: the server answers the close frame, then the pipe closes.
        sock.sendall(frameBytes(struct.pack("!H", 1000), websocket.ABNF.OPCODE_CLOSE))
        opcode, payload = reader.message()
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert payload[:2] == struct.pack("!H", 1000)
        assert bytes(reader.buf) + recvAll(sock) == b""
    assert proxy.metric("proxygate_websocket_upgrades_total", result="ok") == before + 1


def test_framesRightBehindTheUpgradeRequest(proxy, wsEcho):
    """Frames the client pipelines behind its request reach the origin after the 101."""
    early = frameBytes(b"early bird")
    sock, status, _, rest, _ = upgrade(proxy.port, wsEcho.port, early=early)
    with sock:
        assert status == 101
        assert FrameReader(sock, rest).message() == (websocket.ABNF.OPCODE_BINARY, b"early bird")


def _scripted101(record: list, after: bytes = b"", then: str = "close"):
    """A raw origin: read the request head, answer 101 (+ bytes), then act."""

    def handler(srv, conn):
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        record.append(buf)
        key = ""
        for line in buf.decode("latin-1").split("\r\n"):
            if line.lower().startswith("sec-websocket-key:"):
                key = line.split(":", 1)[1].strip()
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + acceptFor(key).encode() + b"\r\n\r\n" + after
        )
        if then == "reset":
            time.sleep(0.2)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif then == "echo-after-eof":
            got = recvAll(conn)
            conn.sendall(b"bye:" + got)
            conn.shutdown(socket.SHUT_WR)
        elif then == "close":
            time.sleep(0.2)

    return handler


def test_upgradeHeadersKeptForTheHop(proxy, server):
    record: list = []
    s = server(_scripted101(record, b"", "echo-after-eof"))
    sock, status, headers, _rest, key = upgrade(proxy.port, s.port, path="/chat?room=1")
    with sock:
        assert status == 101
        h = headerMap(headers)
        assert h["upgrade"] == "websocket"
        assert h["connection"].lower() == "upgrade"
        assert h["sec-websocket-accept"] == acceptFor(key)
    assert record
    lines = record[0].decode("latin-1").split("\r\n")
    assert lines[0] == "GET /chat?room=1 HTTP/1.1"
    sent = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            sent[name.strip().lower()] = value.strip()
    assert sent["upgrade"] == "websocket"
    assert sent["connection"].lower() == "upgrade"
    assert sent["sec-websocket-key"] == key
    assert sent["sec-websocket-version"] == "13"
    assert sent["host"] == f"127.0.0.1:{s.port}"


@pytest.mark.parametrize("then", ["close", "reset"])
def test_abruptOriginCloseAfter101InjectsNothing(proxy, server, then):
    """After the 101 the proxy writes nothing of its own: no error page, no chunk."""
    payload = b"\x81\x05hello"
    s = server(_scripted101([], payload, then))
    sock, status, _, rest, _ = upgrade(proxy.port, s.port)
    with sock:
        assert status == 101
        got = bytearray(rest)
        sock.settimeout(10)
        try:
            got += recvAll(sock)
        except ConnectionResetError:
            pass
    if then == "close":
        assert bytes(got) == payload
    else:
        assert payload.startswith(bytes(got)), got  # possibly cut by the reset, never added to


def test_halfCloseInsideUpgradedPipe(proxy, server):
    s = server(_scripted101([], b"", "echo-after-eof"))
    sock, status, _, rest, _ = upgrade(proxy.port, s.port)
    with sock:
        assert status == 101
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert rest + recvAll(sock) == b"bye:last words"


def test_refusedUpgradeContinuesAsHTTP(proxy, origin):
    before = proxy.metric("proxygate_websocket_upgrades_total", result="refused")
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with sock:
        sock.sendall(upgradeRequest(origin.port, key, "/echo"))
        status, headers, rest = readHead(sock)
        assert status == 200
        h = headerMap(headers)
        assert "upgrade" not in {t.strip().lower() for t in h.get("connection", "").split(",")}
        body = rest + recvExactly(sock, int(h["content-length"]) - len(rest))
        doc = json.loads(body)
        seen = {name.lower(): value for name, value in doc["headers"]}
        assert seen["upgrade"] == "websocket"  # the request kept its upgrade for the hop
        # Same connection, next request: still HTTP.
        sock.sendall(
            f"GET http://127.0.0.1:{origin.port}/bytes/10 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode()
        )
        status, headers, rest = readHead(sock)
        assert status == 200
        assert rest + recvExactly(sock, 10 - len(rest)) != b""
    assert proxy.metric("proxygate_websocket_upgrades_total", result="refused") == before + 1


def test_unasked101Is502(proxy, server):
    s = server(_scripted101([], b"junk"))
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with sock:
        sock.sendall(
            f"GET http://127.0.0.1:{s.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n\r\n".encode()
        )
        status, _headers, rest = readHead(sock)
        assert status == 502
        assert b"junk" not in rest


def test_websocketOverConnectCountsATunnel(startProxy, wsEcho):
    p = startProxy()
    ws = websocket.create_connection(
        wsEcho.url("127.0.0.1"),
        http_proxy_host="127.0.0.1",
        http_proxy_port=p.port,
        proxy_type="http",
        timeout=10,
    )
    try:
        assert p.metric("proxygate_tunnels") == 1
        ws.send("x")
        assert ws.recv() == "x"
    finally:
        ws.close()
    assert waitFor(lambda: p.metric("proxygate_tunnels") == 0, 5)
    assert p.metric("proxygate_tunnels_total", result="ok") == 1


def test_upgradeToDeadOriginIs502AndCounted(startProxy):
    p = startProxy()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    sock, status, _headers, _rest, _ = upgrade(p.port, port)
    with sock:
        assert status == 502
    assert p.metric("proxygate_websocket_upgrades_total", result="error") == 1
    assert p.metric("proxygate_websocket_upgrades_total", result="ok") == 0


def test_idleUpgradedPipeJustCloses(startProxy, wsEcho):
    """The idle timeout on an upgraded pipe closes it: no 408/504 written into it."""
    p = startProxy(LOOPBACK_INI + "idle_timeout = 1\n")
    sock, status, _, rest, _ = upgrade(p.port, wsEcho.port)
    with sock:
        assert status == 101
        assert rest == b""
        started = time.monotonic()
        sock.settimeout(6)
        try:
            assert recvAll(sock) == b""
        except ConnectionResetError:
            pass
        assert 0.8 <= time.monotonic() - started < 3.5
