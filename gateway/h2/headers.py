# -*- test-case-name: tests.test_h2_headers -*-
"""
HTTP/2 header blocks to and from the wire-neutral heads of L{gateway.message}.

Both directions of both roles, pure: what comes off an h2 stream loses what belongs to HTTP/2
(pseudo-header fields, content-length as framing, Host next to :authority), and what goes onto
one gains it and loses what HTTP/2 forbids (RFC 9113 §8.2.2: Connection and the fields it
governs; TE except "trailers"). Names go out in lower case (§8.2.1): HTTP/1.1 fields may come in
any case. Cookies arrive as one field (h2's inbound normalisation joins them, §8.2.3).

The h2 library has validated what it delivers (pseudo-header fields, forbidden fields, upper
case); what is checked here is what h2 cannot know: the values proxygate relies on.

What goes out is already what h2's outbound normalisation and validation would make of it
(lower-case names, no connection-specific field, values as parsed: CR, LF and NUL were
refused on the way in, on either wire), so the connections turn those off: they were a
tenth of the proxy's CPU per request. The one part kept is h2's own rule for secrets:
authorization, proxy-authorization and short cookies are sent never-indexed, out of the
HPACK table that every client's requests to one origin share (L{_out}).
"""

from __future__ import annotations

from hpack import NeverIndexedHeaderTuple

from ..http1.headers import parseAuthority
from ..http1.parse import HTTPError
from ..message import NO_BODY, UNKNOWN, Fields, Request, Response

__all__ = [
    "H2HeaderError",
    "requestFromHeaders",
    "requestHeaders",
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

#: Fields kept out of HPACK's dynamic table (h2's _secure_headers, after Firefox and
#: nghttp2): a compression oracle cannot guess them from the sizes of other requests.
_SECRET = frozenset((b"authorization", b"proxy-authorization"))

#: Methods whose request states its length even when it is 0 (RFC 9110 §8.6).
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


class H2HeaderError(Exception):
    """A header block the proxy cannot forward: C{status} for the client (or 502)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _contentLength(values: list[bytes], status: int) -> int | None:
    if not values:
        return UNKNOWN
    first = values[0]
    if any(v != first for v in values) or not first.isdigit() or len(first) > 18:
        raise H2HeaderError(status, "invalid content-length")
    return int(first)


def requestFromHeaders(
    headers: Headers, scheme: str, host: str, port: int, authority: bytes, endStream: bool
) -> Request:
    """
    The request of a client's h2 stream inside an intercepted tunnel to C{host}:C{port}.

    The destination is always the tunnel's (C{authority}, as the HTTP/1.1 path does): an
    :authority that names anything is only checked for validity, never routed on.

    @param endStream: the header block ended the stream (no body).
    @raise H2HeaderError: 400 for a request the proxy refuses (CONNECT: 501).
    """
    method = path = requestScheme = None
    fields: Fields = []
    lengths: list[bytes] = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":scheme":
                requestScheme = value
            elif name == b":authority":
                _checkAuthority(value)
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"host":
            _checkAuthority(value)
        else:
            fields.append((name, value))
    if method == b"CONNECT":
        raise H2HeaderError(501, "CONNECT inside an HTTP/2 tunnel is not supported")
    if method is None or path is None or requestScheme is None:
        raise H2HeaderError(400, "a request without :method, :scheme or :path")
    if requestScheme.decode("ascii", "replace").lower() != scheme:
        raise H2HeaderError(400, f"a request for {requestScheme!r} inside an {scheme} tunnel")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise H2HeaderError(400, "an invalid :path")
    length = _contentLength(lengths, 400)
    if endStream:
        if length:
            raise H2HeaderError(400, "content-length with no body")
        # No body: an HTTP/1.1 origin is told "Content-Length: 0" only where it stated one,
        # or for a method whose requests state their length.
        length = 0 if lengths or method in _BODY_METHODS else NO_BODY
    return Request(method, scheme, host, port, authority, path, b"HTTP/2", fields, length)


def _checkAuthority(value: bytes) -> None:
    try:
        parseAuthority(value, 443)
    except HTTPError:
        raise H2HeaderError(400, "an invalid :authority or host")


def _out(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """A field to send (its name lower case already), never-indexed if it is a secret."""
    if name in _SECRET or (name == b"cookie" and len(value) < 20):
        return NeverIndexedHeaderTuple(name, value)
    return (name, value)


def requestHeaders(request: Request) -> Headers:
    """The header block sending C{request} on an h2 stream to its origin."""
    headers: Headers = [
        (b":method", request.method),
        (b":scheme", request.scheme.encode("ascii")),
        (b":authority", request.authority),
        (b":path", request.path),
    ]
    # The proxy's own fields (Via, X-Forwarded-For) follow the end-to-end ones.
    for name, value in (*request.fields, *request.proxyFields):
        name = name.lower()
        if name in _NOT_FORWARDED:
            continue
        if name == b"te":
            # gRPC origins require "te: trailers" (the only TE value HTTP/2 allows).
            if value.strip().lower() == b"trailers":
                headers.append((b"te", b"trailers"))
            continue
        headers.append(_out(name, value))
    length = request.length
    if length is not UNKNOWN and length != NO_BODY and (length or request.method in _BODY_METHODS):
        headers.append((b"content-length", b"%d" % length))
    return headers


def responseFromHeaders(headers: Headers, method: bytes, endStream: bool) -> Response:
    """
    The response head an origin sent on an h2 stream (a 1xx included).

    @raise H2HeaderError: 502 for a head the proxy cannot forward.
    """
    status = None
    contentType = b""
    fields: Fields = []
    lengths: list[bytes] = []
    for name, value in headers:
        if name == b":status":
            status = value
        elif name == b"content-length":
            lengths.append(value)
        elif name[:1] != b":":
            if name == b"content-type":
                contentType = value
            fields.append((name, value))
    if status is None or len(status) != 3 or not status.isdigit():
        raise H2HeaderError(502, "the origin's response has no valid :status")
    code = int(status)
    if code < 100:
        raise H2HeaderError(502, f"the origin's response status {code} is invalid")
    length = _contentLength(lengths, 502)
    if code < 200 or code == 204:
        return Response(code, b"", b"HTTP/2", fields, NO_BODY, None, contentType)
    if method == b"HEAD" or code == 304:
        # No body by rule; the length stated is that of what a GET would get.
        stated = lengths[0] if lengths else None
        return Response(code, b"", b"HTTP/2", fields, NO_BODY, stated, contentType)
    if endStream:
        if length:
            raise H2HeaderError(502, "the origin's content-length with no body")
        length = 0
    return Response(code, b"", b"HTTP/2", fields, length, None, contentType)


def responseHeaders(response: Response, method: bytes) -> Headers:
    """The header block answering a client's h2 stream (whose request was C{method})."""
    headers: Headers = [(b":status", b"%d" % response.status)]
    for name, value in (*response.fields, *response.proxyFields):
        name = name.lower()
        if name in _NOT_FORWARDED or name == b"te":
            continue
        headers.append(_out(name, value))
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
    """Trailer fields received on an h2 stream (h2 has refused pseudo-header fields)."""
    return [(name, value) for name, value in headers if name not in _NOT_FORWARDED]


def trailerHeaders(fields: Fields) -> Headers:
    """Trailer fields to send on an h2 stream: lower case, nothing HTTP/2 forbids."""
    out: Headers = []
    for name, value in fields:
        name = name.lower()
        if name not in _NOT_FORWARDED and name != b"te" and name[:1] != b":":
            out.append(_out(name, value))
    return out
