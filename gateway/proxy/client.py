"""
The client-facing protocol: the front door every request comes through.

It reads request heads (bounded in size and time), asks the policy and the authenticator,
and hands the request to one of three paths: a forwarded absolute-form request
(L{forward.ForwardExchange}), a CONNECT tunnel (L{connect}), or a local answer. It owns the
connection's timers and keep-alive; the paths own the bytes.
"""

from __future__ import annotations

import time

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from ..accesslog import AccessRecord
from ..http1.framing import NONE, requestFraming
from ..http1.headers import Target, parseAbsoluteTarget, parseAuthority
from ..http1.parse import (
    HTTPError,
    RequestHead,
    parseRequestHead,
    splitRequestHead,
    splitTokens,
)
from ..policy import clientAllowed
from ..tls.layer import startTLS
from .connect import startConnect
from .flow import CONNECTING, PEER, PIPELINE, ReadPauser
from .forward import ForwardExchange
from .responses import errorResponse

__all__ = ["ClientConnection", "ClientFactory"]

_HEAD, _BODY, _WAIT, _TUNNEL, _CLOSED, _PEEK = range(6)
_PIPELINE_LIMIT = 65536
_TOO_LARGE = "The request head is larger than the proxy accepts."
_INFO = (
    "This is proxygate, an HTTP forward proxy. Configure it as your proxy "
    "(http_proxy / https_proxy) instead of requesting it directly."
)


