"""
L{gateway.h2.machine.H2Machine} and L{gateway.h2.frames}, in process: bytes in, events and
bytes out. python-hyper's h2 is the reference peer for the exchanges that should work; hand
built frames (struct) are the peer for everything that should not, each answered with the
GOAWAY or RST_STREAM code RFC 9113 names, and for the resource attacks that hit other HTTP/2
implementations (CONTINUATION flood, HPACK bomb, empty frame floods, stream tables).
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport

from gateway.h2 import events
from gateway.h2.connection import UNREAD_ANSWERS, H2Limits, H2ServerProtocol
from gateway.h2.frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ErrorCode,
    Setting,
    frameHeader,
    goawayFrame,
    pingFrame,
    resetFrame,
    settingsFrame,
    windowUpdateFrame,
)
from gateway.h2.hpack import Encoder
from gateway.h2.machine import H2Error, H2Machine, ProtocolError, StreamClosed

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"example.com"),
    (b":path", b"/"),
]
POST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"example.com"),
    (b":path", b"/upload"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


# -- raw frames ---------------------------------------------------------------------------------


def frame(kind: int, flags: int, streamId: int, payload: bytes = b"") -> bytes:
    return frameHeader(len(payload), kind, flags, streamId) + payload


def parseFrames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame in C{data}, which holds whole frames."""
    frames = []
    pos = 0
    while pos < len(data):
        high, low, kind, flags, streamId = struct.unpack_from(">BHBBL", data, pos)
        size = high << 16 | low
        frames.append((kind, flags, streamId & 0x7FFFFFFF, data[pos + 9 : pos + 9 + size]))
        pos += 9 + size
    assert pos == len(data)
    return frames


def block(headers=REQUEST) -> bytes:
    """A header block from a fresh encoder (static table and literals: no context)."""
    return Encoder().encode(headers)


def headersFrame(streamId: int, headers=REQUEST, endStream: bool = True) -> bytes:
    flags = END_HEADERS | (END_STREAM if endStream else 0)
    return frame(HEADERS, flags, streamId, block(headers))


def server(settings: dict[int, int] | None = None, **kw) -> H2Machine:
    """A server machine past the client's preface and SETTINGS (acknowledged both ways)."""
    machine = H2Machine(False, settings, **kw)
    machine.initiateConnection()
    machine.receiveData(PREFACE + settingsFrame({}) + settingsFrame({}, ack=True))
    machine.dataToSend()
    return machine


def client(settings: dict[int, int] | None = None, **kw) -> H2Machine:
    machine = H2Machine(True, settings, **kw)
    machine.initiateConnection()
    machine.receiveData(settingsFrame({}) + settingsFrame({}, ack=True))
    machine.dataToSend()
    return machine


def connectionError(machine: H2Machine, data: bytes, code: int) -> None:
    """C{data} is a connection error: ProtocolError, GOAWAY C{code} queued, nothing more read."""
    with pytest.raises(ProtocolError) as caught:
        machine.receiveData(data)
    assert caught.value.code == code, caught.value
    sent = parseFrames(machine.dataToSend())
    assert sent[-1][0] == GOAWAY
    assert struct.unpack(">LL", sent[-1][3][:8])[1] == code
    assert machine.terminated
    assert machine.receiveData(pingFrame(b"12345678")) == []
    assert machine.dataToSend() == b""


def streamError(machine: H2Machine, data: bytes, streamId: int, code: int) -> list:
    """C{data} is a stream error: RST_STREAM C{code} sent, the connection goes on."""
    received = machine.receiveData(data)
    resets = [event for event in received if isinstance(event, events.StreamReset)]
    assert [(r.streamId, r.errorCode, r.remote) for r in resets] == [(streamId, code, False)]
    sent = parseFrames(machine.dataToSend())
    assert (RST_STREAM, 0, streamId, struct.pack(">L", code)) in sent
    assert streamId not in machine.streams
    assert not machine.terminated
    machine.receiveData(pingFrame(b"stillops"))
    assert parseFrames(machine.dataToSend()) == [(PING, 1, 0, b"stillops")]
    return received


# -- python-hyper's h2 as the peer --------------------------------------------------------------


def h2Peer(clientSide: bool, settings: dict[int, int] | None) -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(client_side=clientSide, header_encoding=None)
    peer = h2.connection.H2Connection(config=config)
    peer.initiate_connection()
    if settings:
        peer.update_settings(settings)
    return peer


class Pair:
    """The machine and an h2 peer, with the bytes between them moved by L{pump}."""

    def __init__(self, machineIsClient: bool, peerSettings: dict[int, int] | None = None):
        self.machine = H2Machine(machineIsClient)
        self.peer = h2Peer(not machineIsClient, peerSettings)
        self.machineEvents: list = []
        self.peerEvents: list = []
        self.machine.initiateConnection()
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            toPeer = self.machine.dataToSend()
            toMachine = self.peer.data_to_send()
            if not toPeer and not toMachine:
                return
            if toPeer:
                self.peerEvents += self.peer.receive_data(toPeer)
            if toMachine:
                self.machineEvents += self.machine.receiveData(toMachine)
        raise AssertionError("the peers never settle")

    def take(self, side: str, kind: type) -> list:
        found = [event for event in getattr(self, side) if isinstance(event, kind)]
        setattr(self, side, [e for e in getattr(self, side) if not isinstance(e, kind)])
        return found


def peerBody(pair: Pair, streamId: int) -> bytes:
    body = b""
    for event in pair.take("peerEvents", h2.events.DataReceived):
        assert event.stream_id == streamId
        body += event.data
        pair.peer.acknowledge_received_data(event.flow_controlled_length, streamId)
    return body


def machineBody(pair: Pair, streamId: int) -> bytes:
    body = b""
    for event in pair.take("machineEvents", events.DataReceived):
        assert event.streamId == streamId
        body += event.data
        pair.machine.acknowledgeReceivedData(event.flowLength, streamId)
    return body


def sendAll(machine: H2Machine, streamId: int, body: bytes) -> int:
    """Send what the windows and frame size allow of C{body}: how much that was."""
    sent = 0
    while sent < len(body):
        size = min(machine.sendWindow(streamId), machine.maxOutboundFrameSize, len(body) - sent)
        if size <= 0:
            break
        machine.sendData(streamId, body[sent : sent + size])
        sent += size
    return sent


