# -*- test-case-name: tests.test_h2 -*-
"""
HTTP/2 connections in both roles of an intercepted tunnel:
L{H2ServerProtocol} faces the client (its streams are L{ServerStream}s, each dispatched into
an exchange), L{H2ClientProtocol} faces an origin (the connector opens L{ClientStream}s on it).

Shape, after Twisted's own C{twisted.web._http2} (which wires flow control to producers): the
protocol feeds every read to its L{H2Machine} (proxygate's HTTP/2 codec), turns the machine's
events into calls on the streams, and writes what the machine has to send once per batch: at
the end of the read, or when an exchange calls
C{flush} after events from the other leg (a C{callLater(0)} covers an exchange that forgets).
It is its transport's streaming producer: while the transport's buffer is full no stream
hands data to h2, and each stream with data waiting pauses the side it throttles.

Limits (L{H2Limits}) are what bound what a peer can make the proxy hold or do:
 - concurrent streams: advertised (SETTINGS_MAX_CONCURRENT_STREAMS) and enforced per stream
   (RST_STREAM REFUSED_STREAM, not a connection error);
 - header list size: advertised (SETTINGS_MAX_HEADER_LIST_SIZE) and enforced per stream
   (431, or 502 from an origin); the HPACK decoder stops a block twice as large (a
   connection error: nothing that size is decoded);
 - memory: receive windows of L{H2Limits.streamWindow} per stream and
   L{H2Limits.connectionWindow} per connection, given back only as the exchange takes data;
   sending, what one delivery of the producing side brought per stream (it is paused while
   anything waits), at most L{FLUSH_MARK} framed and not written, and the transport's own
   buffer (whose producer this protocol is);
 - Rapid Reset (CVE-2023-44487): streams the client resets before their response is complete,
   streams this side resets for the client's errors on them (CVE-2025-8671, "MadeYouReset":
   WINDOW_UPDATE of 0, DATA past content-length...), and streams refused, spend a token
   from a bucket (L{H2Limits.resetBurst}, refilled at L{H2Limits.resetRate} per second); an
   empty bucket ends the connection with GOAWAY ENHANCE_YOUR_CALM. New streams are
   dispatched at the end of the read that opened them, so a stream opened and reset in one
   read never reaches an exchange (no origin is dialled);
 - answers the peer does not read (CVE-2019-9512/9515: PING and SETTINGS floods, resets
   provoked): what reads make the proxy write while the transport is paused (its buffer
   full: the peer is not reading) may reach L{UNREAD_ANSWERS}; past that, GOAWAY
   ENHANCE_YOUR_CALM and the connection is aborted (closing it would wait for the peer to
   read);
 - idle: a connection with nothing received or sent for L{H2Limits.idleTimeout} says GOAWAY
   and closes (an exchange still running gets C{timedOut} first).

GOAWAY from the peer drains: no new streams, the open ones finish, then the connection closes.
L{H2Protocol.drain} does the same from this side (service shutdown). PING is answered by the
machine; PRIORITY is ignored; there is no server push (disabled in SETTINGS).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from attrs import frozen
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..exchange.problems import problemForStatus
from ..proxy.flow import noDelay
from . import events
from .frames import ErrorCode, Setting
from .headers import H2HeaderError, requestFromHead
from .machine import H2Machine, ProtocolError
from .stream import ClientStream, ConnectionGone, ServerStream, StreamRefused, StreamReset

__all__ = [
    "H2ClientProtocol",
    "H2Limits",
    "H2Protocol",
    "H2ServerProtocol",
    "StreamRefused",
    "StreamReset",
]

_log = Logger()


#: RFC 9113 §6.9.2: every connection starts with this window, whatever SETTINGS say.
_DEFAULT_WINDOW = 65535

#: Bytes of DATA framed before they are written without waiting for the end of the batch:
#: what a batch may hold in h2's buffer before the transport (and its producer pause) sees it.
FLUSH_MARK = 65536

#: Bytes reads may make this side write while the transport is paused (see the module's
#: docstring): some 15,000 PING acknowledgements, far more than any peer that reads needs.
UNREAD_ANSWERS = 256 * 1024


@frozen
class H2Limits:
    """
    What one HTTP/2 connection lets its peer make the proxy hold or do.

    @ivar maxStreams: concurrent streams the peer may open ([mitm] http2_max_streams).
    @ivar maxHeaderListSize: bytes of a header list (RFC 9113 §6.5.2: names, values and 32
        per field); [proxy] max_header_size.
    @ivar streamWindow: receive window per stream: the most a paused stream holds.
    @ivar connectionWindow: receive window of the connection: the most all its streams hold.
    @ivar idleTimeout: seconds with nothing received or sent before GOAWAY and close.
    @ivar resetBurst: resets (and refused streams) the client may cause at once...
    @ivar resetRate: ...and per second after that (200 and 20: 200 in any 10 seconds).
    """

    maxStreams: int = 100
    maxHeaderListSize: int = 65536
    streamWindow: int = 256 * 1024
    connectionWindow: int = 1024 * 1024
    idleTimeout: float = 300.0
    resetBurst: int = 200
    resetRate: float = 20.0

    @classmethod
    def fromConfig(cls, config) -> H2Limits:
        """
        The limits of an intercepted tunnel's h2 connections, both legs, from the INI:
        [mitm] http2_max_streams, [proxy] max_header_size and idle_timeout.
        """
        return cls(
            maxStreams=config.mitm.http2_max_streams,
            maxHeaderListSize=config.proxy.max_header_size,
            idleTimeout=config.proxy.idle_timeout,
        )


class _Flusher:
    """
    Flushes, at the end of the reactor's turn, the connections that have frames waiting
    and were not flushed by then: one timed call per turn for all of them, where one per
    connection and batch (a call scheduled, then cancelled by the flush that usually comes
    first) was a few per cent of the CPU of a request.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.pending: dict = {}
        self.call = None

    def add(self, protocol) -> dict:
        self.pending[protocol] = None
        if self.call is None:
            self.call = self.reactor.callLater(0, self.run)
        return self.pending

    def run(self) -> None:
        self.call = None
        pending, self.pending = self.pending, {}
        for protocol in list(pending):
            if protocol._flushCall is pending:
                protocol.flush()


