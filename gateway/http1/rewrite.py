"""
HTTP/1.1 heads as an intermediary writes them, and the connection decisions that go with
them: each rule decided once, here, as a pure function.

Reading side: L{requestFromHead} and L{responseFromHead} turn a parsed head into the
wire-neutral L{Request} / L{Response} of the exchange (hop-by-hop fields, framing and Host
removed). Writing side: L{requestHeadBytes} and L{responseHeadBytes} write one back with this
hop's own framing, after the end-to-end fields, in the order the conformance table checks.
In between: L{keepAlive} (may this client connection carry another request?),
L{reusable} (may this origin connection?) and L{delivery} (how a body reaches this client).
"""

from __future__ import annotations

from ..message import NO_BODY, UNKNOWN, Fields, Request, Response
from .framing import CHUNKED, LENGTH, NONE, UNTIL_CLOSE, Framing
from .headers import Target, httpDate, stripHopByHop
from .parse import HTTPError, RequestHead, ResponseHead, splitTokens

__all__ = [
    "connectionOptions",
    "delivery",
    "keepAlive",
    "requestFromHead",
    "requestHeadBytes",
    "responseFromHead",
    "responseHeadBytes",
    "reusable",
    "splitResponseHead",
    "upgradeOffer",
]

#: Request fields the proxy writes itself: Host always, Max-Forwards on TRACE and OPTIONS
#: (decremented by the caller).
_HOST = frozenset({b"host"})
_HOST_AND_MAX_FORWARDS = frozenset({b"host", b"max-forwards"})
#: A 101 keeps the fields of its own hop's handshake.
_UPGRADE_KEEP = frozenset({b"upgrade", b"connection"})
_NOTHING: frozenset[bytes] = frozenset()


def keepAlive(version: bytes, tokens: list[bytes], proxy: bool = True) -> bool:
    """
    Whether a client connection may carry another request after this one (RFC 9112 §9.3).

    @param tokens: the request's Connection options (L{splitTokens}).
    @param proxy: a proxy never keeps an HTTP/1.0 client's connection (RFC 9112 §9.3.1,
        the Keep-Alive header of 1.0 does not survive a hop); an origin server (the metrics
        listener) may, when the client asks for it.
    """
    if version == b"HTTP/1.1":
        return b"close" not in tokens
    return not proxy and b"keep-alive" in tokens


def reusable(head: ResponseHead, framing: Framing, tokens: list[bytes]) -> bool:
    """
    Whether an origin connection may carry another request after this response.

    Not after a close-delimited body, a `Connection: close`, an HTTP/1.0 origin, or a
    response with both Content-Length and Transfer-Encoding: framed by TE, but an origin that
    sends both is confused about framing and its next response is not trusted (RFC 9112 §6.3).

    @param tokens: the response's Connection options (L{connectionOptions}).
    """
    return (
        framing.kind != UNTIL_CLOSE
        and head.version == b"HTTP/1.1"
        and b"close" not in tokens
        and not (head.values(b"transfer-encoding") and head.values(b"content-length"))
    )


def delivery(response: Response, clientVersion: bytes) -> tuple[bool, bool]:
    """
    How a response body reaches an HTTP/1.x client: (chunked, delimited by closing).
    Only a body of unstated length needs either: chunked for HTTP/1.1, and for an HTTP/1.0
    client, which cannot take chunked, the end of the connection.
    """
    if response.length is not UNKNOWN or response.status < 200:
        return False, False
    if clientVersion == b"HTTP/1.1":
        return True, False
    return False, True


def upgradeOffer(head: RequestHead, framing: Framing) -> bytes | None:
    """
    The protocols a request whose Connection names C{upgrade} asks to switch to (its Upgrade
    values), or None: only HTTP/1.1 requests without a body may switch (a body would be read
    two ways).
    """
    if framing.kind != NONE or head.version != b"HTTP/1.1":
        return None
    values = head.values(b"upgrade")
    return b", ".join(values) if values else None


def requestFromHead(
    head: RequestHead,
    target: Target,
    framing: Framing,
    tokens: list[bytes],
    upgrade: bytes | None = None,
) -> Request:
    """
    The neutral request of a parsed head whose target the caller resolved.

    The fields keep their order and spelling, less hop-by-hop ones, every field the
    Connection header names, Host (the next hop's comes from the target) and, on TRACE and
    OPTIONS, Max-Forwards (RFC 9110 §7.6.2: decremented on the way through, appended here).
    """
    method = head.method
    if method == b"TRACE" or method == b"OPTIONS":
        fields = stripHopByHop(head.headers, tokens=tokens, also=_HOST_AND_MAX_FORWARDS)
        values = head.values(b"max-forwards")
        if values and b"max-forwards" not in tokens:
            # Checked by the caller (1*DIGIT, not 0): the last value is the one that counts.
            fields.append((b"Max-Forwards", b"%d" % max(int(values[-1]) - 1, 0)))
    else:
        fields = stripHopByHop(head.headers, tokens=tokens, also=_HOST)
    kind = framing.kind
    if kind == LENGTH:
        length = framing.length
    elif kind == CHUNKED:
        length = UNKNOWN
    elif head.values(b"content-length"):
        # An empty POST keeps its "Content-Length: 0": origins answer 411 without it.
        length = 0
    else:
        length = NO_BODY
    return Request(
        method,
        target.scheme,
        target.host,
        target.port,
        target.hostHeader,
        target.path,
        head.version,
        fields,
        length,
        upgrade,
    )


