# -*- test-case-name: tests.test_h2_machine -*-
"""
One HTTP/2 connection's state (RFC 9113), either role, sans I/O: bytes in
(L{H2Machine.receiveData}, which returns L{gateway.h2.events}), calls for what to send
(L{H2Machine.sendHeaders}, L{H2Machine.sendData}...), bytes out (L{H2Machine.dataToSend}).

proxygate's own, in place of python-hyper's h2 (which the tests use as the reference peer):
h2 spent ~85% of an intercepted h2 request's CPU in its state machines, frame objects,
validation generators and HPACK. This one keeps the state in a few integers per stream,
parses frames in place from the read, dispatches on the frame type, and checks header
blocks in one pass (L{gateway.h2.fields}).

What it enforces, per RFC 9113: the preface and SETTINGS first; frame sizes (§4.2, §6); stream
identifiers (parity, increasing, §5.1.1); stream states (§5.1: frames on idle, half-closed and
closed streams); CONTINUATION sequencing (§6.10); padding; PRIORITY (parsed, ignored; a
stream depending on itself is a stream error); flow control both ways (§6.9: windows,
overflow, INITIAL_WINDOW_SIZE changes applied to open streams, an increment of 0); SETTINGS
validation and ACK, this side's settings applied once acknowledged; PING answered; GOAWAY;
RST_STREAM; PUSH_PROMISE refused (push is disabled both ways); unknown frame types and
settings ignored; content-length against the DATA received (§8.1.1).

Behaviours chosen for a proxy (where h2 differed, proxygate's wiring used to patch it):
 - GOAWAY, sent or received, leaves the connection open: the streams it allows finish
   (§6.8); the application opens no new ones. Only a connection error ends everything.
 - Streams past SETTINGS_MAX_CONCURRENT_STREAMS are the application's to refuse, one by one
   (REFUSED_STREAM, §5.1.2), not a connection error.
 - A header block decoding past C{hardHeaderListSize} is a connection error
   (ENHANCE_YOUR_CALM): nothing that size is decoded. Below it, sizes are the
   application's to judge (a 431 on one stream).
 - Malformed header blocks are delivered flagged (L{gateway.h2.events}), for the
   application to answer or reset; body lengths that break content-length are reset here.
 - Frames for streams this side reset are ignored (their DATA's window given back); so are
   frames for streams closed long enough ago to be forgotten. HEADERS or DATA on an id
   below the peer's highest that was never opened is a connection error.
 - Received DATA is given back to the peer's windows only as the application acknowledges
   it (L{H2Machine.acknowledgeReceivedData}): a WINDOW_UPDATE once half a window is
   consumed, or as soon as what was consumed exceeds what the peer has left.
"""

from __future__ import annotations

import struct

from .events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAcknowledged,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcknowledged,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from .fields import Malformed, requestHead, responseHead, trailerFields
from .frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADER,
    HEADERS,
    MAX_WINDOW,
    PADDED,
    PREFACE,
    PRIORITY_FLAG,
    SETTINGS,
    ErrorCode,
    Setting,
    frameHeader,
    goawayFrame,
    pingFrame,
    resetFrame,
    settingsFrame,
    windowUpdateFrame,
)
from .hpack import Decoder, Encoder, HPACKError, OversizedHeaderList

__all__ = ["H2Error", "H2Machine", "ProtocolError", "Settings", "StreamClosed"]


