"""
A recording loopback origin and a strict raw client, for the conformance and fuzz suites.

L{Recorder} accepts connections on 127.0.0.1, records every byte it receives as an ordered
event log (connection opened, bytes, connection closed by the peer), and answers each
request by a script looked up by the request's path: a list of steps such as "read the
body", "send these bytes", "reset the connection", "echo everything from now on". Without
a script it reads the body and answers C{200 ok}, keeping the connection alive (so the
proxy pools it). Because the log is global and ordered, a test takes a L{Recorder.mark}
before it sends anything and later asks L{Recorder.since} for exactly what the origin
received because of it, on every connection, including bytes that should never have come.

L{Client.response} reads one response from a socket and fails on anything that is not
well-formed HTTP/1.1 as RFC 9112 frames it (bad status line, malformed field, CL with TE,
bad chunk framing...), so every answer the proxy gives is checked for shape as it is read.

Every socket is bounded by a timeout; every thread is a daemon.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "OK",
    "Client",
    "Malformed",
    "Recorder",
    "Response",
    "View",
    "parseResponses",
]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Script steps.  A script is a list of these tuples, run in order for one request.
BODY = ("body",)  # read the request body as its own head frames it (lenient)
CLOSE = ("close",)  # FIN after what was sent, stop (the connection is done)
RESET = ("reset",)  # RST (SO_LINGER 0), stop
ECHO = ("echo",)  # from now on echo every byte back until the peer closes (a tunnel)
HOLD = ("hold",)  # from now on only record, until the peer closes


def send(data: bytes) -> tuple:
    return ("send", data)


def sleep(seconds: float) -> tuple:
    return ("sleep", seconds)


DEFAULT = [BODY, send(OK)]


# -- the origin -------------------------------------------------------------------------------


@dataclass
class View:
    """What the origin saw after a mark: bytes per connection, in order of arrival."""

    data: dict[int, bytearray] = field(default_factory=dict)
    opened: list[int] = field(default_factory=list)
    closed: set[int] = field(default_factory=set)
    order: list[int] = field(default_factory=list)  # connection ids in order of first byte

    @property
    def bytes(self) -> bytes:
        """Everything received, connection after connection (in order of first byte)."""
        return b"".join(bytes(self.data[c]) for c in self.order)

    def requestLines(self) -> list[bytes]:
        """Every line that looks like an HTTP request line, on any connection."""
        out = []
        for c in self.order:
            out += re.findall(
                rb"(?m)^[A-Z][!#$%&'*+.^_`|~0-9A-Za-z-]* \S+ HTTP/\d\.\d(?=\r?$)",
                bytes(self.data[c]),
            )
        return out


class Recorder:
    """A scripted, recording HTTP/1.1 origin (see the module docstring)."""

    def __init__(
        self, context: ssl.SSLContext | None = None, default: list[tuple] | None = None
    ) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.authority = f"127.0.0.1:{self.port}"
        self.context = context
        self.scripts: dict[bytes, list[tuple]] = {}
        self.default = default if default is not None else DEFAULT
        self.alpn: list[str | None] = []  # TLS: the protocol each connection selected
        self._events: list[tuple[int, str, bytes]] = []
        self._cond = threading.Condition()
        self._ids = 0
        self._last = time.monotonic()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- test side ----------------------------------------------------------------------

    def script(self, path: bytes | str, steps: list[tuple]) -> None:
        if isinstance(path, str):
            path = path.encode()
        self.scripts[path] = steps

    def mark(self) -> int:
        with self._cond:
            return len(self._events)

    def since(self, mark: int) -> View:
        with self._cond:
            events = self._events[mark:]
        view = View()
        for conn, kind, data in events:
            if kind == "open":
                view.opened.append(conn)
            elif kind == "data":
                if conn not in view.data:
                    view.data[conn] = bytearray()
                    view.order.append(conn)
                view.data[conn] += data
            elif kind == "close":
                view.closed.add(conn)
        return view

    def waitQuiet(self, quiet: float = 0.08, timeout: float = 3.0) -> None:
        """Until nothing has arrived for C{quiet} seconds (at most C{timeout})."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                idle = time.monotonic() - self._last
            if idle >= quiet:
                return
            time.sleep(quiet - idle)

    def waitFor(self, mark: int, predicate: Callable[[View], bool], timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.since(mark)):
                return True
            if time.monotonic() > deadline:
                return False
            with self._cond:
                self._cond.wait(0.05)

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    # -- server side --------------------------------------------------------------------

    def _event(self, conn: int, kind: str, data: bytes = b"") -> None:
        with self._cond:
            self._events.append((conn, kind, data))
            self._last = time.monotonic()
            self._cond.notify_all()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self._cond:
                self._ids += 1
                cid = self._ids
            threading.Thread(target=self._handle, args=(conn, cid), daemon=True).start()

    def _handle(self, conn: socket.socket, cid: int) -> None:
        conn.settimeout(30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            try:
                conn = self.context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                return
            self.alpn.append(conn.selected_alpn_protocol())
        self._event(cid, "open")
        peer = _Peer(conn, cid, self)
        try:
            while peer.serveOne():
                pass
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


class _Peer:
    """One accepted connection: a receive buffer over a recording socket."""

    def __init__(self, conn, cid: int, rec: Recorder) -> None:
        self.conn = conn
        self.cid = cid
        self.rec = rec
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.conn.recv(65536)
        except (ConnectionResetError, TimeoutError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            self.rec._event(self.cid, "close")
            return False
        self.rec._event(self.cid, "data", data)
        self.buf += data
        return True

    def _line(self) -> bytes | None:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if not self._fill():
                return None

    def serveOne(self) -> bool:
        """Read one request head, run its script. False when the connection is done."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return False
        end = self.buf.index(b"\r\n\r\n")
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        first, _, rest = head.partition(b"\r\n")
        parts = first.split(b" ")
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        steps = self.rec.scripts.get(path, self.rec.default)
        for step in steps:
            kind = step[0]
            if kind == "body":
                self._body(rest)
            elif kind == "send":
                self.conn.sendall(step[1])
            elif kind == "sleep":
                time.sleep(step[1])
            elif kind == "close":
                self._finish()
                return False
            elif kind == "reset":
                self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.conn.close()
                self.rec._event(self.cid, "reset")
                return False
            elif kind == "echo":
                if self.buf:
                    self.conn.sendall(bytes(self.buf))
                    self.buf.clear()
                while self._fill():
                    self.conn.sendall(bytes(self.buf))
                    self.buf.clear()
                return False
            elif kind == "hold":
                while self._fill():
                    pass
                return False
        return True

    def _finish(self) -> None:
        """Half-close, then record whatever still comes until the peer closes (bounded)."""
        try:
            if isinstance(self.conn, ssl.SSLSocket):
                self.conn.close()
                return
            self.conn.shutdown(socket.SHUT_WR)
            self.conn.settimeout(2)
            while self._fill():
                pass
        except OSError:
            pass

    def _body(self, rest: bytes) -> None:
        """Read the body the head announces; lenient (this is the recorder, not a judge)."""
        fields = {}
        for line in rest.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                fields.setdefault(name.strip().lower(), value.strip())
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                line = self._line()
                if line is None:
                    return
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    return
                if size == 0:
                    while True:
                        line = self._line()
                        if line is None or line in (b"\r\n", b"\n"):
                            return
                while len(self.buf) < size + 2:
                    if not self._fill():
                        return
                del self.buf[: size + 2]
        length = fields.get(b"content-length")
        if length and length.isdigit():
            n = int(length)
            while len(self.buf) < n:
                if not self._fill():
                    return
            del self.buf[:n]


# -- a strict client-side reader --------------------------------------------------------------


class Malformed(AssertionError):
    """The proxy sent something that is not well-formed HTTP/1.1."""


@dataclass
class Response:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    framing: str = "none"  # none | length | chunked | close
    raw: bytes = b""  # the head as received
    trailers: list[bytes] = field(default_factory=list)  # trailer lines of a chunked body
    interim: list[Response] = field(default_factory=list)

    def all(self, name: str | bytes) -> list[bytes]:
        if isinstance(name, str):
            name = name.encode()
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def get(self, name: str | bytes) -> bytes | None:
        values = self.all(name)
        return values[-1] if values else None

    def tokens(self, name: str | bytes) -> list[bytes]:
        return [t.strip().lower() for v in self.all(name) for t in v.split(b",") if t.strip()]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.framing} {self.headers!r} body={self.body[:60]!r}>"


_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2}) ([\t !-~\x80-\xff]*)")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t !-~\x80-\xff]*?)[ \t]*")


class _Reader:
    def __init__(self, sock: socket.socket, buf: bytearray | None = None) -> None:
        self.sock = sock
        self.buf = buf if buf is not None else bytearray()
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                if b"\n" in out or b"\r" in out:
                    raise Malformed(f"bare CR/LF from the proxy: {out!r}")
                return out
            if not self.fill():
                raise EOFError(f"connection closed mid-line: {bytes(self.buf)!r}")

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self.fill():
                raise EOFError(f"connection closed {n - len(self.buf)} bytes short of the body")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _head(r: _Reader) -> Response:
    line = r.line()
    m = _STATUS.fullmatch(line)
    if m is None:
        raise Malformed(f"bad status line from the proxy: {line!r}")
    raw = [line]
    headers = []
    while True:
        f = r.line()
        raw.append(f)
        if not f:
            break
        fm = _FIELD.fullmatch(f)
        if fm is None:
            raise Malformed(f"bad field line from the proxy: {f!r}")
        headers.append((fm.group(1), fm.group(2)))
    return Response(int(m.group(1)), m.group(2), line[:8], headers, raw=b"\r\n".join(raw) + b"\r\n")


def _read(r: _Reader, method: bytes) -> Response:
    interim = []
    while True:
        resp = _head(r)
        if resp.status >= 200 or resp.status == 101:
            break
        if resp.all("content-length") or resp.all("transfer-encoding"):
            raise Malformed(f"framing on a 1xx: {resp!r}")
        interim.append(resp)
    resp.interim = interim
    te = resp.tokens("transfer-encoding")
    cl = resp.all("content-length")
    if te and cl:
        raise Malformed(f"Content-Length with Transfer-Encoding from the proxy: {resp!r}")
    if len(cl) > 1 or (cl and not re.fullmatch(rb"[0-9]+", cl[0])):
        raise Malformed(f"bad Content-Length from the proxy: {resp!r}")
    if resp.status == 101 or method == b"HEAD" or resp.status in (204, 304):
        if resp.status in (101, 204) and (te or cl):
            raise Malformed(f"framing on a {resp.status}: {resp!r}")
        return resp
    if method == b"CONNECT" and 200 <= resp.status < 300:
        if te or cl:
            raise Malformed(f"framing on a CONNECT 2xx: {resp!r}")
        return resp
    if te:
        if te != [b"chunked"]:
            raise Malformed(f"transfer coding the proxy should not send: {resp!r}")
        resp.framing = "chunked"
        parts = []
        while True:
            size = r.line()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size):
                raise Malformed(f"bad chunk size from the proxy: {size!r}")
            n = int(size, 16)
            if n == 0:
                while True:
                    t = r.line()
                    if not t:
                        break
                    resp.trailers.append(t)
                break
            parts.append(r.exact(n))
            if r.line() != b"":
                raise Malformed("chunk data not followed by CRLF")
        resp.body = b"".join(parts)
    elif cl:
        resp.framing = "length"
        resp.body = r.exact(int(cl[0]))
    else:
        resp.framing = "close"
        while r.fill():
            pass
        resp.body = bytes(r.buf)
        r.buf.clear()
    return resp


def parseResponses(raw: bytes, firstMethod: bytes = b"GET") -> list[Response]:
    """
    Every response in C{raw} (what a proxy sent on one connection), read as strictly as
    L{Client.response} reads them (the first one answering C{firstMethod}, the others GETs);
    raises L{Malformed} or EOFError on anything else.
    """

    class _Buffer:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def recv(self, _n: int) -> bytes:
            out, self.data = self.data, b""
            return out

    reader = _Reader(_Buffer(raw))
    out: list[Response] = []
    while True:
        if not reader.buf and not reader.fill():
            return out
        out.append(_read(reader, firstMethod if not out else b"GET"))


class Client:
    """One raw client connection to the proxy; reads are strict and bounded by C{timeout}."""

    def __init__(self, port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = _Reader(self.sock)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def response(self, method: bytes = b"GET") -> Response:
        """One response (after any 1xx, kept in C{interim}); L{Malformed} or EOFError."""
        return _read(self.reader, method)

    def rest(self, timeout: float = 3.0) -> tuple[bool, bytes]:
        """
        (whether the proxy closed within C{timeout}, the bytes that came before): a proxy
        that is done with a connection sends nothing more and closes it.
        """
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.reader.fill():
                    return True, bytes(self.reader.buf)
        except TimeoutError:
            return False, bytes(self.reader.buf)
        except OSError:
            return True, bytes(self.reader.buf)
        return False, bytes(self.reader.buf)