_flushers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Reads:
    """
    The h2 reads under way (nested: a read of one connection makes its exchanges write on
    others), and the connections they asked to flush: flushed once, as the outermost read
    ends. Eight requests in one read of a client's connection then go to their origin in one
    write, not eight; eight responses in one read of an origin's, to each client in one.
    """

    depth = 0
    pending: dict = {}

    @classmethod
    def end(cls) -> None:
        while cls.pending:
            pending, cls.pending = cls.pending, {}
            for protocol in pending:
                protocol.flush()


def _flusher(reactor) -> _Flusher:
    flusher = _flushers.get(reactor)
    if flusher is None:
        flusher = _flushers[reactor] = _Flusher(reactor)
    return flusher


@implementer(IPushProducer)
class H2Protocol(Protocol):
    """What both roles share: the machine's events to streams, batching, flow, limits, timers."""

    clientSide = False

    def __init__(self, limits: H2Limits, reactor) -> None:
        self.limits = limits
        self.reactor = reactor
        self.conn = H2Machine(
            self.clientSide,
            {
                Setting.MAX_CONCURRENT_STREAMS: limits.maxStreams,
                Setting.INITIAL_WINDOW_SIZE: limits.streamWindow,
                Setting.MAX_HEADER_LIST_SIZE: limits.maxHeaderListSize,
            },
            hardHeaderListSize=2 * limits.maxHeaderListSize,
        )
        self.streams: dict[int, ServerStream | ClientStream] = {}
        self.writing = True  # the transport takes writes (not paused)
        self.touched: list = []  # streams whose exchange got events in this read
        self._blocked: dict = {}  # streams with data waiting for a window, in order
        self._inRead = False
        self._flushCall = None
        self._unflushed = 0  # DATA bytes framed since the last write
        self._unread = 0  # bytes reads made us write since the transport paused
        self.draining = False  # GOAWAY sent or received: no new streams
        self.closing = False  # ended by this side (an error, Rapid Reset): read nothing more
        self.lost = False
        self._deadline = 0.0
        self._timer = None

    # -- connection lifecycle --------------------------------------------------------------------

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.transport.registerProducer(self, True)
        self.conn.initiateConnection()
        if self.limits.connectionWindow > _DEFAULT_WINDOW:
            self.conn.incrementConnectionWindow(self.limits.connectionWindow - _DEFAULT_WINDOW)
        self._arm()
        self.flush()

    def connectionLost(self, reason) -> None:
        self.lost = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._flushCall = None
        error = reason.value if isinstance(reason.value, Exception) else Exception(str(reason))
        for stream in list(self.streams.values()):
            stream.connectionLost(ConnectionGone(ErrorCode.CANCEL, f"connection lost: {error}"))
        self.streams.clear()
        self._blocked.clear()

    def dataReceived(self, data: bytes) -> None:
        if self.lost or self.closing:
            return
        self._deadline = self.reactor.seconds() + self.limits.idleTimeout
        _Reads.depth += 1
        try:
            self._received(data)
        finally:
            _Reads.depth -= 1
            if not _Reads.depth and _Reads.pending:
                _Reads.end()

    def _received(self, data: bytes) -> None:
        self._inRead = True
        try:
            received = self.conn.receiveData(data)
        except ProtocolError as e:
            self._inRead = False
            self._protocolError(e)
            return
        handlers = self._handlers
        try:
            for event in received:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
                if self.lost or self.closing:
                    return
            self._readDone()
        finally:
            self._inRead = False
        if self.writing:
            self.flush()
            return
        self._unread += self.flush()
        if self._unread > UNREAD_ANSWERS:
            _log.info(
                "HTTP/2 peer {peer} does not read what it asks for: GOAWAY ENHANCE_YOUR_CALM",
                peer=self._peer(),
            )
            self._goAway(ErrorCode.ENHANCE_YOUR_CALM, "the peer does not read")
            self.transport.abortConnection()

    def _readDone(self) -> None:
        """The end of one read's events: the exchanges that got some hear so."""
        touched, self.touched = self.touched, []
        for stream in touched:
            stream.batchEnded()

    def endBatchOutsideRead(self) -> None:
        """Events delivered outside a read (a resume): their batch ends now, and is sent."""
        if not self._inRead:
            if self.touched:
                self._readDone()
            self.flushSoon()

    def _protocolError(self, e: ProtocolError) -> None:
        """The peer broke HTTP/2: GOAWAY is queued; send it, close, fail every stream."""
        _log.info("HTTP/2 protocol error from {peer}: {error}", peer=self._peer(), error=e)
        self.closing = True
        self.flush()
        failure = StreamReset(e.code, f"HTTP/2 protocol error: {e}")
        self._failStreams(failure)
        self.transport.loseConnection()

    def _failStreams(self, error: Exception) -> None:
        for stream in list(self.streams.values()):
            stream.connectionLost(error)

    def _peer(self) -> str:
        try:
            return str(self.transport.getPeer())
        except Exception:
            return "-"

    # -- writing ---------------------------------------------------------------------------------

    def framed(self, size: int) -> None:
        """C{size} bytes of DATA were framed: written now once they pass L{FLUSH_MARK}."""
        self._unflushed += size
        if self._unflushed >= FLUSH_MARK:
            self.flush()
        else:
            self.dirty()

    def dirty(self) -> None:
        """The machine has frames to send: they go at the end of this batch."""
        if self._inRead or self.lost:
            return
        if _Reads.depth:
            _Reads.pending[self] = None
        elif self._flushCall is None:
            self._flushCall = _flusher(self.reactor).add(self)

    def flushSoon(self) -> None:
        """An exchange's flush: now, or once the h2 read under way ends (one write for all)."""
        if _Reads.depth:
            if not self._inRead:
                _Reads.pending[self] = None
            return
        self.flush()

    def flush(self) -> int:
        """Write everything the machine has to send, in one write: how many bytes."""
        if self._flushCall is not None:
            self._flushCall.pop(self, None)
            self._flushCall = None
        self._unflushed = 0
        if self.lost:
            return 0
        data = self.conn.dataToSend()
        if data:
            self._deadline = self.reactor.seconds() + self.limits.idleTimeout
            self.transport.write(data)
        return len(data)

    def blocked(self, stream) -> None:
        self._blocked[stream] = None

    def unblocked(self, stream) -> None:
        self._blocked.pop(stream, None)

    def _pumpAll(self) -> None:
        for stream in list(self._blocked):
            if not self.writing:
                return
            stream.pump()

    # IPushProducer: the transport's write buffer
    def pauseProducing(self) -> None:
        self.writing = False

    def resumeProducing(self) -> None:
        self.writing = True
        self._unread = 0
        self._pumpAll()
        self.flush()

    def stopProducing(self) -> None:
        pass

    # -- events common to both roles -------------------------------------------------------------

    def _data(self, event: events.DataReceived) -> None:
        stream = self.streams.get(event.streamId)
        if stream is None:
            # A stream already over on this side: give the connection's window back.
            self.conn.acknowledgeReceivedData(event.flowLength, event.streamId)
            return
        stream.dataReceived(event.data, event.flowLength)
        if event.endStream:
            stream.remoteEnded()

    def _trailers(self, event: events.TrailersReceived) -> None:
        stream = self.streams.get(event.streamId)
        if stream is None:
            return
        if event.error is not None:
            stream.malformed(f"malformed trailers: {event.error}")
            return
        stream.trailersReceived(event.head)
        stream.remoteEnded()

    def _reset(self, event: events.StreamReset) -> None:
        stream = self.streams.get(event.streamId)
        if stream is not None:
            stream.peerReset(event.errorCode)

    def _window(self, event: events.WindowUpdated) -> None:
        if not self._blocked:
            return
        if event.streamId == 0:
            self._pumpAll()
        else:
            stream = self.streams.get(event.streamId)
            if stream is not None and stream in self._blocked:
                stream.pump()

    def _settings(self, event: events.RemoteSettingsChanged) -> None:
        if Setting.INITIAL_WINDOW_SIZE in event.changed:
            self._pumpAll()

    def _goaway(self, event: events.ConnectionTerminated) -> None:
        self.draining = True
        self._goneAway(event)
        self._closeIfDone()

    def _goneAway(self, event: events.ConnectionTerminated) -> None:
        pass

    # -- streams ---------------------------------------------------------------------------------

    def streamClosed(self, stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self._blocked.pop(stream, None)
        if not self.streams:
            self._closeIfDone()

    # -- draining and closing --------------------------------------------------------------------

    def drain(self) -> None:
        """Say GOAWAY (NO_ERROR): the open streams finish, no new ones start, then close."""
        if self.draining or self.lost:
            self._closeIfDone()
            return
        self.draining = True
        self.conn.closeConnection(ErrorCode.NO_ERROR)
        self.flush()
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self.draining and not self.streams and not self.lost:
            self.flush()
            self.transport.loseConnection()

    def _goAway(self, code: ErrorCode, reason: str) -> None:
        """End the connection now: GOAWAY with C{code}, every stream lost."""
        self.draining = True
        self.closing = True
        self.conn.closeConnection(code)
        self.flush()
        self._failStreams(StreamReset(code, reason))
        self.transport.loseConnection()

    # -- the idle timer (one per connection; moving the deadline costs no reactor call) ---------

    def _arm(self) -> None:
        self._deadline = self.reactor.seconds() + self.limits.idleTimeout
        self._timer = self.reactor.callLater(self.limits.idleTimeout, self._timerFired)

    def _timerFired(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        if now < self._deadline:
            self._timer = self.reactor.callLater(self._deadline - now, self._timerFired)
            return
        self._idle()

    def _idle(self) -> None:
        """Nothing moved for idleTimeout: running exchanges hear so, then GOAWAY and close."""
        self._timedOutStreams()
        if self.lost:
            return
        self._goAway(ErrorCode.NO_ERROR, "idle timeout")

    def _timedOutStreams(self) -> None:
        pass

    _handlers: dict[type, Callable] = {
        events.DataReceived: _data,
        events.TrailersReceived: _trailers,
        events.StreamReset: _reset,
        events.WindowUpdated: _window,
        events.RemoteSettingsChanged: _settings,
        events.ConnectionTerminated: _goaway,
    }


def _pseudo(headers, name: bytes) -> bytes:
    """A pseudo-header field's value (b"-" without one), for the log of a refused request."""
    for field, value in headers:
        if field == name:
            return value
    return b"-"


class H2ServerProtocol(H2Protocol):
    """
    The client-facing connection inside an intercepted tunnel (ALPN h2).

    @param target: (scheme, host, port, authority) of the tunnel: every request goes there.
    @param client: the client's address, for the streams' C{client}.
    @param dispatch: C{dispatch(stream) -> exchange}: makes the exchange serving a new
        stream (C{stream.request}); it gets the DownstreamEvents calls. Called at the end of
        the read that opened the stream, never for a stream reset within that read.
    @param refused: C{refused(stream, problem, method, path)}: a request the proxy answered
        itself (malformed: 400, CONNECT: 501, header list too large: 431), for the access
        log and metrics; C{stream.request} is None, C{method} and C{path} are what the
        header block said (b"-" when it said nothing).
    """

    clientSide = False

    def __init__(
        self,
        limits: H2Limits,
        reactor,
        target: tuple[str, str, int, bytes],
        client: str,
        dispatch: Callable,
        refused: Callable | None = None,
    ) -> None:
        super().__init__(limits, reactor)
        self.target = target
        self.client = client
        self._dispatch = dispatch
        self._refused = refused
        self._pending: list[ServerStream] = []
        self._tokens = float(limits.resetBurst)
        self._tokensAt = reactor.seconds()
        self.requests = 0

    def _requestReceived(self, event: events.RequestReceived) -> None:
        streamId = event.streamId
        if self.draining or len(self.streams) >= self.limits.maxStreams:
            self.conn.resetStream(streamId, ErrorCode.REFUSED_STREAM)
            self._glitch("streams refused")
            return
        endStream = event.endStream
        stream = ServerStream(self, streamId, None, self.client)
        self.streams[streamId] = stream
        try:
            if event.size > self.limits.maxHeaderListSize:
                raise H2HeaderError(431, "The request's header fields are larger than allowed.")
            if event.error is not None:
                raise H2HeaderError(400, f"a malformed HTTP/2 request: {event.error}")
            stream.request = self.requestOf(event.head, endStream)
        except H2HeaderError as e:
            if endStream:
                stream._remoteEnded = True
            problem = problemForStatus(e.status, e.reason)
            stream.answer(e.status, problem.detail, problem.proxyStatus)
            if self._refused is not None:
                headers = event.headers
                self._refused(
                    stream, problem, _pseudo(headers, b":method"), _pseudo(headers, b":path")
                )
            return
        if endStream:
            stream._remoteEnded = True
        self.requests += 1
        self._pending.append(stream)

    def requestOf(self, head: tuple, endStream: bool):
        """
        The request of a stream's header block (taken apart): every request goes to the
        C{target}. A subclass serving other destinations (the inbound gateway) says how.

        @raise H2HeaderError: for a request refused (answered with its status).
        """
        scheme, host, port, authority = self.target
        return requestFromHead(head, scheme, host, port, authority, endStream)

    def _readDone(self) -> None:
        # Dispatch what this read opened, unless this same read reset it (Rapid Reset:
        # HEADERS and RST_STREAM in one packet cost no exchange and no origin connection).
        pending, self._pending = self._pending, []
        for stream in pending:
            if not stream.closed and not self.lost:
                exchange = self._dispatch(stream)
                if exchange is not None and not stream.closed:
                    stream.attach(exchange)
        super()._readDone()

    def _reset(self, event: events.StreamReset) -> None:
        stream = self.streams.get(event.streamId)
        if stream is None:
            if not event.remote:  # the machine reset a stream the client broke before it opened
                self._glitch("stream errors")
            return
        complete = stream._localEnded
        stream.peerReset(event.errorCode)
        if not complete:
            self._glitch("streams reset")

    def _glitch(self, what: str) -> None:
        """One reset or refused stream: spend a token; none left is Rapid Reset."""
        now = self.reactor.seconds()
        limits = self.limits
        self._tokens = min(
            float(limits.resetBurst),
            self._tokens + max(0.0, now - self._tokensAt) * limits.resetRate,
        )
        self._tokensAt = now
        if self._tokens >= 1:
            self._tokens -= 1
            return
        _log.info(
            "HTTP/2 client {peer}: too many {what} (Rapid Reset): GOAWAY ENHANCE_YOUR_CALM",
            peer=self.client,
            what=what,
        )
        self._goAway(ErrorCode.ENHANCE_YOUR_CALM, f"too many {what}")

    def _timedOutStreams(self) -> None:
        for stream in list(self.streams.values()):
            if stream.exchange is not None and not stream.closed:
                stream.exchange.timedOut()

    _handlers = {
        **H2Protocol._handlers,
        events.RequestReceived: _requestReceived,
        events.StreamReset: _reset,
    }


class H2ClientProtocol(H2Protocol):
    """
    A connection to an origin that chose h2: streams are opened on it by L{openStream}
    (a connector's pool keeps it while L{available}).

    @param ip: the address dialled (the streams' C{ip}, for the log).
    """

    clientSide = True

    def __init__(self, limits: H2Limits, reactor, ip: str = "-", viaProxy: bool = False) -> None:
        super().__init__(limits, reactor)
        self.ip = ip
        self.viaProxy = viaProxy
        self._opening = 0  # streams made but whose head is not sent yet
        self.onLost: Callable | None = None  # called once the connection is gone

    @property
    def available(self) -> bool:
        """Whether another stream may be opened now."""
        if self.draining or self.lost or self.transport is None:
            return False
        allowed = min(self.conn.remoteSettings.maxConcurrentStreams, self.limits.maxStreams)
        return len(self.streams) + self._opening < allowed and (
            self.conn.highestOutboundStreamId < 2**31 - 1000
        )

    def openStream(self, exchange) -> ClientStream:
        """
        A new stream for C{exchange} (which gets the UpstreamEvents calls); its id is taken
        by C{sendHead}. Check L{available} first.
        """
        self._opening += 1
        stream = ClientStream(self, exchange)
        stream.reserved = True
        return stream

    def unreserve(self, stream: ClientStream) -> None:
        """C{stream} no longer holds a slot as one about to open (opened, or given up)."""
        if stream.reserved:
            stream.reserved = False
            self._opening -= 1

    def streamOpened(self, stream: ClientStream) -> None:
        self.unreserve(stream)
        self.streams[stream.id] = stream

    def released(self, stream: ClientStream) -> None:
        self.unreserve(stream)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self.onLost is not None:
            onLost, self.onLost = self.onLost, None
            onLost(self)

    def _response(self, event: events.ResponseReceived) -> None:
        stream = self.streams.get(event.streamId)
        if stream is not None:
            stream.headReceived(event)
            if event.endStream and not stream.closed:
                stream.remoteEnded()

    def _goneAway(self, event: events.ConnectionTerminated) -> None:
        # Streams above the origin's last processed id were never seen: retry elsewhere.
        last = event.lastStreamId
        for stream in list(self.streams.values()):
            if stream.id > last:
                stream.goneAway()

    def _timedOutStreams(self) -> None:
        error = StreamReset(ErrorCode.CANCEL, "the origin connection was idle too long")
        for stream in list(self.streams.values()):
            stream.connectionLost(error)

    _handlers = {
        **H2Protocol._handlers,
        events.ResponseReceived: _response,
        events.InformationalResponseReceived: _response,
    }
