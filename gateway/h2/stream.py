# -*- test-case-name: tests.test_h2 -*-
"""
One HTTP/2 stream as one side of an exchange (L{gateway.exchange.side}): a stream of the
client-facing connection is a L{ServerStream} (a Downstream: it receives the response), a
stream of an origin-facing connection a L{ClientStream} (an Upstream: it receives the
request).

Flow control, both ways, is what bounds the proxy's memory:

 - Received DATA is acknowledged (WINDOW_UPDATE, as the machine batches them) only once the
   exchange has taken it, that is when it was delivered while the stream was not paused. A
   paused stream keeps what arrives, unacknowledged: the peer can send at most the stream's
   window (L{gateway.h2.connection.H2Limits.streamWindow}) before it must stop, and the
   connection's window bounds all streams together.
 - Sent data is framed only as far as the peer's window (and the transport) allows; the rest
   waits here, and while anything waits the side throttled by this one (L{throttle}) is
   paused. So what waits is at most what the producing side delivered before it was paused:
   one read of it.

Events reach the exchange as calls (C{requestData}, C{responseHead}...). Frames go out through
the connection, which writes once per batch (the end of a read, or L{flush}).
"""

from __future__ import annotations

from collections import deque

from ..exchange.problems import Problem
from ..message import NO_BODY, Fields, Request, Response
from .frames import ErrorCode
from .headers import (
    H2HeaderError,
    requestHeaders,
    responseFromHead,
    responseHeaders,
    trailerHeaders,
)
from .machine import H2Error

__all__ = ["ClientStream", "ConnectionGone", "ServerStream", "StreamRefused", "StreamReset"]


