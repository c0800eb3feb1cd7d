# -*- test-case-name: tests.test_clienthello -*-
"""
Read a TLS ClientHello before answering it: the server name and the ALPN offer.

Why: mirroring a client's ALPN offer to the origin (C{[mitm] http2}) means dialling the
origin with the client's list, and answering the client with the origin's choice, *before*
the client's handshake is answered; Python's C{ssl} has no server-side ALPN select
callback, so the offer has to be read from the bytes themselves (mitmproxy does the same).

L{ClientHelloReader} is fed the bytes of the tunnel as they arrive (TLS records may be split
across reads, and the hello across records) and answers None ("need more"), a
L{ClientHello}, or raises L{ClientHelloError} (L{NotTLS} when the first byte is not a TLS
handshake record). It is strict: every length must agree with its container, reserved
values are refused, an extension may appear once, and the hello is bounded
(L{MAX_HELLO} bytes), so what a client controls here is bounded too. It copies nothing it
does not keep: the caller still hands every byte it fed to the TLS layer.

Pure: no I/O, no Twisted; RFC 8446 §4.1.2 (record layer §5.1), RFC 6066 §3 (server_name),
RFC 7301 §3.1 (ALPN).
"""

from __future__ import annotations

from attrs import frozen

__all__ = [
    "MAX_HELLO",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloReader",
    "NotTLS",
    "parseClientHello",
]

#: The largest ClientHello accepted, in bytes of handshake message (header included).
#: Real ones are 200-2,000 bytes (a post-quantum key share adds about 1,200); OpenSSL's own
#: limit for a ClientHello is larger, but a proxy has no reason to hold more per tunnel.
MAX_HELLO = 65536

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_MAX_RECORD = 16384  # TLSPlaintext.length: 2^14 (RFC 8446 §5.1)
_SERVER_NAME = 0
_ALPN = 16
_HOST_NAME = 0


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello; the message says what is wrong."""


class NotTLS(ClientHelloError):
    """The first byte is not a TLS handshake record: not TLS at all (plain HTTP, SSH...)."""


@frozen
class ClientHello:
    """
    What a ClientHello offers that the proxy needs before answering it.

    @ivar serverName: the SNI host name (ASCII, as sent), or None when there is none.
    @ivar alpn: the ALPN protocols offered, in the client's order, or None when the
        client sent no ALPN extension (which is not the same as an empty offer: RFC 7301
        forbids an empty list).
    @ivar size: bytes of the stream the hello took, its records' headers included.
    """

    serverName: str | None
    alpn: tuple[bytes, ...] | None
    size: int


class ClientHelloReader:
    """
    Reassembles the ClientHello from TLS records fed in any pieces.

    Only the handshake payload is kept (at most L{MAX_HELLO} bytes), plus an incomplete
    record header or fragment between reads.
    """

    def __init__(self) -> None:
        self._pending = b""  # bytes of an incomplete record
        self._message = bytearray()  # the handshake payload reassembled so far
        self._consumed = 0  # stream bytes of the complete records
        self._result: ClientHello | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        """
        Take the next bytes of the stream.

        @return: the L{ClientHello} once it is complete (again on later calls), or None
            while more bytes are needed.
        @raise ClientHelloError: the stream is not a ClientHello (L{NotTLS}: not TLS).
        """
        if self._result is not None:
            return self._result
        buf = self._pending + data if self._pending else data
        offset = 0
        while len(buf) - offset >= 5:
            contentType = buf[offset]
            if contentType != _HANDSHAKE:
                if self._consumed == 0 and offset == 0:
                    raise NotTLS(f"the first byte is 0x{contentType:02x}, not a TLS handshake")
                raise ClientHelloError(f"a record of type {contentType} inside the ClientHello")
            if buf[offset + 1] != 3 or buf[offset + 2] > 4:
                raise ClientHelloError(
                    f"record version {buf[offset + 1]}.{buf[offset + 2]} is not TLS"
                )
            length = (buf[offset + 3] << 8) | buf[offset + 4]
            if length == 0:
                raise ClientHelloError("an empty handshake record")
            if length > _MAX_RECORD:
                raise ClientHelloError(f"a record of {length} bytes (more than 2^14)")
            end = offset + 5 + length
            if end > len(buf):
                break
            self._message += buf[offset + 5 : end]
            self._consumed += 5 + length
            offset = end
            hello = self._complete()
            if hello is not None:
                # Records behind the hello (TLS 1.3 early data) are the TLS layer's.
                self._pending = b""
                self._result = hello
                return hello
        if self._consumed == 0 and offset == 0 and buf and buf[0] != _HANDSHAKE:
            raise NotTLS(f"the first byte is 0x{buf[0]:02x}, not a TLS handshake")
        self._pending = bytes(buf[offset:])
        return None

    def _complete(self) -> ClientHello | None:
        message = self._message
        if len(message) < 4:
            return None
        if message[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"handshake message type {message[0]}, not a ClientHello")
        length = int.from_bytes(message[1:4], "big")
        if length + 4 > MAX_HELLO:
            raise ClientHelloError(f"a ClientHello of {length} bytes (more than {MAX_HELLO})")
        if len(message) < 4 + length:
            return None
        if len(message) > 4 + length:
            # A record carrying the hello's end and another message: a client sends nothing
            # after its hello until the server answers.
            raise ClientHelloError("bytes after the ClientHello in its last record")
        serverName, alpn = _parseBody(memoryview(message)[4:])
        return ClientHello(serverName=serverName, alpn=alpn, size=self._consumed)


def parseClientHello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of C{data}, or None if C{data} ends before it does."""
    return ClientHelloReader().feed(data)


