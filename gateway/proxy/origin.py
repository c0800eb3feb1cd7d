"""
Connections to origins: the protocol that reads responses, and the pool that keeps them.

An origin connection serves one exchange at a time. It parses the response head and frames
the body with the same strict rules as requests; the exchange it serves decides what the
client sees. A connection goes back to the pool only when its response ended exactly where
its framing said, with nothing after it, and the origin did not ask to close.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from ..http1.framing import UNTIL_CLOSE, responseFraming
from ..http1.parse import HTTPError, parseResponseHead, splitTokens
from .flow import ReadPauser

__all__ = ["OriginConnection", "OriginPool"]

MAX_RESPONSE_HEAD = 65536
_HEAD, _BODY, _IDLE, _UPGRADED = range(4)


@implementer(IHalfCloseableProtocol)
class OriginConnection(Protocol):
    """
    One connection to an origin (or to an upstream proxy), speaking HTTP/1.1.

    Events go to C{self.exchange}: C{informational(head)}, C{responseHead(head, framing)},
    C{responseBody(data)}, C{responseEnd()}, C{upgraded(head, rest)},
    C{originFailed(error)} and C{originLost()}.
    """

    def __init__(self, key: tuple, reactor) -> None:
        self.key = key
        self.reactor = reactor
        self.exchange = None
        self.pool: OriginPool | None = None
        self.ip = ""
        self.requestMethod = b"GET"
        self.reusable = False
        self._state = _IDLE
        self._buf = b""
        self._reader = None
        self.idleSince = 0.0
        self.pauser: ReadPauser | None = None
        self.splice = None  # set once the connection is upgraded into a blind pipe

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self.pauser = ReadPauser(self.transport)

    def start(self, exchange, method: bytes) -> None:
        """Serve C{exchange}: its request head is about to be written."""
        self.exchange = exchange
        self.requestMethod = method
        self._state = _HEAD
        self._buf = b""
        self.reusable = False

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._feedBody(data)
        elif state == _HEAD:
            self._buf += data
            exchange = self.exchange
            self._parseHead()
            exchange.flushHead()
        elif state == _UPGRADED:
            self.splice.fromOrigin(data)
        else:
            # Bytes on an idle connection answer no request: the connection is unusable.
            self.transport.abortConnection()

    def _parseHead(self) -> None:
        while self._state == _HEAD:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    self._fail(HTTPError(502, "the origin's response head is too large"))
                elif buf.count(b"\n") != buf.count(b"\r\n"):
                    # Bare LF line ends would never complete the head: 502 now, not at the
                    # idle timeout (RFC 9112 §2.2).
                    self._fail(HTTPError(502, "bare LF in the origin's response head"))
                return
            if end > MAX_RESPONSE_HEAD:
                # (checked here too: a head may complete in the read that crosses the limit)
                self._fail(HTTPError(502, "the origin's response head is too large"))
                return
            try:
                head = parseResponseHead(buf[:end])
            except HTTPError as e:
                self._fail(e)
                return
            rest = buf[end + 4 :]
            self._buf = b""
            if head.status == 101:
                self._state = _UPGRADED
                self.exchange.upgraded(head, rest)
                return
            if head.status < 200:
                self.exchange.informational(head)
                self._buf = rest
                continue
            try:
                framing = responseFraming(head, self.requestMethod)
            except HTTPError as e:
                self._fail(e)
                return
            self.reusable = (
                framing.kind != UNTIL_CLOSE
                and b"close" not in splitTokens(head.values(b"connection"))
                and head.version == b"HTTP/1.1"
                and not (
                    # CL with TE: framed by TE, but an origin that sends both is confused about
                    # framing; its next response is not trusted (RFC 9112 §6.3).
                    head.values(b"transfer-encoding") and head.values(b"content-length")
                )
            )
            exchange = self.exchange
            exchange.responseHead(head, framing)
            if self.exchange is not exchange:
                return  # the exchange gave up (client gone)
            self._reader = framing.reader()
            if self._reader is None:
                self._end(rest)
            else:
                self._state = _BODY
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
            self.exchange.responseBody(body)
        if done:
            self._end(rest)

    def _end(self, rest: bytes) -> None:
        if rest:
            # RFC 9112 §6.3: extra data after a complete response is discarded, never
            # forwarded as another response, and the connection is not reused.
            self.reusable = False
        self._state = _IDLE
        self._reader = None
        exchange, self.exchange = self.exchange, None
        exchange.responseEnd()

    def _fail(self, e: HTTPError) -> None:
        self.reusable = False
        exchange, self.exchange = self.exchange, None
        self._state = _IDLE
        self.transport.abortConnection()
        if exchange is not None:
            exchange.originFailed(e)

    def detach(self) -> None:
        """The exchange no longer wants this connection: it is closed, not pooled."""
        self.exchange = None
        self._state = _IDLE
        self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        if self.splice is not None:
            self.splice.originReadClosed()
        else:
            # Outside a splice a half-close is a close (it may end a close-delimited body).
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self.splice is not None:
            self.splice.originLost()
            return
        if self.pool is not None:
            self.pool.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self._state == _BODY and self._reader.eof():
            exchange.responseEnd()
        else:
            exchange.originLost(reason)
        self._state = _IDLE

    # pool support


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
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            self._count -= 1
            conn.pool = None
            if conn.transport is not None and conn.transport.connected:
                return conn
        return None

    def put(self, conn: OriginConnection) -> None:
        if not conn.reusable or self._count >= self.maxTotal:
            conn.transport.loseConnection()
            return
        conns = self._idle.setdefault(conn.key, deque())
        if len(conns) >= self.maxPerKey:
            conn.transport.loseConnection()
            return
        if conn.pauser is not None and conn.pauser.reasons:
            conn.pauser.resume(conn.pauser.reasons)
        conns.append(conn)
        self._count += 1
        conn.pool = self
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