class StreamReset(Exception):
    """The peer reset the stream (or the connection went) before it was complete."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset ({_codeName(code)})")
        self.code = code


class ConnectionGone(StreamReset):
    """The connection ended (closed, reset) with the stream still open."""


class StreamRefused(StreamReset):
    """
    The origin never processed the request (REFUSED_STREAM, or a stream beyond its GOAWAY):
    it may be retried on another connection (RFC 9113 §8.7).
    """


#: Why a stream holds its received data (bits of C{_Stream._paused}).
_EXCHANGE = 1  # the exchange paused it (its upstream is still being dialled)
_PEER = 2  # the side this one delivers to cannot take more


def _codeName(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error {code}"


class _Stream:
    """
    What both roles share: buffering, flow control, ending, resetting.

    The state starts as the class's defaults (a stream is made per request: setting two
    dozen attributes each time showed in profiles); the buffers are made when first used.
    """

    id = 0
    exchange = None
    closed = False
    # inbound: body bytes held while paused (or before an exchange is attached); paused for
    # either reason: the exchange's (pause) or the other side's full buffer (pauseProducing),
    # each cleared by its own call only
    _paused = 0
    _held: list[bytes] | tuple = ()
    _heldFlow = 0  # flow-controlled bytes of _held, not yet acknowledged
    _remoteEnded = False  # END_STREAM received
    _endDelivered = False
    _trailers: Fields | None = None
    # outbound
    _queue: deque[bytes] | tuple = ()
    _queued = 0
    _localEnded = False  # END_STREAM sent
    _endPending = False  # end() called while data waited
    _pendingTrailers: Fields | None = None
    _other = None  # the side throttled by this one
    _throttling = False
    _inBatch = False

    def __init__(self, connection) -> None:
        self.connection = connection

    # -- the Side interface ------------------------------------------------------------------

    def sendData(self, data: bytes) -> None:
        if self.closed or self._localEnded or self._endPending or not data:
            return
        if self._queue or not self.connection.writing:
            self._enqueue(data)
            return
        self._send(data)

    def end(self, trailers: Fields | None = None) -> None:
        if self.closed or self._localEnded or self._endPending:
            return
        if self._queue:
            self._endPending = True
            self._pendingTrailers = trailers
            return
        self._sendEnd(trailers)

    def pause(self) -> None:
        self._paused |= _EXCHANGE

    def resume(self) -> None:
        self._unpause(_EXCHANGE)

    def _unpause(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused:
                self._deliverHeld()

    # IPushProducer: what another side (an HTTP/1.1 transport, another stream) pauses while
    # it cannot send what this one delivers (see throttle).
    @property
    def producer(self):
        return self

    def pauseProducing(self) -> None:
        self._paused |= _PEER

    def resumeProducing(self) -> None:
        self._unpause(_PEER)

    def stopProducing(self) -> None:
        pass

    def throttle(self, other) -> None:
        previous, self._other = self._other, other
        if self._throttling:
            if previous is not None and previous is not other:
                previous.producer.resumeProducing()
            if other is not None and other is not previous:
                other.producer.pauseProducing()
            if other is None:
                self._throttling = False

    def flush(self) -> None:
        self.connection.flushSoon()

    # -- sending -------------------------------------------------------------------------------

    def _frame(self, data: bytes) -> int:
        """
        Frame C{data} as far as the peer's window and the transport allow: the bytes
        taken. The connection writes every L{gateway.h2.connection.FLUSH_MARK} bytes framed,
        so a transport that fills up stops this loop (C{writing}) within one mark: the peer's
        window (which may be 2 GB) never decides what the proxy holds.
        """
        connection = self.connection
        conn = connection.conn
        try:
            window = conn.sendWindow(self.id)
        except H2Error:
            return len(data)  # gone: nothing will ever take it
        total = len(data)
        frame = conn.maxOutboundFrameSize
        if window >= total <= frame:
            conn.sendData(self.id, data)
            connection.framed(total)
            return total
        sent = 0
        while sent < total and window > 0 and connection.writing:
            size = min(window, frame, total - sent)
            conn.sendData(self.id, data[sent : sent + size])
            sent += size
            window -= size
            connection.framed(size)
        return sent

    def _send(self, data: bytes) -> None:
        sent = self._frame(data)
        if sent < len(data):
            self._enqueue(data[sent:] if sent else data)

    def _enqueue(self, data: bytes) -> None:
        """C{data} waits for a window (or the transport): the other side is throttled."""
        if not self._queue:
            self._queue = deque()
        self._queue.append(data)
        self._queued += len(data)
        self._blocked()

    def pump(self) -> None:
        """The window or the transport opened: send what waits, then unthrottle."""
        if self.closed:
            return
        queue = self._queue
        while queue and self.connection.writing:
            data = queue[0]
            sent = self._frame(data)
            self._queued -= sent
            if sent < len(data):
                queue[0] = data[sent:]
                return
            queue.popleft()
        if queue:
            return
        self.connection.unblocked(self)
        if self._endPending:
            self._endPending = False
            self._sendEnd(self._pendingTrailers)
        if self._throttling:
            self._throttling = False
            if self._other is not None:
                self._other.producer.resumeProducing()

    def _blocked(self) -> None:
        self.connection.blocked(self)
        if not self._throttling:
            self._throttling = True
            if self._other is not None:
                self._other.producer.pauseProducing()

    def _sendEnd(self, trailers: Fields | None) -> None:
        conn = self.connection.conn
        try:
            if trailers:
                conn.sendHeaders(self.id, trailerHeaders(trailers), True)
            else:
                conn.endStream(self.id)
        except H2Error:
            self._gone()
            return
        self._localEnded = True
        self.connection.dirty()
        self._localEnd()

    def _reset(self, code: ErrorCode) -> None:
        """Send RST_STREAM (once) and forget the stream."""
        if self.closed:
            return
        if self.id:
            self.connection.conn.resetStream(self.id, code)
            self.connection.dirty()
        self._gone()

    def malformed(self, reason: str) -> None:
        """The peer sent what HTTP/2 forbids on this stream: RST_STREAM PROTOCOL_ERROR."""
        if self.closed:
            return
        self._reset(ErrorCode.PROTOCOL_ERROR)
        self._lost(StreamReset(ErrorCode.PROTOCOL_ERROR, reason))

    # -- receiving -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes, flow: int) -> None:
        if not data:
            self._acknowledge(flow)  # an empty frame (END_STREAM, or padding only)
            return
        if self._paused or self.exchange is None or self._held:
            if self._held:
                self._held.append(data)
            else:
                self._held = [data]
            self._heldFlow += flow
            return
        self._batch()
        self._deliverData(data)
        self._acknowledge(flow)

    def trailersReceived(self, fields: Fields) -> None:
        self._trailers = fields

    def remoteEnded(self) -> None:
        self._remoteEnded = True
        if not self._paused and self.exchange is not None and not self._held:
            self._deliverEnd()

    def _acknowledge(self, flow: int) -> None:
        if flow and not self.closed:
            self.connection.conn.acknowledgeReceivedData(flow, self.id)
            self.connection.dirty()

    def _deliverHeld(self) -> None:
        """
        Deliver what was held, as long as the exchange does not pause again. Outside a read
        of this connection (a resume from the other leg), the exchange's end-of-batch call
        follows at once.
        """
        if self.exchange is None or not (self._held or self._remoteEnded):
            return
        self._batch()
        while self._held and not self._paused and not self.closed:
            data = b"".join(self._held)
            flow, self._heldFlow = self._heldFlow, 0
            self._held = ()
            self._deliverData(data)
            self._acknowledge(flow)
        if self._remoteEnded and not self._held and not self._paused and not self.closed:
            self._deliverEnd()
        self.connection.endBatchOutsideRead()

    def _deliverEnd(self) -> None:
        if self._endDelivered:
            return
        self._endDelivered = True
        self._batch()
        trailers, self._trailers = self._trailers, None
        self._deliverEndEvent(trailers)
        self._maybeDone()

    def _batch(self) -> None:
        """Remember that the exchange got events in this read, for its end-of-batch call."""
        if not self._inBatch:
            self._inBatch = True
            self.connection.touched.append(self)

    def batchEnded(self) -> None:
        self._inBatch = False

    def peerReset(self, code: int) -> None:
        """RST_STREAM from the peer."""
        if self.closed:
            return
        self._gone()
        self._lost(StreamReset(code))

    def connectionLost(self, reason: Exception) -> None:
        if self.closed:
            return
        self._gone()
        self._lost(reason)

    def _gone(self) -> None:
        """The stream is over for this side: drop buffers, leave the connection's tables."""
        if self.closed:
            return
        self.closed = True
        self._queue = ()
        self._queued = 0
        self._held = ()
        flow, self._heldFlow = self._heldFlow, 0
        if flow:
            # The connection's window must not shrink by what this stream never gave back.
            self.connection.conn.acknowledgeReceivedData(flow, self.id)
        self.connection.streamClosed(self)

    def _maybeDone(self) -> None:
        if self._localEnded and self._endDelivered:
            self._gone()

    @property
    def buffered(self) -> int:
        """Bytes this stream holds: received and not taken, plus sent and not yet framed."""
        return sum(len(b) for b in self._held) + self._queued

    # role-specific
    def _deliverData(self, data: bytes) -> None:
        raise NotImplementedError

    def _deliverEndEvent(self, trailers: Fields | None) -> None:
        raise NotImplementedError

    def _localEnd(self) -> None:
        self._maybeDone()

    def _lost(self, reason: Exception) -> None:
        raise NotImplementedError


