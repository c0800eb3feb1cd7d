"""
benchmarks/loadgen.py's lean HTTP/2 client and origin (pure, in process, no sockets).

The benchmark's figures are only as good as these two: they are checked here against the h2
library (python-hyper), which validates every frame, header block and window it receives, and
against each other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

_path = Path(__file__).resolve().parent.parent / "benchmarks" / "loadgen.py"
_spec = importlib.util.spec_from_file_location("loadgen", _path)
loadgen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loadgen)


class Owner:
    """What H2Client is to a session: it hears of every stream's end."""

    def __init__(self):
        self.answers, self.resets, self.ends = [], [], []

    def done(self, st):
        self.answers.append((st[1], st[2]))

    def failed(self, st, e):
        self.resets.append(str(e))

    def lost(self, e):
        self.ends.append(str(e))


def clientSession(path=b"/bytes/1024"):
    owner = Owner()
    return loadgen.H2ClientSession(b"127.0.0.1:8443", path, owner), owner


def h2peer(client_side):
    return h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    )


def exchange(lean, peer, answer=None):
    """Carry bytes both ways until neither side has more; answer(peer, event) for each event."""
    events = []
    for _ in range(1000):
        moved = False
        out = lean.take()
        if out:
            moved = True
            for ev in peer.receive_data(out):
                events.append(ev)
                if answer:
                    answer(peer, ev)
        out = peer.data_to_send()
        if out:
            moved = True
            lean.feed(out)
        if hasattr(lean, "pump") and lean.pending:
            moved = lean.pump() > 0 or moved
        if not moved:
            return events
    raise AssertionError("no end to the exchange")


def test_theRequestBlockIsStaticOnly():
    """The GET decodes the same on any table, and leaves the peer's table empty."""
    block = loadgen.request_block(b"127.0.0.1:8443", b"/bytes/1024")
    decoder = hpack.Decoder()
    assert decoder.decode(block, raw=True) == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1:8443"),
        (b":path", b"/bytes/1024"),
        (b"user-agent", b"loadgen/1"),
    ]
    assert not decoder.header_table.dynamic_entries
    assert hpack.Decoder().decode(loadgen.response_block(200, 1024), raw=True) == [
        (b":status", b"200"),
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"1024"),
    ]
    long = loadgen.hpack_literal(58, b"x" * 300)  # integers past their prefix
    assert hpack.Decoder().decode(long, raw=True) == [(b"user-agent", b"x" * 300)]


def test_theClientAgainstTheH2Library():
    """Requests the h2 library accepts; answers that use its dynamic table, one field changing
    between them, an informational answer first, trailers, a 404: each counted right."""
    session, owner = clientSession()
    server = h2peer(client_side=False)
    server.initiate_connection()
    seen = []

    def answer(peer, ev):
        if not isinstance(ev, h2.events.RequestReceived):
            return
        seen.append(ev.headers)
        n, sid = len(seen), ev.stream_id
        if n == 3:
            peer.send_headers(sid, [(b":status", b"103"), (b"link", b"</a>")])
        if n == 4:
            peer.send_headers(sid, [(b":status", b"404")], end_stream=True)
            return
        fields = [(b":status", b"200"), (b"content-length", b"1024"), (b"date", b"%d" % (n // 2))]
        peer.send_headers(sid, fields)
        peer.send_data(sid, b"x" * 1024, end_stream=n != 5)
        if n == 5:
            peer.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)

    exchange(session, server, answer)
    for _ in range(6):
        session.request(0.0)
    exchange(session, server, answer)
    assert seen[0] == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1:8443"),
        (b":path", b"/bytes/1024"),
        (b"user-agent", b"loadgen/1"),
    ]
    assert owner.answers == [(200, 1024)] * 3 + [(404, 0)] + [(200, 1024)] * 2
    assert not session.streams and not owner.resets and not owner.ends


def test_theClientAnswersPingsAndSettingsAndCountsResets():
    """PING gets its ACK, SETTINGS theirs, a smaller HEADER_TABLE_SIZE makes the next block
    say so (RFC 7541 4.2), a reset stream is a failure, GOAWAY ends the rest."""
    session, owner = clientSession()
    server = h2peer(client_side=False)
    server.initiate_connection()
    exchange(session, server)
    server.ping(b"12345678")
    server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    events = exchange(session, server)
    assert any(isinstance(e, h2.events.PingAckReceived) for e in events)
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
    a, b = session.request(0.0), session.request(0.0)
    out = session.take()
    second = 9 + int.from_bytes(out[:3], "big")
    assert out[9] == 0x20 and out[second + 9] == 0x82  # a size update to 0, once (h2 checks it)
    got = [ev for ev in server.receive_data(out) if isinstance(ev, h2.events.RequestReceived)]
    assert len(got) == 2
    server.reset_stream(a, h2.errors.ErrorCodes.REFUSED_STREAM)
    session.feed(server.data_to_send())
    assert owner.resets == ["stream reset REFUSED_STREAM"]
    server.close_connection()
    session.feed(server.data_to_send())
    assert owner.ends == ["GOAWAY NO_ERROR"] and session.closed and b in session.streams


def test_theOriginAgainstTheH2Library():
    """GET /bytes/N with the h2 library's 65,535-byte windows: the origin never sends past them
    (h2 would raise), resumes on WINDOW_UPDATE; a path that is not /bytes/N is a 404."""
    origin = loadgen.H2OriginSession()
    client = h2peer(client_side=True)
    client.initiate_connection()
    got = {}

    def answer(peer, ev):
        if isinstance(ev, h2.events.ResponseReceived):
            got[ev.stream_id] = [dict(ev.headers), 0, False]
        elif isinstance(ev, h2.events.DataReceived):
            got[ev.stream_id][1] += len(ev.data)
            peer.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            got[ev.stream_id][2] = True

    paths = [b"/bytes/1024", b"/bytes/300000", b"/nope", b"/bytes/0", b"/bytes/1024"]
    for i, path in enumerate(paths):
        headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"o"),
                   (b":path", path), (b"user-agent", b"test")]  # fmt: skip
        client.send_headers(1 + 2 * i, headers, end_stream=True)
    origin.feed(client.data_to_send())
    exchange(origin, client, answer)
    assert [(g[0][b":status"], g[1], g[2]) for _, g in sorted(got.items())] == [
        (b"200", 1024, True),
        (b"200", 300000, True),
        (b"404", 0, True),
        (b"200", 0, True),
        (b"200", 1024, True),
    ]
    assert got[3][0][b"content-length"] == b"300000" and not origin.pending


