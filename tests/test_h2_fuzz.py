"""
Property-based and fuzz tests of proxygate's HTTP/2 codec (gateway/h2/) and its Twisted side.

Inputs are valid traffic made by python-hyper's h2 (the reference peer) and hpack, then
mutated the way a hostile or broken peer would send it: bytes flipped, the stream cut short,
frames duplicated, dropped, swapped, given other flags, stream ids or lengths, foreign frames
inserted; and the result split at arbitrary read boundaries. The properties:

- HPACK: the L{Decoder} on arbitrary bytes and on mutated valid blocks (from hpack's encoder
  and ours, one context across blocks) only returns or raises L{HPACKError}, within a
  deadline, and reaches hpack's verdict (the same fields, or an error); our L{Encoder}
  round-trips arbitrary header lists through our decoder and python-hyper's (Huffman on
  and off, table sizes changed between blocks);
- Huffman: encode/decode round-trip; decoding arbitrary bytes returns or raises
  L{HuffmanError}, and agrees with hpack's decoder;
- L{H2Machine}, both roles: arbitrary bytes after a valid preface and SETTINGS, and mutated
  peer traffic, only give events or L{ProtocolError}; after an error the machine is
  terminated and still says what it has to send; without one, its stream table and windows
  are consistent and the application can still answer; valid traffic gives the same events
  and the same bytes out however it is split into reads;
- L{H2ServerProtocol} (a stand-in exchange answers every request) and L{H2ClientProtocol}
  (a few requests sent) over a StringTransport with a task.Clock reactor, fed mutated
  traffic, its transport's buffer full or not: no exception escapes C{dataReceived},
  nothing is logged at error or critical level, and the connection ends up open or closed,
  never stuck between (its idle timeout closes whatever stays open);
- end to end: a few dozen mutated sequences over TLS (ALPN h2) through a CONNECT to
  ``twistd proxygate`` with [mitm] on, one connection each; afterwards its log has no
  traceback and curl --http2 still gets an answer through it.

CI runs a derandomized, bounded campaign (a few seconds). For a longer local one::

    PROXYGATE_FUZZ_EXAMPLES=20000 pytest tests/test_h2_fuzz.py -n 0

which also randomizes the seed and keeps Hypothesis' example database (.hypothesis/).
The end-to-end property takes 30 connections, 300 at most in a campaign.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from datetime import timedelta

import h2.config
import h2.connection
import hpack
import pytest
from hpack.huffman_table import decode_huffman
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from gateway.h2.connection import H2ClientProtocol, H2Limits, H2ServerProtocol
from gateway.h2.frames import MAX_WINDOW, PREFACE, frameHeader, settingsFrame
from gateway.h2.hpack import Decoder, Encoder, HPACKError
from gateway.h2.huffman import HuffmanError, huffmanDecode, huffmanEncode
from gateway.h2.machine import H2Machine, ProtocolError
from gateway.message import Request
from tests.support import ProxyProcess
from tests.support.h2origin import H2Origin
from tests.support.mitmorigin import OriginPKI
from tests.support.tunnel import readHead
from tests.test_h2_mitm import curl, h2Ini, startProxy

# -- budget ------------------------------------------------------------------------------------

CAMPAIGN = int(os.environ.get("PROXYGATE_FUZZ_EXAMPLES", "0") or 0)

_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile("h2ci", derandomize=True, database=None, print_blob=True,
                          suppress_health_check=_HEALTH)  # fmt: skip
settings.register_profile("h2campaign", derandomize=False, print_blob=True,
                          suppress_health_check=_HEALTH)  # fmt: skip
BASE = settings.get_profile("h2campaign" if CAMPAIGN else "h2ci")


def examples(ci: int) -> int:
    return CAMPAIGN or ci


FAST = timedelta(milliseconds=500)  # per example, sans-IO: a hang or a blow-up fails

# -- header lists ------------------------------------------------------------------------------

TOKEN = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
names = st.one_of(
    st.sampled_from([b"content-type", b"cookie", b"authorization", b"user-agent", b"x-a"]),
    st.text(TOKEN, min_size=1, max_size=20).map(str.encode),
)
values = st.binary(max_size=60).map(
    lambda v: v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)
headerLists = st.lists(st.tuples(names, values), max_size=12)


def requestFields(authority: bytes, path: bytes, method: bytes = b"GET") -> list:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", authority),
        (b":path", path),
    ]


RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


# -- HPACK -------------------------------------------------------------------------------------


def decodeBoth(blocks: list[bytes], maxListSize: int = 65536) -> None:
    """
    Decode C{blocks} in order on one context, ours and hpack's, until one fails: ours
    only raises HPACKError, and both reach the same verdict and the same fields. (Tables
    of the default size, as H2Machine's: a decoder made smaller than that is one hpack
    expects a size update from, ours one that starts small.)
    """
    ours = Decoder(maxListSize=maxListSize)
    theirs = hpack.Decoder(max_header_list_size=maxListSize)
    for block in blocks:
        try:
            decoded = [tuple(field) for field in ours.decode(block)[0]]
        except HPACKError:
            decoded = None
        try:
            reference = [tuple(field) for field in theirs.decode(block, raw=True)]
        except hpack.HPACKError:
            reference = None
        assert decoded == reference, block
        if decoded is None:
            return


@settings(BASE, max_examples=examples(300), deadline=FAST)
@given(st.binary(max_size=400))
def test_hpackDecoderOnArbitraryBytes(data: bytes) -> None:
    decodeBoth([data], maxListSize=8192)


def flipped(draw, data: bytes) -> bytes:
    """C{data} with a few bytes changed, cut short or grown."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "set" and data:
            data[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x3F, 0x1F, 0x20, 0x40]))
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif data:
            del data[i]
    return bytes(data)


