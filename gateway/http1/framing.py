"""
Where a message body ends (RFC 9112 §6-§7), decided once per message, and the incremental
readers that find that end in a byte stream.

The proxy never relays framing it did not parse: a chunked body is decoded and re-encoded,
a Content-Length body is counted, and anything ambiguous (CL with TE, two different lengths,
`+5`, an unknown coding, an oversized chunk size) is refused before a byte is forwarded.
That single rule is what keeps a client and an origin that frame differently from smuggling
a second request past the proxy.
"""

from __future__ import annotations

import re

from .parse import HTTPError, RequestHead, ResponseHead, splitTokens

__all__ = [
    "CHUNKED",
    "NONE",
    "UNTIL_CLOSE",
    "ChunkedReader",
    "Framing",
    "LengthReader",
    "UntilCloseReader",
    "encodeChunk",
    "requestFraming",
    "responseFraming",
]

NONE = 0
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3


class Framing:
    """How a body is delimited: C{kind} is NONE, LENGTH (with C{length}), CHUNKED or
    UNTIL_CLOSE. Plain slotted class: one is made per message on the hot path."""

    __slots__ = ("kind", "length")

    def __init__(self, kind: int, length: int = 0) -> None:
        self.kind = kind
        self.length = length

    def __repr__(self) -> str:
        names = {NONE: "none", LENGTH: "length", CHUNKED: "chunked", UNTIL_CLOSE: "close"}
        return f"Framing({names[self.kind]}, {self.length})"

    def reader(self):
        if self.kind == LENGTH:
            return LengthReader(self.length)
        if self.kind == CHUNKED:
            return ChunkedReader()
        if self.kind == UNTIL_CLOSE:
            return UntilCloseReader()
        return None


_NO_BODY = Framing(NONE)
_DIGITS = re.compile(rb"[0-9]{1,18}")


def _contentLength(values: list[bytes]) -> int | None:
    """
    The one length the Content-Length values state, None without any, -1 when they are
    invalid or disagree (the caller picks the status).
    """
    if not values:
        return None
    if len(values) == 1 and _DIGITS.fullmatch(values[0]):
        return int(values[0])  # the common case
    lengths = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            # 1*DIGIT and nothing else: `+5`, `-1`, `0x5`, `5 5` and empty values were all
            # smuggling vectors somewhere (Squid CVE-2020-15049, HAProxy CVE-2023-40225).
            if not _DIGITS.fullmatch(item):
                return -1
            lengths.add(int(item))
    if len(lengths) != 1:
        return -1
    return lengths.pop()


def requestFraming(head: RequestHead) -> Framing:
    """
    The body framing of a request, or an HTTPError for framing the proxy refuses.

    CL together with TE is refused rather than "fixed": RFC 9112 §6.1 allows either, and a
    refusal cannot be mis-forwarded.
    """
    te = head.values(b"transfer-encoding")
    if te:
        codings = splitTokens(te)
        if head.version == b"HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if head.values(b"content-length"):
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if codings == [b"chunked"]:
            return Framing(CHUNKED)
        if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            raise HTTPError(400, "Transfer-Encoding does not end in a single chunked")
        raise HTTPError(501, "transfer codings other than chunked are not supported")
    length = _contentLength(head.values(b"content-length"))
    if length == -1:
        raise HTTPError(400, "invalid Content-Length")
    if length:
        return Framing(LENGTH, length)
    return _NO_BODY


def responseFraming(head: ResponseHead, requestMethod: bytes) -> Framing:
    """
    The body framing of a response (RFC 9112 §6.3, in its order of precedence).
    """
    status = head.status
    length = _contentLength(head.values(b"content-length"))
    if requestMethod == b"HEAD" or status < 200 or status == 204 or status == 304:
        # Still validate a Content-Length that will be forwarded with the head.
        if length == -1:
            raise HTTPError(502, "invalid Content-Length from the origin")
        return _NO_BODY
    te = head.values(b"transfer-encoding")
    if te:
        if splitTokens(te) == [b"chunked"]:
            return Framing(CHUNKED)
        # A coding the proxy would have to relay without its label would corrupt the body.
        raise HTTPError(502, "unsupported Transfer-Encoding from the origin")
    if length == -1:
        raise HTTPError(502, "invalid Content-Length from the origin")
    if length is not None:
        return Framing(LENGTH, length) if length else _NO_BODY
    return Framing(UNTIL_CLOSE)


class LengthReader:
    """Counts down a Content-Length body."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        """
        @return: (body bytes, whether the body is complete, bytes after the body)
        """
        remaining = self.remaining
        if len(data) < remaining:
            self.remaining = remaining - len(data)
            return data, False, b""
        self.remaining = 0
        return data[:remaining], True, data[remaining:]

    def eof(self) -> bool:
        """Whether the connection closing now leaves a complete body."""
        return self.remaining == 0


class UntilCloseReader:
    """A response delimited by the origin closing the connection (RFC 9112 §6.3 rule 8)."""

    __slots__ = ()

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        return data, False, b""

    def eof(self) -> bool:
        return True


_SIZE = 0
_DATA = 1
_DATA_END = 2
_TRAILER = 3
_DONE = 4

_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,15})((?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|\"[\t !#-\[\]-~\x80-\xff]*\"))?)*)"
)
_MAX_SIZE_LINE = 4096
_MAX_TRAILERS = 16384


class ChunkedReader:
    """
    Decodes a chunked body strictly (RFC 9112 §7.1).

    The size line is 1*HEXDIG (at most 15 digits, so no integer games), optional
    well-formed extensions, then CRLF; chunk data is followed by exactly CRLF; trailer
    fields are read and dropped (the proxy re-frames, and trailers never change framing or
    routing). Size lines and trailers are bounded, the state machine is iterative.
    """

    __slots__ = ("_buf", "_remaining", "_state", "_trailerBytes", "error")

    def __init__(self, error: HTTPError | None = None) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._buf = b""
        self._trailerBytes = 0
        self.error = error or HTTPError(400, "malformed chunked body")

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        out: list[bytes] = []
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                out.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    if data[pos : pos + 1] != b"\r":
                        raise self.error
                    self._buf = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise self.error
                pos += 2
                self._state = _SIZE
            elif state == _SIZE:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    # Too long, or ended by a bare LF (Go CVE-2025-22871): refuse now rather
                    # than wait for a CRLF that would make the line mean something else.
                    # (+1: the CR of a CRLF split across reads)
                    if end - pos > _MAX_SIZE_LINE + 1 or data.find(b"\n", pos) >= 0:
                        raise self.error
                    self._buf = data[pos:]
                    break
                if nl - pos > _MAX_SIZE_LINE:
                    raise self.error
                m = _CHUNK_SIZE.fullmatch(data, pos, nl)
                if m is None:
                    raise self.error
                size = int(m.group(1), 16)
                pos = nl + 2
                if size:
                    self._remaining = size
                    self._state = _DATA
                else:
                    self._state = _TRAILER
            elif state == _TRAILER:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    if self._trailerBytes + end - pos > _MAX_TRAILERS or data.find(b"\n", pos) >= 0:
                        raise self.error
                    self._buf = data[pos:]
                    break
                line = data[pos:nl]
                self._trailerBytes += len(line) + 2
                if self._trailerBytes > _MAX_TRAILERS or b"\n" in line or b"\r" in line:
                    raise self.error
                pos = nl + 2
                if not line:
                    self._state = _DONE
                    return b"".join(out), True, data[pos:]
            else:
                break
        return b"".join(out), False, b""

    def eof(self) -> bool:
        return self._state == _DONE


def encodeChunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
