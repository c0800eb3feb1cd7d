"""
Strict, sans-IO parsing of HTTP/1.1 message heads (RFC 9112 §2-§5).

A forward proxy sits between peers that disagree about HTTP, and nearly every proxy CVE of
the last years is a parser that was lenient in one place and strict in another. So the rules
here are the strict reading, applied the same way in every message: exactly CRLF line ends,
single spaces in the start line, token field names, no whitespace before the colon, no
control characters in values. Requests that break them are refused (400); responses get the
few repairs RFC 9112 requires of a proxy (whitespace before the colon removed, obs-fold
unfolded) and are otherwise refused too (502).

The functions take the head *without* its final empty line, as L{splitRequestHead} (or the
caller) finds it in a receive buffer, and return plain values; they never see a socket.
"""

from __future__ import annotations

import re
from itertools import islice

from attrs import define

__all__ = [
    "HTTPError",
    "RequestHead",
    "ResponseHead",
    "parseRequestHead",
    "parseResponseHead",
    "splitRequestHead",
]


class HTTPError(Exception):
    """
    A message the proxy cannot or will not handle.

    It carries the status the proxy answers with and a one-line reason for the client, the
    access log and the metrics, so every refusal is explained the same way wherever it is
    raised.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


Headers = list[tuple[bytes, bytes]]


_EMPTY: list[bytes] = []


def _index(headers: Headers) -> dict[bytes, list[bytes]]:
    fields: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in fields:
            fields[lower].append(value)
        else:
            fields[lower] = [value]
    return fields


class _Fields:
    """
    Case-insensitive lookups by field name. The parser fills the index as it reads the
    lines, so the dozen lookups a request needs (framing, Connection, Host, auth) cost a
    dict access each instead of a pass over every field.
    """

    __slots__ = ()

    def values(self, lowerName: bytes) -> list[bytes]:
        """Every value of one field, in order (C{lowerName} in lower case)."""
        fields = self.fields
        if fields is None:
            fields = self.fields = _index(self.headers)
        return fields.get(lowerName, _EMPTY)


@define(slots=True)
class RequestHead(_Fields):
    """
    A parsed request head. Field names keep the spelling they arrived with (the origin sees
    them unchanged); lookups go through L{values}, which compares case-insensitively.
    """

    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    fields: dict[bytes, list[bytes]] | None = None


@define(slots=True)
class ResponseHead(_Fields):
    version: bytes
    status: int
    reason: bytes
    headers: Headers
    fields: dict[bytes, list[bytes]] | None = None


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_METHOD = re.compile(_TOKEN)
# Visible ASCII only: SP, CTL, DEL and obs-text never appear in a valid request-target, and
# '#' (a fragment) is never sent on the wire (HAProxy CVE-2023-45539).
_TARGET = re.compile(rb"[!-\"$-~]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# field-line = field-name ":" OWS field-value OWS; the value may be empty and may contain
# SP/HTAB inside, obs-text, but no other control character (CR, LF, NUL: RFC 9110 §5.5).
_FIELD = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[!-~\x80-\xff](?:[ \t!-~\x80-\xff]*[!-~\x80-\xff])?)?)[ \t]*"
)
# Responses: a proxy MUST remove whitespace between the field name and the colon.
_RESPONSE_FIELD = re.compile(
    rb"("
    + _TOKEN
    + rb")[ \t]*:[ \t]*((?:[!-~\x80-\xff](?:[ \t!-~\x80-\xff]*[!-~\x80-\xff])?)?)[ \t]*"
)
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t !-~\x80-\xff]*))?")

# The fast path: almost every head is valid and unfolded, and its field names are the same
# few dozen again and again. One C scan rejects every control character a field may not
# hold (CR and LF are counted by _splitLines), and names already seen to be tokens are
# looked up instead of matched, with their lower case remembered; a line is then a
# partition at its first colon. Any head the fast path does not take (an unseen name that
# is not a token, a folded line, a space before a colon) goes through the line-by-line
# parser, which gives the precise error or makes the repair.
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([!-\"$-~]+) (HTTP/1\.[01])")
_FIELD_NAME = re.compile(_TOKEN)
# What a head may hold: HTAB, CR and LF (framing, checked by _splitLines), SP, VCHAR, obs-text.
_HEAD_CHARS = bytes([9, 10, 13, *range(32, 127), *range(128, 256)])
_names: dict[bytes, bytes] = {}  # field names known to be tokens -> lower case


def _quickLines(block: bytes, maxHeaders: int) -> list[bytes] | None:
    """The lines of C{block} if the fast path may take it, else None."""
    lines = _splitLines(block)
    if lines is None or len(lines) > maxHeaders + 1 or block.translate(None, _HEAD_CHARS):
        return None
    return lines


def _quickFields(lines: list[bytes]) -> tuple[Headers, dict[bytes, list[bytes]]] | None:
    """The fields after the first line and their index, or None for the line-by-line parser."""
    headers: Headers = []
    fields: dict[bytes, list[bytes]] = {}
    names = _names
    for line in islice(lines, 1, None):
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        lower = names.get(name)
        if lower is None:
            if not _FIELD_NAME.fullmatch(name):
                return None
            if len(names) >= 4096:
                names.clear()
            lower = names[name] = name.lower()
        value = value.strip(b" \t")
        headers.append((name, value))
        if lower in fields:
            fields[lower].append(value)
        else:
            fields[lower] = [value]
    return headers, fields


def _splitLines(block: bytes) -> list[bytes] | None:
    """The lines of a head, or None when a bare CR or LF is left inside one."""
    lines = block.split(b"\r\n")
    # A bare CR or LF left inside a line means the sender framed lines differently from us:
    # exactly the disagreement request smuggling feeds on (RFC 9112 §2.2).
    crlf = len(lines) - 1
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        return None
    return lines


#: Field blocks parsed lately, by their bytes. A client on a kept-alive connection sends the
#: same field lines with every request, and an origin the same ones for a resource within a
#: second (its Date): what HTTP/2's HPACK table exploits. A block seen before costs a hash and
#: two shallow copies instead of a parse (a third of a keep-alive GET's parsing). Bounded in
#: entries and in block size, emptied when full. Only blocks the fast path took are kept, so
#: a hit is a block that passed every check before, byte for byte.
_blocks: dict[bytes, tuple[Headers, dict[bytes, list[bytes]], int]] = {}
_BLOCKS = 256
_BLOCK_SIZE = 2048


def _knownFields(block: bytes, start: int, maxHeaders: int):
    """The fields of C{block[start:]} (the lines after the start line) if parsed lately."""
    known = _blocks.get(block[start:])
    if known is None or known[2] > maxHeaders:
        return None
    return list(known[0]), dict(known[1])


def _remember(block: bytes, start: int, parsed: tuple[Headers, dict[bytes, list[bytes]]]):
    if len(block) - start <= _BLOCK_SIZE:
        if len(_blocks) >= _BLOCKS:
            _blocks.clear()
        headers, fields = parsed
        _blocks[block[start:]] = (list(headers), dict(fields), len(headers))


def parseRequestHead(block: bytes, maxHeaders: int = 100) -> RequestHead:
    """
    Parse a request line and its field lines.

    @raise HTTPError: 400 for anything malformed, 431 for too many fields, 505 for a
        well-formed version other than 1.0 and 1.1.
    """
    end = block.find(b"\r\n")
    if end > 0:
        # The request line's pattern admits no control character: only the field lines
        # needed the scans below, and a known block passed them.
        line = _REQUEST_LINE.fullmatch(block, 0, end)
        if line is not None:
            known = _knownFields(block, end + 2, maxHeaders)
            if known is not None:
                return RequestHead(*line.groups(), *known)
    lines = _quickLines(block, maxHeaders)
    line = _REQUEST_LINE.fullmatch(lines[0]) if lines is not None else None
    quick = _quickFields(lines) if line is not None else None
    if quick is None:
        return _parseRequestLines(block, maxHeaders)
    if end > 0:
        _remember(block, end + 2, quick)
    method, target, version = line.groups()
    return RequestHead(method, target, version, *quick)


def _parseRequestLines(block: bytes, maxHeaders: int) -> RequestHead:
    """L{parseRequestHead} line by line: any head, and the precise error for a bad one."""
    lines = _splitLines(block)
    if lines is None:
        raise HTTPError(400, "bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _METHOD.fullmatch(method):
        raise HTTPError(400, "malformed method")
    if not _TARGET.fullmatch(target):
        raise HTTPError(400, "invalid character in the request target")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if _VERSION.fullmatch(version):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HTTPError(400, "malformed HTTP version")
    if len(lines) - 1 > maxHeaders:
        raise HTTPError(431, f"more than {maxHeaders} header fields")
    headers: Headers = []
    fields: dict[bytes, list[bytes]] = {}
    append = headers.append
    fullmatch = _FIELD.fullmatch
    for line in lines[1:]:
        m = fullmatch(line)
        if m is None:
            if line[:1] in (b" ", b"\t"):
                raise HTTPError(400, "obsolete line folding in the request head")
            raise HTTPError(400, "malformed header field")
        name, value = m.groups()
        append((name, value))
        lower = name.lower()
        if lower in fields:
            fields[lower].append(value)
        else:
            fields[lower] = [value]
    return RequestHead(method, target, version, headers, fields)


def parseResponseHead(block: bytes, maxHeaders: int = 200) -> ResponseHead:
    """
    Parse a status line and its field lines, with the repairs RFC 9112 asks of a proxy.

    @raise HTTPError: always 502: the client cannot fix what the origin sent.
    """
    end = block.find(b"\r\n")
    # A status below 100 ("0xx") is left to the line-by-line parser's 502.
    if end > 9 and block[9] != 48:
        # The status line's pattern admits no control character but HTAB (see above).
        status = _STATUS_LINE.fullmatch(block, 0, end)
        if status is not None:
            known = _knownFields(block, end + 2, maxHeaders)
            if known is not None:
                version, code, reason = status.groups()
                return ResponseHead(b"HTTP/1." + version, int(code), reason or b"", *known)
    lines = _quickLines(block, maxHeaders)
    status = _STATUS_LINE.fullmatch(lines[0]) if lines is not None else None
    quick = _quickFields(lines) if status is not None and block[9] != 48 else None
    if quick is None:
        return _parseResponseLines(block, maxHeaders)
    if end > 0:
        _remember(block, end + 2, quick)
    version, code, reason = status.groups()
    return ResponseHead(b"HTTP/1." + version, int(code), reason or b"", *quick)


def _parseResponseLines(block: bytes, maxHeaders: int) -> ResponseHead:
    """L{parseResponseHead} line by line: folded fields, and the precise error for a bad head."""
    lines = _splitLines(block)
    if lines is None:
        raise HTTPError(502, "bare CR or LF in the origin's response head")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise HTTPError(502, "malformed status line from the origin")
    status = int(m.group(2))
    if status < 100:
        raise HTTPError(502, "invalid status code from the origin")
    if len(lines) - 1 > maxHeaders:
        raise HTTPError(502, "too many header fields from the origin")
    headers: Headers = []
    fields: dict[bytes, list[bytes]] = {}
    fullmatch = _RESPONSE_FIELD.fullmatch
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and headers:
            # obs-fold: RFC 9112 §5.2 lets a proxy replace it with SP before forwarding.
            name, value = headers[-1]
            extra = line.strip(b" \t")
            if not _FIELD.fullmatch(b"x:" + extra):
                raise HTTPError(502, "malformed folded header from the origin")
            value = value + b" " + extra if value else extra
            headers[-1] = (name, value)
            fields[name.lower()][-1] = value
            continue
        fm = fullmatch(line)
        if fm is None:
            raise HTTPError(502, "malformed header field from the origin")
        name, value = fm.groups()
        headers.append((name, value))
        lower = name.lower()
        if lower in fields:
            fields[lower].append(value)
        else:
            fields[lower] = [value]
    return ResponseHead(b"HTTP/1." + m.group(1), status, m.group(3) or b"", headers, fields)


#: A LF that does not end a CRLF (looking one byte back, so a scan may start anywhere).
_BARE_LF = re.compile(rb"(?<!\r)\n")


def splitRequestHead(
    buffer: bytes, limit: int, tooLarge: str, scanned: int = 0
) -> tuple[bytes | None, bytes]:
    """
    The request head at the front of a receive buffer, without its final empty line, and
    the buffer that remains: (head, what follows it), or (None, the buffer to keep) while
    the head is incomplete. Empty lines before a request line are dropped (RFC 9112 §2.2).
    One function for every listener, so each refuses exactly the same heads.

    A head trickled in one byte per segment must not be scanned again from its start for
    every byte (quadratic CPU: 60 KB cost seconds). So a caller that keeps the buffer this
    returned with None and appends to it passes C{scanned=len(that buffer)}: only the new
    bytes are searched (from three bytes back, for an end of head split across segments),
    with the same answers as a scan of the whole buffer.

    @param limit: the most bytes a head may have, its final CRLF counted.
    @param tooLarge: the reason of the 431, in the caller's words.
    @param scanned: how much of C{buffer} an earlier call has already seen incomplete
        (the length of the buffer it returned); 0 for a buffer never scanned.
    @raise HTTPError: 431 for a head over C{limit}, as soon as the buffer shows it; 400 for
        bare LF line ends, which would never end the head (not waiting for a timeout).
    """
    if buffer[:2] == b"\r\n":
        buffer = buffer.lstrip(b"\r\n")
        scanned = 0
    end = buffer.find(b"\r\n\r\n", scanned - 3 if scanned > 3 else 0)
    if end < 0:
        if len(buffer) > limit:
            raise HTTPError(431, tooLarge)
        if _BARE_LF.search(buffer, scanned):
            raise HTTPError(400, "bare LF in the request head")
        return None, buffer
    if end + 4 > limit:
        raise HTTPError(431, tooLarge)
    return buffer[:end], buffer[end + 4 :]


def splitTokens(values: list[bytes]) -> list[bytes]:
    """
    The members of comma-separated list fields, lower-cased, empty members dropped
    (RFC 9110 §5.6.1: recipients must accept `a, , b`).
    """
    out = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if item:
                out.append(item.lower())
    return out