class H2Error(Exception):
    """An HTTP/2 error, with its error code (L{ErrorCode})."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(H2Error):
    """The peer broke HTTP/2: a connection error. GOAWAY with C{code} is queued."""


class StreamClosed(H2Error):
    """This side sent on a stream that is not open for it (reset, ended, never opened)."""


class _StreamError(H2Error):
    """The peer broke HTTP/2 on one stream: RST_STREAM, the connection goes on."""


_DEFAULT_WINDOW = 65535
_DEFAULT_FRAME = 16384
_LARGEST_FRAME = 2**24 - 1

#: How a forgotten stream closed: reset (frames after it are ignored) or ended both ways.
_RESET = 1
_ENDED = 2
#: Closed streams remembered (their ids, how they closed); half are forgotten past this.
_REMEMBERED = 2048
#: Header blocks remembered per connection (see H2Machine._parse), and the largest one
#: remembered: a repeated request's block is a few dozen bytes (its fields indexed), and 64
#: large ones would hold megabytes for the connection's life.
_BLOCKS_KEPT = 64
_BLOCK_KEPT_SIZE = 1024

_U32 = struct.Struct(">L").unpack_from
_U32x2 = struct.Struct(">LL").unpack_from
_SETTING = struct.Struct(">HL").unpack_from
_unpackHeader = HEADER.unpack_from


class Settings:
    """One side's SETTINGS values in effect (RFC 9113 §6.5.2 defaults)."""

    __slots__ = (
        "enableConnectProtocol",
        "enablePush",
        "headerTableSize",
        "initialWindowSize",
        "maxConcurrentStreams",
        "maxFrameSize",
        "maxHeaderListSize",
    )

    def __init__(self) -> None:
        self.headerTableSize = 4096
        self.enablePush = 1
        self.maxConcurrentStreams = 2**31 - 1  # unlimited until said
        self.initialWindowSize = _DEFAULT_WINDOW
        self.maxFrameSize = _DEFAULT_FRAME
        self.maxHeaderListSize = 2**31 - 1
        self.enableConnectProtocol = 0


_SETTING_NAMES = {
    Setting.HEADER_TABLE_SIZE: "headerTableSize",
    Setting.ENABLE_PUSH: "enablePush",
    Setting.MAX_CONCURRENT_STREAMS: "maxConcurrentStreams",
    Setting.INITIAL_WINDOW_SIZE: "initialWindowSize",
    Setting.MAX_FRAME_SIZE: "maxFrameSize",
    Setting.MAX_HEADER_LIST_SIZE: "maxHeaderListSize",
    Setting.ENABLE_CONNECT_PROTOCOL: "enableConnectProtocol",
}


class _Stream:
    """
    One open stream's state: its windows, which ends are closed, and what its received
    message still owes (content-length left, -1 when unchecked).
    """

    __slots__ = (
        "final",
        "id",
        "localEnded",
        "noContent",
        "processed",
        "recvWindow",
        "remaining",
        "remoteEnded",
        "sendWindow",
    )

    def __init__(self, streamId: int, sendWindow: int, recvWindow: int, final: bool) -> None:
        self.id = streamId
        self.sendWindow = sendWindow
        self.recvWindow = recvWindow
        self.processed = 0  # acknowledged, not yet given back by WINDOW_UPDATE
        self.localEnded = False
        self.remoteEnded = False
        self.remaining = -1
        # a request, or a final response, was received: the next HEADERS are trailers
        self.final = final
        self.noContent = False  # the response to this request has no content (HEAD)


