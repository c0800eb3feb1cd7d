"""
The HTTP side of the metrics listener: a small, strict HTTP/1.1 server for a fixed table
of paths (the scrape path, and C{/ca.pem} and C{/ca.der} when MITM is on).

Why not twisted.web: importing C{twisted.web.server} costs about 3.6 MB of resident memory
in every process (issue 8 asks for an idle proxy under 40 MB), for a listener that answers
GET on three paths. Heads go through the proxy's own strict parser (L{gateway.http1.parse}),
so this listener refuses exactly what the proxy refuses.

What a client gets, as a scraper of a serious exporter expects:

- GET or HEAD on a route: 200 with Content-Type and Content-Length; HEAD sends the head alone,
  with the length the GET body would have. The query string is ignored and one trailing
  slash is accepted (C{/metrics/?x=1} scrapes too). Paths are compared byte for byte, without
  percent-decoding; an absolute-form target (C{http://host/metrics}) routes by its path.
- The exposition in the format the scraper's Accept asks for, or the text format when
  prometheus_client cannot serve what it asks (L{gateway.metrics.expose}); gzip-compressed
  when its Accept-Encoding takes gzip (as prometheus_client's own server does), with
  C{Vary: Accept-Encoding}. Certificates are sent as they are.
- Another path: 404. Another method: 405 with C{Allow: GET, HEAD}. Every response states its
  Content-Length, so a kept-alive connection always knows where the next one starts.
- Keep-alive (Prometheus reuses its connections): an HTTP/1.1 connection stays open unless
  the client sends C{Connection: close}; an HTTP/1.0 one only with C{Connection: keep-alive}.
  Pipelined requests are answered in order: while an asynchronous answer is on its way (the
  merged scrape of C{[proxy] workers}) nothing further is parsed, and reading stops once
  more than a head's worth of input waits. Reading also stops while the client does not read
  its answers (the protocol is the transport's streaming producer), so memory stays bounded
  whatever a client pipelines.
- Refused, then closed (nothing after a refused head can be framed with confidence): a
  malformed head, or an HTTP/1.1 request without exactly one Host (400, RFC 9112 §3.2); a
  head over L{MAX_HEAD_SIZE} or over 100 fields (431); a request with content, that is
  Content-Length above 0 or any Transfer-Encoding (413: this server takes no content, and
  never reads it); an HTTP version other than 1.0 and 1.1 (505).
- Timeouts: a connection has C{timeout} seconds for each head (counted from the accept or
  from the previous answer, not reset by each byte, so a slowloris gains nothing) and for
  each answer. An idle connection is then closed; one with part of a head gets 408; one
  whose client stopped reading, or whose answer never came, is aborted.
- A handler that fails: 500, the failure logged; the connection and the listener go on.
- A client gone before an asynchronous answer: the answer is dropped, nothing is logged.
  The handler's Deferred is not cancelled: the merged scrape has its own timeout, and a
  cancellation would turn a client's impatience into a logged failure.
- Scrapes are not logged (they come every few seconds and say nothing).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .http1.framing import NONE, requestFraming
from .http1.headers import httpDate, parseAbsoluteTarget
from .http1.parse import (
    HTTPError,
    RequestHead,
    parseRequestHead,
    splitRequestHead,
    splitTokens,
)
from .message import REASONS

__all__ = [
    "ALLOW",
    "MAX_HEAD_SIZE",
    "Answer",
    "Handler",
    "MetricsServerFactory",
    "MetricsServerProtocol",
    "acceptsGzip",
    "routePath",
    "staticHandler",
]

#: What a handler answers: (status, Content-Type, body). The body is sent whole: metrics
#: expositions and CA certificates are small enough to build in memory.
Answer = tuple[int, bytes, bytes]
#: A route's handler: the request head in, an answer (or a Deferred of one) out.
Handler = Callable[[RequestHead], "Answer | defer.Deferred[Answer]"]

#: Largest request head accepted, final CRLF included. A Prometheus scrape head is about
#: 300 bytes, a browser's under 2 KiB; 16 KiB is the total twisted.web accepted here before
#: (HTTPChannel.totalHeadersSize), so no client that worked stops working.
MAX_HEAD_SIZE = 16384
#: The methods every route answers.
ALLOW = b"GET, HEAD"

_TEXT = b"text/plain; charset=utf-8"
_NOT_FOUND: Answer = (404, _TEXT, b"not found\n")
_NOT_ALLOWED: Answer = (405, _TEXT, b"only GET and HEAD are allowed here\n")
_FAILED: Answer = (500, _TEXT, b"internal error, see the proxygate log\n")
_TOO_LARGE = f"the request head is over {MAX_HEAD_SIZE} bytes"


#: Answers worth compressing: expositions (a capped scrape is about 1 MB of text, 35 KB
#: gzipped). Certificates are not (DER does not shrink, and PEM is 1 KB).
_COMPRESSIBLE = (b"text/", b"application/openmetrics-text")
#: Below this, gzip's header and a deflate block cost more than they save.
_GZIP_MIN = 1024
#: zlib level 6: 5 ms for a 1 MB exposition, within 3% of level 9's size at a third of
#: its time (the scrape is rendered in the reactor thread).
_GZIP_LEVEL = 6


def acceptsGzip(values: list[bytes]) -> bool:
    """
    Whether Accept-Encoding field values accept gzip (RFC 9110 §12.5.3): a C{gzip},
    C{x-gzip} or C{*} member whose weight is not zero, unless gzip itself is refused
    with C{q=0}. prometheus_client's own server ignores weights; a scraper that writes
    C{gzip;q=0} means it.
    """
    accepted = refused = False
    for member in b",".join(values).split(b","):
        coding, _, params = member.partition(b";")
        coding = coding.strip().lower()
        if coding not in (b"gzip", b"x-gzip", b"*"):
            continue
        zero = False
        for param in params.split(b";"):
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    zero = float(value.strip()) <= 0
                except ValueError:
                    zero = True
        if coding == b"*":
            accepted = accepted or not zero
        elif zero:
            refused = True
        else:
            accepted = True
    return accepted and not refused


def _encoded(
    head: RequestHead, body: bytes, extra: tuple[tuple[bytes, bytes], ...]
) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]]:
    """C{body} gzipped if the client takes it (as prometheus_client's own server does)."""
    extra = (*extra, (b"Vary", b"Accept-Encoding"))
    if len(body) < _GZIP_MIN or not acceptsGzip(head.values(b"accept-encoding")):
        return body, extra
    compressed = gzip.compress(body, compresslevel=_GZIP_LEVEL, mtime=0)
    return compressed, (*extra, (b"Content-Encoding", b"gzip"))


def routePath(configured: str) -> bytes:
    """A configured path as a routing-table key: without its trailing slash (but C{/})."""
    return configured.rstrip("/").encode("ascii") or b"/"


def staticHandler(contentType: bytes, body: bytes) -> Handler:
    """A route that always answers the same bytes (the CA certificate)."""
    answer: Answer = (200, contentType, body)
    return lambda head: answer


def _requestPath(target: bytes) -> bytes:
    """The routing key of a request target: its path, query and one trailing slash dropped."""
    if target[:1] != b"/":
        if b"://" not in target:
            # asterisk-form and authority-form are for OPTIONS and CONNECT, refused by now.
            raise HTTPError(400, "the request target is not a path")
        target = parseAbsoluteTarget(target).path
    path = target.split(b"?", 1)[0]
    if len(path) > 1 and path[-1:] == b"/":
        path = path[:-1]
    return path


def _checkHead(head: RequestHead) -> None:
    """What the server refuses in a well-formed head, before routing (see the docstring)."""
    if head.version == b"HTTP/1.1" and len(head.values(b"host")) != 1:
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host field")
    if requestFraming(head).kind != NONE:
        raise HTTPError(413, "this server accepts no request content")


def _persistent(head: RequestHead) -> bool:
    """Whether the client keeps the connection open after this exchange (RFC 9112 §9.3)."""
    tokens = splitTokens(head.values(b"connection"))
    if head.version == b"HTTP/1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


class MetricsServerFactory(Factory):
    """
    The metrics listener's factory: its routes, its timeout, and its open connections (so
    that stopping the service closes them too).
    """

    # No "Starting factory" lines in the log for a listener that is always there.
    noisy = False
    log = Logger(namespace="proxygate.metrics")

    def __init__(
        self, routes: Mapping[bytes, Handler], *, timeout: float = 30.0, reactor=None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.routes = dict(routes)
        self.timeout = timeout
        self.reactor = reactor
        self.connections: set[MetricsServerProtocol] = set()
        self.draining = False

    def buildProtocol(self, addr) -> MetricsServerProtocol:
        return MetricsServerProtocol(self)

    def closeConnections(self) -> None:
        """The service stops: close idle connections now, busy ones after their answer."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()


@implementer(IPushProducer, IHalfCloseableProtocol)
class MetricsServerProtocol(Protocol):
    """
    One client connection of the metrics listener. It is the transport's streaming producer:
    what it produces is answers, so the transport pausing it (its write buffer is full)
    stops the reading of further requests.
    """

    def __init__(self, factory: MetricsServerFactory) -> None:
        self.factory = factory
        self._buffer = b""
        self._scanned = 0  # bytes of _buffer already searched for an incomplete head
        self._timer = None
        self._pending = False  # an asynchronous answer is on its way
        self._serving = False  # inside _serveBuffered (answers that arrive then are not re-entered)
        self._closing = False  # loseConnection called, or the client is gone
        self._gone = False
        self._writesPaused = False
        self._readsPaused = False
        self._readClosed = False

    # --- connection lifecycle -----------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.transport.registerProducer(self, True)
        self._arm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._closing = True
        self._buffer = b""
        self.factory.connections.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def readConnectionLost(self) -> None:
        """The client half-closed after its requests: answer them, then close."""
        self._readClosed = True
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        pass

    def drain(self) -> None:
        if not (self._pending or self._closing):
            self._close()

    # --- IPushProducer: the transport's write buffer ------------------------------------

    def pauseProducing(self) -> None:
        self._writesPaused = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._writesPaused = False
        self._serveBuffered()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    # --- timer --------------------------------------------------------------------------

    def _arm(self) -> None:
        """A fresh deadline: for the next head, the answer under way, or a close to finish."""
        timeout = self.factory.timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.factory.reactor.callLater(timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        if self._closing or self._pending or self._writesPaused:
            # A close the client does not complete, an answer that never came, a client
            # that stopped reading: nothing graceful is left to do.
            self._closing = True
            self.transport.abortConnection()
        elif self._buffer:
            self._refuse(408, "the request head took too long to arrive")
        else:
            self._close()

    # --- reading ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        self._serveBuffered()

    def _serveBuffered(self) -> None:
        """Answer the complete heads in the buffer, in order, as far as nothing waits."""
        if self._serving:
            return
        self._serving = True
        try:
            while not (self._pending or self._closing or self._writesPaused):
                head = self._takeHead()
                if head is None:
                    break
                self._serve(head)
        finally:
            self._serving = False
        self._updateReading()
        self._closeIfDone()

    def _takeHead(self) -> RequestHead | None:
        """The next complete, acceptable head out of the buffer; None (maybe refused) if none."""
        try:
            block, self._buffer = splitRequestHead(
                self._buffer, MAX_HEAD_SIZE, _TOO_LARGE, self._scanned
            )
            if block is None:
                self._scanned = len(self._buffer)
                return None
            self._scanned = 0
            head = parseRequestHead(block)
            _checkHead(head)
        except HTTPError as e:
            self._refuse(e.status, e.reason)
            return None
        return head

    def _updateReading(self) -> None:
        """Read while requests can be answered and the buffer holds less than one head."""
        if self._closing or self._readClosed:
            return
        stop = self._writesPaused or len(self._buffer) > MAX_HEAD_SIZE
        if stop != self._readsPaused:
            self._readsPaused = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _closeIfDone(self) -> None:
        """After a half-close: close once every request that arrived is answered."""
        if self._readClosed and not (self._pending or self._closing or self._writesPaused):
            self._close()

    # --- answering ----------------------------------------------------------------------

    def _serve(self, head: RequestHead) -> None:
        """Route one request; its answer is written now or when its Deferred fires."""
        self._arm()
        if head.method != b"GET" and head.method != b"HEAD":
            self._send(head, _NOT_ALLOWED, ((b"Allow", ALLOW),))
            return
        try:
            path = _requestPath(head.target)
        except HTTPError as e:
            self._refuse(e.status, e.reason)
            return
        handler = self.factory.routes.get(path)
        if handler is None:
            self._send(head, _NOT_FOUND)
            return
        self._pending = True
        d = defer.maybeDeferred(handler, head)
        d.addErrback(self._handlerFailed, head, path)
        d.addCallback(self._answered, head)
        d.addErrback(lambda f: self.factory.log.failure("metrics listener: answering", f))

    def _handlerFailed(self, failure: Failure, head: RequestHead, path: bytes) -> Answer:
        self.factory.log.failure(
            "metrics listener: {method} {path} failed",
            failure,
            method=head.method.decode("ascii"),
            path=path.decode("ascii", "replace"),
        )
        return _FAILED

    def _answered(self, answer: Answer, head: RequestHead) -> None:
        self._pending = False
        if self._closing:
            return  # the client is gone (or was cut off): nobody to answer
        self._send(head, answer)
        self._serveBuffered()  # a no-op when the answer came synchronously, inside it

    def _send(
        self, head: RequestHead, answer: Answer, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        status, contentType, body = answer
        if status == 200 and contentType.startswith(_COMPRESSIBLE):
            body, extra = _encoded(head, body, extra)
        keepAlive = _persistent(head) and not self.factory.draining
        if not keepAlive:
            connection = b"Connection: close\r\n"
        elif head.version == b"HTTP/1.0":
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        self._write(status, contentType, body, connection, extra, head.method == b"HEAD")
        if keepAlive:
            self._arm()
        else:
            self._close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a request that cannot be served, and close: what follows cannot be framed."""
        body = reason.encode("utf-8") + b"\n"
        self._write(status, _TEXT, body, b"Connection: close\r\n", (), False)
        self._close()

    def _write(
        self,
        status: int,
        contentType: bytes,
        body: bytes,
        connection: bytes,
        extra: tuple[tuple[bytes, bytes], ...],
        headOnly: bool,
    ) -> None:
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
            b"Date: %s\r\n" % httpDate(),
            b"Content-Type: %s\r\n" % contentType,
            b"Content-Length: %d\r\n" % len(body),
            connection,
        ]
        head.extend(b"%s: %s\r\n" % field for field in extra)
        head.append(b"\r\n")
        if not headOnly:
            head.append(body)
        self.transport.write(b"".join(head))

    def _close(self) -> None:
        """Close once what was written is sent; abort if the client does not take it in time."""
        self._closing = True
        self._buffer = b""
        # A registered producer keeps loseConnection from ever completing.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._arm()