def test_theOriginTakesPaddingPriorityContinuationAndBodies():
    """A padded HEADERS with priority, a block split over CONTINUATION, a request body, all fed
    a byte at a time: the origin answers both; an oversized frame or no preface ends it."""
    origin = loadgen.H2OriginSession()
    client = h2peer(client_side=True)
    client.initiate_connection()
    origin.feed(client.data_to_send())
    client.receive_data(origin.take())
    block = loadgen.request_block(b"o", b"/bytes/10")
    padded = bytes([3]) + b"\0\0\0\0\x10" + block + b"\0\0\0"
    flags = loadgen.END_HEADERS | loadgen.END_STREAM | loadgen.PADDED | loadgen.PRIORITY_FLAG
    wire = loadgen.h2frame(loadgen.HEADERS, flags, 1, padded)
    wire += loadgen.h2frame(loadgen.HEADERS, 0, 3, block[:4])
    wire += loadgen.h2frame(loadgen.CONTINUATION, loadgen.END_HEADERS, 3, block[4:])
    wire += loadgen.h2frame(loadgen.DATA, loadgen.END_STREAM, 3, b"body")
    for i in range(len(wire)):
        origin.feed(wire[i : i + 1])
    out = origin.take()
    assert out.count(b"x" * 10) == 2 and origin.last_stream == 3 and origin.received == 4
    with pytest.raises(loadgen.H2Error, match="FRAME_SIZE_ERROR"):
        origin.feed(loadgen.FRAME.pack(0x40, 1, loadgen.DATA, 0, 5))  # 16,385 bytes
    with pytest.raises(loadgen.H2Error, match="preface"):
        loadgen.H2OriginSession().feed(b"GET / HTTP/1.1\r\n")


def test_theClientAndTheOriginTogether():
    """The two lean ends: many streams in flight, a body over many frames and window updates."""
    session, owner = clientSession(b"/bytes/100000")
    origin = loadgen.H2OriginSession()
    for _ in range(10):
        session.request(0.0)
    for _ in range(100):
        out = session.take()
        origin.feed(out)
        if origin.pending:
            origin.pump()
        back = origin.take()
        if not out and not back:
            break
        session.feed(back)
    assert owner.answers == [(200, 100000)] * 10 and not session.streams


def test_theBlockDecoderForgetsWhenTheTableMoves():
    """The same bytes mean other fields once the table has changed: nothing remembered then."""
    encoder, decoder = hpack.Encoder(), loadgen.BlockDecoder()
    assert decoder.decode(encoder.encode([(b"x-a", b"1")])) == [(b"x-a", b"1")]  # indexes x-a
    indexed = encoder.encode([(b"x-a", b"1")])
    assert indexed == b"\xbe" and decoder.decode(indexed) == [(b"x-a", b"1")]
    assert decoder.seen == {b"\xbe": [(b"x-a", b"1")]}
    decoder.decode(encoder.encode([(b"x-b", b"2")]))  # now 62 is x-b
    assert decoder.seen == {} and decoder.decode(b"\xbe") == [(b"x-b", b"2")]
    with pytest.raises(loadgen.H2Error, match="COMPRESSION_ERROR"):
        decoder.decode(b"\xff\xff\xff\x0f")


def test_theBlockDecoderSeesAnEqualEntryAdded():
    """A table of two entries gets a copy of its newest: as long as before, the same newest
    field, yet index 63 now means another field."""

    def indexed(name, value):  # a literal with incremental indexing, new name (RFC 7541 6.2.1)
        return b"\x40" + bytes([len(name)]) + name + bytes([len(value)]) + value

    decoder = loadgen.BlockDecoder()
    decoder.decode(loadgen.hpack_int(72, 5, 0x20) + indexed(b"x-a", b"1") + indexed(b"x-b", b"2"))
    assert decoder.decode(b"\xbf") == [(b"x-a", b"1")] and b"\xbf" in decoder.seen
    decoder.decode(indexed(b"x-b", b"2"))  # 36 bytes each: x-a falls out
    assert decoder.decode(b"\xbf") == [(b"x-b", b"2")]
