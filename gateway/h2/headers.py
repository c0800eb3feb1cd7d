# -*- test-case-name: tests.test_h2_headers -*-
"""
HTTP/2 header blocks to and from the wire-neutral heads of L{gateway.message}.

Both directions of both roles, pure: what comes off an h2 stream loses what belongs to HTTP/2
(pseudo-header fields, content-length as framing, Host next to :authority), and what goes onto
one gains it and loses what HTTP/2 forbids (RFC 9113 §8.2.2: Connection and the fields it
governs; TE except "trailers"). Names go out in lower case (§8.2.1): HTTP/1.1 fields may come in
any case.

What comes in was checked and taken apart by L{gateway.h2.fields} (in the connection's one
pass: RFC 9113's rules, cookies joined); what is checked here is what proxygate relies on: the
scheme of the tunnel, a path it can forward, an authority it can parse, CONNECT (refused).

What goes out is built clean (lower-case names, no connection-specific field, values as
parsed: CR, LF and NUL were refused on the way in, on either wire), so it is not checked
again; the fields of a head that came over HTTP/2 are already what HTTP/2 sends, and go as
they are (the proxy changes their values at most, never their names).

Secrets stay out of HPACK's shared table: the encoder sends authorization,
proxy-authorization and short cookies never-indexed, and a field that arrived never-indexed
(L{gateway.h2.hpack.NeverIndexed}) leaves so (RFC 7541 §7.1.3).
"""

from __future__ import annotations

from ..http1.headers import parseAuthority
from ..http1.parse import HTTPError
from ..message import NO_BODY, UNKNOWN, Fields, Request, Response
from .fields import Malformed, requestHead, responseHead
from .fields import trailerFields as _trailerFields

__all__ = [
    "H2HeaderError",
    "gatewayRequestFromHead",
    "requestFromHead",
    "requestFromHeaders",
    "requestHeaders",
    "responseFromHead",
    "responseFromHeaders",
    "responseHeaders",
    "trailerFields",
    "trailerHeaders",
]

Headers = list[tuple[bytes, bytes]]

#: Fields that mean something for one connection only and must not be sent on HTTP/2
#: (RFC 9113 §8.2.2), plus the framing HTTP/2 replaces (content-length is re-derived from
#: the head's length) and Host (:authority carries it, §8.3.1).
_NOT_FORWARDED = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"host",
        b"content-length",
    )
)

#: Methods whose request states its length even when it is 0 (RFC 9110 §8.6).
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