@settings(BASE, max_examples=examples(300), deadline=FAST)
@given(st.data(), st.lists(headerLists, min_size=1, max_size=4), st.booleans(), st.booleans())
def test_hpackDecoderOnMutatedBlocks(data, lists, huffman: bool, ours: bool) -> None:
    if ours:
        encoder = Encoder(huffman=huffman)
        blocks = [encoder.encode(fields) for fields in lists]
    else:
        theirs = hpack.Encoder()
        blocks = [theirs.encode(fields, huffman=huffman) for fields in lists]
    which = data.draw(st.integers(0, len(blocks) - 1))
    blocks[which] = flipped(data.draw, blocks[which])
    decodeBoth(blocks)


@settings(BASE, max_examples=examples(300), deadline=FAST)
@given(
    st.lists(st.tuples(headerLists, st.sampled_from([None, 0, 1, 64, 256, 4096, 8192]))),
    st.booleans(),
    st.sampled_from([0, 256, 4096, 65536]),
)
def test_hpackRoundTrip(blocks, huffman: bool, cap: int) -> None:
    """
    Our encoder's blocks decode to what it was given, by our decoder and by hpack's, as the
    peer's SETTINGS_HEADER_TABLE_SIZE changes between blocks (C{None}: no change).
    """
    encoder = Encoder(maxTableSize=cap, huffman=huffman)
    ours = Decoder()
    theirs = hpack.Decoder()
    allowed = 4096
    for fields, limit in blocks:
        if limit is not None:
            allowed = limit
            encoder.setPeerLimit(limit)
            ours.maxAllowed = limit
            theirs.max_allowed_table_size = limit
        block = encoder.encode(fields)
        decoded, size = ours.decode(block)
        assert [tuple(f) for f in decoded] == fields
        assert size == sum(len(n) + len(v) + 32 for n, v in fields)
        assert [tuple(f) for f in theirs.decode(block, raw=True)] == fields
        assert ours.size <= ours.maxSize <= min(allowed, cap)
        assert theirs.header_table_size == ours.maxSize


# -- Huffman -----------------------------------------------------------------------------------


@settings(BASE, max_examples=examples(500), deadline=FAST)
@given(st.binary(max_size=300))
def test_huffmanRoundTrip(data: bytes) -> None:
    assert huffmanDecode(huffmanEncode(data)) == data