class ServerStream(_Stream):
    """
    A client's stream on the client-facing connection: the Downstream side of its exchange.

    @ivar request: the request it carries.
    @ivar client: the client's address (for logs and X-Forwarded-For).
    """

    _headSent = False
    _requestFlush = None

    def __init__(self, connection, streamId: int, request: Request, client: str) -> None:
        self.connection = connection
        self.id = streamId
        self.request = request
        self.client = client

    def attach(self, exchange) -> None:
        """The exchange that serves this stream; held body events are delivered now."""
        self.exchange = exchange
        self._requestFlush = getattr(exchange, "requestFlush", None)
        self._deliverHeld()

    def sendHead(self, response: Response) -> None:
        if self.closed or self._localEnded:
            return
        if response.status == 101 or (self._headSent and response.status >= 200):
            return  # no upgrades on HTTP/2 (RFC 9113 §8.6); one final head
        final = response.status >= 200
        length = response.length
        noBody = final and (
            length == 0
            or length == NO_BODY
            or self.request.method == b"HEAD"
            or response.status in (204, 304)
        )
        headers = responseHeaders(response, self.request.method)
        try:
            self.connection.conn.sendHeaders(self.id, headers, noBody)
        except H2Error:
            self._gone()
            return
        self.connection.dirty()
        if final:
            self._headSent = True
        if noBody:
            self._localEnded = True
            self._localEnd()

    def abort(self) -> None:
        self._reset(ErrorCode.INTERNAL_ERROR)

    def answer(self, status: int, message: str, proxyStatus: str | None = None) -> None:
        """A proxy-made answer (a refusal, an error), complete, on this stream."""
        body = message.encode("utf-8", "replace") + b"\n"
        headers = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        if proxyStatus is not None:
            headers.append((b"proxy-status", b"proxygate; error=" + proxyStatus.encode()))
        head = self.request is not None and self.request.method == b"HEAD"
        try:
            self.connection.conn.sendHeaders(self.id, headers, head)
        except H2Error:
            self._gone()
            return
        self._headSent = True
        self.connection.dirty()
        if head:
            self._localEnded = True
            self._localEnd()
        else:
            self.sendData(body)
            self.end()

    def _deliverData(self, data: bytes) -> None:
        self.exchange.requestData(data)

    def _deliverEndEvent(self, trailers: Fields | None) -> None:
        self.exchange.requestEnd(trailers)

    def _localEnd(self) -> None:
        """
        The response is complete: the exchange is over for this stream. A request still
        coming is cut with RST_STREAM NO_ERROR (RFC 9113 §8.1: stop sending, the answer
        is complete); what it sent and was not taken is forgotten (and given back).
        """
        if not self._remoteEnded:
            self._reset(ErrorCode.NO_ERROR)
        else:
            self._gone()

    def _lost(self, reason: Exception) -> None:
        if self.exchange is not None:
            self.exchange.downstreamLost()

    def batchEnded(self) -> None:
        self._inBatch = False
        if self._requestFlush is not None and not self.closed:
            self._requestFlush()

    def __repr__(self) -> str:
        return f"<ServerStream {self.id} {self.request!r}>"