@implementer(IHalfCloseableProtocol)
class ClientConnection(Protocol):
    def __init__(self, rt) -> None:
        self.rt = rt
        self._state = _HEAD
        self._buf = b""
        self._scanned = 0  # bytes of _buf already searched for an incomplete head
        self._body = None  # body reader of the request being read
        self.exchange = None  # ForwardExchange or a CONNECT attempt
        self.splice = None
        self.persistent = True
        self.version = b"HTTP/1.1"
        self.peerHost = "-"
        self.pauser: ReadPauser | None = None
        self._deadline = 0.0
        self._timer = None
        self._timeoutKind = "idle"
        self._readClosed = False
        self._draining = False
        self.requests = 0
        # Set once a CONNECT is intercepted: (host, port, user) every request inside goes to.
        self.mitm: tuple[str, int, str | None] | None = None

    # --- connection lifecycle ----------------------------------------------------------

    def connectionMade(self) -> None:
        rt = self.rt
        self.pauser = ReadPauser(self.transport)
        self.peerHost = _peerHost(self.transport.getPeer())
        rt.connections.add(self)
        live = rt.metrics.live
        live.clientConnections += 1
        live.clientConnectionsTotal += 1
        if not clientAllowed(rt.clientCIDRs, self.peerHost):
            rt.metrics.denied.labels("client").inc()
            self._refuseConnection(403, "Your address is not allowed to use this proxy.", "client")
            return
        if len(rt.connections) > rt.maxConnections:
            rt.metrics.denied.labels("limit").inc()
            self._refuseConnection(
                503, "The proxy is at its connection limit; retry later.", "connection limit"
            )
            return
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        # The first head is due header_timeout after the accept, as nginx and Apache's
        # mod_reqtimeout count it: connections that never send a byte must not hold slots
        # for idle_timeout (a silent slowloris against max_connections). Between requests
        # of a kept-alive connection the idle timeout applies.
        self._arm("header", rt.headerTimeout)

    def _refuseConnection(self, status: int, message: str, reason: str) -> None:
        self._state = _CLOSED
        self.transport.write(errorResponse(status, message))
        self.transport.loseConnection()
        self._logLocal(b"-", "-", status, "TCP_DENIED", reason)

    def connectionLost(self, reason) -> None:
        rt = self.rt
        rt.connections.discard(self)
        rt.metrics.live.clientConnections -= 1
        self._state = _CLOSED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.splice is not None:
            self.splice.clientLost()
        elif self.exchange is not None:
            exchange, self.exchange = self.exchange, None
            exchange.clientLost()

    def readConnectionLost(self) -> None:
        """The client half-closed: finish what it asked for, then close."""
        self._readClosed = True
        if self.splice is not None:
            self.splice.clientReadClosed()
            return
        if self._state == _BODY:
            # The body was cut short: never forward an incomplete message as complete.
            self.transport.loseConnection()
        elif self.exchange is None:
            self.transport.loseConnection()
        else:
            self.persistent = False

    def writeConnectionLost(self) -> None:
        pass

    # --- timers --------------------------------------------------------------------------

    def _arm(self, kind: str, seconds: float) -> None:
        """One timer per connection; moving the deadline later costs no reactor call."""
        self._timeoutKind = kind
        self._deadline = self.rt.reactor.seconds() + seconds
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self.rt.reactor.callLater(seconds, self._timerFired)
        elif timer.getTime() > self._deadline:
            timer.reset(seconds)

    def touch(self) -> None:
        """Activity on a body or tunnel: push the idle deadline out."""
        self._deadline = self.rt.reactor.seconds() + self.rt.idleTimeout

    def _timerFired(self) -> None:
        self._timer = None
        now = self.rt.reactor.seconds()
        if now < self._deadline:
            self._timer = self.rt.reactor.callLater(self._deadline - now, self._timerFired)
            return
        self._timedOut()

    def _timedOut(self) -> None:
        if self._state == _CLOSED:
            # Still open an idle period after we closed: a TLS client (MITM tunnel) that
            # never answers our close_notify keeps a TLS close pending forever. Drop it.
            self.transport.abortConnection()
            return
        if self.splice is not None:
            self.splice.abort()
            return
        if (
            self._timeoutKind == "header"
            and self._state == _HEAD
            and not self._buf
            and self.requests == 0
            and self.mitm is None
        ):
            # Nothing was asked: close without a 408 that a client racing to send its first
            # request would take for the answer to it.
            self.rt.metrics.denied.labels("limit").inc()
            self._state = _CLOSED
            self.transport.loseConnection()
            self._arm("close", self.rt.headerTimeout)
            self._logLocal(b"-", "-", 0, "TAG_NONE", "no request within header_timeout")
            return
        if self._timeoutKind == "header" and self._state == _HEAD:
            self.rt.metrics.denied.labels("limit").inc()
            self._state = _CLOSED
            self.transport.write(errorResponse(408, "The request head took too long to arrive."))
            self.transport.loseConnection()
            self._arm("close", self.rt.headerTimeout)  # bound a TLS close the peer ignores
            self._logLocal(
                b"-", "-", 408, "TAG_NONE", "request head not complete within header_timeout"
            )
            return
        exchange = self.exchange
        if exchange is not None and isinstance(exchange, ForwardExchange):
            if not exchange.responseStarted and not exchange.finished:
                exchange.rt.metrics.upstreamErrors.labels("timeout").inc()
                exchange._localError(
                    504,
                    "The origin did not answer in time.",
                    "connection_timeout",
                )
                return
            exchange.clientLost()
        elif exchange is None and self._state == _HEAD:
            # An idle keep-alive connection: close gracefully. The last response may still
            # sit in the kernel's buffers, being read; a reset would discard it.
            self._state = _CLOSED
            self.transport.loseConnection()
            self._arm("close", self.rt.headerTimeout)
            return
        self.transport.abortConnection()

    # --- reading -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _TUNNEL:
            self.splice.fromClient(data)
        elif state == _BODY:
            self._feedBody(data)
        elif state == _HEAD:
            if self._timeoutKind != "header":
                # Armed once per head: empty lines before a request line (stripped from the
                # buffer) must not restart the clock, or CRLFs would keep a slowloris alive.
                self._arm("header", self.rt.headerTimeout)
            self._buf += data
            self._readHead()
        elif state == _PEEK:
            self._buf += data
            self._peeked()
        elif state == _WAIT:
            self._buf += data
            if len(self._buf) > _PIPELINE_LIMIT:
                self.pauser.pause(PIPELINE)

    def _readHead(self) -> None:
        try:
            block, self._buf = splitRequestHead(
                self._buf, self.rt.maxHeaderSize, _TOO_LARGE, self._scanned
            )
            if block is None:
                self._scanned = len(self._buf)  # a trickled head: scan only what comes next
                return
            self._scanned = 0
            head = parseRequestHead(block, self.rt.maxHeaders)
        except HTTPError as e:
            self._reject(e)
            return
        self.requests += 1
        self._arm("idle", self.rt.idleTimeout)
        self.version = head.version
        tokens = splitTokens(head.values(b"connection"))
        # RFC 9112 §9.3: never a persistent connection with an HTTP/1.0 client.
        self.persistent = (
            head.version == b"HTTP/1.1" and b"close" not in tokens and not self._draining
        )
        auth = self.rt.authenticator
        if self.mitm is not None:
            # Inside an intercepted tunnel: the CONNECT carried the credentials.
            self._dispatch(head, tokens, self.mitm[2])
            return
        if auth is not None:
            values = head.values(b"proxy-authorization")
            d = auth.authenticate(values[0] if len(values) == 1 else None)
            if d.called:
                # The hot path: a cached credential answers synchronously.
                result = []
                d.addBoth(result.append)
                self._authenticated(head, tokens, result[0])
            else:
                self._state = _WAIT
                self.pauser.pause(PIPELINE)
                d.addBoth(self._authDone, head, tokens)
            return
        self._dispatch(head, tokens, None)

    def _authDone(self, result, head, tokens) -> None:
        if self._state == _CLOSED:
            return
        self.pauser.resume(PIPELINE)
        self._state = _HEAD
        self._authenticated(head, tokens, result)

    def _authenticated(self, head: RequestHead, tokens, user) -> None:
        if not isinstance(user, str):
            self.rt.metrics.denied.labels("auth").inc()
            auth = self.rt.authenticator
            # A body the client may already be sending cannot be skipped reliably: close.
            hasBody = any(
                n.lower() in (b"content-length", b"transfer-encoding") for n, _ in head.headers
            )
            close = hasBody or not self.persistent or head.method == b"CONNECT"
            self._answer(
                head,
                407,
                "Proxy authentication required: send valid credentials "
                "(for example http://user:password@proxy:port).",
                "TCP_DENIED",
                close=close,
                extraHeaders=((b"Proxy-Authenticate", auth.challenge()),),
                reason="auth",
            )
            return
        self._dispatch(head, tokens, user)

    def _dispatch(self, head: RequestHead, tokens, user: str | None) -> None:
        rt = self.rt
        if head.method == b"CONNECT":
            try:
                # A CONNECT has no content (RFC 9110 §9.3.6): what follows its head is tunnel
                # data, so a body the client frames would be read two ways. Refuse it.
                if requestFraming(head).kind != NONE:
                    raise HTTPError(400, "a CONNECT request has no content")
            except HTTPError as e:
                self._reject(e, head)
                return
            self._state = _WAIT
            startConnect(self, head, user)
            return
        target = head.target
        if self.mitm is not None:
            self._dispatchMitm(head, tokens, user)
            return
        if target[:1] == b"/" or target == b"*":
            # A body it may carry is not read: close rather than parse it as a request.
            hasBody = any(
                n.lower() in (b"content-length", b"transfer-encoding") for n, _ in head.headers
            )
            self._answer(
                head,
                400,
                _INFO,
                "TAG_NONE",
                close=hasBody or not self.persistent,
                reason="origin-form request",
            )
            return
        try:
            hosts = head.values(b"host")
            if head.version == b"HTTP/1.1" and len(hosts) != 1:
                raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host field")
            if len(hosts) > 1:
                raise HTTPError(400, "more than one Host field")
            _checkHost(hosts)
            parsed = parseAbsoluteTarget(target)
            if head.method == b"OPTIONS" and parsed.path == b"/" and target[-1:] != b"/":
                parsed.path = b"*"  # RFC 9112 §3.2.4: no path and no query is the server
            framing = requestFraming(head)
            if self._maxForwardsZero(head, framing):
                return
        except HTTPError as e:
            self._reject(e, head)
            return
        decision = rt.destinations.checkName(parsed.host, parsed.port)
        if not decision.allowed:
            rt.metrics.denied.labels(decision.reason or "destination").inc()
            self._answer(
                head,
                403,
                f"Destination denied: {decision.detail}",
                "TCP_DENIED",
                close=not self.persistent or framing.kind != NONE,
                url=parsed.url(),
                reason=decision.detail,
            )
            return
        self._forward(head, tokens, parsed, framing, user, "forward")

    def _dispatchMitm(self, head: RequestHead, tokens, user: str | None) -> None:
        """A request decrypted inside an intercepted tunnel: always to the CONNECT target."""
        host, port, _ = self.mitm
        authority = f"[{host}]" if ":" in host else host
        if port != 443:
            authority += f":{port}"
        target = head.target
        if target[:1] != b"/":
            # Absolute form inside the tunnel is fine only for the tunnel's own origin.
            expected = f"https://{authority}".encode()
            if not (
                target.lower() == expected
                or target.lower().startswith(expected + b"/")
                or target.lower().startswith(expected + b"?")
            ):
                self._reject(HTTPError(400, "a decrypted tunnel only reaches its own origin"), head)
                return
            target = target[len(expected) :] or b"/"
        try:
            if head.version == b"HTTP/1.1" and len(head.values(b"host")) != 1:
                raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host field")
            _checkHost(head.values(b"host"))
            framing = requestFraming(head)
            if self._maxForwardsZero(head, framing):
                return
        except HTTPError as e:
            self._reject(e, head)
            return
        parsed = Target("https", host, port, target, authority.encode("ascii"))
        self._forward(head, tokens, parsed, framing, user, "mitm")

    def _maxForwardsZero(self, head: RequestHead, framing) -> bool:
        """
        Max-Forwards on TRACE and OPTIONS (RFC 9110 §7.6.2): exactly one 1*DIGIT value
        (else 400), and at 0 the proxy is the final recipient and answers (returns True).
        """
        if head.method != b"TRACE" and head.method != b"OPTIONS":
            return False
        values = head.values(b"max-forwards")
        if not values:
            return False
        if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 10:
            raise HTTPError(400, "invalid Max-Forwards")
        if int(values[0]):
            return False
        self._answer(
            head,
            200 if head.method == b"OPTIONS" else 405,
            "Max-Forwards reached zero at proxygate.",
            "TAG_NONE",
            close=not self.persistent or framing.kind != NONE,
        )
        return True

    def _forward(self, head: RequestHead, tokens, parsed: Target, framing, user, mode) -> None:
        upgrade = None
        if b"upgrade" in tokens and framing.kind == NONE and head.version == b"HTTP/1.1":
            values = head.values(b"upgrade")
            if values:
                upgrade = b", ".join(values)
        exchange = ForwardExchange(
            self, head, parsed, framing, upgrade=upgrade, user=user, mode=mode
        )
        self.exchange = exchange
        if framing.kind == NONE:
            self._state = _WAIT
            self._body = None
        else:
            self._state = _BODY
            self._body = framing.reader()
        exchange.begin()
        if self._state == _BODY and self._buf:
            rest, self._buf = self._buf, b""
            self._feedBody(rest)
        elif self._state == _WAIT and len(self._buf) > _PIPELINE_LIMIT:
            self.pauser.pause(PIPELINE)

    def _feedBody(self, data: bytes) -> None:
        self._deadline = self.rt.reactor.seconds() + self.rt.idleTimeout
        try:
            body, done, rest = self._body.feed(data)
        except HTTPError as e:
            exchange, self.exchange = self.exchange, None
            self._state = _CLOSED
            if exchange is not None:
                exchange.reason = e.reason
                exchange.clientLost()
            if exchange is None or not exchange.responseStarted:
                self.transport.write(errorResponse(e.status, e.reason))
            self.transport.loseConnection()
            return
        exchange = self.exchange
        if body and exchange is not None:
            exchange.requestBody(body)
        if done:
            self._body = None
            self._state = _WAIT
            self._buf = rest + self._buf if rest else self._buf
            if exchange is not None:
                exchange.requestEnd()
            if len(self._buf) > _PIPELINE_LIMIT:
                self.pauser.pause(PIPELINE)

    # --- writing answers -----------------------------------------------------------------

    def exchangeDone(self, close: bool) -> None:
        """The response is fully written: read the next request, or close."""
        self.exchange = None
        if self._state == _CLOSED:
            return
        # Nothing produces into this connection between exchanges. One that failed after
        # its origin was attached (a 502 when the origin closed without answering) left that
        # origin registered: the next request's registerProducer (an origin, a CONNECT's
        # splice) raised and the connection hung, and a paused one would keep a close from
        # completing. Its pause reasons go with it.
        self.transport.unregisterProducer()
        self.pauser.resume(PEER | CONNECTING)
        if self._state == _BODY:
            # The response ended before the request body: nothing more can be read safely.
            close = True
        if close or not self.persistent or self._readClosed or self._draining:
            self._state = _CLOSED
            self.transport.loseConnection()
            return
        self._state = _HEAD
        self._arm("idle", self.rt.idleTimeout)
        self.pauser.resume(PIPELINE)
        if self._buf:
            self._arm("header", self.rt.headerTimeout)
            self._readHead()

    def startSplice(self, splice) -> None:
        """Become a blind pipe (CONNECT established, or 101 relayed)."""
        self.splice = splice
        self.exchange = None
        self._state = _TUNNEL
        self._arm("idle", self.rt.idleTimeout)
        self.pauser.resume(PIPELINE)
        rest, self._buf = self._buf, b""
        if rest:
            splice.fromClient(rest)
        if self._readClosed:
            splice.clientReadClosed()

    def peekFirstByte(self, attempt) -> None:
        """
        An intercepted CONNECT has been answered 200: hold the tunnel's first bytes until
        C{attempt.firstByte} has decided between decrypting and relaying blind.
        """
        self.exchange = attempt
        self._state = _PEEK
        self._arm("idle", self.rt.idleTimeout)
        if self._buf:
            self._peeked()

    def _peeked(self) -> None:
        self._state = _WAIT
        self.exchange.firstByte(self._buf[:1])

    def startMitm(self, host: str, port: int, creator, user: str | None) -> None:
        """
        Speak TLS as the origin on this same connection (the CONNECT is answered) and read
        the decrypted requests. Bytes that arrived behind the CONNECT head (the
        ClientHello, usually) are handed to the TLS layer first.
        """
        self.exchange = None
        self.mitm = (host, port, user)
        self.persistent = True
        self.version = b"HTTP/1.1"
        tls = startTLS(self, creator)
        self._state = _HEAD
        # Like a new connection: idle until the first request byte (then the header timer);
        # a tunnel set up ahead of use must not get a 408 after header_timeout.
        self._arm("idle", self.rt.idleTimeout)
        early, self._buf = self._buf, b""
        if early:
            tls.dataReceived(early)

    def _reject(self, e: HTTPError, head: RequestHead | None = None) -> None:
        """A request the proxy refuses to parse further: answer and close."""
        if e.status == 431:
            self.rt.metrics.denied.labels("limit").inc()
        self._state = _CLOSED
        self.transport.write(errorResponse(e.status, e.reason[:1].upper() + e.reason[1:] + "."))
        self.transport.loseConnection()
        method = head.method if head is not None else b"-"
        self._logLocal(method, "-", e.status, "TAG_NONE", e.reason)

    def _answer(
        self,
        head: RequestHead,
        status: int,
        message: str,
        action: str,
        *,
        close: bool,
        extraHeaders=(),
        url: str = "-",
        reason: str | None = None,
    ) -> None:
        """A complete local answer to a parsed request; the connection may live on."""
        self.transport.write(
            errorResponse(
                status, message, close=close, extraHeaders=extraHeaders, head=head.method == b"HEAD"
            )
        )
        self._logLocal(
            head.method, url if url != "-" else _safeTarget(head), status, action, reason
        )
        self.rt.metrics.request("forward", head.method, status, 0.0)
        self.exchangeDone(close)

    def _logLocal(
        self, method: bytes, url: str, status: int, action: str, reason: str | None
    ) -> None:
        log = self.rt.accessLog
        if log is None:
            return
        log.record(
            AccessRecord(
                start=time.time(),
                elapsed=0.0,
                client=self.peerHost,
                code=status,
                size=0,
                method=method.decode("ascii", "replace"),
                url=url,
                user=None,
                action=action,
                hierarchy="HIER_NONE/-",
                contentType="text/plain",
                mode="local",
                reason=reason,
            )
        )

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the current exchange."""
        self._draining = True
        self.persistent = False
        if self._state == _HEAD and not self._buf:
            self._state = _CLOSED
            self.transport.loseConnection()


def _checkHost(hosts: list[bytes]) -> None:
    """A Host field with an invalid value is a 400 (RFC 9112 §3.2), even though the proxy
    replaces it with the target's authority; an empty one is valid."""
    if hosts and hosts[0]:
        try:
            parseAuthority(hosts[0], 80)
        except HTTPError:
            raise HTTPError(400, "invalid Host field")


def _peerHost(address) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return "-"
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _safeTarget(head: RequestHead) -> str:
    """The target for the log, without query or userinfo."""
    target = head.target.split(b"?", 1)[0]
    if b"@" in target:
        return "-"
    return target.decode("ascii", "replace")


@implementer(IProtocolNegotiationFactory)
class ClientFactory(Factory):
    """Builds client connections bound to one runtime (one per service)."""

    noisy = False

    def __init__(self, rt) -> None:
        self.rt = rt

    def acceptableProtocols(self) -> list[bytes]:
        """
        ALPN on an ssl: listener: http/1.1. Without it Twisted's select callback answers
        an ALPN offer (curl to an HTTPS proxy, urllib3, another proxygate) with an empty
        protocol and OpenSSL aborts the handshake ("internal error").
        """
        return [b"http/1.1"]

    def buildProtocol(self, addr):
        p = ClientConnection(self.rt)
        p.factory = self
        return p