@settings(BASE, max_examples=examples(500), deadline=FAST)
@given(st.data(), st.booleans())
def test_huffmanDecodeOnArbitraryBytes(draw, coded: bool) -> None:
    """Only a string or HuffmanError, and the same verdict as hpack's decoder."""
    if coded:  # a valid string's code, changed
        data = flipped(draw.draw, huffmanEncode(draw.draw(st.binary(min_size=1, max_size=60))))
    else:
        data = draw.draw(st.binary(max_size=100))
    try:
        decoded = huffmanDecode(data)
    except HuffmanError:
        decoded = None
    try:
        reference = decode_huffman(data)
    except hpack.HPACKDecodingError:
        reference = None
    assert decoded == reference


# -- peer traffic ------------------------------------------------------------------------------


def splitFrames(data: bytes) -> list[bytes]:
    """Whole frames of C{data} (which holds only whole frames)."""
    frames = []
    pos = 0
    while pos < len(data):
        high, low = struct.unpack_from(">BH", data, pos)
        end = pos + 9 + (high << 16 | low)
        frames.append(data[pos:end])
        pos = end
    return frames


#: (code, value) of SETTINGS h2 sends: every code with values it accepts.
SETTINGS = st.one_of(
    st.tuples(st.sampled_from([1, 3, 6]), st.sampled_from([0, 1, 100, 4096, 65535, 2**20])),
    st.tuples(st.just(4), st.sampled_from([0, 1, 100, 65535, 2**20, 2**31 - 1])),
    st.tuples(st.just(5), st.sampled_from([16384, 16385, 2**24 - 1])),
)


CLIENT_ACTIONS = ("get", "get", "post", "body", "end", "trailers", "reset", "ping", "settings",
                  "window", "priority", "big")  # fmt: skip
SERVER_ACTIONS = ("head", "head", "info", "body", "end", "trailers", "reset", "ping", "settings",
                  "window", "goaway")  # fmt: skip


def drawBody(draw) -> bytes:
    return draw(st.sampled_from([b"", b"x", b"hello world", b"z" * 3000]))


@st.composite
def clientTraffic(draw, authority: bytes = b"example.com"):
    """
    (preface and SETTINGS, frames): what python-hyper's h2 as a client sends: requests
    with and without bodies and trailers, resets, PINGs, SETTINGS, WINDOW_UPDATEs, PRIORITY.
    """
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    start = conn.data_to_send()
    open_: list[int] = []
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(CLIENT_ACTIONS))
        sid = draw(st.sampled_from(open_)) if open_ else None
        if action in ("get", "post", "big") or sid is None:
            sid = conn.get_next_available_stream_id()
            fields = requestFields(
                authority, b"/f/%d" % sid, b"POST" if action == "post" else b"GET"
            )
            fields += draw(headerLists.map(lambda hs: [h for h in hs if h[0] not in _HOP]))
            if action == "big":  # past one frame: HEADERS and CONTINUATION
                fields.append((b"x-big", b"b" * 17000))
            end = action != "post"
            conn.send_headers(sid, fields, end_stream=end)
            if not end:
                open_.append(sid)
        elif action == "body":
            conn.send_data(sid, drawBody(draw)[: conn.local_flow_control_window(sid)])
        elif action == "end":
            conn.end_stream(sid)
            open_.remove(sid)
        elif action == "trailers":
            conn.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
            open_.remove(sid)
        elif action == "reset":
            conn.reset_stream(sid, draw(st.sampled_from([0, 1, 8])))
            open_.remove(sid)
        elif action == "ping":
            conn.ping(b"12345678")
        elif action == "settings":
            conn.update_settings(dict([draw(SETTINGS)]))
        elif action == "window":
            conn.increment_flow_control_window(draw(st.integers(1, 2**16)))
        elif action == "priority":
            conn.prioritize(sid, weight=draw(st.integers(1, 256)))
        out += conn.data_to_send()
    return start, splitFrames(out)


_HOP = {b"connection", b"te", b"transfer-encoding", b"upgrade", b"keep-alive",
        b"proxy-connection", b"host", b"content-length"}  # fmt: skip