def requestHeadBytes(
    request: Request, absolute: bool = False, authorization: bytes | None = None
) -> bytes:
    """
    The head an HTTP/1.1 origin (or, with C{absolute}, an upstream proxy) gets.

    Order: request line, Host, the end-to-end fields, framing, the upgrade handshake,
    then the proxy's own fields (Via, X-Forwarded-For).

    @param authorization: the upstream proxy's Proxy-Authorization value (from the
        configuration, never the client's).
    """
    if absolute:
        # Absolute form to an upstream proxy; OPTIONS to the server itself (`*`) has an
        # empty path there.
        path = request.path if request.path != b"*" else b""
        lines = [
            request.method,
            b" ftp://" if request.scheme == "ftp" else b" http://",
            request.authority,
            path,
            b" HTTP/1.1\r\nHost: ",
            request.authority,
            b"\r\n",
        ]
        if authorization is not None:
            lines += (b"Proxy-Authorization: ", authorization, b"\r\n")
    else:
        lines = [
            request.method,
            b" ",
            request.path,
            b" HTTP/1.1\r\nHost: ",
            request.authority,
            b"\r\n",
        ]
    _appendFields(lines, request.fields)
    length = request.length
    if length is UNKNOWN:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif length >= 0:
        lines.append(b"Content-Length: %d\r\n" % length)
    if request.upgrade is not None:
        lines += (b"Connection: upgrade\r\nUpgrade: ", request.upgrade, b"\r\n")
    _appendFields(lines, request.proxyFields)
    lines.append(b"\r\n")
    return b"".join(lines)


def connectionOptions(head: RequestHead | ResponseHead) -> list[bytes]:
    """The options of a message's Connection fields, lower case (read once per message)."""
    return splitTokens(head.values(b"connection"))


def responseFromHead(
    head: ResponseHead, framing: Framing, requestMethod: bytes, tokens: list[bytes]
) -> Response:
    """
    The neutral response of a parsed head, with the body length its framing gives.

    A final response without Date gets one (RFC 9110 §6.6.1: a recipient with a clock
    adds it when forwarding). A 101 keeps Upgrade and Connection for its own hop.

    @param tokens: its Connection options (L{connectionOptions}).
    """
    status = head.status
    fields = stripHopByHop(head.headers, _UPGRADE_KEEP if status == 101 else _NOTHING, tokens)
    values = head.values
    contentType = values(b"content-type")
    contentType = contentType[-1] if contentType and b"content-type" not in tokens else b""
    stated = None
    kind = framing.kind
    if kind == LENGTH:
        length = framing.length
    elif kind == NONE:
        if status < 200 or status == 204:
            length = NO_BODY
        elif requestMethod == b"HEAD" or status == 304:
            # It states the length of what a GET would get (checked by responseFraming).
            length = NO_BODY
            lengths = values(b"content-length")
            if lengths:
                stated = lengths[0].split(b",")[0].strip()
        else:
            length = 0
    else:
        length = UNKNOWN
    if status >= 200 and (not values(b"date") or b"date" in tokens):
        fields.append((b"Date", httpDate()))
    return Response(status, head.reason, head.version, fields, length, stated, contentType)


def responseHeadBytes(response: Response, chunked: bool, close: bool) -> bytes:
    """
    The head an HTTP/1.x client gets (always as HTTP/1.1, RFC 9110 §6.2).

    Order: status line, the end-to-end fields, framing, Connection: close, then the proxy's
    own fields (Via). Informational heads carry no framing.

    @param chunked: the body goes chunked (L{delivery}).
    @param close: the connection closes after this response (not said on a 101, whose
        Connection field is the upgrade's).
    """
    status = response.status
    lines = [b"HTTP/1.1 %d " % status, response.reason, b"\r\n"]
    _appendFields(lines, response.fields)
    if status >= 200:
        length = response.length
        if length is UNKNOWN:
            if chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n")
        elif length >= 0:
            lines.append(b"Content-Length: %d\r\n" % length)
        elif response.statedLength is not None:
            lines += (b"Content-Length: ", response.statedLength, b"\r\n")
        if close and status != 101:
            lines.append(b"Connection: close\r\n")
    _appendFields(lines, response.proxyFields)
    lines.append(b"\r\n")
    return b"".join(lines)


def splitResponseHead(buffer: bytes, limit: int) -> tuple[bytes | None, bytes]:
    """
    The response head at the front of a receive buffer, without its final empty line, and
    what follows it; (None, buffer) while it is incomplete. The same rules for every reader
    of responses (origins, upstream proxies answering CONNECT).

    @raise HTTPError: 502 for a head over C{limit} bytes, or one with bare LF line ends,
        which would never complete (RFC 9112 §2.2): at once, not at the idle timeout.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > limit:
            raise HTTPError(502, "the response head is too large")
        if buffer.count(b"\n") != buffer.count(b"\r\n"):
            raise HTTPError(502, "bare LF in the response head")
        return None, buffer
    if end > limit:
        # (checked here too: a head may complete in the read that crosses the limit)
        raise HTTPError(502, "the response head is too large")
    return buffer[:end], buffer[end + 4 :]


def _appendFields(lines: list[bytes], fields: Fields) -> None:
    """Add C{fields} to a head being built, as field lines (joined in C)."""
    if len(fields) == 1:
        name, value = fields[0]  # the proxy's own Via, most often
        lines += (name, b": ", value, b"\r\n")
    elif fields:
        lines += (b"\r\n".join([b": ".join(field) for field in fields]), b"\r\n")
