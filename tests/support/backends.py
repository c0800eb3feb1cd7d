"""
Loopback backends for the inbound gateway's tests: what a route forwards to.

L{EchoBackend} is a threaded HTTP/1.1 server on 127.0.0.1 (a free port, or the one given)
that answers:

- any request: JSON with the backend's name, the method, the path (the request target as
  received), the version, every header as received (name spelling and order kept), and the
  body's length and SHA-256;
- the same, with the headers a test asks for through request headers: C{X-Echo-Status},
  C{X-Echo-Location}, C{X-Echo-Content-Location}, C{X-Echo-Refresh}, C{X-Echo-Set-Cookie}
  (so a test drives Location rewriting with C{curl -H});
- C{/upload}: the body streamed (Content-Length or chunked, 1 MiB at a time, nothing kept),
  answered with its byte count and SHA-256: a 200 MB upload costs no memory;
- C{/health}: 200 while C{healthy} is true, else 503;
- a WebSocket upgrade on any path: 101, then every frame echoed (text, binary,
  continuation), pings answered, the close handshake completed.

C{stop()} closes the listening socket and every open connection (the backend is down:
connections are refused); C{start()} listens again on the same port (it comes back).
Every thread is a daemon; every blocking read has a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["EchoBackend", "websocketAccept"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ECHOED = {
    "x-echo-location": "Location",
    "x-echo-content-location": "Content-Location",
    "x-echo-refresh": "Refresh",
    "x-echo-set-cookie": "Set-Cookie",
}


def websocketAccept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo-backend/1"
    timeout = 30  # a socket timeout on every read: a stuck test cannot hang a thread forever

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.backend._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.backend._closed(self.connection)

    # -- bodies --------------------------------------------------------------------------

    def _bodyChunks(self):
        """The request body, 1 MiB at a time, whatever its framing."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                while size:
                    chunk = self.rfile.read(min(size, 1 << 20))
                    if not chunk:
                        return
                    size -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def _digest(self) -> tuple[int, str]:
        h = hashlib.sha256()
        total = 0
        for chunk in self._bodyChunks():
            h.update(chunk)
            total += len(chunk)
        return total, h.hexdigest()

    def _json(self, status: int, doc: dict, extra: dict[str, str] | None = None) -> None:
        out = json.dumps(doc).encode()
        self.send_response(status)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    # -- requests ------------------------------------------------------------------------

    def _handle(self) -> None:
        backend = self.server.backend
        headers = list(self.headers.items())
        backend.requests.append({"method": self.command, "path": self.path, "headers": headers})
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
            return
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._digest()
            ok = backend.healthy
            self._json(200 if ok else 503, {"backend": backend.name, "healthy": ok})
            return
        length, digest = self._digest()
        if path == "/upload":
            self._json(200, {"backend": backend.name, "bytes": length, "sha256": digest})
            return
        extra = {_ECHOED[name.lower()]: value for name, value in headers if name.lower() in _ECHOED}
        status = int(self.headers.get("X-Echo-Status", "200"))
        doc = {
            "backend": backend.name,
            "method": self.command,
            "path": self.path,
            "version": self.request_version,
            "headers": headers,
            "body_length": length,
            "body_sha256": digest,
            "peer": self.client_address[0],
        }
        self._json(status, doc, extra)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle

    # -- WebSocket -----------------------------------------------------------------------

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocketAccept(key))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self.server.backend.websockets += 1
        while True:
            frame = self._readFrame()
            if frame is None:
                return
            fin, opcode, payload = frame
            if opcode == 0x8:  # close: answer with the same code, then end
                self._sendFrame(True, 0x8, payload[:2])
                return
            if opcode == 0x9:  # ping
                self._sendFrame(True, 0xA, payload)
            elif opcode in (0x0, 0x1, 0x2):
                self._sendFrame(fin, opcode, payload)

    def _readExactly(self, n: int) -> bytes | None:
        data = self.rfile.read(n)
        return data if len(data) == n else None

    def _readFrame(self) -> tuple[bool, int, bytes] | None:
        head = self._readExactly(2)
        if head is None:
            return None
        fin, opcode = bool(head[0] & 0x80), head[0] & 0x0F
        length = head[1] & 0x7F
        if length == 126:
            more = self._readExactly(2)
            length = struct.unpack("!H", more)[0] if more else None
        elif length == 127:
            more = self._readExactly(8)
            length = struct.unpack("!Q", more)[0] if more else None
        if length is None:
            return None
        mask = self._readExactly(4) if head[1] & 0x80 else b""
        payload = self._readExactly(length) if length else b""
        if mask is None or payload is None:
            return None
        if mask:
            key = (mask * (length // 4 + 1))[:length]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
                length, "big"
            )
        return fin, opcode, payload

    def _sendFrame(self, fin: bool, opcode: int, payload: bytes) -> None:
        n = len(payload)
        first = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack("!BB", first, n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", first, 126, n)
        else:
            head = struct.pack("!BBQ", first, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class EchoBackend:
    """See the module docstring. C{name} is in every JSON answer (which backend answered)."""

    def __init__(self, name: str = "backend", port: int = 0, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = port
        self.healthy = True
        self.requests: list[dict] = []
        self.websockets = 0
        self.accepted = 0  # connections accepted: how many a client (a gateway's pool) opened
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> EchoBackend:
        """Listen (again, on the same port once it has one)."""
        if self._server is not None:
            return self
        _Server.address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = _Server((self.host, self.port), _Handler)
        server.backend = self
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: no more connections accepted, the open ones closed."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    close = stop

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            self.accepted += 1

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
