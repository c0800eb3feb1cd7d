"""
One forwarded request and its response: the absolute-form path (and, later, the requests
decrypted inside a MITM tunnel, which are the same thing with TLS on both legs).

The exchange takes a parsed request head from the client connection, gets an origin
connection (pooled or new), writes a normalised head, streams the request body as the
client sends it, and streams the response back re-framed for this client. Nothing is
buffered beyond what one read delivers: each side's full send buffer pauses the other
side's reading.
"""

from __future__ import annotations

import time

from ..accesslog import AccessRecord, hierarchy
from ..http1.framing import CHUNKED, LAST_CHUNK, LENGTH, NONE, encodeChunk
from ..http1.headers import Target, httpDate, stripHopByHop
from ..http1.parse import HTTPError, RequestHead, ResponseHead, splitTokens
from ..metrics import normaliseAPI
from ..tls.layer import describeFailure
from .dial import DialFailure
from .flow import CONNECTING, writeNow
from .origin import OriginConnection
from .responses import errorResponse
from .tunnel import Splice

__all__ = ["ForwardExchange"]

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_UPGRADE_KEEP = frozenset({b"upgrade", b"connection"})
# Request fields the proxy writes itself: Host always, Max-Forwards on TRACE and OPTIONS.
_HOST = frozenset({b"host"})
_HOST_AND_MAX_FORWARDS = frozenset({b"host", b"max-forwards"})


def _appendFields(lines: list[bytes], fields: list[tuple[bytes, bytes]]) -> None:
    """Add C{fields} to a head being built, as field lines."""
    if fields:
        lines += (b"\r\n".join([b": ".join(field) for field in fields]), b"\r\n")