class _Cursor:
    """Reads a ClientHello body; every read past its end is a L{ClientHelloError}."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> memoryview:
        if self.end - self.pos < n:
            raise ClientHelloError(f"truncated {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def integer(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, lengthSize: int, what: str) -> _Cursor:
        """A length-prefixed vector, as a cursor over its contents."""
        n = self.integer(lengthSize, f"{what} length")
        start = self.pos
        self.take(n, what)
        return _Cursor(self.data, start, start + n)

    def done(self) -> bool:
        return self.pos == self.end

    def rest(self) -> bytes:
        """What is left, as bytes (consumed)."""
        out = bytes(self.data[self.pos : self.end])
        self.pos = self.end
        return out


def _parseBody(body: memoryview) -> tuple[str | None, tuple[bytes, ...] | None]:
    c = _Cursor(body)
    major, minor = c.take(2, "version")
    if major != 3 or minor < 1:
        # SSL 3.0 (3.0) and older: not something proxygate's TLS would accept.
        raise ClientHelloError(f"ClientHello version {major}.{minor} is too old")
    c.take(32, "random")
    sessionId = c.vector(1, "session id")
    if sessionId.end - sessionId.pos > 32:
        raise ClientHelloError("a session id longer than 32 bytes")
    suites = c.vector(2, "cipher suites")
    count = suites.end - suites.pos
    if count == 0 or count % 2:
        raise ClientHelloError("cipher suites: an empty or odd-length list")
    compression = c.vector(1, "compression methods")
    if compression.done():
        raise ClientHelloError("no compression method")
    if c.done():
        return None, None  # no extensions (TLS 1.2 and older may omit them)
    extensions = c.vector(2, "extensions")
    if not c.done():
        raise ClientHelloError("bytes after the extensions")
    serverName: str | None = None
    alpn: tuple[bytes, ...] | None = None
    seen: set[int] = set()
    while not extensions.done():
        kind = extensions.integer(2, "extension type")
        data = extensions.vector(2, "extension")
        if kind in seen:
            raise ClientHelloError(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            serverName = _serverName(data)
        elif kind == _ALPN:
            alpn = _alpn(data)
    return serverName, alpn


def _serverName(data: _Cursor) -> str | None:
    """RFC 6066 §3: a list with at most one host_name, an ASCII name without NUL."""
    if data.done():
        return None  # an empty extension (a server's answer; tolerated from a client)
    names = data.vector(2, "server name list")
    if not data.done():
        raise ClientHelloError("bytes after the server name list")
    if names.done():
        raise ClientHelloError("an empty server name list")
    host: str | None = None
    while not names.done():
        kind = names.integer(1, "server name type")
        name = names.vector(2, "server name").rest()
        if kind != _HOST_NAME:
            continue  # other name types are skipped (RFC 6066 defines none)
        if host is not None:
            raise ClientHelloError("more than one host_name in server_name")
        if not name or len(name) > 255:
            raise ClientHelloError("an empty or over-long host_name")
        if any(b < 0x21 or b > 0x7E for b in name):
            raise ClientHelloError("a host_name that is not printable ASCII")
        host = name.decode("ascii")
    return host


def _alpn(data: _Cursor) -> tuple[bytes, ...]:
    """RFC 7301 §3.1: a non-empty list of non-empty protocol names."""
    names = data.vector(2, "protocol name list")
    if not data.done():
        raise ClientHelloError("bytes after the protocol name list")
    if names.done():
        raise ClientHelloError("an empty ALPN protocol list")
    offered = []
    while not names.done():
        name = names.vector(1, "protocol name").rest()
        if not name:
            raise ClientHelloError("an empty ALPN protocol name")
        offered.append(name)
    return tuple(offered)