def clientMachine(requests: int) -> H2Machine:
    """Our client, its preface sent and C{requests} requests opened (1, 3, ...), the
    even-numbered ones ended."""
    machine = H2Machine(True)
    machine.initiateConnection()
    for i in range(requests):
        machine.sendHeaders(2 * i + 1, requestFields(b"example.com", b"/%d" % i), i % 2 == 0)
    return machine


@st.composite
def serverTraffic(draw):
    """
    (requests, (SETTINGS, frames)): what python-hyper's h2 as a server sends to
    L{clientMachine}(requests): 1xx and final responses, bodies, trailers, resets, PINGs,
    SETTINGS, WINDOW_UPDATEs, GOAWAY.
    """
    requests = draw(st.integers(1, 4))
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.initiate_connection()
    conn.receive_data(clientMachine(requests).dataToSend())
    start = conn.data_to_send()
    streams = {2 * i + 1: "new" for i in range(requests)}
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        sid = draw(st.sampled_from(sorted(streams))) if streams else None
        state = streams.get(sid)
        action = draw(st.sampled_from(SERVER_ACTIONS))
        if sid is None or action == "ping":
            conn.ping(b"87654321")
        elif action == "settings":
            conn.update_settings(dict([draw(SETTINGS)]))
        elif action == "window":
            conn.increment_flow_control_window(draw(st.integers(1, 2**16)))
        elif action == "goaway":
            conn.close_connection(last_stream_id=0)
            out += conn.data_to_send()
            break
        elif action == "reset":
            conn.reset_stream(sid, 8)
            del streams[sid]
        elif state == "new" and action == "info":
            conn.send_headers(sid, [(b":status", b"103"), (b"link", b"</a>")])
        elif state == "new":
            extra = draw(headerLists.map(lambda hs: [h for h in hs if h[0] not in _HOP]))
            end = action == "end"
            conn.send_headers(sid, RESPONSE + extra, end_stream=end)
            streams[sid] = "head"
            if end:
                del streams[sid]
        elif action == "body":
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            conn.send_data(sid, drawBody(draw)[:window])
        elif action == "trailers":
            conn.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
            del streams[sid]
        else:
            conn.end_stream(sid)
            del streams[sid]
        out += conn.data_to_send()
    return requests, (start, splitFrames(out))


STREAM_IDS = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 2**31 - 1])
U32 = st.sampled_from([0, 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1])


def _frame(kind: int, flags: int, streamId: int, payload: bytes) -> bytes:
    return frameHeader(len(payload), kind, flags, streamId) + payload


#: Well-formed frames with values at the edges, which a peer may send any time.
hostileFrames = st.one_of(
    st.builds(  # SETTINGS: windows, frame and table sizes at their limits
        lambda pairs: _frame(4, 0, 0, b"".join(struct.pack(">HL", c, v) for c, v in pairs)),
        st.lists(st.tuples(st.integers(1, 9), U32), max_size=4),
    ),
    st.builds(lambda sid, n: _frame(8, 0, sid, struct.pack(">L", n)), STREAM_IDS, U32),
    st.builds(lambda sid, n: _frame(3, 0, sid, struct.pack(">L", n)), STREAM_IDS, U32),
    st.builds(  # PRIORITY, dependencies on itself and others
        lambda sid, dep, w: _frame(2, 0, sid, struct.pack(">LB", dep, w)),
        STREAM_IDS,
        STREAM_IDS,
        st.integers(0, 255),
    ),
    st.builds(  # GOAWAY
        lambda last, code, debug: _frame(7, 0, 0, struct.pack(">LL", last, code) + debug),
        STREAM_IDS,
        U32,
        st.binary(max_size=8),
    ),
    st.builds(  # DATA, padded or not, ending the stream or not
        lambda sid, flags, body: _frame(0, flags, sid, body),
        STREAM_IDS,
        st.sampled_from([0, 1, 8, 9]),
        st.binary(max_size=40),
    ),
    st.builds(  # HEADERS with a valid block: a request, a response or trailers
        lambda sid, flags, fields: _frame(1, flags, sid, Encoder().encode(fields)),
        STREAM_IDS,
        st.sampled_from([4, 5, 0, 1, 0x24]),
        st.sampled_from(
            [
                requestFields(b"example.com", b"/h"),
                RESPONSE,
                [(b":status", b"100")],
                [(b"x-t", b"1")],
                [*requestFields(b"e", b"/", b"POST"), (b"content-length", b"3")],
            ]
        ),
    ),
    st.builds(  # CONTINUATION, ending the block or not
        lambda sid, flags: _frame(9, flags, sid, Encoder().encode([(b"x-c", b"c")])),
        STREAM_IDS,
        st.sampled_from([0, 4]),
    ),
)