class ForwardExchange:
    """
    State of one request/response pair between a client connection and an origin.

    The client connection feeds it C{requestBody(data)} and C{requestEnd()}, and is told
    C{exchangeDone(close)} at the end. The origin connection calls the response events.
    """

    def __init__(
        self,
        client,
        head: RequestHead,
        target: Target,
        framing,
        *,
        mode: str = "forward",
        upgrade: bytes | None = None,
        user: str | None = None,
    ) -> None:
        self.client = client
        self.rt = client.rt
        self.head = head
        self.target = target
        self.framing = framing
        self.mode = mode
        self.upgrade = upgrade
        self.user = user
        self.origin: OriginConnection | None = None
        self.pending: list[bytes] | None = []
        self.requestComplete = framing.kind == NONE
        self.responseStarted = False
        self.finished = False
        self.code = 0
        self.sent = 0
        self.received = 0
        self.sentUpstream = 0
        self.contentType = ""
        self.ip = "-"
        self.reused = False
        self.retried = False
        self.closeAfter = not client.persistent
        self.clientChunked = False
        self._heldHead = b""  # the response head, until the end of the read that brought it
        self.started = self.rt.reactor.seconds()
        self.wallStart = time.time()
        self.reason: str | None = None
        # An upstream proxy to go through, or None for direct (no_proxy, or none configured).
        self.route = self.rt.upstream.routeFor(target.host, target.port)

    # --- origin side -------------------------------------------------------------------

    def begin(self) -> None:
        conn = self.rt.pool.get(self._poolKey())
        if conn is not None:
            self.reused = True
            self._attach(conn, conn.ip)
        else:
            self._dial()

    def _poolKey(self) -> tuple:
        target = self.target
        if self.route is None:
            return (target.scheme, target.host, target.port)
        if target.scheme == "http":
            # Absolute-form requests share connections to the upstream, whatever the origin.
            return ("upstream", self.route.host, self.route.port)
        return (target.scheme, target.host, target.port, "upstream")

    def _dial(self) -> None:
        rt = self.rt
        target = self.target
        conn = OriginConnection(self._poolKey(), rt.reactor)
        if self.route is None:
            wrap = rt.interceptor.originTLS(target.host) if target.scheme == "https" else None
            d = rt.dialer.connect(target.host, target.port, conn, wrap)
        elif target.scheme == "http":
            d = rt.upstream.dialProxy(rt.dialer, conn)
        else:
            d = rt.upstream.dialThrough(
                rt.dialer,
                target.host,
                target.port,
                conn,
                rt.interceptor.originCreator(target.host),
                timeout=rt.dialer.connectTimeout,
            )
        d.addCallbacks(lambda ip: self._connected(conn, ip), self._dialFailed)

    def _connected(self, conn: OriginConnection, ip: str) -> None:
        conn.ip = ip
        if self.finished:
            conn.transport.loseConnection()
            return
        self._attach(conn, ip)

    def _attach(self, conn: OriginConnection, ip: str) -> None:
        self.origin = conn
        self.ip = ip
        conn.start(self, self.head.method)
        client = self.client
        client.transport.registerProducer(conn.pauser, True)
        conn.transport.registerProducer(client.pauser, True)
        out = [self._requestHead()]
        pending, self.pending = self.pending, None
        if pending:
            out.extend(pending)
            # Everything received so far was pending (body bytes, as in requestBody; a
            # chunked body's last chunk too: requestEnd queued it, it is not added again).
            self.sentUpstream = self.received
        writeNow(conn.transport, b"".join(out))
        client.pauser.resume(CONNECTING)

    def _dialFailed(self, failure) -> None:
        if self.finished:
            return
        why = DialFailure(failure.value)
        why.count(self.rt.metrics)
        if why.metric is None:
            self.rt.log.failure("dialling {host}", failure, host=self.target.host)
        self._localError(why.status, why.message, why.proxyStatus, action=why.action)

    def _requestHead(self) -> bytes:
        head = self.head
        target = self.target
        if self.route is not None and target.scheme == "http":
            # To an upstream proxy: absolute form, and its credentials from our config.
            # (OPTIONS to the server itself, `*` at the origin, has an empty path here)
            lines = [
                head.method,
                b" http://",
                target.hostHeader,
                target.path if target.path != b"*" else b"",
                b" HTTP/1.1\r\nHost: ",
                target.hostHeader,
                b"\r\n",
            ]
            if self.rt.upstream.authorization is not None:
                lines += (b"Proxy-Authorization: ", self.rt.upstream.authorization, b"\r\n")
        else:
            lines = [
                head.method,
                b" ",
                target.path,
                b" HTTP/1.1\r\nHost: ",
                target.hostHeader,
                b"\r\n",
            ]
        keep = _UPGRADE_KEEP if self.upgrade is not None else frozenset()
        tokens = splitTokens(head.values(b"connection"))
        fields = head.fields
        maxForwards = None
        also = _HOST
        if head.method in (b"TRACE", b"OPTIONS"):
            also = _HOST_AND_MAX_FORWARDS
            if b"max-forwards" in fields and b"max-forwards" not in tokens:
                maxForwards = fields[b"max-forwards"][-1]  # checked by the client: 1*DIGIT
        _appendFields(lines, stripHopByHop(head.headers, tokens=tokens, also=also))
        if maxForwards is not None:
            # Decrement on the way through (RFC 9110 §7.6.2); 0 was answered locally.
            lines.append(b"Max-Forwards: %d\r\n" % max(int(maxForwards) - 1, 0))
        kind = self.framing.kind
        if kind == LENGTH:
            lines.append(b"Content-Length: %d\r\n" % self.framing.length)
        elif kind == CHUNKED:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif head.values(b"content-length"):
            # An empty POST keeps its "Content-Length: 0": origins answer 411 without it.
            lines.append(b"Content-Length: 0\r\n")
        if keep:
            lines.append(b"Connection: upgrade\r\nUpgrade: " + self.upgrade + b"\r\n")
        via = self.rt.viaRequest
        if via:
            lines.append(via[head.version])
        if self.rt.forwardedFor:
            lines.append(b"X-Forwarded-For: " + self.client.peerHost.encode("ascii") + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # --- request body, from the client ---------------------------------------------------

    def requestBody(self, data: bytes) -> None:
        self.received += len(data)
        if self.framing.kind == CHUNKED:
            data = encodeChunk(data)
        if self.pending is not None:
            # Still dialling: hold this one read and stop reading until connected.
            self.pending.append(data)
            self.client.pauser.pause(CONNECTING)
            return
        if self.origin is not None:
            self.sentUpstream = self.received
            writeNow(self.origin.transport, data)

    def requestEnd(self) -> None:
        self.requestComplete = True
        if self.framing.kind == CHUNKED:
            if self.pending is not None:
                self.pending.append(LAST_CHUNK)
            elif self.origin is not None:
                self.origin.transport.write(LAST_CHUNK)

    # --- response, from the origin -------------------------------------------------------

    def informational(self, head: ResponseHead) -> None:
        if self.client.version == b"HTTP/1.1":
            self._write(self._responseHead(head, interim=True))

    def responseHead(self, head: ResponseHead, framing) -> None:
        if head.status == 407 and self.route is not None and self.target.scheme == "http":
            # The client cannot fix our upstream credentials: say whose they are.
            self.rt.metrics.upstreamErrors.labels("refused").inc()
            self._localError(
                502,
                f"The upstream proxy {self.rt.upstream.label}:{self.route.port} answered "
                "407 Proxy Authentication Required: its credentials in [upstream] proxy are "
                "missing or wrong.",
                "connection_refused",
            )
            return
        self.responseStarted = True
        self.code = head.status
        if self.upgrade is not None:
            self.rt.metrics.upgrades.labels("refused").inc()
        # Held, so that it leaves with the body that usually came in the same read: one
        # send instead of two. The origin connection calls flushHead after every read.
        self._heldHead = self._responseHead(head, framing=framing)

    def _responseHead(self, head: ResponseHead, framing=None, interim: bool = False) -> bytes:
        lines = [b"HTTP/1.1 %d " % head.status, head.reason, b"\r\n"]
        keep = _UPGRADE_KEEP if head.status == 101 else frozenset()
        tokens = splitTokens(head.values(b"connection"))
        fields = head.fields
        _appendFields(lines, stripHopByHop(head.headers, keep, tokens))
        # Neither is hop-by-hop: each goes only when the Connection field names it.
        hasDate = b"date" in fields and b"date" not in tokens
        if b"content-type" in fields and b"content-type" not in tokens:
            self.contentType = fields[b"content-type"][-1].decode("latin-1")
        if not interim:
            if not hasDate:
                lines += (b"Date: ", httpDate(), b"\r\n")
            if framing is not None:
                kind = framing.kind
                if kind == LENGTH:
                    lines.append(b"Content-Length: %d\r\n" % framing.length)
                elif kind == NONE:
                    if head.status >= 200 and (self.head.method == b"HEAD" or head.status == 304):
                        # A HEAD or 304 response states the length of what a GET would get.
                        length = head.values(b"content-length")
                        if length:
                            lines += (
                                b"Content-Length: ",
                                length[0].split(b",")[0].strip(),
                                b"\r\n",
                            )
                    elif head.status not in (204,) and head.status >= 200:
                        lines.append(b"Content-Length: 0\r\n")
                elif self.client.version == b"HTTP/1.1":
                    lines.append(b"Transfer-Encoding: chunked\r\n")
                    self.clientChunked = True
                else:
                    # An HTTP/1.0 client cannot take chunked: delimit by closing.
                    self.closeAfter = True
            if not self.requestComplete:
                # The origin answered before the request body ended (e.g. 413): the rest of
                # that body cannot be told from a next request safely, so close after this.
                self.closeAfter = True
            if head.status == 101:
                pass
            elif self.closeAfter:
                lines.append(b"Connection: close\r\n")
        via = self.rt.viaResponse
        if via:
            lines.append(via.get(head.version, via[b"HTTP/1.1"]))
        lines.append(b"\r\n")
        return b"".join(lines)

    def responseBody(self, data: bytes) -> None:
        self.sent += len(data)
        # A response still flowing is not idle: push the client's idle deadline out.
        self.client.touch()
        if self.clientChunked:
            data = encodeChunk(data)
        self._write(data)

    def flushHead(self) -> None:
        if self._heldHead:
            self._write(b"")

    def responseEnd(self) -> None:
        if self.clientChunked:
            self._write(LAST_CHUNK)
        else:
            self.flushHead()
        origin = self.origin
        if origin is not None:
            self._releaseOrigin(origin, reuse=self.requestComplete)
        self._finish()

    def upgraded(self, head: ResponseHead, rest: bytes) -> None:
        """The origin switched protocols: relay its 101, then become a blind pipe."""
        if self.upgrade is None:
            # A 101 nobody asked for cannot be relayed (RFC 9110 §15.2.2).
            self.originFailed(HTTPError(502, "the origin switched protocols unasked"))
            return
        offered = {p.split(b"/")[0] for p in splitTokens([self.upgrade])}
        chosen = splitTokens(head.values(b"upgrade"))
        if not chosen or any(p.split(b"/")[0] not in offered for p in chosen):
            # RFC 9110 §7.8: only to a protocol the client offered, and the 101 names it.
            self.originFailed(HTTPError(502, "the origin switched to a protocol not offered"))
            return
        self.responseStarted = True
        self.code = 101
        self.rt.metrics.upgrades.labels("ok").inc()
        client = self.client
        client.transport.unregisterProducer()
        origin = self.origin
        origin.transport.unregisterProducer()
        self._write(self._responseHead(head))
        splice = Splice(
            client, origin.transport, origin.pauser, self.rt.metrics, self._upgradeEnded
        )
        origin.splice = splice
        client.startSplice(splice)
        if rest:
            splice.fromOrigin(rest)

    def _upgradeEnded(self) -> None:
        self._log()

    def originFailed(self, e: HTTPError) -> None:
        """The origin broke HTTP: 502 if nothing was sent yet, else cut the client off."""
        self.rt.metrics.upstreamErrors.labels("reset").inc()
        self.reason = e.reason
        if self.origin is not None:
            origin, self.origin = self.origin, None
            origin.detach()
        if self.responseStarted:
            self._abortClient()
        else:
            self._localError(
                e.status,
                f"Bad response from the origin: {e.reason}.",
                "http_protocol_error",
            )

    def originLost(self, reason) -> None:
        """The origin closed before its response was complete."""
        self.origin = None
        if self.finished:
            return
        tlsProblem = describeFailure(reason)
        if tlsProblem is not None and not self.responseStarted:
            # Never a silently trusted origin: the client is told why, in the body.
            self.rt.metrics.upstreamErrors.labels("tls").inc()
            peer = f"the origin {self.target.host}"
            if self.route is not None and self.target.scheme == "http":
                # Absolute form to an https:// upstream: the TLS that failed is the proxy's.
                peer = f"the upstream proxy {self.rt.upstream.label}:{self.route.port}"
            self._localError(
                502,
                f"TLS to {peer} failed: {tlsProblem}",
                "tls_certificate_error",
            )
            return
        if (
            not self.responseStarted
            and self.reused
            and not self.retried
            and self.head.method in _IDEMPOTENT
            and self.framing.kind == NONE
        ):
            # A pooled connection the origin had already closed: the request never reached
            # it, so one retry on a fresh connection is safe (idempotent, no body).
            self.retried = True
            self.reused = False
            self.client.transport.unregisterProducer()
            self.pending = []
            self._dial()
            return
        self.rt.metrics.upstreamErrors.labels("reset").inc()
        if self.responseStarted:
            self.reason = "origin closed mid-response"
            self._abortClient()
        else:
            self._localError(
                502,
                "The origin closed the connection without a response.",
                "http_response_incomplete",
            )

    def _releaseOrigin(self, origin: OriginConnection, reuse: bool) -> None:
        self.origin = None
        self.client.transport.unregisterProducer()
        if origin.transport is not None:
            origin.transport.unregisterProducer()
        self.client.pauser.resume(CONNECTING)
        if reuse:
            self.rt.pool.put(origin)
        else:
            origin.transport.loseConnection()

    # --- endings -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        held = self._heldHead
        if held:
            self._heldHead = b""
            data = held + data
        writeNow(self.client.transport, data)

    def _localError(
        self,
        status: int,
        message: str,
        proxyStatus: str | None,
        action: str = "TCP_MISS",
    ) -> None:
        self.code = status
        self.reason = message
        if self.upgrade is not None:
            # An upgrade the origin never answered (dial failure, timeout, broken reply).
            self.rt.metrics.upgrades.labels("error").inc()
        if self.origin is not None:
            origin, self.origin = self.origin, None
            origin.detach()
        # Unread request body bytes may still be coming: close after answering.
        close = self.closeAfter or not self.requestComplete
        self.closeAfter = close
        body = errorResponse(
            status, message, close=close, proxyStatus=proxyStatus, head=self.head.method == b"HEAD"
        )
        self.client.transport.write(body)
        self._finish(action)

    def _abortClient(self) -> None:
        """Make a truncated response visible: the client sees the connection reset."""
        self.closeAfter = True
        self.finished = True
        self.client.transport.abortConnection()
        self._log()

    def clientLost(self) -> None:
        """The client went away mid-exchange: drop the origin side too."""
        if self.finished:
            return
        self.finished = True
        self.reason = "client closed the connection"
        if self.origin is not None:
            origin, self.origin = self.origin, None
            origin.detach()
        self._log(action="TCP_MISS_ABORTED")

    def _finish(self, action: str = "TCP_MISS") -> None:
        if self.finished:
            return
        self.finished = True
        self._log(action)
        self.client.exchangeDone(self.closeAfter)

    def _log(self, action: str = "TCP_MISS") -> None:
        rt = self.rt
        elapsed = rt.reactor.seconds() - self.started
        m = rt.metrics
        m.request(self.mode, self.head.method, self.code, elapsed)
        if self.mode == "mitm":
            m.api(
                self.target.host,
                normaliseAPI(self.target.path),
                self.head.method,
                self.code,
                elapsed,
                self.received,
            )
        m.moved(self.received, self.sentUpstream, self.sent, self.sent)
        if rt.accessLog is not None:
            rt.accessLog.record(
                AccessRecord(
                    start=self.wallStart,
                    elapsed=elapsed,
                    client=self.client.peerHost,
                    code=self.code,
                    size=self.sent,
                    method=self.head.method.decode("ascii"),
                    url=self.target.url(),
                    user=self.user,
                    action=action,
                    hierarchy=hierarchy(self.ip, self.route is not None),
                    contentType=self.contentType,
                    mode=self.mode,
                    reason=self.reason,
                    version=self.head.version.decode("ascii"),
                )
            )
