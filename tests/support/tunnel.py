"""
Raw TCP origins and a socket-level CONNECT client: what the tunnel tests send and check
byte for byte.

- L{TCPServer} runs a handler per accepted connection in a thread (or holds connections
  open without reading, with no handler); L{echoHandler} echoes until EOF.
- L{openTunnel} sends a CONNECT and reads the proxy's answer head (L{readHead});
  L{recvExactly} and L{recvAll} read what comes through.

Everything binds loopback on port 0, and every thread is a daemon.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["TCPServer", "echoHandler", "openTunnel", "readHead", "recvAll", "recvExactly"]


class TCPServer:
    """
    A loopback TCP server running C{handler(conn)} in a thread per connection; the first
    bytes each connection received are recorded by handlers that want to (C{self.seen}).
    """

    def __init__(self, handler, host: str = "127.0.0.1", backlog: int = 1024) -> None:
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.seen: list[bytes] = []
        self.events: list[str] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(None)
            if self.handler is None:
                self.conns.append(conn)  # hold it open, never read
                continue
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(self, conn)
        except OSError as e:
            self.events.append(f"error: {e!r}")
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()
        self.conns.clear()


def echoHandler(server: TCPServer, conn: socket.socket) -> None:
    """Echo until EOF, then half-close back."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def readHead(sock: socket.socket, limit: int = 65536) -> tuple[int, list[tuple[str, str]], bytes]:
    """Read one response head: (status, [(name, value)], bytes that came after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"closed before a complete head: {buf!r}")
        buf += data
        if len(buf) > limit:
            raise ValueError("head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return status, headers, rest


def openTunnel(
    proxyPort: int,
    authority: str,
    *,
    early: bytes = b"",
    timeout: float = 10.0,
    extra: bytes = b"",
) -> tuple[socket.socket, int, list[tuple[str, str]], bytes]:
    """CONNECT through the proxy: (socket, status, headers, bytes after the head)."""
    sock = socket.create_connection(("127.0.0.1", proxyPort), timeout=timeout)
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode() + extra + b"\r\n"
    sock.sendall(head + early)
    try:
        status, headers, rest = readHead(sock)
    except Exception:
        sock.close()
        raise
    return sock, status, headers, rest


def recvExactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(1 << 20, n - len(out)))
        if not data:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


def recvAll(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return bytes(out)
        out += data