def mutatedFrames(draw, frames: list[bytes], maxMutations: int = 4) -> bytes:
    """C{frames} (a list of whole frames) with up to C{maxMutations} changes, joined."""
    frames = list(frames)
    for _ in range(draw(st.integers(0, maxMutations))):
        kind = draw(st.sampled_from(["flip", "cut", "dupe", "swap", "drop", "insert",
                                     "frame", "flags", "stream", "length", "type"]))  # fmt: skip
        if kind == "frame":
            frames.insert(draw(st.integers(0, len(frames))), draw(hostileFrames))
            continue
        if kind == "insert" or not frames:
            frame = _frame(
                draw(st.integers(0, 11)),
                draw(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x2D, 0xFF])),
                draw(st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1, 2**31 + 1])),
                draw(st.binary(max_size=24)),
            )
            frames.insert(draw(st.integers(0, len(frames))), frame)
            continue
        k = draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[k])
        if len(frame) < 9 and kind in ("flags", "stream", "length", "type"):
            continue  # a frame cut short has no header to change
        if kind == "flip":
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del frame[draw(st.integers(0, len(frame) - 1)) :]
            frames[k] = bytes(frame)  # a short frame: whatever follows is read into it
            if not frame:
                del frames[k]
            continue
        elif kind == "dupe":
            frames.insert(k, bytes(frame))
        elif kind == "swap" and k + 1 < len(frames):
            frames[k], frames[k + 1] = frames[k + 1], frames[k]
            continue
        elif kind == "drop":
            del frames[k]
            continue
        elif kind == "flags":
            frame[4] = draw(st.sampled_from([0, 1, 4, 5, 8, 9, 0x20, 0x25, 0xFF]))
        elif kind == "stream":
            frame[5:9] = struct.pack(">L", draw(st.sampled_from([0, 1, 2, 3, 4, 5, 9, 2**31 + 1])))
        elif kind == "length":
            size = draw(st.sampled_from([0, 1, 4, 5, 8, 9, 16384, 16385, 2**24 - 1]))
            frame[0:3] = struct.pack(">L", size)[1:]
        elif kind == "type":
            frame[3] = draw(st.integers(0, 12))
        frames[k] = bytes(frame)
    return b"".join(frames)


def splits(data: bytes):
    """C{data} cut into reads at arbitrary boundaries."""
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [
            data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
        ]
    )


# -- the machine -------------------------------------------------------------------------------


def serverMachine() -> H2Machine:
    machine = H2Machine(False)
    machine.initiateConnection()
    return machine


def checkConsistent(machine: H2Machine) -> None:
    """What must hold of a machine between reads, whatever it was fed."""
    ours = [sid for sid in machine.streams if sid & 1 != machine._peerParity]
    assert machine._outboundOpen == len(ours)
    assert machine._recvWindow >= 0
    assert machine._sendWindow <= MAX_WINDOW
    for sid, stream in machine.streams.items():
        assert stream.id == sid and sid not in machine._closed
        assert not (stream.localEnded and stream.remoteEnded)
        assert stream.sendWindow <= MAX_WINDOW
    assert machine.lastPeerStreamId & 1 == machine._peerParity or not machine.lastPeerStreamId


