"""
Message heads that do not know their wire.

A request or response crosses the proxy as one of these: the side that read it from its
wire (an HTTP/1.1 connection, an HTTP/2 stream, an FTP fetch) has already removed what
belongs to that wire (hop-by-hop fields, framing, Host or :authority), and the side that
writes it adds its own. The exchange in between only sees the end-to-end part, so an HTTP/1.1
client can talk to an HTTP/2 origin (and the reverse) without either side knowing.

Plain slotted classes, not attrs: one of each is made per request on the hot path.
"""

from __future__ import annotations

__all__ = [
    "NO_BODY",
    "REASONS",
    "UNKNOWN",
    "Fields",
    "Request",
    "Response",
    "bracketed",
    "logURL",
]

Fields = list[tuple[bytes, bytes]]

#: A body length nobody stated: the body ends when its side says so (HTTP/1.1 chunked or
#: close-delimited, an HTTP/2 stream without content-length).
UNKNOWN = None
#: No body, and no length said about one (a GET without Content-Length; a response that has
#: no body by rule: 1xx, 204, 304, to HEAD). Distinct from a stated length of 0, which the
#: next hop is told.
NO_BODY = -1
_NONE: Fields = []


def bracketed(host: str) -> str:
    """A host as it appears in an authority: an IPv6 literal in brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]" if ":" in host else host


def logURL(scheme: str, authority: bytes, target: bytes) -> str:
    """
    A URL as the access log shows it: without its query (Squid's strip_query_terms), from
    an authority that never holds userinfo.
    """
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    return f"{scheme}://{authority.decode('ascii', 'replace')}{path}"


class Request:
    """
    One request, as the exchange forwards it.

    @ivar method: C{b"GET"}...
    @ivar scheme: C{"http"}, C{"https"} (an intercepted tunnel, a TLS backend) or C{"ftp"}.
    @ivar host: the destination name or address, lower case, IPv6 without brackets.
    @ivar port: the destination port.
    @ivar authority: what the next hop sees as Host (or :authority): C{b"example.com:8080"}.
    @ivar path: origin-form path and query (C{b"/a?b"}), or C{b"*"} (OPTIONS to the server).
    @ivar version: the protocol the client spoke (C{b"HTTP/1.1"}, C{b"HTTP/1.0"},
        C{b"HTTP/2"}): Via names it.
    @ivar fields: the end-to-end fields, in order, names as received (HTTP/2: lower case).
    @ivar length: body bytes that follow (a stated Content-Length, 0 included), C{NO_BODY},
        or C{UNKNOWN} (they end when the side says so).
    @ivar upgrade: the protocols a client asked to switch to (HTTP/1.1 only), else None.
    @ivar proxyFields: the fields this proxy adds (Via, X-Forwarded-For), written after the
        framing; shared lists, never mutated.
    """

    __slots__ = (
        "authority",
        "fields",
        "host",
        "length",
        "method",
        "path",
        "port",
        "proxyFields",
        "scheme",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        scheme: str,
        host: str,
        port: int,
        authority: bytes,
        path: bytes,
        version: bytes,
        fields: Fields,
        length: int | None = 0,
        upgrade: bytes | None = None,
    ) -> None:
        self.method = method
        self.scheme = scheme
        self.host = host
        self.port = port
        self.authority = authority
        self.path = path
        self.version = version
        self.fields = fields
        self.length = length
        self.upgrade = upgrade
        self.proxyFields = _NONE

    def url(self) -> str:
        """The URL for logs (L{logURL})."""
        return logURL(self.scheme, self.authority, self.path)

    def __repr__(self) -> str:
        return f"<Request {self.method.decode()} {self.url()} length={self.length}>"


class Response:
    """
    One response head, as the exchange forwards it.

    @ivar status: the status code; 1xx heads are informational (more follow).
    @ivar reason: the reason phrase (HTTP/1.1 only; empty from HTTP/2).
    @ivar version: the protocol the origin spoke: Via names it.
    @ivar fields: the end-to-end fields (hop-by-hop and framing removed).
    @ivar length: body bytes that follow (a stated length, 0 included), C{NO_BODY} or
        C{UNKNOWN}.
    @ivar statedLength: for a response that has no body by rule (to HEAD, a 304), the
        Content-Length it states, which describes the body a GET would get; else None.
    @ivar contentType: its media type, for the access log (b"" when none).
    @ivar proxyFields: the fields this proxy adds (Via), written after the framing.
    """

    __slots__ = (
        "contentType",
        "fields",
        "length",
        "proxyFields",
        "reason",
        "statedLength",
        "status",
        "version",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        fields: Fields,
        length: int | None = 0,
        statedLength: bytes | None = None,
        contentType: bytes = b"",
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.fields = fields
        self.length = length
        self.statedLength = statedLength
        self.contentType = contentType
        self.proxyFields = _NONE

    def __repr__(self) -> str:
        return f"<Response {self.status} length={self.length}>"


#: Reason phrases of the statuses the proxy itself answers with (RFC 9110 §15).
REASONS = {
    200: b"OK",
    301: b"Moved Permanently",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