class H2HeaderError(Exception):
    """A header block the proxy cannot forward: C{status} for the client (or 502)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def requestFromHeaders(
    headers: Headers, scheme: str, host: str, port: int, authority: bytes, endStream: bool
) -> Request:
    """
    L{requestFromHead} of a header block not taken apart yet.

    @raise H2HeaderError: 400 for a malformed block, or what L{requestFromHead} raises.
    """
    try:
        head = requestHead(headers)
    except Malformed as e:
        raise H2HeaderError(400, str(e)) from None
    return requestFromHead(head, scheme, host, port, authority, endStream)


def requestFromHead(
    head: tuple, scheme: str, host: str, port: int, authority: bytes, endStream: bool
) -> Request:
    """
    The request of a client's h2 stream inside an intercepted tunnel to C{host}:C{port},
    from its header block taken apart (L{gateway.h2.fields.requestHead}).

    The destination is always the tunnel's (C{authority}, as the HTTP/1.1 path does): an
    :authority that names anything is only checked for validity, never routed on.

    @param endStream: the header block ended the stream (no body).
    @raise H2HeaderError: 400 for a request the proxy refuses (CONNECT: 501).
    """
    method, path, fields, length = _checked(head, scheme, endStream)
    # The head may be shared (the connection remembers repeated header blocks): a copy of
    # its fields, which the exchange may change.
    return Request(method, scheme, host, port, authority, path, b"HTTP/2", list(fields), length)


def gatewayRequestFromHead(head: tuple, scheme: str, endStream: bool) -> Request:
    """
    The request of a client's h2 stream to the inbound gateway (an C{ssl:} C{[reverse]}
    listener): as L{requestFromHead}, but its authority is the one it names (:authority,
    else Host; empty without either, as an HTTP/1.0 request without Host), which picks the
    route; the host and port are the backend's, set once a backend is chosen.

    @raise H2HeaderError: 405 for CONNECT (the gateway is not a forward proxy), 400 for a
        request the gateway refuses.
    """
    method, path, fields, length = _checked(head, scheme, endStream, connect=405)
    authority = head[2] if head[2] is not None else head[6]
    return Request(method, scheme, "", 0, authority or b"", path, b"HTTP/2", list(fields), length)


def _checked(head: tuple, scheme: str, endStream: bool, connect: int = 501) -> tuple:
    """
    What a request head must be to be forwarded (see L{requestFromHead}): its method, path,
    fields and length.
    """
    method, requestScheme, requestAuthority, path, fields, length, hostField = head
    if method == b"CONNECT":
        if connect == 405:
            raise H2HeaderError(405, "CONNECT is refused: this is not a forward proxy")
        raise H2HeaderError(501, "CONNECT inside an HTTP/2 tunnel is not supported")
    if requestScheme != _SCHEMES.get(scheme) and requestScheme.lower() != _SCHEMES.get(scheme):
        raise H2HeaderError(400, f"a request for {requestScheme!r} inside an {scheme} tunnel")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise H2HeaderError(400, "an invalid :path")
    if requestAuthority is not None:
        _checkAuthority(requestAuthority)
    if hostField is not None and hostField != requestAuthority:
        _checkAuthority(hostField)
    if length < 0:
        length = UNKNOWN
    if endStream:
        if length:
            raise H2HeaderError(400, "content-length with no body")
        # No body: an HTTP/1.1 origin is told "Content-Length: 0" only where it stated one,
        # or for a method whose requests state their length.
        length = 0 if length == 0 or method in _BODY_METHODS else NO_BODY
    return method, path, fields, length


_SCHEMES = {"https": b"https", "http": b"http"}


def _checkAuthority(value: bytes) -> None:
    try:
        parseAuthority(value, 443)
    except HTTPError:
        raise H2HeaderError(400, "an invalid :authority or host") from None


# What becomes of a field's name on the way out (remembered per spelling, bounded).
_SAME = 0  # sent as it is
_DROP = 1  # not sent
_TE = 2  # TE: only "trailers" goes
_RENAME = 3  # sent in lower case

_outNames: dict[bytes, tuple[int, bytes]] = {}


def _outName(name: bytes) -> tuple[int, bytes]:
    lower = name.lower()
    if lower in _NOT_FORWARDED or lower[:1] == b":":
        action = (_DROP, lower)
    elif lower == b"te":
        action = (_TE, lower)
    else:
        action = (_SAME if lower == name else _RENAME, lower)
    if len(_outNames) >= 4096:
        _outNames.clear()
    _outNames[name] = action
    return action


def _outFields(headers: Headers, fields, te: bool) -> None:
    """Append C{fields} to C{headers} as HTTP/2 sends them (TE: trailers only if C{te})."""
    names = _outNames
    append = headers.append
    for field in fields:
        action = names.get(field[0])
        if action is None:
            action = _outName(field[0])
        kind = action[0]
        if kind == _SAME:
            append(field)  # as it came: a never-indexed one stays so
        elif kind == _RENAME:
            append((action[1], field[1]))
        elif kind == _TE and te and field[1].strip().lower() == b"trailers":
            # gRPC origins require "te: trailers" (the only TE value HTTP/2 allows).
            append((b"te", b"trailers"))


def _addFields(headers: Headers, message: Request | Response, te: bool) -> None:
    """
    A message's fields after its pseudo-header fields: the end-to-end ones (a head that came
    over HTTP/2 was checked on the way in and goes as it is; an HTTP/1.1 one is filtered for
    h2, TE kept on requests if C{te}), then the proxy's own (Via, X-Forwarded-For).
    """
    if message.version == b"HTTP/2":
        headers += message.fields
    else:
        _outFields(headers, message.fields, te)
    if message.proxyFields:
        _outFields(headers, message.proxyFields, te)


def requestHeaders(request: Request) -> Headers:
    """The header block sending C{request} on an h2 stream to its origin."""
    headers: Headers = [
        (b":method", request.method),
        (b":scheme", _SCHEMES.get(request.scheme) or request.scheme.encode("ascii")),
        (b":authority", request.authority),
        (b":path", request.path),
    ]
    _addFields(headers, request, True)
    length = request.length
    if length is not UNKNOWN and length != NO_BODY and (length or request.method in _BODY_METHODS):
        headers.append((b"content-length", b"%d" % length))
    return headers


def responseFromHeaders(headers: Headers, method: bytes, endStream: bool) -> Response:
    """
    L{responseFromHead} of a header block not taken apart yet.

    @raise H2HeaderError: 502 for a malformed block, or what L{responseFromHead} raises.
    """
    try:
        head = responseHead(headers)
    except Malformed as e:
        raise H2HeaderError(502, f"the origin's response is malformed: {e}") from None
    return responseFromHead(head, method, endStream)


def responseFromHead(head: tuple, method: bytes, endStream: bool) -> Response:
    """
    The response head an origin sent on an h2 stream (a 1xx included), from its header
    block taken apart (L{gateway.h2.fields.responseHead}).

    @raise H2HeaderError: 502 for a head the proxy cannot forward.
    """
    code, fields, length, contentType = head
    fields = list(fields)  # the head may be shared (see requestFromHead)
    if code < 200 or code == 204:
        return Response(code, b"", b"HTTP/2", fields, NO_BODY, None, contentType)
    if method == b"HEAD" or code == 304:
        # No body by rule; the length stated is that of what a GET would get.
        stated = b"%d" % length if length >= 0 else None
        return Response(code, b"", b"HTTP/2", fields, NO_BODY, stated, contentType)
    if length < 0:
        length = UNKNOWN
    if endStream:
        if length:
            raise H2HeaderError(502, "the origin's content-length with no body")
        length = 0
    return Response(code, b"", b"HTTP/2", fields, length, None, contentType)


def responseHeaders(response: Response, method: bytes) -> Headers:
    """The header block answering a client's h2 stream (whose request was C{method})."""
    headers: Headers = [(b":status", b"%d" % response.status)]
    _addFields(headers, response, False)
    status = response.status
    if status < 200:
        return headers
    if method == b"HEAD" or status in (204, 304):
        if response.statedLength is not None and status != 204:
            headers.append((b"content-length", response.statedLength))
    elif response.length is not UNKNOWN and response.length >= 0:
        headers.append((b"content-length", b"%d" % response.length))
    return headers


def trailerFields(headers: Headers) -> Fields:
    """
    Trailer fields received on an h2 stream, checked (L{gateway.h2.fields.trailerFields}).

    @raise H2HeaderError: 502 for malformed trailers.
    """
    try:
        return _trailerFields(headers)
    except Malformed as e:
        raise H2HeaderError(502, str(e)) from None


def trailerHeaders(fields: Fields) -> Headers:
    """Trailer fields to send on an h2 stream: lower case, nothing HTTP/2 forbids."""
    out: Headers = []
    _outFields(out, fields, False)
    return out