def feed(machine: H2Machine, reads: list[bytes]) -> tuple[list, bytes, ProtocolError | None]:
    """
    The reads, one by one: (events, bytes out, the connection error if any). Only
    ProtocolError may escape receiveData; after one the machine reads nothing more and
    still says what it has to send (its GOAWAY).
    """
    received: list = []
    out = b""
    for data in reads:
        try:
            received += machine.receiveData(data)
        except ProtocolError as e:
            assert machine.terminated
            out += machine.dataToSend()
            assert out  # the GOAWAY
            assert machine.receiveData(PREFACE + b"\x00" * 30) == []
            return received, out, e
        out += machine.dataToSend()
        checkConsistent(machine)
    return received, out, None


def answerEverything(machine: H2Machine) -> None:
    """The application carries on with what the peer left open: nothing may raise."""
    for sid, stream in list(machine.streams.items()):
        if not stream.localEnded:
            fields = [(b"x-trailer", b"1")] if machine.client else RESPONSE
            machine.sendHeaders(sid, fields, endStream=True)
    machine.dataToSend()
    checkConsistent(machine)


@settings(BASE, max_examples=examples(300), deadline=FAST)
@given(st.binary(max_size=300), st.booleans())
def test_machineOnArbitraryBytes(data: bytes, isClient: bool) -> None:
    if isClient:
        machine = clientMachine(2)
        prefix = settingsFrame({})
    else:
        machine = serverMachine()
        prefix = PREFACE + settingsFrame({})
    feed(machine, [prefix])
    _, _, error = feed(machine, [data])
    if error is None:
        answerEverything(machine)


@settings(BASE, max_examples=examples(200), deadline=FAST)
@given(st.data())
def test_serverMachineOnMutatedClientTraffic(data) -> None:
    start, frames = data.draw(clientTraffic())
    stream = mutatedFrames(data.draw, frames)
    machine = serverMachine()
    feed(machine, [start])
    _, _, error = feed(machine, data.draw(splits(stream)))
    if error is None:
        answerEverything(machine)


@settings(BASE, max_examples=examples(300), deadline=FAST)
@given(st.data())
def test_clientMachineOnMutatedServerTraffic(data) -> None:
    requests, (start, frames) = data.draw(serverTraffic())
    stream = mutatedFrames(data.draw, frames)
    machine = clientMachine(requests)
    feed(machine, [start])
    _, _, error = feed(machine, data.draw(splits(stream)))
    if error is None:
        answerEverything(machine)


def outcome(machine: H2Machine, reads: list[bytes]) -> tuple:
    received, out, error = feed(machine, reads)
    return [repr(e) for e in received], out, None if error is None else error.code


@settings(BASE, max_examples=examples(200), deadline=FAST)
@given(st.data(), st.booleans())
def test_readBoundariesDoNotMatter(data, isClient: bool) -> None:
    """Valid traffic gives the same events and the same bytes out however it is split."""
    if isClient:
        requests, (start, frames) = data.draw(serverTraffic())

        def make():
            return clientMachine(requests)
    else:
        start, frames = data.draw(clientTraffic())
        make = serverMachine
    whole = start + b"".join(frames)
    expected = outcome(make(), [whole])
    assert expected[2] is None  # h2's traffic is valid
    assert outcome(make(), data.draw(splits(whole))) == expected


# -- the Twisted protocol ----------------------------------------------------------------------


class AnsweringExchange:
    """A stand-in exchange: answers each request once it ends; every other call is a no-op."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def requestEnd(self, trailers=None) -> None:
        self.stream.answer(200, "fuzzed")

    def __getattr__(self, name: str):
        return lambda *args, **kw: None


class ErrorLog:
    """The error and critical events twisted.logger sees while it is attached."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or "log_failure" in event:
            self.events.append(event)

    def __enter__(self) -> ErrorLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)