def test_serverExchangeWithH2Client():
    """A GET and a POST with a body, concurrently; responses with a body and with trailers."""
    pair = Pair(machineIsClient=False)
    pair.peer.send_headers(1, REQUEST, end_stream=True)
    pair.peer.send_headers(3, [*POST, (b"content-length", b"5")])
    pair.peer.send_data(3, b"hello", end_stream=True)
    pair.pump()
    requests = pair.take("machineEvents", events.RequestReceived)
    assert [(r.streamId, r.endStream, r.error) for r in requests] == [
        (1, True, None),
        (3, False, None),
    ]
    assert requests[0].headers == REQUEST
    assert machineBody(pair, 3) == b"hello"

    pair.machine.sendHeaders(3, RESPONSE)
    pair.machine.sendData(3, b"created")
    pair.machine.sendHeaders(3, [(b"grpc-status", b"0")], endStream=True)
    pair.machine.sendHeaders(1, RESPONSE)
    pair.machine.sendData(1, b"index")
    pair.machine.endStream(1)
    pair.pump()
    responses = pair.take("peerEvents", h2.events.ResponseReceived)
    assert [(r.stream_id, r.headers) for r in responses] == [(3, RESPONSE), (1, RESPONSE)]
    trailers = pair.take("peerEvents", h2.events.TrailersReceived)
    assert [(t.stream_id, t.headers) for t in trailers] == [(3, [(b"grpc-status", b"0")])]
    data = pair.take("peerEvents", h2.events.DataReceived)
    assert [(d.stream_id, d.data) for d in data] == [(3, b"created"), (1, b"index")]
    ended = pair.take("peerEvents", h2.events.StreamEnded)
    assert sorted(e.stream_id for e in ended) == [1, 3]
    assert pair.machine.streams == {}
    with pytest.raises(StreamClosed):
        pair.machine.sendData(1, b"late")


def test_endStreamMarksTheLastDataFrame():
    """endStream right after sendData sets END_STREAM on that frame, not on an empty one."""
    machine = server()
    machine.receiveData(headersFrame(1))
    machine.sendHeaders(1, RESPONSE)
    machine.sendData(1, b"body")
    machine.endStream(1)
    sent = parseFrames(machine.dataToSend())
    assert sent[-1] == (DATA, END_STREAM, 1, b"body")
    assert 1 not in machine.streams


def test_clientExchangeWithH2Server():
    """Requests with bodies and trailers both ways; a 1xx before the final response."""
    pair = Pair(machineIsClient=True)
    machine = pair.machine
    assert machine.nextStreamId() == 1
    machine.sendHeaders(1, POST)
    machine.sendData(1, b"part one ")
    machine.sendData(1, b"part two")
    machine.sendHeaders(1, [(b"x-checksum", b"abc")], endStream=True)
    machine.sendHeaders(3, REQUEST, endStream=True)
    assert machine.nextStreamId() == 5
    pair.pump()
    received = pair.take("peerEvents", h2.events.RequestReceived)
    assert [r.stream_id for r in received] == [1, 3]
    trailers = pair.take("peerEvents", h2.events.TrailersReceived)
    assert trailers[0].headers == [(b"x-checksum", b"abc")]
    assert peerBody(pair, 1) == b"part one part two"

    pair.peer.send_headers(3, [(b":status", b"103"), (b"link", b"</a>")])
    pair.peer.send_headers(3, [(b":status", b"204")], end_stream=True)
    pair.peer.send_headers(1, [(b":status", b"200"), (b"content-length", b"4")])
    pair.peer.send_data(1, b"done")
    pair.peer.send_headers(1, [(b"x-trailer", b"t")], end_stream=True)
    pair.pump()
    informational = pair.take("machineEvents", events.InformationalResponseReceived)
    assert [(i.streamId, i.head[0], i.error) for i in informational] == [(3, 103, None)]
    responses = pair.take("machineEvents", events.ResponseReceived)
    assert [(r.streamId, r.head[0], r.endStream) for r in responses] == [
        (3, 204, True),
        (1, 200, False),
    ]
    assert machineBody(pair, 1) == b"done"
    trailers = pair.take("machineEvents", events.TrailersReceived)
    assert [(t.streamId, t.headers) for t in trailers] == [(1, [(b"x-trailer", b"t")])]
    assert machine.streams == {}


def test_largeBodiesSplitAndFlowControlled():
    """
    A body four times the default window, both ways: frames no larger than MAX_FRAME_SIZE,
    the machine stops at the peer's window and goes on after its WINDOW_UPDATEs.
    """
    body = bytes(range(256)) * 1024  # 256 KiB
    pair = Pair(machineIsClient=False)
    machine = pair.machine
    pair.peer.send_headers(1, POST)
    pair.pump()
    # upload: h2 sends what our windows allow; we give it back as we consume
    sent = 0
    received = b""
    while len(received) < len(body):
        window = pair.peer.local_flow_control_window(1)
        chunk = min(window, pair.peer.max_outbound_frame_size, len(body) - sent)
        if chunk:
            pair.peer.send_data(1, body[sent : sent + chunk])
            sent += chunk
        pair.pump()
        received += machineBody(pair, 1)
        pair.pump()
    pair.peer.end_stream(1)
    pair.pump()
    assert received == body

    # download: never past the peer's windows, resumed by its WINDOW_UPDATEs
    machine.sendHeaders(1, RESPONSE)
    done = 0
    download = b""
    stalls = 0
    while done < len(body):
        done += sendAll(machine, 1, body[done:])
        out = machine.dataToSend()
        for kind, _, _, payload in parseFrames(out):
            if kind == DATA:
                assert len(payload) <= 16384
        pair.peerEvents += pair.peer.receive_data(out)
        if machine.sendWindow(1) == 0:
            stalls += 1
            assert pair.peer.remote_flow_control_window(1) == 0 or (
                pair.peer.inbound_flow_control_window == 0
            )
        download += peerBody(pair, 1)
        pair.pump()
    machine.endStream(1)
    pair.pump()
    download += peerBody(pair, 1)
    assert download == body
    assert stalls >= 3
    assert pair.take("peerEvents", h2.events.StreamEnded)


def test_sendBeyondTheWindowRefused():
    machine = server()
    machine.receiveData(headersFrame(1))
    machine.sendHeaders(1, RESPONSE)
    assert machine.sendWindow(1) == 65535
    for _ in range(3):
        machine.sendData(1, b"x" * 16384)
    machine.sendData(1, b"x" * 16383)
    assert machine.sendWindow(1) == 0
    with pytest.raises(H2Error) as caught:
        machine.sendData(1, b"x")
    assert caught.value.code == ErrorCode.FLOW_CONTROL_ERROR
    received = machine.receiveData(windowUpdateFrame(0, 100))
    assert [(e.streamId, e.delta) for e in received] == [(0, 100)]
    assert machine.sendWindow(1) == 0  # the stream's own window is still empty
    machine.receiveData(windowUpdateFrame(1, 10))
    assert machine.sendWindow(1) == 10
    with pytest.raises(H2Error) as caught:
        machine.sendData(1, b"x" * 20000)
    machine.sendData(1, b"x" * 10)


