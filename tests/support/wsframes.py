"""
A hand-written WebSocket client side, for the absolute-form upgrade through the proxy
(C{GET http://host/ HTTP/1.1} + C{Upgrade: websocket}), which WebSocket libraries do not
send: the upgrade request, the expected C{Sec-WebSocket-Accept}, frames to send and a
reader of the server's frames.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct

from websocket import ABNF

__all__ = ["FrameReader", "acceptFor", "frameBytes", "upgradeRequest"]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def acceptFor(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


class FrameReader:
    """Reads the server's (unmasked) frames from a socket, starting with leftover bytes."""

    def __init__(self, sock: socket.socket, rest: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(rest)

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("EOF inside a frame")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._need(2)
        assert not b1 & 0x80, "a server frame must not be masked"
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._need(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._need(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._need(length)

    def message(self) -> tuple[int, bytes]:
        fin, opcode, data = self.frame()
        parts = [data]
        while not fin:
            fin, _, data = self.frame()
            parts.append(data)
        return opcode, b"".join(parts)


def frameBytes(data: bytes, opcode: int = ABNF.OPCODE_BINARY) -> bytes:
    return ABNF.create_frame(data, opcode).format()


def upgradeRequest(port: int, key: str, path: str = "/", host: str = "127.0.0.1") -> bytes:
    return (
        f"GET http://{host}:{port}{path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
