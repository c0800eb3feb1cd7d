"""
Plain HTTP/1.1 origins on loopback for the forwarding tests.

- L{Origin} is a threaded HTTP/1.1 origin with deterministic payloads (C{/bytes/N}), an echo
  of what it received (C{/echo}), chosen statuses (C{/status/N}), chunked (C{/chunked/N})
  and close-delimited (C{/close/N}) responses and a streaming upload sink (C{/sink}).
- L{RawOrigin} is a socket-level origin that records the exact bytes it receives and
  replies with scripted bytes.
- L{SinkOrigin} reads uploads as a stream (optionally slowly) and answers their length and
  sha256: 1 GB uploads cost it nothing.

All bind port 0 (C{port} is the one they got); every thread is a daemon.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.payload import payloadChunks

__all__ = ["Origin", "OriginHandler", "RawOrigin", "SinkOrigin"]


class OriginHandler(BaseHTTPRequestHandler):
    """The paths of L{Origin} (see the module docstring); it records each request."""

    protocol_version = "HTTP/1.1"
    server_version = "origin/1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(out)
        if length:
            return self.rfile.read(int(length))
        return b""

    def _handle(self) -> None:
        path = self.path
        self.server.requests.append((self.command, path, list(self.headers.items())))
        if path.startswith("/bytes/"):
            n = int(path.split("/")[2].split("?")[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                for chunk in payloadChunks(n):
                    self.wfile.write(chunk)
        elif path.startswith("/chunked/"):
            n = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in payloadChunks(n, 10000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif path.startswith("/close/"):
            n = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in payloadChunks(n):
                self.wfile.write(chunk)
            self.close_connection = True
        elif path.startswith("/status/"):
            code = int(path.split("/")[2])
            body = self._body()
            self.send_response(code)
            if code not in (204, 304) and code >= 200:
                self.send_header("Content-Length", "0")
            self.end_headers()
            del body
        elif path.startswith("/sink"):
            h = hashlib.sha256()
            total = 0
            # Stream the body without keeping it: large uploads.
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = self._body()
                h.update(data)
                total = len(data)
            elif length:
                remaining = int(length)
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    h.update(chunk)
                    remaining -= len(chunk)
                    total += len(chunk)
            body = json.dumps({"bytes": total, "sha256": h.hexdigest()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:  # /echo and anything else
            body = self._body()
            doc = {
                "method": self.command,
                "path": path,
                "version": self.request_version,
                "headers": list(self.headers.items()),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
                "peer": self.client_address[0],
                "port": self.client_address[1],
            }
            out = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle

    def do_TRACE(self) -> None:
        self._handle()


class Origin(ThreadingHTTPServer):
    """L{OriginHandler} on 127.0.0.1 (or another loopback address: C{::1}), in a thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1"):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), OriginHandler)
        self.requests: list = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "/") -> str:
        host = self.server_address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class RawOrigin:
    """
    Accepts connections, records every byte received on each, and answers each connection
    with a scripted response once it has seen a complete head (or immediately, if asked).
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.closeAfter = True
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        record = bytearray()
        self.received.append(record)
        conn.settimeout(5)
        try:
            while b"\r\n\r\n" not in record:
                data = conn.recv(65536)
                if not data:
                    return
                record += data
            time.sleep(0.05)  # let a body that follows arrive, for the record
            conn.settimeout(0.1)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    record += data
            except OSError:
                pass
            conn.sendall(self.response)
            if self.closeAfter:
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.05)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class SinkHandler(BaseHTTPRequestHandler):
    """
    POST/PUT /sink: read the body (Content-Length or chunked) as a stream and answer with
    its length and sha256. ?rate=B&slow=S reads at B bytes/s for the first S seconds.
    Reads are never collected, so 1 GB uploads cost nothing here.
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        rate = float(query.get("rate", ["0"])[0])
        slowUntil = time.monotonic() + float(query.get("slow", ["0"])[0])
        h = hashlib.sha256()
        total = 0
        te = self.headers.get("Transfer-Encoding", "").lower()

        def consume(n: int) -> None:
            nonlocal total
            while n:
                piece = self.rfile.read(min(n, 65536))
                if not piece:
                    raise ConnectionError("short body")
                h.update(piece)
                total += len(piece)
                n -= len(piece)
                if rate and time.monotonic() < slowUntil:
                    time.sleep(len(piece) / rate)

        if te == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                consume(size)
                assert self.rfile.readline() == b"\r\n"
        elif te:
            self.send_error(501)
            return
        else:
            consume(int(self.headers.get("Content-Length", "0")))
        body = json.dumps(
            {
                "bytes": total,
                "sha256": h.hexdigest(),
                "te": te,
                "cl": self.headers.get("Content-Length"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST


class SinkOrigin(ThreadingHTTPServer):
    """L{SinkHandler} on 127.0.0.1, in a thread."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), SinkHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "/sink") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