def test_sendLargerThanTheFrameSizeRefused():
    machine = server()
    machine.receiveData(headersFrame(1) + windowUpdateFrame(0, 100000))
    machine.receiveData(windowUpdateFrame(1, 100000))
    machine.sendHeaders(1, RESPONSE)
    with pytest.raises(H2Error) as caught:
        machine.sendData(1, b"x" * 16385)
    assert caught.value.code == ErrorCode.FRAME_SIZE_ERROR
    machine.receiveData(settingsFrame({Setting.MAX_FRAME_SIZE: 32768}))
    assert machine.maxOutboundFrameSize == 32768
    machine.sendData(1, b"x" * 32768)


def test_largeHeaderBlockSplitIntoContinuations():
    """A header block larger than the peer's MAX_FRAME_SIZE goes as HEADERS + CONTINUATION."""
    pair = Pair(machineIsClient=True)
    big = REQUEST + [(b"x-big-%d" % i, b"v" * 1000) for i in range(40)]
    pair.machine.sendHeaders(1, big, endStream=True)
    out = pair.machine.dataToSend()
    kinds = [kind for kind, *_ in parseFrames(out)]
    assert kinds[0] == HEADERS and kinds[1:] == [CONTINUATION] * (len(kinds) - 1)
    assert len(kinds) >= 3
    received = pair.peer.receive_data(out)
    assert [e.headers for e in received if isinstance(e, h2.events.RequestReceived)] == [big]


def test_initialWindowSizeChangeAdjustsOpenStreams():
    """SETTINGS_INITIAL_WINDOW_SIZE moves every open stream's window, even below zero."""
    machine = server()
    machine.receiveData(headersFrame(1) + headersFrame(3))
    machine.sendHeaders(1, RESPONSE)
    machine.sendHeaders(3, RESPONSE)
    machine.sendData(1, b"x" * 16000)
    machine.receiveData(settingsFrame({Setting.INITIAL_WINDOW_SIZE: 10000}))
    assert parseFrames(machine.dataToSend())[-1] == (SETTINGS, 1, 0, b"")
    assert machine.streams[1].sendWindow == 10000 - 16000
    assert machine.sendWindow(3) == 10000
    with pytest.raises(H2Error):
        machine.sendData(1, b"x")
    machine.receiveData(windowUpdateFrame(1, 6000))
    assert machine.sendWindow(1) == 0
    machine.receiveData(settingsFrame({Setting.INITIAL_WINDOW_SIZE: 20000}))
    assert machine.sendWindow(1) == 10000
    assert machine.sendWindow(3) == 20000
    # a stream opened now starts at the new value
    machine.receiveData(headersFrame(5))
    machine.sendHeaders(5, RESPONSE)
    assert machine.streams[5].sendWindow == 20000


def test_initialWindowSizeOverflowingAStream():
    machine = server()
    machine.receiveData(headersFrame(1))
    machine.receiveData(windowUpdateFrame(1, 2**31 - 1 - 65535))
    connectionError(
        machine,
        settingsFrame({Setting.INITIAL_WINDOW_SIZE: 65536}),
        ErrorCode.FLOW_CONTROL_ERROR,
    )


def test_initialWindowSizeManyTimesInOneFrame():
    """
    A SETTINGS frame full of INITIAL_WINDOW_SIZE values moves the windows once (to the last
    value), yet an overflow at a value on the way is still an error.
    """
    machine = server()
    machine.receiveData(b"".join(headersFrame(i, endStream=False) for i in range(1, 201, 2)))
    values = [70000 + (i & 1) for i in range(2729)] + [1000]
    payload = b"".join(struct.pack(">HL", Setting.INITIAL_WINDOW_SIZE, v) for v in values)
    [event] = machine.receiveData(frame(SETTINGS, 0, 0, payload))
    assert event.changed == {Setting.INITIAL_WINDOW_SIZE: 1000}
    assert {stream.sendWindow for stream in machine.streams.values()} == {1000}
    machine.receiveData(windowUpdateFrame(1, 2**31 - 1 - 2000))
    payload = b"".join(struct.pack(">HL", Setting.INITIAL_WINDOW_SIZE, v) for v in (2001, 500))
    connectionError(machine, frame(SETTINGS, 0, 0, payload), ErrorCode.FLOW_CONTROL_ERROR)


def test_receiveWindowGivenBackAsConsumed():
    """WINDOW_UPDATEs go out as the application acknowledges, not as DATA arrives."""
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    received = machine.receiveData(frame(DATA, 0, 1, b"x" * 16384) * 3)
    assert machine.dataToSend() == b""
    for event in received:
        machine.acknowledgeReceivedData(event.flowLength, 1)
    updates = [
        (sid, struct.unpack(">L", payload)[0])
        for kind, _, sid, payload in parseFrames(machine.dataToSend())
        if kind == WINDOW_UPDATE
    ]
    assert sum(n for sid, n in updates if sid == 0) == 49152
    assert sum(n for sid, n in updates if sid == 1) == 49152


def test_localInitialWindowAppliedOnceAcknowledged():
    """Our INITIAL_WINDOW_SIZE binds the peer only after its ACK (§6.9.2)."""
    machine = H2Machine(False, {Setting.INITIAL_WINDOW_SIZE: 1000})
    machine.initiateConnection()
    machine.receiveData(PREFACE + settingsFrame({}) + headersFrame(1, POST, endStream=False))
    # not acknowledged yet: the default window holds
    received = machine.receiveData(frame(DATA, 0, 1, b"x" * 5000))
    assert received[0].data == b"x" * 5000
    machine.receiveData(settingsFrame({}, ack=True))
    assert machine.streams[1].recvWindow == 1000 - 5000
    streamError(machine, frame(DATA, 0, 1, b"x"), 1, ErrorCode.FLOW_CONTROL_ERROR)


def test_peerSettingsTaken():
    """The h2 peer's non-default SETTINGS are taken (MAX_FRAME_SIZE, INITIAL_WINDOW_SIZE)."""
    pair = Pair(True, {Setting.MAX_FRAME_SIZE: 65536, Setting.INITIAL_WINDOW_SIZE: 200000})
    assert pair.machine.maxOutboundFrameSize == 65536
    pair.machine.sendHeaders(1, POST)
    assert pair.machine.sendWindow(1) == 65535  # the connection's window still binds
    pair.peer.increment_flow_control_window(200000)
    pair.pump()
    assert pair.machine.sendWindow(1) == 200000
    pair.machine.sendData(1, b"y" * 65536, endStream=True)
    pair.pump()
    assert peerBody(pair, 1) == b"y" * 65536


# -- protocol errors ------------------------------------------------------------------------------


def test_invalidPreface():
    machine = H2Machine(False)
    machine.initiateConnection()
    machine.dataToSend()
    connectionError(machine, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.PROTOCOL_ERROR)


