"""
HTTP/1.1 connections to origins (or to an upstream proxy, in absolute form): the upstream
side of one exchange at a time, and the pool that keeps them between exchanges.

An origin connection parses the response head and frames the body with the same strict
rules as requests; the exchange it serves decides what the client sees. It goes back to the
pool only when its response ended exactly where its framing said, with nothing after it,
the request was complete, and the origin did not ask to close.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from ..exchange.problems import Problem
from ..http1.framing import LAST_CHUNK, NONE, Framing, encodeChunk, responseFraming
from ..http1.parse import HTTPError, parseResponseHead
from ..http1.rewrite import (
    connectionOptions,
    requestHeadBytes,
    responseFromHead,
    reusable,
    splitResponseHead,
)
from ..message import UNKNOWN, Request
from ..seam import unreadInput
from ..tls.layer import describeFailure
from .flow import ReadPauser, TransportSide, noDelay
from .tunnel import Stream

__all__ = ["OriginConnection", "OriginPool"]

MAX_RESPONSE_HEAD = 65536
#: Seconds a connection waits in the pool after a response that has no body by rule (to
#: HEAD, 204, 304), or one after several 1xx, before it serves another request: a buggy
#: origin's stray body comes within this and closes it (nginx closes idle upstream
#: connections that receive bytes; this adds the wait).
QUARANTINE = 1.0

IDLE = "idle"  # no exchange: in the pool, or being set up
HEAD = "head"  # reading a response head (informational ones included)
BODY = "body"  # reading a response body
STREAM = "stream"  # handed over after a 101


@implementer(IHalfCloseableProtocol)
class OriginConnection(TransportSide, Protocol):
    """
    One connection to an origin, or to an upstream proxy (C{absolute}: requests go in
    absolute form with the proxy's own credentials).

    @ivar key: the pool key (scheme, host, port, route).
    @ivar peer: how failures name the other end ("the origin example.com").
    """

    def __init__(
        self,
        key: tuple,
        peer: str,
        *,
        absolute: bool = False,
        authorization: bytes | None = None,
        viaProxy: bool = False,
    ) -> None:
        self.key = key
        self.peer = peer
        self.absolute = absolute
        self.authorization = authorization
        self.viaProxy = viaProxy
        self.exchange = None
        self.pool: OriginPool | None = None
        self.ip = "-"
        self.method = b"GET"
        self.reusable = False
        self.quarantined = False
        self._interim = 0
        self.idleSince = 0.0
        self.availableAt = 0.0  # out of quarantine then (0: at once)
        self.pauser: ReadPauser | None = None
        self.producer: ReadPauser | None = None
        self._state = IDLE
        self._buf = b""
        self._reader = None
        self._held = b""  # the request head, joining the first body bytes in one write
        self._chunked = False
        self._stream: Stream | None = None

    def connectionMade(self) -> None:
        noDelay(self.transport)
        # What pauses this connection's reading when a peer cannot take more (throttle).
        self.pauser = self.producer = ReadPauser(self.transport)

    # --- the upstream side of an exchange ---------------------------------------------

    def attach(self, exchange) -> None:
        """Serve C{exchange}: its request head is about to be sent."""
        self.exchange = exchange
        self._state = HEAD
        self._buf = b""
        self.reusable = False
        self._interim = 0

    def sendHead(self, request: Request) -> None:
        self.method = request.method
        self._chunked = request.length is UNKNOWN
        self._held = requestHeadBytes(request, self.absolute, self.authorization)

    def sendData(self, data: bytes) -> None:
        self._send(encodeChunk(data) if self._chunked else data)

    def end(self, trailers=None) -> None:
        if self._chunked:
            self._send(LAST_CHUNK)

    def abort(self) -> None:
        """The exchange no longer wants this connection: closed, never pooled."""
        self.exchange = None
        self._state = IDLE
        self.transport.abortConnection()

    def release(self, reuse: bool) -> None:
        self.exchange = None
        if reuse and self.pool is not None:
            self.pool.put(self)
        else:
            self.transport.loseConnection()

    def takeStream(self) -> Stream:
        """After a 101: the connection becomes a byte stream (what followed the head first)."""
        self._state = STREAM
        self.exchange = None
        rest, self._buf = self._buf, b""
        self._stream = Stream(self.transport, self.pauser, early=rest, owner=self)
        return self._stream

    # --- reading the response ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # The exchange served, taken now: the response may end in this read, and its end
        # of batch (responseFlush) is still its to hear.
        exchange = self.exchange
        state = self._state
        if state == BODY:
            self._feedBody(data)
        elif state == HEAD:
            self._buf += data
            self._readHead()
        elif state == STREAM:
            self._stream.dataReceived(data)
            return
        else:
            # Bytes on an idle connection answer no request: the connection is unusable.
            self.transport.abortConnection()
            return
        if exchange is not None:
            exchange.responseFlush()

    def _readHead(self) -> None:
        while self._state == HEAD:
            try:
                block, rest = splitResponseHead(self._buf, MAX_RESPONSE_HEAD)
                if block is None:
                    return
                head = parseResponseHead(block)
            except HTTPError as e:
                self._fail(e)
                return
            self._buf = rest
            status = head.status
            if status == 101:
                self._state = STREAM
                # The exchange relays the 101 and takes the stream (rest first), or fails.
                self.exchange.responseHead(
                    responseFromHead(head, _NO_FRAMING, self.method, connectionOptions(head))
                )
                return
            try:
                framing = responseFraming(head, self.method)
            except HTTPError as e:
                self._fail(e)
                return
            exchange = self.exchange
            tokens = connectionOptions(head)
            if status < 200:
                self._interim += 1
                exchange.responseHead(responseFromHead(head, framing, self.method, tokens))
                if self.exchange is not exchange:
                    return
                continue
            if status == 407 and self.absolute:
                # The client cannot fix our upstream credentials: say whose they are.
                self.reusable = False
                self.exchange = None
                self._state = IDLE
                exchange.upstreamFailed(
                    Problem(
                        502,
                        "upstream_refused",
                        f"{self.peer[:1].upper()}{self.peer[1:]} answered 407 Proxy "
                        "Authentication Required: its credentials in [upstream] proxy are "
                        "missing or wrong.",
                    )
                )
                return
            self.reusable = reusable(head, framing, tokens)
            # A response that has no body by rule (to HEAD, 204, 304) is where a buggy
            # origin sends one anyway, later: its connection waits out QUARANTINE before it
            # serves anyone else, and whatever arrives meanwhile closes it.
            self.quarantined = (
                self.method == b"HEAD" or status == 204 or status == 304 or self._interim > 1
            )
            self._buf = b""
            exchange.responseHead(responseFromHead(head, framing, self.method, tokens))
            if self.exchange is not exchange:
                return  # the exchange gave up (client gone)
            self._reader = framing.reader()
            if self._reader is None:
                self._end(rest)
            else:
                self._state = BODY
                if rest:
                    self._feedBody(rest)

    def _feedBody(self, data: bytes) -> None:
        try:
            body, done, rest = self._reader.feed(data)
        except HTTPError as e:
            # The head is gone already: the client's response is cut, never completed.
            self._fail(e)
            return
        if body:
            self.exchange.responseData(body)
        if done:
            self._end(rest)

    def _end(self, rest: bytes) -> None:
        if rest:
            # RFC 9112 §6.3: extra data after a complete response is discarded, never
            # forwarded as another response, and the connection is not reused.
            self.reusable = False
        self._state = IDLE
        self._reader = None
        exchange = self.exchange
        exchange.responseEnd()

    def _fail(self, e: HTTPError) -> None:
        self.reusable = False
        exchange, self.exchange = self.exchange, None
        self._state = IDLE
        self.transport.abortConnection()
        if exchange is not None:
            exchange.upstreamFailed(
                Problem(e.status, "protocol", f"Bad response from the origin: {e.reason}.")
            )

    # --- the connection's end --------------------------------------------------------------

    def readConnectionLost(self) -> None:
        if self._state == STREAM:
            self._stream.readConnectionLost()
        else:
            # Outside a stream a half-close is a close (it may end a close-delimited body).
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self._state == STREAM:
            if self._stream is not None:
                self._stream.connectionLost(reason)
            return
        if self.pool is not None:
            self.pool.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self._state == BODY and self._reader.eof():
            self._state = IDLE
            exchange.responseEnd()
            return
        self._state = IDLE
        tls = describeFailure(reason)
        exchange.upstreamLost(
            None if tls is None else Problem(502, "tls", f"TLS to {self.peer} failed: {tls}")
        )


_NO_FRAMING = Framing(NONE)  # a 101 has no body


class OriginPool:
    """
    Idle keep-alive connections by key (scheme, host, port, route), newest first: the most
    recently used connection is the least likely to have been closed by the origin.
    """

    def __init__(self, reactor, maxPerKey: int = 64, maxTotal: int = 1024, idle: float = 60.0):
        self.reactor = reactor
        self.maxPerKey = maxPerKey
        self.maxTotal = maxTotal
        self.idleSeconds = idle
        self._idle: dict[tuple, deque[OriginConnection]] = {}
        self._count = 0
        self._sweeper = None

    def get(self, key: tuple) -> OriginConnection | None:
        """
        The newest idle connection to C{key} that may serve a request now: out of
        quarantine, still connected, with nothing waiting unread in its socket (a stray
        response that arrived before the reactor delivered it must not be read as the
        next request's: it would be another client's).
        """
        conns = self._idle.get(key)
        now = None
        index = len(conns) if conns else 0
        while index:
            index -= 1
            conn = conns[index]
            if conn.availableAt:
                now = self.reactor.seconds() if now is None else now
                if conn.availableAt > now:
                    continue  # in quarantine
                conn.availableAt = 0.0
            del conns[index]
            self._count -= 1
            transport = conn.transport
            if transport is not None and transport.connected and not unreadInput(transport):
                conn.pool = self
                return conn
            conn.pool = None
            if transport is not None:
                transport.abortConnection()
        return None

    def adopt(self, conn: OriginConnection) -> None:
        """A new connection this pool may keep after its exchange."""
        conn.pool = self

    def put(self, conn: OriginConnection) -> None:
        if not conn.reusable or self._count >= self.maxTotal:
            conn.pool = None
            conn.transport.loseConnection()
            return
        conns = self._idle.setdefault(conn.key, deque())
        if len(conns) >= self.maxPerKey:
            conn.pool = None
            conn.transport.loseConnection()
            return
        if conn.pauser is not None and conn.pauser.reasons:
            conn.pauser.resume(conn.pauser.reasons)
        if conn.quarantined:
            conn.quarantined = False
            conn.availableAt = self.reactor.seconds() + QUARANTINE
        conns.append(conn)
        self._count += 1
        # No timer per release (that was a callLater and a cancel per request): one sweep
        # closes what has been idle too long.
        conn.idleSince = self.reactor.seconds()
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idleSeconds / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        oldest = self.reactor.seconds() - self.idleSeconds
        for conns in list(self._idle.values()):
            while conns and conns[0].idleSince <= oldest:
                conn = conns.popleft()
                self._count -= 1
                conn.pool = None
                conn.transport.loseConnection()
        if self._count:
            self._sweeper = self.reactor.callLater(self.idleSeconds / 2, self._sweep)

    def discard(self, conn: OriginConnection) -> None:
        conns = self._idle.get(conn.key)
        if conns is not None:
            try:
                conns.remove(conn)
                self._count -= 1
            except ValueError:
                pass
        conn.pool = None

    def closeAll(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.transport.loseConnection()
        self._idle.clear()
        self._count = 0