class ClientStream(_Stream):
    """
    A stream this proxy opens on an origin's connection: the Upstream side of its exchange.
    Its id is taken when the head is sent (HTTP/2 requires ids in the order streams open).
    """

    reserved = False  # counted by the connection as about to open
    _batchExchange = None
    _method = b"GET"
    _headReceived = False

    def __init__(self, connection, exchange) -> None:
        self.connection = connection
        self.exchange = exchange
        self.ip = connection.ip
        self.viaProxy = connection.viaProxy

    def attach(self, exchange) -> None:
        """The exchange this stream serves (the one it was opened for)."""
        self.exchange = exchange

    def sendHead(self, request: Request) -> None:
        conn = self.connection.conn
        self._method = request.method
        empty = request.length == 0 or request.length == NO_BODY
        try:
            self.id = conn.nextStreamId()
            conn.sendHeaders(self.id, requestHeaders(request), empty)
        except H2Error as e:
            # The origin's limits changed under us (fewer streams, GOAWAY): not processed.
            self.id = 0
            self.connection.unreserve(self)
            self._gone()
            self._lost(StreamRefused(ErrorCode.REFUSED_STREAM, f"cannot open a stream: {e}"))
            return
        self.connection.streamOpened(self)
        self.connection.dirty()
        if empty:
            self._localEnded = True

    def abort(self) -> None:
        self._reset(ErrorCode.CANCEL)

    def release(self, reuse: bool) -> None:
        """
        The exchange is done with this stream. An incomplete one is reset (CANCEL); the
        connection stays, shared, whatever C{reuse} says: HTTP/2 framing never leaves a
        connection unusable after one stream's exchange.
        """
        self.exchange = None
        if not self.closed:
            if self._localEnded and self._remoteEnded:
                self._gone()  # complete both ways (its last event is what ended it)
            else:
                self._reset(ErrorCode.CANCEL)
        self.connection.released(self)

    def headReceived(self, event) -> None:
        """A response head (L{gateway.h2.events.ResponseReceived} or a 1xx)."""
        try:
            if event.size > self.connection.limits.maxHeaderListSize:
                raise H2HeaderError(502, "the origin's response head is too large")
            if event.error is not None:
                raise H2HeaderError(502, f"a malformed HTTP/2 response: {event.error}")
            response = responseFromHead(event.head, self._method, event.endStream)
        except H2HeaderError as e:
            exchange, self.exchange = self.exchange, None
            self._reset(ErrorCode.PROTOCOL_ERROR)
            if exchange is not None:
                exchange.upstreamFailed(
                    Problem(e.status, "protocol", f"Bad response from the origin: {e.reason}.")
                )
            return
        if response.status >= 200:
            self._headReceived = True
        if self.exchange is not None:
            self._batch()
            self.exchange.responseHead(response)

    def _deliverData(self, data: bytes) -> None:
        self.exchange.responseData(data)

    def _deliverEndEvent(self, trailers: Fields | None) -> None:
        self.exchange.responseEnd(trailers)

    def _lost(self, reason: Exception) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if isinstance(reason, ConnectionGone) and not self._headReceived:
            # The connection closed before any answer: as an HTTP/1.1 connection that closes
            # (None), which the exchange retries once if it reused it and may repeat it.
            exchange.upstreamLost(None)
        else:
            exchange.upstreamLost(problemOfReset(reason))

    def goneAway(self) -> None:
        """A GOAWAY from the origin excluded this stream: it was never processed."""
        if self.closed:
            return
        self._gone()
        self._lost(StreamRefused(ErrorCode.REFUSED_STREAM, "the origin went away first"))

    def _batch(self) -> None:
        if not self._inBatch:
            # The exchange that gets this read's events hears its end, even if the response
            # ended in it (and released this stream): what it sent the client goes then.
            self._batchExchange = self.exchange
        super()._batch()

    def batchEnded(self) -> None:
        self._inBatch = False
        exchange, self._batchExchange = self._batchExchange, None
        if exchange is not None:
            exchange.responseFlush()

    def __repr__(self) -> str:
        return f"<ClientStream {self.id}>"


def problemOfReset(reason: Exception) -> Problem:
    """
    What an exchange makes of an origin stream that ended early: a refused one
    (L{StreamRefused}: never processed, so it may be retried), or an incomplete response.
    """
    if isinstance(reason, StreamRefused):
        return Problem(502, "stream_refused", f"The origin refused the stream: {reason}.")
    if isinstance(reason, StreamReset) and reason.code == ErrorCode.REFUSED_STREAM:
        return Problem(502, "stream_refused", "The origin refused the stream (REFUSED_STREAM).")
    return Problem(502, "incomplete", f"The origin's stream ended early: {reason}.")