def test_prefaceInPieces():
    machine = H2Machine(False)
    machine.initiateConnection()
    for byte in PREFACE:
        assert machine.receiveData(bytes([byte])) == []
    machine.receiveData(settingsFrame({}))
    assert parseFrames(machine.dataToSend())[-1] == (SETTINGS, 1, 0, b"")
    bad = H2Machine(False)
    connectionError(bad, PREFACE[:10] + b"X", ErrorCode.PROTOCOL_ERROR)


def test_firstFrameMustBeSettings():
    machine = H2Machine(False)
    connectionError(machine, PREFACE + pingFrame(b"12345678"), ErrorCode.PROTOCOL_ERROR)
    machine = H2Machine(True)
    machine.initiateConnection()
    machine.dataToSend()
    connectionError(machine, settingsFrame({}, ack=True), ErrorCode.PROTOCOL_ERROR)


def test_framesInPiecesAndTogether():
    """Frames split at every byte, and many in one read, mean the same."""
    data = headersFrame(1, POST, endStream=False) + frame(DATA, END_STREAM, 1, b"abc")
    whole = server().receiveData(data)
    machine = server()
    pieces = []
    for byte in data:
        pieces += machine.receiveData(bytes([byte]))
    assert [type(e) for e in pieces] == [type(e) for e in whole]
    assert pieces[-1].data == whole[-1].data == b"abc"


def test_dataBeyondTheConnectionWindow():
    machine = server()
    machine.receiveData(b"".join(headersFrame(i, POST, endStream=False) for i in (1, 3, 5)))
    machine.receiveData(frame(DATA, 0, 1, b"x" * 16384) * 2 + frame(DATA, 0, 3, b"x" * 16384))
    connectionError(machine, frame(DATA, 0, 5, b"x" * 16384), ErrorCode.FLOW_CONTROL_ERROR)


def test_dataBeyondTheStreamWindow():
    machine = server({Setting.INITIAL_WINDOW_SIZE: 100})
    machine.incrementConnectionWindow(10**6)
    machine.dataToSend()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    streamError(machine, frame(DATA, 0, 1, b"x" * 101), 1, ErrorCode.FLOW_CONTROL_ERROR)
    # what the stream took of the connection's window is given back
    assert machine._recvWindow + machine._processed == 65535 + 10**6


def test_paddedDataCountsItsPadding():
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    payload = bytes([10]) + b"abc" + b"\0" * 10
    [event] = machine.receiveData(frame(DATA, PADDED | END_STREAM, 1, payload))
    assert (event.data, event.flowLength, event.endStream) == (b"abc", 14, True)


@pytest.mark.parametrize("padding", [4, 200])
def test_dataPaddingLongerThanThePayload(padding):
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    payload = bytes([padding]) + b"abc"
    connectionError(machine, frame(DATA, PADDED, 1, payload), ErrorCode.PROTOCOL_ERROR)


def test_headersPaddingLongerThanTheBlock():
    machine = server()
    fragment = block()
    payload = bytes([len(fragment) + 1]) + fragment
    connectionError(
        machine, frame(HEADERS, PADDED | END_HEADERS, 1, payload), ErrorCode.PROTOCOL_ERROR
    )
    machine = server()
    [event] = machine.receiveData(
        frame(HEADERS, PADDED | END_HEADERS | END_STREAM, 1, b"\x03" + fragment + b"\0\0\0")
    )
    assert event.headers == REQUEST


def test_paddedWithoutPadLength():
    machine = server()
    connectionError(machine, frame(HEADERS, PADDED | END_HEADERS, 1), ErrorCode.FRAME_SIZE_ERROR)
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    connectionError(machine, frame(DATA, PADDED, 1), ErrorCode.FRAME_SIZE_ERROR)


@pytest.mark.parametrize("streamId", [0, 1])
def test_windowUpdateOfZero(streamId):
    machine = server()
    machine.receiveData(headersFrame(1, endStream=False))
    if streamId:
        streamError(machine, windowUpdateFrame(1, 0), 1, ErrorCode.PROTOCOL_ERROR)
    else:
        connectionError(machine, windowUpdateFrame(0, 0), ErrorCode.PROTOCOL_ERROR)


def test_windowUpdateOverflowOnTheConnection():
    machine = server()
    machine.receiveData(windowUpdateFrame(0, 2**31 - 1 - 65535))
    connectionError(machine, windowUpdateFrame(0, 1), ErrorCode.FLOW_CONTROL_ERROR)


def test_windowUpdateOverflowOnAStream():
    machine = server()
    machine.receiveData(headersFrame(1, endStream=False) + headersFrame(3, endStream=False))
    machine.receiveData(windowUpdateFrame(1, 2**31 - 1 - 65535))
    streamError(machine, windowUpdateFrame(1, 1), 1, ErrorCode.FLOW_CONTROL_ERROR)
    assert 3 in machine.streams