def serverProtocol() -> tuple[H2ServerProtocol, StringTransport, task.Clock]:
    clock = task.Clock()
    protocol = H2ServerProtocol(
        H2Limits(idleTimeout=10.0),
        clock,
        ("https", "example.com", 443, b"example.com"),
        "-",
        AnsweringExchange,
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def clientProtocol(requests: int) -> tuple[H2ClientProtocol, StringTransport, task.Clock]:
    """An origin-facing connection with C{requests} GETs sent (streams 1, 3...)."""
    clock = task.Clock()
    protocol = H2ClientProtocol(H2Limits(idleTimeout=10.0), clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for i in range(requests):
        stream = protocol.openStream(AnsweringExchange(None))
        stream.sendHead(Request(b"GET", "https", "example.com", 443, b"example.com",
                                b"/%d" % i, b"HTTP/1.1", [], 0))  # fmt: skip
    protocol.flush()
    return protocol, transport, clock


def survives(made: tuple, reads: list[bytes], paused: bool) -> None:
    """
    The reads into the protocol (C{paused}: its transport's buffer full, the peer reading
    nothing until the end): nothing raised or logged as an error, and the connection ends
    up open (then its idle timeout closes it) or closed, never stuck in between.
    """
    with ErrorLog() as errors:
        protocol, transport, clock = made
        if paused:
            protocol.pauseProducing()
        for chunk in reads:
            protocol.dataReceived(chunk)
            clock.advance(0)  # what the exchanges' callLater(0)s do
        if paused and not transport.disconnected:
            protocol.resumeProducing()
        if not transport.disconnecting:
            assert not protocol.conn.terminated
            for _ in range(5):
                clock.advance(10.0)
        assert transport.disconnecting, "a connection neither open nor closed"
        protocol.connectionLost(Failure(ConnectionDone()))
        clock.advance(60)
    assert errors.events == []


@settings(BASE, max_examples=examples(150), deadline=timedelta(seconds=2))
@given(st.data(), st.booleans())
def test_serverProtocolOnMutatedClientTraffic(data, paused: bool) -> None:
    start, frames = data.draw(clientTraffic())
    reads = [start, *data.draw(splits(mutatedFrames(data.draw, frames)))]
    survives(serverProtocol(), reads, paused)


@settings(BASE, max_examples=examples(150), deadline=timedelta(seconds=2))
@given(st.data(), st.booleans())
def test_clientProtocolOnMutatedServerTraffic(data, paused: bool) -> None:
    """The same for the origin-facing side: streams opened by requests, an origin's answers."""
    requests, (start, frames) = data.draw(serverTraffic())
    reads = [start, *data.draw(splits(mutatedFrames(data.draw, frames)))]
    survives(clientProtocol(requests), reads, paused)


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> OriginPKI:
    return OriginPKI(tmp_path_factory.mktemp("h2fuzz-pki"))


def fuzzConnection(proxy: ProxyProcess, authority: str, data: bytes, budget: float) -> None:
    """One TLS (ALPN h2) connection through a CONNECT sending C{data}, read until closed,
    quiet or C{budget} seconds."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, _, _ = readHead(sock)
        assert status == 200
        ctx = ssl.create_default_context(cafile=str(proxy.ca))
        ctx.set_alpn_protocols(["h2"])
        with ctx.wrap_socket(sock, server_hostname=authority.rpartition(":")[0]) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            try:
                tls.sendall(data)
                tls.settimeout(0.1)
                deadline = time.monotonic() + budget
                while time.monotonic() < deadline and tls.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass


def test_mutatedTrafficThroughTheProxy(tmp_path, pki) -> None:
    origin = H2Origin(pki)
    proxy = startProxy(tmp_path, h2Ini(pki))
    try:
        authority = origin.url("/").split("/")[2]
        sent = []

        @settings(BASE, max_examples=min(CAMPAIGN, 300) or 30, deadline=None)
        @given(st.data())
        def connection(data) -> None:
            start, frames = data.draw(clientTraffic(authority.encode()))
            stream = mutatedFrames(data.draw, frames)
            sent.append(len(stream))
            fuzzConnection(proxy, authority, start + stream, budget=0.5)

        connection()
        assert len(sent) >= 20
        done = curl(proxy, "--http2", "-sS", "-w", "\n%{http_version}", origin.url("/after"))
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().rpartition("\n")[2] == "2"
        # the mutations left many requests whole: they went through to the origin
        streams = [line for line in proxy.accessLines() if "/f/" in line]
        assert len(streams) >= 10, len(streams)
        log = proxy.log()
        assert "Traceback" not in log and "Unhandled" not in log, log[-5000:]
    finally:
        proxy.stop()
        origin.close()
