"""
The client-facing HTTP/1.1 connection: the front door every request comes through, and the
downstream side of each exchange it starts (L{gateway.exchange.side.Downstream}).

It reads request heads (bounded in size and time), asks the policy and the authenticator,
and hands each request to one of three paths: an exchange (an absolute-form request, or one
decrypted inside an intercepted tunnel), a CONNECT tunnel (L{gateway.proxy.connect}), or a
local answer. It owns the connection's timers and keep-alive; the exchange owns the request.

A connection inside an intercepted tunnel is one of these too, over the tunnel's TLS layer,
with the tunnel as its C{tunnel}: its requests all go to the CONNECT target.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from ..exchange.answers import answer
from ..exchange.exchange import Exchange
from ..exchange.problems import Problem, problemForStatus
from ..exchange.targets import forwardTarget, maxForwards, tunnelTarget
from ..exchange.transaction import Transaction
from ..http1.framing import LAST_CHUNK, NONE, encodeChunk, requestFraming
from ..http1.headers import Target
from ..http1.parse import (
    HTTPError,
    RequestHead,
    parseRequestHead,
    splitRequestHead,
)
from ..http1.rewrite import (
    connectionOptions,
    delivery,
    keepAlive,
    requestFromHead,
    responseHeadBytes,
    upgradeOffer,
)
from ..message import Response
from ..policy import checkClient
from ..seam import writeNow
from .connect import Tunnel
from .flow import CONNECTING, PEER, PIPELINE, ReadPauser, TransportSide, noDelay
from .tunnel import Stream

__all__ = ["ClientConnection", "ClientFactory"]

HEAD = "head"  # reading a request head (or idle between requests)
BODY = "body"  # reading a request body
WAIT = "wait"  # the request is read; its answer is pending (pipelined bytes are kept)
STREAM = "stream"  # handed over to raw bytes (a tunnel, a 101, an intercepted tunnel's TLS)
CLOSED = "closed"  # closing or closed: nothing more is read

_PIPELINE_LIMIT = 65536
_TOO_LARGE = "The request head is larger than the proxy accepts."
_INFO = (
    "This is proxygate, an HTTP forward proxy. Configure it as your proxy "
    "(http_proxy / https_proxy) instead of requesting it directly."
)
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ClientConnection(TransportSide, Protocol):
    """
    @ivar client: the client's address as the proxy knows it, for policy, logs and
        X-Forwarded-For.
    @ivar tunnel: the intercepted CONNECT this connection runs inside, or None.
    @ivar mode: the metrics mode of its requests (forward, or mitm inside a tunnel).
    @ivar idleTimeout: how long the current request's body, response or tunnel may sit
        idle ([proxy] idle_timeout; a reverse listener's route sets its own).
    """

    def __init__(self, rt, tunnel: Tunnel | None = None) -> None:
        self.rt = rt
        self.tunnel = tunnel
        self.mode = "forward" if tunnel is None else "mitm"
        self.client = "-" if tunnel is None else tunnel.client
        self.idleTimeout = rt.idleTimeout
        self.exchange = None  # the Exchange or Tunnel the current request is in
        self.stream: Stream | None = None
        self.nestedConnection: ClientConnection | None = None
        self._scanned = 0  # bytes of _buf already searched for an incomplete head
        self.persistent = True
        self.version = b"HTTP/1.1"
        self.pauser: ReadPauser | None = None
        self.producer: ReadPauser | None = None
        self.requests = 0
        self._state = HEAD
        self._buf = b""
        self._body = None  # body reader of the request being read
        self._deadline = 0.0
        self._timer = None  # None whenever it is not pending (fired or cancelled)
        self._timerAt = 0.0  # when it fires
        self._timeoutKind = "idle"
        self._readClosed = False
        self._draining = False
        self._handshook = False
        # The response being written: its held head, chunked or not, close after or not.
        self._held = b""
        self._chunked = False
        self._closeAfter = False

    # --- connection lifecycle ----------------------------------------------------------

    def connectionMade(self) -> None:
        rt = self.rt
        # What pauses this connection's reading when a peer cannot take more (throttle).
        self.pauser = self.producer = ReadPauser(self.transport)
        if self.tunnel is not None:
            # Inside an intercepted tunnel: the outer connection was counted and checked.
            # Idle until the first request byte (then the header timer): a tunnel set up
            # ahead of use must not get a 408 after header_timeout.
            self._arm("idle", rt.idleTimeout)
            return
        self.client = _peerHost(self.transport.getPeer())
        rt.connections.add(self)
        live = rt.metrics.live
        live.clientConnections += 1
        live.clientConnectionsTotal += 1
        decision = checkClient(rt.clientCIDRs, self.client)
        if not decision.allowed:
            self._refuseConnection(
                Problem(
                    403,
                    "client",
                    f"Your address is not allowed to use this proxy ({decision.detail}).",
                )
            )
            return
        if len(rt.connections) > rt.maxConnections:
            self._refuseConnection(
                Problem(503, "limit", "The proxy is at its connection limit; retry later.")
            )
            return
        noDelay(self.transport)
        # The first head is due header_timeout after the accept, as nginx and Apache's
        # mod_reqtimeout count it: connections that never send a byte must not hold slots
        # for idle_timeout (a silent slowloris against max_connections). Between requests
        # of a kept-alive connection the idle timeout applies.
        self._arm("header", rt.headerTimeout)

    def _refuseConnection(self, problem: Problem) -> None:
        """Refused before any request: answer, close, log (not a request in the metrics)."""
        self._state = CLOSED
        self._localLog(None, problem, self._write(problem, close=True), counted=False)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        rt = self.rt
        if self.tunnel is None:
            rt.connections.discard(self)
            rt.metrics.live.clientConnections -= 1
        elif not self._handshook:
            self.tunnel.handshakeFailed(reason)
        self._state = CLOSED
        self._cancelTimer()
        if self.stream is not None:
            self.stream.connectionLost(reason)
        elif self.exchange is not None:
            exchange, self.exchange = self.exchange, None
            exchange.downstreamLost()

    def handshakeCompleted(self) -> None:
        """
        A TLS layer below finished its handshake: an ssl: listener's, or an intercepted
        tunnel's (the client accepted our certificate: the tunnel is logged as intercepted).
        """
        self._handshook = True
        if self.tunnel is not None:
            self.tunnel.handshakeDone()

    def readConnectionLost(self) -> None:
        """The client half-closed: finish what it asked for, then close."""
        self._readClosed = True
        if self._state == STREAM:
            self.stream.readConnectionLost()
            return
        if self._state == BODY:
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
        """
        One timer per connection; moving the deadline later costs no reactor call (the
        timer, when it fires early, sleeps again until the deadline).
        """
        self._timeoutKind = kind
        deadline = self._deadline = self.rt.reactor.seconds() + seconds
        if self._timer is None:
            self._timer = self.rt.reactor.callLater(seconds, self._timerFired)
            self._timerAt = deadline
        elif self._timerAt > deadline:
            self._timer.reset(seconds)
            self._timerAt = deadline

    def touch(self) -> None:
        """Activity on a body or tunnel: push the idle deadline out."""
        self._deadline = self.rt.reactor.seconds() + self.idleTimeout

    def _timerFired(self) -> None:
        self._timer = None
        now = self.rt.reactor.seconds()
        if now < self._deadline:
            self._timer = self.rt.reactor.callLater(self._deadline - now, self._timerFired)
            self._timerAt = self._deadline
            return
        self._timedOut()

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timedOut(self) -> None:
        state = self._state
        if state == CLOSED:
            # Still open an idle period after we closed: a TLS client (MITM tunnel) that
            # never answers our close_notify keeps a TLS close pending forever. Drop it.
            self.transport.abortConnection()
            return
        if state == STREAM:
            self.shutdown()
            return
        if self._timeoutKind == "header" and state == HEAD:
            if not self._buf and self.requests == 0 and self.tunnel is None:
                # Nothing was asked: close without a 408 that a client racing to send its
                # first request would take for the answer to it.
                self._state = CLOSED
                self._localLog(
                    None, Problem(0, "idle", "No request within header_timeout."), 0, False
                )
            else:
                self._state = CLOSED
                problem = Problem(
                    408, "header_timeout", "The request head took too long to arrive."
                )
                self._localLog(None, problem, self._write(problem, close=True), counted=False)
            self.transport.loseConnection()
            self._arm("close", self.rt.headerTimeout)  # bound a TLS close the peer ignores
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.timedOut()
        elif state == HEAD:
            # An idle keep-alive connection: close gracefully. The last response may still
            # sit in the kernel's buffers, being read; a reset would discard it.
            self._state = CLOSED
            self.transport.loseConnection()
            self._arm("close", self.rt.headerTimeout)
        else:
            self.transport.abortConnection()

    # --- reading -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state is HEAD:
            self._buf += data
            requests = self.requests
            self._readHead()
            if requests == self.requests and self._timeoutKind != "header":
                # Bytes that did not complete a head start its clock, once per head: empty
                # lines before a request line (stripped from the buffer) must not restart it,
                # or CRLFs would keep a slowloris alive. (A head complete in one read needs
                # no clock.)
                self._arm("header", self.rt.headerTimeout)
        elif state is STREAM:
            self.stream.dataReceived(data)
        elif state is BODY:
            self._feedBody(data)
        elif state is WAIT:
            self._buf += data
            if len(self._buf) > _PIPELINE_LIMIT:
                self.pauser.pause(PIPELINE)

    def _readHead(self) -> None:
        rt = self.rt
        try:
            block, self._buf = splitRequestHead(
                self._buf, rt.maxHeaderSize, _TOO_LARGE, self._scanned
            )
            if block is None:
                self._scanned = len(self._buf)  # a trickled head: scan only what comes next
                return
            self._scanned = 0
            head = parseRequestHead(block, rt.maxHeaders)
        except HTTPError as e:
            self._reject(problemForStatus(e.status, e.reason))
            return
        self.requests += 1
        self._arm("idle", rt.idleTimeout)
        self.version = head.version
        tokens = connectionOptions(head)
        self.persistent = keepAlive(head.version, tokens) and not self._draining
        auth = rt.authenticator
        if self.tunnel is not None:
            # Inside an intercepted tunnel: the CONNECT carried the credentials.
            self._dispatch(head, tokens, self.tunnel.user)
        elif auth is None:
            self._dispatch(head, tokens, None)
        else:
            values = head.values(b"proxy-authorization")
            d = auth.authenticate(values[0] if len(values) == 1 else None)
            if d.called:
                # The hot path: a cached credential answers synchronously.
                result = []
                d.addBoth(result.append)
                self._authenticated(head, tokens, result[0])
            else:
                self._state = WAIT
                self.pauser.pause(PIPELINE)
                d.addBoth(self._authDone, head, tokens)

    def _authDone(self, result, head: RequestHead, tokens) -> None:
        if self._state == CLOSED:
            return
        self.pauser.resume(PIPELINE)
        self._state = HEAD
        self._authenticated(head, tokens, result)

    def _authenticated(self, head: RequestHead, tokens, user) -> None:
        if isinstance(user, str):
            self._dispatch(head, tokens, user)
            return
        # A body the client may already be sending cannot be skipped reliably: close.
        self._answer(
            head,
            Problem(
                407,
                "auth",
                "Proxy authentication required: send valid credentials "
                "(for example http://user:password@proxy:port).",
            ),
            close=_hasBody(head) or not self.persistent or head.method == b"CONNECT",
            extraFields=[(b"Proxy-Authenticate", self.rt.authenticator.challenge())],
        )

    def _dispatch(self, head: RequestHead, tokens, user: str | None) -> None:
        rt = self.rt
        tunnel = self.tunnel
        if head.method == b"CONNECT":
            if tunnel is not None:
                self._answer(
                    head,
                    Problem(
                        405,
                        "method",
                        "A CONNECT inside an intercepted tunnel is refused: it would "
                        "escape the inspection this proxy applies.",
                    ),
                    close=True,
                    user=user,
                )
                return
            # A CONNECT has no content (RFC 9110 §9.3.6): what follows its head is tunnel
            # data, so a body the client frames would be read two ways. Refuse it.
            try:
                framing = requestFraming(head)
            except HTTPError as e:
                self._reject(problemForStatus(e.status, e.reason), head)
                return
            if framing.kind != NONE:
                self._reject(Problem(400, "bad_request", "A CONNECT request has no content."), head)
                return
            self._state = WAIT
            self.exchange = Tunnel(rt, self, head, user)
            self.exchange.begin()
            return
        if tunnel is None and (head.target[:1] == b"/" or head.target == b"*"):
            # A body it may carry is not read: close rather than parse it as a request.
            self._answer(
                head,
                Problem(400, "not_a_proxy_request", _INFO),
                close=_hasBody(head) or not self.persistent,
                user=user,
            )
            return
        connector = mode = None
        try:
            if tunnel is not None:
                target = tunnelTarget(head, tunnel.host, tunnel.port)
                connector = tunnel.connector
            elif head.target[:6].lower() == b"ftp://" and rt.config.proxy.ftp:
                target, connector = _ftpTarget(rt, head)
                mode = "ftp"
            else:
                target = forwardTarget(head)
            framing = requestFraming(head)
            final = maxForwards(head)
        except HTTPError as e:
            self._reject(problemForStatus(e.status, e.reason), head, user)
            return
        if final is not None:
            self._answer(
                head,
                Problem(final, "max_forwards", "Max-Forwards reached zero at proxygate."),
                close=not self.persistent or framing.kind != NONE,
                user=user,
            )
            return
        if tunnel is None:
            decision = rt.destinations.checkName(target.host, target.port)
            if not decision.allowed:
                self._answer(
                    head,
                    Problem(403, "destination", f"Destination denied: {decision.detail}"),
                    close=not self.persistent or framing.kind != NONE,
                    url=target.url(),
                    user=user,
                )
                return
        upgrade = upgradeOffer(head, framing) if b"upgrade" in tokens else None
        request = requestFromHead(head, target, framing, tokens, upgrade)
        exchange = Exchange(
            rt, self, request, mode=mode or self.mode, user=user, connector=connector
        )
        self._run(exchange, None if framing.kind == NONE else framing.reader())

    def _run(self, exchange, body) -> None:
        """Start C{exchange}; C{body} reads the request's body from here (None: it has none)."""
        self.exchange = exchange
        if body is None:
            self._state = WAIT
        else:
            self._state = BODY
            self._body = body
        exchange.begin()
        if self._state == BODY and self._buf:
            rest, self._buf = self._buf, b""
            self._feedBody(rest)
        elif self._state == WAIT and len(self._buf) > _PIPELINE_LIMIT:
            self.pauser.pause(PIPELINE)

    def _feedBody(self, data: bytes) -> None:
        self._deadline = self.rt.reactor.seconds() + self.idleTimeout
        try:
            body, done, rest = self._body.feed(data)
        except HTTPError as e:
            # Bad chunked framing: the rest cannot be read safely. The exchange fails with a
            # cut request; the client gets the error if nothing was answered yet.
            problem = problemForStatus(e.status, e.reason)
            exchange, self.exchange = self.exchange, None
            started = exchange is not None and exchange.code != 0
            if exchange is not None:
                exchange.downstreamLost(problem)
            self._state = CLOSED
            if not started:
                self._write(problem, close=True)
            self.transport.loseConnection()
            return
        exchange = self.exchange
        if body and exchange is not None:
            exchange.requestData(body)
        if done:
            self._body = None
            self._state = WAIT
            if rest:
                self._buf = rest + self._buf
            if exchange is not None:
                exchange.requestEnd()
            if len(self._buf) > _PIPELINE_LIMIT:
                self.pauser.pause(PIPELINE)

    # --- the downstream side of the exchange -------------------------------------------------

    def sendHead(self, response: Response) -> None:
        if response.status < 200 and response.status != 101:
            if self.version == b"HTTP/1.1":  # an HTTP/1.0 client knows no 1xx
                writeNow(self.transport, responseHeadBytes(response, False, False))
            return
        chunked, closeDelimited = delivery(response, self.version)
        # The origin answered before the request body ended (e.g. 413): the rest of that
        # body cannot be told from a next request safely, so close after this.
        close = closeDelimited or not self.persistent or self._state == BODY
        self._chunked = chunked
        self._closeAfter = close
        # Held, so that it leaves with the body that usually came in the same read: one
        # send instead of two (flush sends it alone).
        self._held = responseHeadBytes(response, chunked, close)

    def sendData(self, data: bytes) -> None:
        # A response still flowing is not idle: push the idle deadline out.
        self._deadline = self.rt.reactor.seconds() + self.idleTimeout
        self._send(encodeChunk(data) if self._chunked else data)

    def end(self, trailers=None) -> None:
        if self._chunked:
            if trailers:
                tail = b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
            else:
                tail = LAST_CHUNK
            self._held += tail
        self.flush()
        self._requestDone(self._closeAfter)

    def abort(self) -> None:
        """Make a truncated response visible: the client sees the connection reset."""
        self.exchange = None
        self._state = CLOSED
        self.transport.abortConnection()

    def takeStream(self) -> Stream:
        """Become a byte stream (a 101 relayed, a CONNECT established)."""
        self._state = STREAM
        self.exchange = None
        self._arm("idle", self.idleTimeout)
        self.pauser.resume(PIPELINE)
        rest, self._buf = self._buf, b""
        stream = self.stream = Stream(self.transport, self.pauser, self.touch, rest, self)
        if self._readClosed:
            stream.readConnectionLost()
        return stream

    # --- after a request ---------------------------------------------------------------

    def _requestDone(self, close: bool) -> None:
        """The answer is fully written: read the next request, or close."""
        self.exchange = None
        self._chunked = False
        self._closeAfter = False
        if self._state == CLOSED:
            return
        # The exchange unregistered what produced into this connection; the pause reasons
        # it may have left go with it.
        if self.pauser.reasons & (PEER | CONNECTING):
            self.pauser.resume(PEER | CONNECTING)
        if self._state == BODY:
            # The response ended before the request body: nothing more can be read safely.
            close = True
        if close or not self.persistent or self._readClosed or self._draining:
            self._state = CLOSED
            self.transport.loseConnection()
            return
        self._state = HEAD
        self._arm("idle", self.rt.idleTimeout)
        self.pauser.resume(PIPELINE)
        if self._buf:
            self._arm("header", self.rt.headerTimeout)
            self._readHead()

    def establish(self) -> Stream:
        """A CONNECT succeeded: answer 200 and become the tunnel's byte stream."""
        writeNow(self.transport, ESTABLISHED)
        return self.takeStream()

    def nested(self, tunnel: Tunnel, inner=None):
        """
        The connection that serves the requests decrypted inside this one's intercepted
        tunnel (C{inner}: an HTTP/2 one; by default an HTTP/1.1 L{ClientConnection}): it
        owns the timeouts from now on, and drains with this one.
        """
        self._cancelTimer()
        if inner is None:
            inner = ClientConnection(self.rt, tunnel)
        self.nestedConnection = inner
        return inner

    # --- the proxy's own answers -------------------------------------------------------

    def _write(self, problem: Problem, close: bool, extraFields=(), head: bool = False) -> int:
        """Write the answer to C{problem}; return its body's size."""
        response, body = answer(problem, head, extraFields)
        writeNow(self.transport, responseHeadBytes(response, False, close) + body)
        return len(body)

    def refuse(self, problem: Problem, close: bool, extraFields=(), head: bool = False) -> int:
        """
        Answer the current request with C{problem} (the caller logs), then read the next
        one or close. Returns the body's size.
        """
        self._state = WAIT if self._state != CLOSED else CLOSED
        size = self._write(problem, close, extraFields, head)
        self._requestDone(close)
        return size

    def _answer(
        self,
        head: RequestHead,
        problem: Problem,
        *,
        close: bool,
        extraFields=(),
        url: str | None = None,
        user: str | None = None,
        route: str | None = None,
    ) -> None:
        """A complete local answer to a parsed request; the connection may live on."""
        size = self.refuse(problem, close, extraFields, head.method == b"HEAD")
        self._localLog(head, problem, size, url=url, user=user, route=route)

    def _reject(
        self, problem: Problem, head: RequestHead | None = None, user: str | None = None
    ) -> None:
        """A request the proxy refuses to parse further: answer and close."""
        self._state = CLOSED
        size = self._write(problem, close=True)
        self.transport.loseConnection()
        self._localLog(head, problem, size, counted=head is not None, user=user)

    def _localLog(
        self,
        head: RequestHead | None,
        problem: Problem,
        size: int,
        counted: bool = True,
        url: str | None = None,
        user: str | None = None,
        route: str | None = None,
    ) -> None:
        """
        Count and log an answer the proxy made itself. C{route}: the inbound gateway's route
        the request matched (it is logged as a request of the route, not as a local one).
        """
        rt = self.rt
        method = head.method if head is not None else b"-"
        version = head.version if head is not None else b"HTTP/1.1"
        t = Transaction(rt, self.client, method, self.mode, user, version)
        if route is None:
            t.logMode = "local"
        t.route = route
        t.localAnswer(
            problem,
            size,
            url if url is not None else (_safeTarget(head) if head is not None else "-"),
        )
        problem.count(rt.metrics)
        t.record(counted=counted)

    # --- shutdown ------------------------------------------------------------------------

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the current exchange."""
        self._draining = True
        self.persistent = False
        if self.nestedConnection is not None:
            self.nestedConnection.drain()
        if self._state == HEAD and not self._buf:
            self._state = CLOSED
            self.transport.loseConnection()

    def shutdown(self) -> None:
        """The end of the drain grace (or an idle stream): close now, a tunnel within seconds."""
        stream = self.stream
        if stream is not None and stream.idle is not None:
            stream.idle()
        else:
            self.transport.abortConnection()


def _ftpTarget(rt, head: RequestHead):
    """
    An ftp:// request (what C{ftp_proxy} clients send): its target, and the connector that
    holds the URL's credentials (which never travel in the request).
    """
    from ..exchange.targets import checkHost
    from ..ftp.connector import FTPConnector
    from ..ftp.url import parseFTPTarget

    checkHost(head)
    t = parseFTPTarget(head.target)
    return Target("ftp", t.host, t.port, t.path, t.authority), FTPConnector(rt, t.credentials)


def _hasBody(head: RequestHead) -> bool:
    return bool(head.values(b"content-length") or head.values(b"transfer-encoding"))


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