class H2Machine:
    """
    The state of one HTTP/2 connection.

    @param client: the role (True: this side opens the streams).
    @param settings: this side's SETTINGS (L{Setting} codes to values), sent by
        L{initiateConnection}; ENABLE_PUSH is always 0.
    @param hardHeaderListSize: decoding a header block stops, and the connection ends, past
        this many bytes of header list.
    @param huffman: Huffman-code the literal strings this side sends.
    """

    def __init__(
        self,
        client: bool,
        settings: dict[int, int] | None = None,
        hardHeaderListSize: int = 2**20,
        huffman: bool = False,
    ) -> None:
        self.client = client
        self.localSettings: dict[int, int] = dict(settings or {})
        self.localSettings[Setting.ENABLE_PUSH] = 0
        self.remoteSettings = Settings()
        self.streams: dict[int, _Stream] = {}
        self.highestOutboundStreamId = 0
        self.lastPeerStreamId = 0
        self.goawaySent = False
        self.goawayReceived = False
        self.terminated = False  # a connection error: nothing more is read
        self.hardHeaderListSize = hardHeaderListSize
        self._peerParity = 1 if not client else 0
        self._closed: dict[int, int] = {}
        self._forgotten = 0  # the highest id forgotten from _closed
        self._blocks: dict[bytes, tuple] = {}  # header blocks decoded: see _parse
        self._outboundOpen = 0
        self._decoder = Decoder(maxListSize=hardHeaderListSize)
        self._encoder = Encoder(huffman=huffman)
        self._out: list[bytes] = []
        self._lastData = -1  # where in _out the last DATA frame's header is (-1: gone)
        self._lastDataOf = (0, 0)  # that frame's stream and size
        self._buffer = b""
        self._events: list = []
        self._preface = not client  # a server waits for the client's preface
        self._settingsFirst = True  # the peer's first frame must be SETTINGS
        self._block: list | None = None  # a header block waiting for CONTINUATION
        self._maxBlock = 2 * hardHeaderListSize  # raw bytes a header block may take
        self._maxInFrame = max(
            _DEFAULT_FRAME, self.localSettings.get(Setting.MAX_FRAME_SIZE, _DEFAULT_FRAME)
        )
        self._pendingLocal: list[dict[int, int]] = []
        # flow control: sending (the peer's windows) and receiving (ours)
        self._sendWindow = _DEFAULT_WINDOW
        self._recvWindow = _DEFAULT_WINDOW
        self._recvMax = _DEFAULT_WINDOW
        self._processed = 0
        self._localInitial = _DEFAULT_WINDOW  # acknowledged INITIAL_WINDOW_SIZE
        self._handlers = (
            self._data,
            self._headers,
            self._priority,
            self._rstStream,
            self._settings,
            self._pushPromise,
            self._ping,
            self._goaway,
            self._windowUpdate,
            self._continuation,
        )

    # -- sending ---------------------------------------------------------------------------------

    def initiateConnection(self) -> None:
        """The preface (a client's) and this side's SETTINGS."""
        if self.client:
            self._out.append(PREFACE)
        self._out.append(settingsFrame(self.localSettings))
        self._pendingLocal.append(dict(self.localSettings))

    def dataToSend(self) -> bytes:
        """Every frame queued since the last call."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        self._lastData = -1
        return data

    @property
    def maxOutboundFrameSize(self) -> int:
        return self.remoteSettings.maxFrameSize

    def nextStreamId(self) -> int:
        """The id the next stream this client opens takes."""
        return self.highestOutboundStreamId + 2 if self.highestOutboundStreamId else 1

    def sendHeaders(self, streamId: int, headers, endStream: bool = False) -> None:
        """
        A header block on C{streamId}: a client's request opens it (ids in increasing
        order); a server's response, or either side's trailers (with C{endStream}).

        @raise StreamClosed: the stream is not open for sending.
        @raise H2Error: REFUSED_STREAM: no stream may be opened now (GOAWAY, the peer's
            limit of concurrent streams).
        """
        stream = self.streams.get(streamId)
        if stream is None:
            stream = self._open(streamId, headers)
        elif stream.localEnded:
            raise StreamClosed(ErrorCode.STREAM_CLOSED, f"stream {streamId} is closed")
        block = self._encoder.encode(headers)
        out = self._out
        size = self.remoteSettings.maxFrameSize
        flags = END_STREAM if endStream else 0
        if len(block) <= size:
            out.append(frameHeader(len(block), HEADERS, flags | END_HEADERS, streamId))
            out.append(block)
        else:
            out.append(frameHeader(size, HEADERS, flags, streamId))
            out.append(block[:size])
            for start in range(size, len(block), size):
                chunk = block[start : start + size]
                last = END_HEADERS if start + size >= len(block) else 0
                out.append(frameHeader(len(chunk), CONTINUATION, last, streamId))
                out.append(chunk)
        if endStream:
            self._endLocal(stream)

    def _open(self, streamId: int, headers) -> _Stream:
        if not self.client or not streamId & 1 or streamId <= self.highestOutboundStreamId:
            raise StreamClosed(ErrorCode.STREAM_CLOSED, f"stream {streamId} cannot be opened")
        if self.goawayReceived:
            raise H2Error(ErrorCode.REFUSED_STREAM, "the peer said GOAWAY")
        if self._outboundOpen >= self.remoteSettings.maxConcurrentStreams:
            raise H2Error(ErrorCode.REFUSED_STREAM, "the peer's limit of concurrent streams")
        stream = _Stream(streamId, self.remoteSettings.initialWindowSize, self._localInitial, False)
        for name, value in headers:
            if name == b":method":
                stream.noContent = value == b"HEAD"
                break
        self.streams[streamId] = stream
        self.highestOutboundStreamId = streamId
        self._outboundOpen += 1
        return stream

    def sendData(self, streamId: int, data: bytes, endStream: bool = False) -> None:
        """
        One DATA frame: C{data} must fit L{sendWindow} and L{maxOutboundFrameSize}.

        @raise StreamClosed: the stream is not open for sending.
        """
        stream = self.streams.get(streamId)
        if stream is None or stream.localEnded:
            raise StreamClosed(ErrorCode.STREAM_CLOSED, f"stream {streamId} is closed")
        size = len(data)
        if size > self._sendWindow or size > stream.sendWindow:
            raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, "DATA larger than the send window")
        if size > self.remoteSettings.maxFrameSize:
            raise H2Error(ErrorCode.FRAME_SIZE_ERROR, "DATA larger than the peer's frames")
        self._sendWindow -= size
        stream.sendWindow -= size
        out = self._out
        if endStream:
            out.append(frameHeader(size, DATA, END_STREAM, streamId))
            self._endLocal(stream)
        else:
            self._lastData = len(out)
            self._lastDataOf = (streamId, size)
            out.append(frameHeader(size, DATA, 0, streamId))
        if size:
            out.append(data)

    def endStream(self, streamId: int) -> None:
        """
        END_STREAM: set on the stream's last DATA frame if nothing was queued after it,
        else on an empty one. @raise StreamClosed: not open for sending.
        """
        index = self._lastData
        if index >= 0 and self._lastDataOf[0] == streamId:
            size = self._lastDataOf[1]
            if len(self._out) == index + (2 if size else 1):
                stream = self.streams.get(streamId)
                if stream is not None and not stream.localEnded:
                    self._out[index] = frameHeader(size, DATA, END_STREAM, streamId)
                    self._lastData = -1
                    self._endLocal(stream)
                    return
        self.sendData(streamId, b"", True)

    def _endLocal(self, stream: _Stream) -> None:
        stream.localEnded = True
        if stream.remoteEnded:
            self._close(stream, _ENDED)

    def resetStream(self, streamId: int, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM, if the stream is open (a closed one is left alone)."""
        stream = self.streams.get(streamId)
        if stream is not None:
            self._out.append(resetFrame(streamId, code))
            self._close(stream, _RESET)

    def sendWindow(self, streamId: int) -> int:
        """What may be sent on C{streamId} now. @raise StreamClosed: not open for sending."""
        stream = self.streams.get(streamId)
        if stream is None or stream.localEnded:
            raise StreamClosed(ErrorCode.STREAM_CLOSED, f"stream {streamId} is closed")
        window = stream.sendWindow
        return window if window < self._sendWindow else self._sendWindow

    def acknowledgeReceivedData(self, size: int, streamId: int) -> None:
        """
        The application consumed C{size} flow-controlled bytes (L{DataReceived.flowLength})
        of C{streamId}: they go back to the peer's windows (a closed stream's, the
        connection's only), in WINDOW_UPDATEs sent once enough has gathered.
        """
        if not size:
            return
        self._giveBack(size)
        stream = self.streams.get(streamId)
        if stream is not None and not stream.remoteEnded:
            processed = stream.processed + size
            if processed >= self._localInitial >> 1 or processed >= stream.recvWindow:
                self._out.append(windowUpdateFrame(streamId, processed))
                stream.recvWindow += processed
                processed = 0
            stream.processed = processed

    def _giveBack(self, size: int) -> None:
        """C{size} bytes of the connection's receive window are free again."""
        processed = self._processed + size
        if processed >= self._recvMax >> 1 or processed >= self._recvWindow:
            self._out.append(windowUpdateFrame(0, processed))
            self._recvWindow += processed
            processed = 0
        self._processed = processed

    def incrementConnectionWindow(self, increment: int) -> None:
        """Grow the connection's receive window (it starts at 65,535 whatever SETTINGS say)."""
        self._out.append(windowUpdateFrame(0, increment))
        self._recvWindow += increment
        self._recvMax += increment

    def ping(self, data: bytes) -> None:
        self._out.append(pingFrame(data))

    def closeConnection(
        self, code: int = ErrorCode.NO_ERROR, lastStreamId: int | None = None, debug: bytes = b""
    ) -> None:
        """
        GOAWAY. With NO_ERROR the open streams may finish (the application opens no new
        ones, and refuses the peer's); with an error, nothing more is read.
        """
        if lastStreamId is None:
            lastStreamId = self.lastPeerStreamId
        self._out.append(goawayFrame(lastStreamId, code, debug))
        self.goawaySent = True
        if code:
            self.terminated = True

    # -- receiving -------------------------------------------------------------------------------

    def receiveData(self, data: bytes) -> list:
        """
        Bytes from the peer: what they meant, as events. Frames the peer is owed (SETTINGS
        and PING acknowledgements, RST_STREAM for its stream errors) are queued.

        @raise ProtocolError: a connection error; GOAWAY is queued, and nothing more is read.
        """
        if self.terminated:
            return []
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        events = self._events = []
        try:
            if self._preface:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 preface")
                    self._buffer = data
                    return events
                if not data.startswith(PREFACE):
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 preface")
                self._preface = False
                data = data[len(PREFACE) :]
            end = self._frames(data)
        except ProtocolError as e:
            self.closeConnection(e.code, debug=str(e).encode("utf-8", "replace")[:256])
            raise
        if end < len(data):
            self._buffer = data[end:]
        return events

    def _frames(self, data: bytes) -> int:
        """Handle every complete frame in C{data}: the offset of the first incomplete one."""
        handlers = self._handlers
        length = len(data)
        pos = 0
        while length - pos >= 9:
            high, low, kind, flags, streamId = _unpackHeader(data, pos)
            size = high << 16 | low
            if size > self._maxInFrame:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"a frame of {size} bytes")
            start = pos + 9
            end = start + size
            if end > length:
                break
            streamId &= 0x7FFFFFFF
            if self._block is not None and kind != CONTINUATION:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a header block left unfinished")
            if self._settingsFirst:
                if kind != SETTINGS or flags & ACK:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "the first frame is not SETTINGS")
                self._settingsFirst = False
            if kind < 10:
                handlers[kind](flags, streamId, data, start, end)
            pos = end
        return pos

    # frames, by type

    def _data(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if not streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        flow = end - start
        window = self._recvWindow - flow
        if window < 0:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recvWindow = window
        if flags & PADDED:
            start, end = _unpad(data, start, end)
        stream = self.streams.get(streamId)
        if stream is None or stream.remoteEnded:
            self._giveBack(flow)
            self._frameOnClosed(stream, streamId, "DATA")
            return
        try:
            stream.recvWindow -= flow
            if stream.recvWindow < 0:
                raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
            if not stream.final:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR, "DATA before the response")
            remaining = stream.remaining
            if remaining >= 0:
                remaining -= end - start
                if remaining < 0 or (remaining and flags & END_STREAM):
                    raise _StreamError(ErrorCode.PROTOCOL_ERROR, "DATA unlike content-length")
                stream.remaining = remaining
        except _StreamError as e:
            self._giveBack(flow)
            self._streamError(stream, e.code)
            return
        if flags & END_STREAM:
            stream.remoteEnded = True
            if stream.localEnded:
                self._close(stream, _ENDED)
            self._events.append(DataReceived(streamId, data[start:end], flow, True))
        elif flow:  # empty DATA carries nothing to deliver (CVE-2019-9518 floods)
            self._events.append(DataReceived(streamId, data[start:end], flow, False))

    def _frameOnClosed(self, stream: _Stream | None, streamId: int, kind: str) -> None:
        """DATA or HEADERS for a stream that takes none."""
        if stream is not None:  # half-closed (remote)
            self._streamError(stream, ErrorCode.STREAM_CLOSED)
        elif self._idle(streamId):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{kind} on idle stream {streamId}")
        else:
            how = self._closed.get(streamId)
            if how == _ENDED:
                raise ProtocolError(ErrorCode.STREAM_CLOSED, f"{kind} on closed stream {streamId}")
            if how is None and streamId > self._forgotten:
                # skipped over by a higher id: a HEADERS here is a decreasing id (§5.1.1)
                code = ErrorCode.PROTOCOL_ERROR if kind == "HEADERS" else ErrorCode.STREAM_CLOSED
                raise ProtocolError(code, f"{kind} on stream {streamId}, never opened")
        # else: a stream reset (or forgotten): ignored

    def _idle(self, streamId: int) -> bool:
        """Whether C{streamId} is one no frame has opened yet (§5.1)."""
        if streamId & 1 == self._peerParity:
            return streamId > self.lastPeerStreamId
        return streamId > self.highestOutboundStreamId

    def _headers(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if not streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        padding = 0
        if flags & PADDED:
            if start == end:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS without its pad length")
            padding = data[start]
            start += 1
        dependency = 0
        if flags & PRIORITY_FLAG:
            if end - start < 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for PRIORITY")
            dependency = _U32(data, start)[0] & 0x7FFFFFFF
            start += 5
        if padding:
            if padding > end - start:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
            end -= padding
        if flags & END_HEADERS:
            self._headerBlock(streamId, flags, data[start:end], dependency)
        else:
            self._block = [streamId, flags, [data[start:end]], end - start, dependency]
            self._checkBlockSize(end - start)

    def _continuation(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        block = self._block
        if block is None or block[0] != streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION out of sequence")
        block[2].append(data[start:end])
        block[3] += end - start + 9  # empty CONTINUATIONs cost too (CVE-2024-27316)
        self._checkBlockSize(block[3])
        if flags & END_HEADERS:
            self._block = None
            self._headerBlock(streamId, block[1], b"".join(block[2]), block[4])

    def _checkBlockSize(self, size: int) -> None:
        if size > self._maxBlock:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "a header block too large")

    def _headerBlock(self, streamId: int, flags: int, block: bytes, dependency: int) -> None:
        """A complete header block: decoded whatever becomes of it (the HPACK context)."""
        endStream = bool(flags & END_STREAM)
        stream = self.streams.get(streamId)
        if stream is None:
            if streamId & 1 != self._peerParity or streamId <= self.lastPeerStreamId:
                self._decode(block)
                self._frameOnClosed(None, streamId, "HEADERS")
                return
            if self.client:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a stream opened by the server")
            headers, size, head, error = self._parse(block, requestHead)
            self.lastPeerStreamId = streamId
            stream = _Stream(
                streamId, self.remoteSettings.initialWindowSize, self._localInitial, True
            )
            self.streams[streamId] = stream
            if dependency == streamId:
                self._streamError(stream, ErrorCode.PROTOCOL_ERROR)
                return
            if head is not None and head[5] >= 0:
                if endStream and head[5]:
                    error = "content-length with no DATA"
                stream.remaining = head[5]
            if endStream:
                stream.remoteEnded = True
            self._events.append(RequestReceived(streamId, headers, size, head, error, endStream))
            return
        if stream.final or stream.remoteEnded or dependency == streamId:
            headers, size = self._decode(block)
            if dependency == streamId:
                self._streamError(stream, ErrorCode.PROTOCOL_ERROR)
            elif stream.remoteEnded:
                self._streamError(stream, ErrorCode.STREAM_CLOSED)
            else:
                self._trailers(stream, headers, size, endStream)
            return
        headers, size, head, error = self._parse(block, responseHead)
        if head is None:
            event = ResponseReceived
        elif head[0] < 200:
            event = InformationalResponseReceived
            if endStream:
                error = "an informational response that ends the stream"
            elif head[0] == 101:
                error = "101 Switching Protocols on HTTP/2"
        else:
            event = ResponseReceived
            stream.final = True
            if not stream.noContent and head[0] != 304 and head[2] >= 0:
                if endStream and head[2]:
                    error = "content-length with no DATA"
                stream.remaining = head[2]
        if endStream:
            stream.remoteEnded = True
            if stream.localEnded:
                self._close(stream, _ENDED)
        self._events.append(event(streamId, headers, size, head, error, endStream))

    def _decode(self, block: bytes) -> tuple[list, int]:
        try:
            return self._decoder.decode(block)
        except OversizedHeaderList as e:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, str(e)) from None
        except HPACKError as e:
            raise ProtocolError(ErrorCode.COMPRESSION_ERROR, str(e)) from None

    def _parse(self, block: bytes, parse) -> tuple:
        """
        A request's or response's header block (C{parse}: L{requestHead}, L{responseHead})
        decoded and taken apart: (headers, size, head, error). Blocks that left the HPACK
        table as it was (every field indexed, say: a client repeating a request) are
        remembered, and the same bytes against the same table are not decoded again. What
        is handed out is shared: read only.
        """
        decoder = self._decoder
        version = decoder.version
        known = self._blocks.get(block)
        if known is not None and known[0] == version and known[1] is parse:
            return known[2]
        headers, size = self._decode(block)
        try:
            parsed = (headers, size, parse(headers), None)
        except Malformed as e:
            parsed = (headers, size, None, str(e))
        if decoder.version == version and len(block) <= _BLOCK_KEPT_SIZE:
            if len(self._blocks) >= _BLOCKS_KEPT:
                self._blocks.clear()
            self._blocks[block] = (version, parse, parsed)
        return parsed

    def _trailers(self, stream: _Stream, headers, size: int, endStream: bool) -> None:
        if not endStream:
            self._streamError(stream, ErrorCode.PROTOCOL_ERROR)  # §8.1: malformed
            return
        if stream.remaining > 0:
            self._streamError(stream, ErrorCode.PROTOCOL_ERROR)  # less DATA than content-length
            return
        error = None
        try:
            fields = trailerFields(headers)
        except Malformed as e:
            fields, error = None, str(e)
        stream.remoteEnded = True
        if stream.localEnded:
            self._close(stream, _ENDED)
        self._events.append(TrailersReceived(stream.id, headers, size, fields, error, True))

    def _priority(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if not streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if end - start != 5:
            self._errorOn(streamId, ErrorCode.FRAME_SIZE_ERROR, "PRIORITY not of 5 bytes")
        elif _U32(data, start)[0] & 0x7FFFFFFF == streamId:
            self._errorOn(streamId, ErrorCode.PROTOCOL_ERROR, "a stream depending on itself")

    def _errorOn(self, streamId: int, code: int, message: str) -> None:
        """
        A stream error on a frame that may name any stream: RST_STREAM if it is open, a
        connection error if it is idle (nothing may be sent on an idle stream), nothing if
        it is closed.
        """
        stream = self.streams.get(streamId)
        if stream is not None:
            self._streamError(stream, code)
        elif self._idle(streamId):
            raise ProtocolError(code, message)

    def _rstStream(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if not streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if end - start != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM not of 4 bytes")
        stream = self.streams.get(streamId)
        if stream is None:
            if self._idle(streamId):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        code = _U32(data, start)[0]
        self._close(stream, _RESET)
        self._events.append(StreamReset(streamId, code, True))

    def _settings(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if end != start:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            if self._pendingLocal:
                self._applyLocal(self._pendingLocal.pop(0))
            self._events.append(SettingsAcknowledged())
            return
        if (end - start) % 6:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not in 6-byte parts")
        changed: dict[int, int] = {}
        initial = self.remoteSettings.initialWindowSize
        peak = initial
        for offset in range(start, end, 6):
            code, value = _SETTING(data, offset)
            self._applyRemote(code, value)
            changed[code] = value
            if code == Setting.INITIAL_WINDOW_SIZE and value > peak:
                peak = value
        if Setting.INITIAL_WINDOW_SIZE in changed:
            self._moveWindows(initial, peak)
        self._out.append(settingsFrame({}, ack=True))
        self._events.append(RemoteSettingsChanged(changed))

    def _applyRemote(self, code: int, value: int) -> None:
        remote = self.remoteSettings
        if code == Setting.INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
        elif code == Setting.MAX_FRAME_SIZE:
            if not _DEFAULT_FRAME <= value <= _LARGEST_FRAME:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE of {value}")
        elif code == Setting.HEADER_TABLE_SIZE:
            self._encoder.setPeerLimit(value)
        elif code in (Setting.ENABLE_PUSH, Setting.ENABLE_CONNECT_PROTOCOL):
            if value > 1 or (code == Setting.ENABLE_PUSH and value and self.client):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"setting {code} of {value}")
        elif code == Setting.NO_RFC7540_PRIORITIES:
            if value > 1:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"setting {code} of {value}")
            return
        name = _SETTING_NAMES.get(code)
        if name is not None:
            setattr(remote, name, value)

    def _moveWindows(self, initial: int, peak: int) -> None:
        """
        INITIAL_WINDOW_SIZE went from C{initial} to the value now in effect, through C{peak}
        at most: every open stream's send window moves once per frame, not once per value (a
        frame of 2,730 values times 100 streams was 14 ms of CPU), and a window that passed
        2^31-1 on the way is caught all the same (§6.9.2).
        """
        delta = self.remoteSettings.initialWindowSize - initial
        if not delta and peak == initial:
            return
        highest = MAX_WINDOW - (peak - initial)
        for stream in self.streams.values():
            if stream.sendWindow > highest:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window grown too large")
            stream.sendWindow += delta

    def _applyLocal(self, settings: dict[int, int]) -> None:
        """This side's SETTINGS, acknowledged: in effect for what the peer sends from now."""
        value = settings.get(Setting.INITIAL_WINDOW_SIZE)
        if value is not None and value != self._localInitial:
            delta = value - self._localInitial
            self._localInitial = value
            for stream in self.streams.values():
                stream.recvWindow += delta

    def _pushPromise(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")

    def _ping(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if end - start != 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING not of 8 bytes")
        if flags & ACK:
            self._events.append(PingAcknowledged(data[start:end]))
        else:
            self._out.append(pingFrame(data[start:end], ack=True))

    def _goaway(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if streamId:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if end - start < 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last, code = _U32x2(data, start)
        self.goawayReceived = True
        self._events.append(ConnectionTerminated(code, last & 0x7FFFFFFF, data[start + 8 : end]))

    def _windowUpdate(self, flags: int, streamId: int, data: bytes, start: int, end: int) -> None:
        if end - start != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE not of 4 bytes")
        increment = _U32(data, start)[0] & 0x7FFFFFFF
        if not streamId:
            if not increment:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._sendWindow += increment
            if self._sendWindow > MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "a connection window too large")
            self._events.append(WindowUpdated(0, increment))
            return
        stream = self.streams.get(streamId)
        if stream is None:
            if self._idle(streamId):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not increment:
            self._streamError(stream, ErrorCode.PROTOCOL_ERROR)
            return
        stream.sendWindow += increment
        if stream.sendWindow > MAX_WINDOW:
            self._streamError(stream, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self._events.append(WindowUpdated(streamId, increment))

    # -- streams ending --------------------------------------------------------------------------

    def _streamError(self, stream: _Stream, code: int) -> None:
        """The peer broke the rules on C{stream}: RST_STREAM, and the application hears it."""
        self._out.append(resetFrame(stream.id, code))
        self._close(stream, _RESET)
        self._events.append(StreamReset(stream.id, code, False))

    def _close(self, stream: _Stream, how: int) -> None:
        streamId = stream.id
        del self.streams[streamId]
        if streamId & 1 != self._peerParity:
            self._outboundOpen -= 1
        closed = self._closed
        closed[streamId] = how
        if len(closed) > _REMEMBERED:
            old = list(closed)[: _REMEMBERED >> 1]
            for streamId in old:
                del closed[streamId]
            self._forgotten = max(self._forgotten, *old)


def _unpad(data: bytes, start: int, end: int) -> tuple[int, int]:
    """A padded frame's payload without its padding (§6.1)."""
    if start == end:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "a padded frame without its pad length")
    padding = data[start]
    start += 1
    if padding > end - start:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return start, end - padding