def test_windowUpdateWrongLength():
    machine = server()
    connectionError(machine, frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\1\0"), ErrorCode.FRAME_SIZE_ERROR)


def test_windowUpdateOnIdleStream():
    machine = server()
    connectionError(machine, windowUpdateFrame(7, 1), ErrorCode.PROTOCOL_ERROR)


def test_frameLargerThanMaxFrameSize():
    """Refused on its header alone: the 16 MiB payload is never awaited nor buffered."""
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    connectionError(machine, frameHeader(16385, DATA, 0, 1), ErrorCode.FRAME_SIZE_ERROR)
    machine = server()
    connectionError(machine, frameHeader(2**24 - 1, HEADERS, 0, 1), ErrorCode.FRAME_SIZE_ERROR)


def test_largerFramesOnceAdvertised():
    machine = server({Setting.MAX_FRAME_SIZE: 65536, Setting.INITIAL_WINDOW_SIZE: 65536})
    machine.incrementConnectionWindow(65536)
    machine.receiveData(headersFrame(1, POST, endStream=False))
    [event] = machine.receiveData(frame(DATA, 0, 1, b"x" * 65536))
    assert len(event.data) == 65536


@pytest.mark.parametrize(
    "setting, value, code",
    [
        (Setting.ENABLE_PUSH, 2, ErrorCode.PROTOCOL_ERROR),
        (Setting.INITIAL_WINDOW_SIZE, 2**31, ErrorCode.FLOW_CONTROL_ERROR),
        (Setting.MAX_FRAME_SIZE, 16383, ErrorCode.PROTOCOL_ERROR),
        (Setting.MAX_FRAME_SIZE, 2**24, ErrorCode.PROTOCOL_ERROR),
        (Setting.ENABLE_CONNECT_PROTOCOL, 2, ErrorCode.PROTOCOL_ERROR),
        (Setting.NO_RFC7540_PRIORITIES, 2, ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_badSettingValues(setting, value, code):
    connectionError(server(), settingsFrame({setting: value}), code)


def test_serverMayNotEnablePush():
    connectionError(client(), settingsFrame({Setting.ENABLE_PUSH: 1}), ErrorCode.PROTOCOL_ERROR)
    machine = server()
    machine.receiveData(settingsFrame({Setting.ENABLE_PUSH: 1}))  # a client may


def test_settingsEdges():
    """The largest legal values are taken; unknown settings are acknowledged and ignored."""
    machine = server()
    received = machine.receiveData(
        settingsFrame(
            {
                Setting.MAX_FRAME_SIZE: 2**24 - 1,
                Setting.INITIAL_WINDOW_SIZE: 2**31 - 1,
                0x7777: 12345,
                Setting.MAX_CONCURRENT_STREAMS: 0,
            }
        )
    )
    assert received[0].changed[0x7777] == 12345
    assert parseFrames(machine.dataToSend()) == [(SETTINGS, 1, 0, b"")]
    assert machine.maxOutboundFrameSize == 2**24 - 1
    assert machine.remoteSettings.initialWindowSize == 2**31 - 1
    assert machine.remoteSettings.maxConcurrentStreams == 0


def test_settingsLengthNotMultipleOfSix():
    connectionError(server(), frame(SETTINGS, 0, 0, b"\0\4\0\0\0\1\0"), ErrorCode.FRAME_SIZE_ERROR)


def test_settingsAckWithPayload():
    connectionError(server(), frame(SETTINGS, 1, 0, b"\0" * 6), ErrorCode.FRAME_SIZE_ERROR)


def test_settingsOnAStream():
    connectionError(server(), frame(SETTINGS, 0, 1), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("length", [0, 7, 9])
def test_pingWrongLength(length):
    connectionError(server(), frame(PING, 0, 0, b"p" * length), ErrorCode.FRAME_SIZE_ERROR)


def test_pingOnAStream():
    connectionError(server(), frame(PING, 0, 1, b"p" * 8), ErrorCode.PROTOCOL_ERROR)


def test_pingAnsweredAndAcknowledged():
    machine = client()
    machine.ping(b"abcdefgh")
    assert parseFrames(machine.dataToSend()) == [(PING, 0, 0, b"abcdefgh")]
    [event] = machine.receiveData(pingFrame(b"abcdefgh", ack=True))
    assert event.data == b"abcdefgh"
    assert machine.receiveData(pingFrame(b"12345678")) == []
    assert parseFrames(machine.dataToSend()) == [(PING, 1, 0, b"12345678")]


def test_evenStreamFromAClient():
    connectionError(server(), headersFrame(2), ErrorCode.PROTOCOL_ERROR)


def test_streamFromAServer():
    """A server's HEADERS on a stream the client never opened (push is disabled)."""
    machine = client()
    machine.sendHeaders(1, REQUEST, endStream=True)
    connectionError(machine, headersFrame(2, RESPONSE), ErrorCode.PROTOCOL_ERROR)
    machine = client()
    connectionError(machine, headersFrame(1, RESPONSE), ErrorCode.PROTOCOL_ERROR)


def test_decreasingStreamIds():
    """§5.1.1: a new stream's id must exceed every one the peer opened before."""
    machine = server()
    machine.receiveData(headersFrame(5))
    connectionError(machine, headersFrame(3), ErrorCode.PROTOCOL_ERROR)


def test_headersOnAStreamThatEnded():
    machine = server()
    machine.receiveData(headersFrame(1))
    machine.sendHeaders(1, RESPONSE, endStream=True)
    assert 1 not in machine.streams
    connectionError(machine, headersFrame(1), ErrorCode.STREAM_CLOSED)


def test_dataOnAStreamThatEnded():
    machine = server()
    machine.receiveData(headersFrame(1, POST))
    machine.sendHeaders(1, RESPONSE, endStream=True)
    connectionError(machine, frame(DATA, 0, 1, b"x"), ErrorCode.STREAM_CLOSED)


def test_dataOnAHalfClosedStream():
    machine = server()
    machine.receiveData(headersFrame(1))
    machine.sendHeaders(1, RESPONSE)
    streamError(machine, frame(DATA, 0, 1, b"late"), 1, ErrorCode.STREAM_CLOSED)


def test_framesOnAStreamThisSideResetIgnored():
    """§5.1: frames in flight when we reset a stream are ignored; DATA's window comes back."""
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    machine.resetStream(1, ErrorCode.CANCEL)
    assert parseFrames(machine.dataToSend()) == [(RST_STREAM, 0, 1, b"\0\0\0\x08")]
    received = machine.receiveData(
        frame(DATA, 0, 1, b"x" * 16384) * 2
        + headersFrame(1, [(b"x-trailer", b"t")])
        + windowUpdateFrame(1, 5)
        + resetFrame(1, ErrorCode.CANCEL)
        + frame(PRIORITY, 0, 1, b"\0\0\0\0\x10")
    )
    assert received == []
    assert not machine.terminated
    sent = parseFrames(machine.dataToSend())
    assert [kind for kind, *_ in sent] == [WINDOW_UPDATE]
    assert sent[0][2] == 0


def test_dataOnStreamZero():
    connectionError(server(), frame(DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR)


def test_dataOnAnIdleStream():
    connectionError(server(), frame(DATA, 0, 9, b"x"), ErrorCode.PROTOCOL_ERROR)


def test_headersOnStreamZero():
    connectionError(server(), headersFrame(0), ErrorCode.PROTOCOL_ERROR)


def test_rstStreamChecks():
    connectionError(server(), resetFrame(0, 0), ErrorCode.PROTOCOL_ERROR)
    connectionError(server(), resetFrame(3, 0), ErrorCode.PROTOCOL_ERROR)  # idle
    machine = server()
    machine.receiveData(headersFrame(1))
    connectionError(machine, frame(RST_STREAM, 0, 1, b"\0\0\0"), ErrorCode.FRAME_SIZE_ERROR)


def test_rstStreamFromThePeer():
    machine = server()
    machine.receiveData(headersFrame(1, endStream=False))
    [event] = machine.receiveData(resetFrame(1, ErrorCode.CANCEL))
    assert (event.streamId, event.errorCode, event.remote) == (1, ErrorCode.CANCEL, True)
    assert machine.streams == {}
    with pytest.raises(StreamClosed):
        machine.sendHeaders(1, RESPONSE)


def test_continuationWithoutHeaders():
    connectionError(
        server(), frame(CONTINUATION, END_HEADERS, 1, block()), ErrorCode.PROTOCOL_ERROR
    )


def test_continuationInterleaved():
    fragment = block()
    machine = server()
    start = frame(HEADERS, END_STREAM, 1, fragment[:3])
    connectionError(machine, start + pingFrame(b"12345678"), ErrorCode.PROTOCOL_ERROR)
    machine = server()
    connectionError(machine, start + frame(0xEE, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR)
    machine = server()
    other = frame(CONTINUATION, END_HEADERS, 3, fragment[3:])
    connectionError(machine, start + other, ErrorCode.PROTOCOL_ERROR)


def test_headerBlockInContinuations():
    fragment = block()
    machine = server()
    data = frame(HEADERS, END_STREAM, 1, fragment[:2])
    for i in range(2, len(fragment)):
        flags = END_HEADERS if i == len(fragment) - 1 else 0
        data += frame(CONTINUATION, flags, 1, fragment[i : i + 1])
    [event] = machine.receiveData(data)
    assert event.headers == REQUEST and event.endStream


def test_pushPromiseRefused():
    """A server never takes PUSH_PROMISE; a client disabled push in its SETTINGS."""
    promise = frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2" + block())
    connectionError(server(), promise, ErrorCode.PROTOCOL_ERROR)
    machine = client()
    machine.sendHeaders(1, REQUEST, endStream=True)
    connectionError(machine, promise, ErrorCode.PROTOCOL_ERROR)


def test_priorityDependingOnItself():
    machine = server()
    machine.receiveData(headersFrame(1, endStream=False))
    streamError(machine, frame(PRIORITY, 0, 1, b"\0\0\0\1\x10"), 1, ErrorCode.PROTOCOL_ERROR)
    machine = server()
    payload = b"\0\0\0\1\x10" + block()
    flags = END_HEADERS | PRIORITY_FLAG | END_STREAM
    streamError(machine, frame(HEADERS, flags, 1, payload), 1, ErrorCode.PROTOCOL_ERROR)


def test_priorityIgnored():
    """PRIORITY on an idle, open or closed stream changes nothing; a bad length does."""
    machine = server()
    assert machine.receiveData(frame(PRIORITY, 0, 9, b"\0\0\0\1\x10")) == []
    machine.receiveData(headersFrame(1))
    [event] = machine.receiveData(
        frame(HEADERS, END_HEADERS | PRIORITY_FLAG | END_STREAM, 3, b"\x80\0\0\1\xff" + block())
    )
    assert event.headers == REQUEST
    connectionError(machine, frame(PRIORITY, 0, 0, b"\0" * 5), ErrorCode.PROTOCOL_ERROR)
    machine = server()
    connectionError(machine, frame(PRIORITY, 0, 11, b"\0" * 4), ErrorCode.FRAME_SIZE_ERROR)


def test_unknownFrameTypesIgnored():
    machine = server()
    data = frame(0xEE, 0xFF, 0, b"whatever") + frame(0x10, 0, 1, b"x" * 100)
    assert machine.receiveData(data + headersFrame(1))[0].headers == REQUEST
    assert machine.dataToSend() == b""


def test_goawayFromThePeer():
    machine = client()
    machine.sendHeaders(1, REQUEST, endStream=True)
    machine.sendHeaders(3, REQUEST, endStream=True)
    [event] = machine.receiveData(goawayFrame(1, ErrorCode.NO_ERROR, b"bye"))
    assert (event.errorCode, event.lastStreamId, event.debug) == (0, 1, b"bye")
    assert not machine.terminated
    with pytest.raises(H2Error) as caught:
        machine.sendHeaders(5, REQUEST)
    assert caught.value.code == ErrorCode.REFUSED_STREAM
    # the stream it allows still finishes
    received = machine.receiveData(headersFrame(1, [(b":status", b"200")]))
    assert received[0].head[0] == 200
    connectionError(machine, frame(GOAWAY, 0, 0, b"\0" * 7), ErrorCode.FRAME_SIZE_ERROR)


def test_contentLengthChecked():
    """DATA unlike content-length is a stream error (§8.1.1)."""
    machine = server()
    machine.receiveData(headersFrame(1, [*POST, (b"content-length", b"3")], endStream=False))
    streamError(machine, frame(DATA, 0, 1, b"four"), 1, ErrorCode.PROTOCOL_ERROR)
    machine = server()
    machine.receiveData(headersFrame(1, [*POST, (b"content-length", b"3")], endStream=False))
    streamError(machine, frame(DATA, END_STREAM, 1, b"tw"), 1, ErrorCode.PROTOCOL_ERROR)


def test_dataBeforeTheResponse():
    machine = client()
    machine.sendHeaders(1, REQUEST, endStream=True)
    streamError(machine, frame(DATA, 0, 1, b"x"), 1, ErrorCode.PROTOCOL_ERROR)


def test_trailersWithoutEndStream():
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    trailers = headersFrame(1, [(b"x-trailer", b"t")], endStream=False)
    streamError(machine, trailers, 1, ErrorCode.PROTOCOL_ERROR)


def test_headersOnAHalfClosedStream():
    machine = server()
    machine.receiveData(headersFrame(1))
    streamError(machine, headersFrame(1, [(b"x-more", b"m")]), 1, ErrorCode.STREAM_CLOSED)


def test_informationalResponsesFlagged():
    """A 1xx that ends the stream, and 101 (no Upgrade in HTTP/2): delivered with an error."""
    machine = client()
    machine.sendHeaders(1, REQUEST, endStream=True)
    machine.sendHeaders(3, REQUEST, endStream=True)
    received = machine.receiveData(
        headersFrame(1, [(b":status", b"100")], endStream=True)
        + headersFrame(3, [(b":status", b"101")], endStream=False)
    )
    assert [(type(e), bool(e.error)) for e in received] == [
        (events.InformationalResponseReceived, True)
    ] * 2


def test_resetByTheServer():
    machine = client()
    machine.sendHeaders(1, POST)
    [event] = machine.receiveData(resetFrame(1, ErrorCode.REFUSED_STREAM))
    assert (event.streamId, event.errorCode, event.remote) == (1, ErrorCode.REFUSED_STREAM, True)
    with pytest.raises(StreamClosed):
        machine.sendData(1, b"x")
    with pytest.raises(StreamClosed):
        machine.sendWindow(1)
    assert machine.receiveData(frame(DATA, 0, 1, b"late")) == []  # in flight: ignored


def test_frameEncoders():
    """frames.py: the 24-bit length, the reserved bit, each frame's layout."""
    assert frameHeader(0x123456, DATA, END_STREAM, 0x7FFFFFFF) == (
        b"\x12\x34\x56\x00\x01\x7f\xff\xff\xff"
    )
    assert parseFrames(settingsFrame({Setting.MAX_FRAME_SIZE: 2**24 - 1, 0x99: 0})) == [
        (SETTINGS, 0, 0, b"\x00\x05\x00\xff\xff\xff\x00\x99\x00\x00\x00\x00")
    ]
    assert settingsFrame({1: 2}, ack=True) == frame(SETTINGS, 1, 0)
    assert parseFrames(windowUpdateFrame(3, 2**31 - 1)) == [
        (WINDOW_UPDATE, 0, 3, b"\x7f\xff\xff\xff")
    ]
    assert parseFrames(resetFrame(5, ErrorCode.CANCEL)) == [(RST_STREAM, 0, 5, b"\0\0\0\x08")]
    assert parseFrames(pingFrame(b"abcdefgh", ack=True)) == [(PING, 1, 0, b"abcdefgh")]
    assert parseFrames(goawayFrame(7, ErrorCode.ENHANCE_YOUR_CALM, b"calm")) == [
        (GOAWAY, 0, 0, b"\0\0\0\x07\0\0\0\x0bcalm")
    ]


def test_reservedBitIgnored():
    """§4.1: the reserved bit of the stream id is ignored on receipt."""
    machine = server()
    data = headersFrame(1)
    data = data[:5] + bytes([data[5] | 0x80]) + data[6:]
    [event] = machine.receiveData(data)
    assert event.streamId == 1


def test_malformedRequestDeliveredFlagged():
    machine = server()
    [event] = machine.receiveData(headersFrame(1, [(b":method", b"GET")]))
    assert event.head is None and event.error
    assert not machine.terminated


def test_hpackGarbageIsACompressionError():
    connectionError(
        server(), frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), ErrorCode.COMPRESSION_ERROR
    )


def test_clientSendingRules():
    """What this side may not do is refused before anything is queued."""
    machine = client({Setting.MAX_CONCURRENT_STREAMS: 10})
    with pytest.raises(StreamClosed):
        machine.sendHeaders(2, REQUEST)
    machine.sendHeaders(3, REQUEST)
    with pytest.raises(StreamClosed):
        machine.sendHeaders(1, REQUEST)  # ids only go up
    machine.receiveData(settingsFrame({Setting.MAX_CONCURRENT_STREAMS: 1}))
    with pytest.raises(H2Error) as caught:
        machine.sendHeaders(5, REQUEST)
    assert caught.value.code == ErrorCode.REFUSED_STREAM
    machine.resetStream(3)
    machine.sendHeaders(5, REQUEST)
    with pytest.raises(StreamClosed):
        server().sendHeaders(1, REQUEST)  # a server opens nothing


# -- resource attacks -----------------------------------------------------------------------------


def test_continuationFloodCut():
    """CVE-2024-27316: an endless header block ends at the size cap, not in memory."""
    machine = server(hardHeaderListSize=8192)
    machine.receiveData(frame(HEADERS, END_STREAM, 1, block()[:5]))
    chunk = frame(CONTINUATION, 0, 1, b"\x00" * 1000)
    for _ in range(16):
        machine.receiveData(chunk)
    connectionError(machine, chunk, ErrorCode.ENHANCE_YOUR_CALM)  # past 2 * 8192


def test_emptyContinuationFloodCut():
    """Zero-length CONTINUATION frames count too: each one costs the receiver something."""
    machine = server(hardHeaderListSize=8192)
    machine.receiveData(frame(HEADERS, END_STREAM, 1, block()[:5]))
    chunk = frame(CONTINUATION, 0, 1) * 100
    for _ in range(18):
        machine.receiveData(chunk)
    connectionError(machine, chunk, ErrorCode.ENHANCE_YOUR_CALM)  # 1,900 frames


def test_hpackBomb():
    """
    A small block that decodes to a huge list (one large table entry referenced again and
    again) stops at the decoded size cap: ENHANCE_YOUR_CALM, nothing that size is built.
    """
    machine = server(hardHeaderListSize=65536)
    encoder = Encoder()
    first = encoder.encode([*REQUEST, (b"x-bomb", b"b" * 4000)])
    machine.receiveData(frame(HEADERS, END_HEADERS | END_STREAM, 1, first))
    bomb = encoder.encode(REQUEST) + b"\xbe" * 4000  # index 62: the newest entry
    assert len(bomb) < 4100
    connectionError(
        machine, frame(HEADERS, END_HEADERS | END_STREAM, 3, bomb), ErrorCode.ENHANCE_YOUR_CALM
    )


def test_headerListSizeReportedBelowTheCap():
    """Below the hard cap, the size is the application's to judge (a 431 on one stream)."""
    machine = server(hardHeaderListSize=65536)
    [event] = machine.receiveData(headersFrame(1, [*REQUEST, (b"x-big", b"v" * 12000)]))
    assert event.size > 12000 and not machine.terminated


def test_emptyDataFloodCostsNoEvents():
    """CVE-2019-9518: empty DATA frames without END_STREAM carry nothing to deliver."""
    machine = server()
    machine.receiveData(headersFrame(1, POST, endStream=False))
    assert machine.receiveData(frame(DATA, 0, 1) * 1000) == []
    [event] = machine.receiveData(frame(DATA, END_STREAM, 1))
    assert event.endStream and event.data == b""


def test_pingAndSettingsFloodAnsweredInBoundedFrames():
    """
    CVE-2019-9512/9515: every PING and SETTINGS is answered (RFC), so what bounds the
    answers is the reader of dataToSend (the protocol: test_pingFloodToAPeerThatDoesNotRead); here:
    each answer is exactly one small frame, nothing else accumulates in the machine.
    """
    machine = server()
    machine.receiveData((pingFrame(b"12345678") + settingsFrame({})) * 500)
    out = machine.dataToSend()
    assert len(out) == 500 * (17 + 9)
    assert machine.dataToSend() == b""


def test_streamTableBounded():
    """Thousands of streams opened and ended: nothing open remains, closed ids are forgotten."""
    machine = server()
    encoder = Encoder()
    for streamId in range(1, 20001, 2):
        machine.receiveData(
            frame(HEADERS, END_HEADERS | END_STREAM, streamId, encoder.encode(REQUEST))
        )
        machine.sendHeaders(streamId, RESPONSE, endStream=True)
        machine.dataToSend()
    assert machine.streams == {}
    assert len(machine._closed) <= 2048


def test_rapidResetStreamsClosedInTheMachine():
    """
    CVE-2023-44487: HEADERS + RST_STREAM pairs leave nothing behind in the machine; the
    budget of resets is the protocol's (tests/test_h2.py: test_rapidReset*).
    """
    machine = server()
    encoder = Encoder()
    data = b""
    for streamId in range(1, 2001, 2):
        data += frame(HEADERS, END_HEADERS, streamId, encoder.encode(REQUEST))
        data += resetFrame(streamId, ErrorCode.CANCEL)
    received = machine.receiveData(data)
    assert len(received) == 2000
    assert machine.streams == {}
    assert machine.dataToSend() == b""


def test_concurrentStreamsBeyondTheLimitAreTheApplications():
    """
    Streams past our MAX_CONCURRENT_STREAMS arrive as requests for the application to refuse
    one by one (REFUSED_STREAM); refused ones cost nothing more.
    """
    machine = server({Setting.MAX_CONCURRENT_STREAMS: 2})
    encoder = Encoder()
    received = machine.receiveData(
        b"".join(frame(HEADERS, END_HEADERS, i, encoder.encode(REQUEST)) for i in (1, 3, 5))
    )
    assert [e.streamId for e in received] == [1, 3, 5]
    machine.resetStream(5, ErrorCode.REFUSED_STREAM)
    assert sorted(machine.streams) == [1, 3]
    assert parseFrames(machine.dataToSend()) == [(RST_STREAM, 0, 5, b"\0\0\0\x07")]
    # the client's DATA in flight for the refused stream is ignored
    assert machine.receiveData(frame(DATA, END_STREAM, 5, b"x")) == []


def literal(name: bytes, value: bytes) -> bytes:
    """A field literal without indexing, new name (RFC 7541 §6.2.2): the table is unchanged."""
    assert len(name) < 127
    return b"\x00" + bytes([len(name)]) + name + b"\x7f" + _integer(len(value) - 127) + value


def _integer(value: int) -> bytes:
    out = b""
    while value >= 128:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


#: REQUEST with the static table and a literal not indexed: decoding it changes no table.
STATIC_REQUEST = b"\x82\x87\x84\x01\x0bexample.com"


def test_headerBlockCacheHoldsOnlySmallBlocks():
    """
    Large blocks that leave the HPACK table as it was are not remembered: 64 of them would
    hold megabytes per connection for the connection's life.
    """
    machine = server(hardHeaderListSize=2**20)
    for streamId in range(1, 200, 2):
        fragment = STATIC_REQUEST + literal(b"x-big", b"%d" % streamId + b"v" * 12000)
        [event] = machine.receiveData(frame(HEADERS, END_HEADERS | END_STREAM, streamId, fragment))
        assert event.headers[-1][0] == b"x-big"
    assert machine._blocks == {}
    # a small one is remembered, and the same bytes again are not decoded again
    first = machine.receiveData(frame(HEADERS, END_HEADERS | END_STREAM, 201, STATIC_REQUEST))
    again = machine.receiveData(frame(HEADERS, END_HEADERS | END_STREAM, 203, STATIC_REQUEST))
    assert len(machine._blocks) == 1
    assert again[0].headers is first[0].headers


# -- what the Twisted protocol bounds -------------------------------------------------------------


class Exchange:
    """An exchange that takes every call and does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kw: None


def protocolUnderTest(**limits) -> tuple[H2ServerProtocol, StringTransport]:
    protocol = H2ServerProtocol(
        H2Limits(**limits),
        task.Clock(),
        ("https", "example.com", 443, b"example.com"),
        "-",
        lambda stream: Exchange(),
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(PREFACE + settingsFrame({}) + settingsFrame({}, ack=True))
    transport.clear()
    return protocol, transport


def test_pingFloodToAPeerThatDoesNotRead():
    """
    CVE-2019-9512: PINGs while the transport is paused (the peer reads nothing): the
    acknowledgements stop at UNREAD_ANSWERS with GOAWAY ENHANCE_YOUR_CALM and an abort.
    """
    protocol, transport = protocolUnderTest()
    protocol.pauseProducing()
    flood = pingFrame(b"12345678") * 1000
    for _ in range(UNREAD_ANSWERS // 17000):
        protocol.dataReceived(flood)
    assert not transport.disconnecting
    protocol.dataReceived(flood)
    assert transport.disconnecting and transport.disconnected  # aborted, not closed
    kind, _, _, payload = parseFrames(transport.value())[-1]
    assert kind == GOAWAY
    assert struct.unpack(">L", payload[4:8])[0] == ErrorCode.ENHANCE_YOUR_CALM
    assert len(transport.value()) < UNREAD_ANSWERS + 17100
    transport.clear()
    protocol.dataReceived(flood)  # nothing more is read
    assert transport.value() == b""


def test_settingsFloodToAPeerThatDoesNotRead():
    """CVE-2019-9515: the same for SETTINGS, each answered by an ACK."""
    protocol, transport = protocolUnderTest()
    protocol.pauseProducing()
    flood = settingsFrame({Setting.HEADER_TABLE_SIZE: 4096}) * 1000
    for _ in range(UNREAD_ANSWERS // 9000 + 1):
        protocol.dataReceived(flood)
    assert transport.disconnecting


def test_pingsToAPeerThatReads():
    """A peer that reads (the transport resumes) may PING as much as it likes."""
    protocol, transport = protocolUnderTest()
    flood = pingFrame(b"12345678") * 1000
    for _ in range(2 * UNREAD_ANSWERS // 17000):
        protocol.pauseProducing()
        protocol.dataReceived(flood)
        protocol.resumeProducing()
    assert not transport.disconnecting
    assert len(transport.value()) > 2 * UNREAD_ANSWERS - 17000


def lastGoaway(transport: StringTransport) -> int:
    goaways = [p for kind, _, _, p in parseFrames(transport.value()) if kind == GOAWAY]
    return struct.unpack(">L", goaways[-1][4:8])[0]


@pytest.mark.parametrize(
    "provoke",
    [
        lambda streamId: windowUpdateFrame(streamId, 0),
        lambda streamId: frame(PRIORITY, 0, streamId, struct.pack(">LB", streamId, 16)),
        lambda streamId: frame(DATA, 0, streamId, b"x" * 10),  # content-length: 1
    ],
)
def test_madeYouReset(provoke):
    """
    CVE-2025-8671: streams the client makes this side reset (a stream error on each) spend
    the Rapid Reset budget like its own resets: GOAWAY ENHANCE_YOUR_CALM once it is spent.
    """
    protocol, transport = protocolUnderTest(resetBurst=20, resetRate=0.001)
    encoder = Encoder()
    fields = [*POST, (b"content-length", b"1")]
    for streamId in range(1, 200, 2):
        protocol.dataReceived(
            frame(HEADERS, END_HEADERS, streamId, encoder.encode(fields)) + provoke(streamId)
        )
        if transport.disconnecting:
            break
    assert streamId == 41
    assert lastGoaway(transport) == ErrorCode.ENHANCE_YOUR_CALM


def test_streamErrorsBeforeTheStreamOpensCount():
    """HEADERS depending on itself: reset by the machine, never seen by the protocol."""
    protocol, transport = protocolUnderTest(resetBurst=20, resetRate=0.001)
    encoder = Encoder()
    flags = END_HEADERS | END_STREAM | PRIORITY_FLAG
    for streamId in range(1, 200, 2):
        payload = struct.pack(">LB", streamId, 16) + encoder.encode(REQUEST)
        protocol.dataReceived(frame(HEADERS, flags, streamId, payload))
        if transport.disconnecting:
            break
    assert streamId == 41
    assert lastGoaway(transport) == ErrorCode.ENHANCE_YOUR_CALM
