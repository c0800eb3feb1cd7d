"""
Tests for gateway.h2: the HTTP/2 connection protocols and their streams, in process.

Two setups, no sockets and no reactor (task.Clock for every timer):
 - L{Loop}: proxygate's origin-facing protocol (H2ClientProtocol) talking to its
   client-facing one (H2ServerProtocol) over two StringTransports, with recording fake
   exchanges on both ends: "this event in, these calls out";
 - L{RawPeer}: h2's own H2Connection as the peer of one protocol, for what a well-behaved
   proxygate would never send (too many streams, oversized headers, Rapid Reset).
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from twisted.internet import error, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.h2.connection import H2ClientProtocol, H2Limits, H2ServerProtocol
from gateway.message import NO_BODY, UNKNOWN, Request, Response

TARGET = ("https", "api.example.test", 443, b"api.example.test")


class Recorder:
    """A fake exchange (or side): every call is recorded as (name, *args)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args):
            self.calls.append((name, *args))

        return record

    def names(self) -> list[str]:
        return [c[0] for c in self.calls if c[0] not in ("requestFlush", "responseFlush")]

    def data(self, name: str) -> bytes:
        return b"".join(c[1] for c in self.calls if c[0] == name)


class Producer(Recorder):
    """
    The other side of a throttle: counts pauses and resumes, knows its state. A side's
    throttle pauses the other's producer (as an HTTP/1.1 transport would).
    """

    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    @property
    def producer(self):
        return self

    def pauseProducing(self) -> None:
        self.pause()

    def resumeProducing(self) -> None:
        self.resume()

    def pause(self) -> None:
        self.paused = True
        self.calls.append(("pause",))

    def resume(self) -> None:
        self.paused = False
        self.calls.append(("resume",))


class CountingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def get(path: bytes = b"/", method: bytes = b"GET", length=0, fields=()) -> Request:
    return Request(
        method, "https", "api.example.test", 443, b"api.example.test", path, b"HTTP/1.1",
        list(fields), length,
    )  # fmt: skip


def ok(length=UNKNOWN, fields=(), status=200) -> Response:
    return Response(status, b"OK", b"HTTP/1.1", list(fields), length)


class Loop:
    """proxygate's two roles, connected: C{client} (origin-facing) -> C{server}."""

    def __init__(self, server: H2Limits | None = None, client: H2Limits | None = None):
        self.clock = task.Clock()
        self.dispatched: list[tuple] = []
        self.server = H2ServerProtocol(
            server or H2Limits(), self.clock, TARGET, "127.0.0.1", self._dispatch
        )
        self.client = H2ClientProtocol(client or H2Limits(), self.clock, "127.0.0.1")
        self.st = CountingTransport()
        self.ct = CountingTransport()
        self.server.makeConnection(self.st)
        self.client.makeConnection(self.ct)
        self.pump()

    def _dispatch(self, stream):
        exchange = Recorder()
        self.dispatched.append((stream, exchange))
        return exchange

    def pump(self, limit: int = 10000) -> None:
        for _ in range(limit):
            self.clock.advance(0)
            moved = False
            for source, sink in ((self.ct, self.server), (self.st, self.client)):
                data = source.value()
                if data:
                    source.clear()
                    sink.dataReceived(data)
                    moved = True
            if not moved:
                return
        raise AssertionError("still moving")

    def request(self, request: Request, body: bytes = b"", trailers=None):
        up = Recorder()
        stream = self.client.openStream(up)
        stream.sendHead(request)
        if body:
            stream.sendData(body)
        if request.length != 0:
            stream.end(trailers)
        stream.flush()
        return stream, up


# -- the basic exchange ----------------------------------------------------------------------


def test_requestAndResponse():
    """A GET goes out as HEADERS, is dispatched, and its response comes back."""
    loop = Loop()
    stream, up = loop.request(get(b"/a?b"))
    loop.pump()
    [(down, exchange)] = loop.dispatched
    assert down.request.method == b"GET" and down.request.path == b"/a?b"
    assert down.request.length == NO_BODY and down.client == "127.0.0.1"
    assert exchange.names() == ["requestEnd"]
    down.sendHead(ok(5, [(b"Content-Type", b"text/plain")]))
    down.sendData(b"hello")
    down.end()
    down.flush()
    loop.pump()
    assert up.names() == ["responseHead", "responseData", "responseEnd"]
    head = up.calls[0][1]
    assert (head.status, head.length, head.fields) == (200, 5, [(b"content-type", b"text/plain")])
    assert up.data("responseData") == b"hello"
    assert ("responseFlush",) in up.calls
    assert loop.server.streams == {} and loop.client.streams == {}
    stream.release(True)
    loop.client.flush()
    assert loop.ct.value() == b"", "a complete stream is not reset when released"
    assert loop.client.available


def test_manyConcurrentStreams():
    """50 streams at once, answered in reverse order, each with its own body."""
    loop = Loop()
    ups = [loop.request(get(b"/%d" % i))[1] for i in range(50)]
    loop.pump()
    assert len(loop.dispatched) == 50
    for down, _ in reversed(loop.dispatched):
        body = down.request.path * 1000
        down.sendHead(ok(len(body)))
        down.sendData(body)
        down.end()
    loop.server.flush()
    loop.pump()
    for i, up in enumerate(ups):
        assert up.names()[0] == "responseHead" and up.names()[-1] == "responseEnd"
        assert up.data("responseData") == b"/%d" % i * 1000


def test_oneWritePerRead():
    """Ten requests in one read, answered at once: one write carries every answer."""
    loop = Loop()
    for i in range(10):
        loop.request(get(b"/%d" % i))

    def answer(stream):
        exchange = Recorder()
        exchange.requestEnd = lambda trailers=None: (
            stream.sendHead(ok(2)),
            stream.sendData(b"ok"),
            stream.end(),
        )
        loop.dispatched.append((stream, exchange))
        return exchange

    loop.server._dispatch = answer
    data = loop.ct.value()
    loop.ct.clear()
    before = loop.st.writes
    loop.server.dataReceived(data)
    assert loop.st.writes == before + 1
    assert len(loop.dispatched) == 10


def test_flushSafetyNet():
    """Data sent outside a read without flush() still goes, at the next reactor turn."""
    loop = Loop()
    loop.request(get())
    loop.pump()
    [(down, _)] = loop.dispatched
    down.sendHead(ok(UNKNOWN))
    assert loop.st.value() == b""
    loop.clock.advance(0)
    assert loop.st.value() != b""


# -- trailers ---------------------------------------------------------------------------------


def test_trailersBothWays():
    """Request trailers and response trailers (gRPC's grpc-status) pass through."""
    loop = Loop()
    request = get(b"/pkg.Service/Method", b"POST", UNKNOWN, [(b"te", b"trailers")])
    _, up = loop.request(request, b"\x00\x00\x00\x00\x01x", [(b"x-req-trailer", b"1")])
    loop.pump()
    [(down, exchange)] = loop.dispatched
    assert (b"te", b"trailers") in down.request.fields
    assert exchange.data("requestData") == b"\x00\x00\x00\x00\x01x"
    assert exchange.calls[-2:] == [("requestEnd", [(b"x-req-trailer", b"1")]), ("requestFlush",)]
    down.sendHead(ok(UNKNOWN, [(b"content-type", b"application/grpc")]))
    down.sendData(b"\x00\x00\x00\x00\x01y")
    down.end([(b"grpc-status", b"0"), (b"grpc-message", b"")])
    down.flush()
    loop.pump()
    assert up.names() == ["responseHead", "responseData", "responseEnd"]
    assert ("responseEnd", [(b"grpc-status", b"0"), (b"grpc-message", b"")]) in up.calls


def test_trailersOnlyResponse():
    """A head that ends the stream (gRPC trailers-only: grpc-status 5) stays one HEADERS."""
    loop = Loop()
    _, up = loop.request(get(b"/pkg.S/M", b"POST", 0))
    loop.pump()
    [(down, _)] = loop.dispatched
    down.sendHead(ok(0, [(b"grpc-status", b"5"), (b"grpc-message", b"not found")]))
    down.end()
    down.flush()
    loop.pump()
    assert up.names() == ["responseHead", "responseEnd"]
    head = up.calls[0][1]
    assert head.length == 0 and (b"grpc-status", b"5") in head.fields
    assert ("responseEnd", None) in up.calls


# -- flow control -----------------------------------------------------------------------------

BIG = 8 * 1024 * 1024
CHUNK = 65536


def _produce(side, producer: Producer, total: int, sent: list[int]) -> None:
    """Send C{total} bytes on C{side} in chunks while C{producer} is not paused."""
    while sent[0] < total and not producer.paused:
        n = min(CHUNK, total - sent[0])
        side.sendData(b"x" * n)
        sent[0] += n
    if sent[0] == total:
        side.end()
    side.flush()


def test_slowReaderDownload():
    """
    A client that reads slowly (its exchange paused the origin-facing stream) holds the
    sender by flow control: what the proxy holds stays within one stream window on the
    receiving stream and one chunk on the sending one, and everything arrives in the end.
    """
    limits = H2Limits()
    loop = Loop()
    stream, up = loop.request(get(b"/big"))
    stream.pause()  # the slow reader behind this stream's exchange
    loop.pump()
    [(down, _)] = loop.dispatched
    producer, sent = Producer(), [0]
    down.throttle(producer)
    down.sendHead(ok(BIG))
    peak = 0
    for _ in range(200):
        _produce(down, producer, BIG, sent)
        loop.pump()
        peak = max(peak, stream.buffered + down.buffered)
        assert stream.buffered <= limits.streamWindow
        assert down.buffered <= CHUNK
        if producer.paused:
            break
    assert producer.paused and sent[0] < 2 * limits.streamWindow
    received = len(up.data("responseData"))
    assert received == 0
    # The reader takes everything now: the window reopens, the producer resumes.
    stream.resume()
    for _ in range(1000):
        loop.pump()
        if not producer.paused:
            _produce(down, producer, BIG, sent)
        if up.names()[-1:] == ["responseEnd"]:
            break
    assert len(up.data("responseData")) == BIG
    assert ("resume",) in producer.calls
    assert peak <= limits.streamWindow + CHUNK


def test_slowOriginUpload():
    """The reverse: an origin-side exchange that paused the client's stream stops the upload."""
    limits = H2Limits()
    loop = Loop()
    up = Recorder()
    stream = loop.client.openStream(up)
    stream.sendHead(get(b"/up", b"POST", BIG))
    producer, sent = Producer(), [0]
    stream.throttle(producer)
    loop.pump()
    [(down, exchange)] = loop.dispatched
    down.pause()  # the origin behind this exchange does not read
    for _ in range(200):
        _produce(stream, producer, BIG, sent)
        loop.pump()
        assert down.buffered <= limits.streamWindow
        if producer.paused:
            break
    assert producer.paused
    assert exchange.data("requestData") == b""
    down.resume()
    for _ in range(1000):
        loop.pump()
        if not producer.paused:
            _produce(stream, producer, BIG, sent)
        if "requestEnd" in exchange.names():
            break
    assert len(exchange.data("requestData")) == BIG


def test_connectionWindowBoundsAllStreams():
    """Many paused streams together hold at most the connection window."""
    limits = H2Limits(streamWindow=256 * 1024, connectionWindow=1024 * 1024)
    loop = Loop(client=limits)
    pairs = []
    for i in range(8):
        stream, up = loop.request(get(b"/%d" % i))
        stream.pause()
        pairs.append((stream, up))
    loop.pump()
    producers = []
    for down, _ in loop.dispatched:
        producer = Producer()
        down.throttle(producer)
        down.sendHead(ok(BIG))
        producers.append((down, producer, [0]))
    for _ in range(100):
        for down, producer, sent in producers:
            _produce(down, producer, BIG, sent)
        loop.pump()
    held = sum(stream.buffered for stream, _ in pairs)
    assert held <= limits.connectionWindow
    assert all(producer.paused for _, producer, _ in producers)


def test_transportBackpressure():
    """A full transport (pauseProducing) stops framing; resumeProducing sends and resumes."""
    loop = Loop()
    loop.request(get())
    loop.pump()
    [(down, _)] = loop.dispatched
    producer = Producer()
    down.throttle(producer)
    down.sendHead(ok(UNKNOWN))
    loop.server.pauseProducing()
    down.sendData(b"y" * 1000)
    assert producer.paused and down.buffered == 1000
    loop.server.resumeProducing()
    assert not producer.paused and down.buffered == 0


# -- resets, GOAWAY, timeouts ------------------------------------------------------------------


def test_resetLeavesOtherStreams():
    """The client cancels one stream: its exchange is told, the other one completes."""
    loop = Loop()
    s1, _up1 = loop.request(get(b"/1"))
    _s2, up2 = loop.request(get(b"/2"))
    loop.pump()
    (d1, e1), (d2, e2) = loop.dispatched
    s1.abort()
    s1.flush()
    loop.pump()
    assert e1.names()[-1] == "downstreamLost" and d1.closed
    d2.sendHead(ok(2))
    d2.sendData(b"ok")
    d2.end()
    d2.flush()
    loop.pump()
    assert up2.data("responseData") == b"ok" and up2.names()[-1] == "responseEnd"
    assert "downstreamLost" not in e2.names()


def test_serverAbortIsStreamReset():
    """An exchange aborting a response (origin died) resets that stream only."""
    loop = Loop()
    _, up1 = loop.request(get(b"/1"))
    _, up2 = loop.request(get(b"/2"))
    loop.pump()
    (d1, _), (d2, _) = loop.dispatched
    d1.sendHead(ok(10))
    d1.sendData(b"part")
    d1.abort()
    d2.sendHead(ok(0))
    loop.server.flush()
    loop.pump()
    lost = [c for c in up1.calls if c[0] == "upstreamLost"]
    assert lost[0][1].code == "incomplete" and "INTERNAL_ERROR" in lost[0][1].detail
    assert up2.names() == ["responseHead", "responseEnd"]


def test_serverDrainFinishesOpenStreams():
    """drain(): GOAWAY; the client opens no more streams, the open one finishes, then close."""
    loop = Loop()
    _, up = loop.request(get())
    loop.pump()
    [(down, _)] = loop.dispatched
    loop.server.drain()
    loop.pump()
    assert not loop.client.available and loop.client.draining
    assert not loop.st.disconnecting
    down.sendHead(ok(1))
    down.sendData(b"!")
    down.end()
    down.flush()
    loop.pump()
    assert up.names() == ["responseHead", "responseData", "responseEnd"]
    assert loop.st.disconnecting


def test_originGoawayRefusesUnprocessedStreams():
    """An origin's GOAWAY: streams above its last id are refused (retryable), others finish."""
    clock = task.Clock()
    client = H2ClientProtocol(H2Limits(), clock)
    peer = RawPeer(client, clientSide=False)
    ups = []
    for i in range(3):
        up = Recorder()
        stream = client.openStream(up)
        stream.sendHead(get(b"/%d" % i))
        ups.append(up)
    client.flush()
    peer.exchange()
    peer.conn.send_headers(1, [(b":status", b"200")], end_stream=True)
    peer.conn.close_connection(last_stream_id=3)  # streams 1 and 3 were seen, 5 was not
    peer.exchange()
    assert ups[0].names() == ["responseHead", "responseEnd"]
    assert ups[1].names() == []
    [(_name, problem)] = [c for c in ups[2].calls if c[0] == "upstreamLost"]
    assert problem.code == "stream_refused"  # the exchange retries it
    assert not client.available


def test_idleTimeout():
    """No frame for idle_timeout: running exchanges hear timedOut, then GOAWAY and close."""
    loop = Loop(server=H2Limits(idleTimeout=30))
    loop.request(get(b"/wait"))
    loop.pump()
    [(_, exchange)] = loop.dispatched
    loop.clock.advance(29)
    assert not loop.st.disconnecting
    loop.clock.advance(2)
    assert "timedOut" in exchange.names()
    assert loop.st.disconnecting
    loop.pump()
    assert loop.client.draining


def test_idleConnectionCloses():
    """An idle connection with no stream closes after idle_timeout, not before."""
    loop = Loop(server=H2Limits(idleTimeout=10))
    loop.clock.advance(5)
    loop.request(get())
    loop.pump()
    loop.dispatched[0][0].sendHead(ok(0))
    loop.server.flush()
    loop.pump()
    loop.clock.advance(9)
    assert not loop.st.disconnecting
    loop.clock.advance(2)
    assert loop.st.disconnecting


def test_connectionLostTellsEveryStream():
    loop = Loop()
    _, up = loop.request(get())
    loop.pump()
    [(_, exchange)] = loop.dispatched
    loop.server.connectionLost(Failure(error.ConnectionLost()))
    loop.client.connectionLost(Failure(error.ConnectionLost()))
    assert exchange.names()[-1] == "downstreamLost"
    assert up.names()[-1] == "upstreamLost"


# -- h2's own connection as the peer -----------------------------------------------------------


class RawPeer:
    """h2's H2Connection facing a protocol under test over a StringTransport."""

    def __init__(self, protocol, clientSide: bool = True) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=clientSide, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.protocol = protocol
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)
        self.events: list = []
        self.exchange()

    def send(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.protocol.dataReceived(data)

    def receive(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.events += self.conn.receive_data(data)

    def exchange(self) -> None:
        for _ in range(10):
            self.send()
            self.receive()

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"api.example.test"),
    (b":path", b"/"),
]


def serverUnderTest(**limits):
    clock = task.Clock()
    dispatched = []

    def dispatch(stream):
        exchange = Recorder()
        dispatched.append((stream, exchange))
        return exchange

    refused = []
    protocol = H2ServerProtocol(
        H2Limits(**limits),
        clock,
        TARGET,
        "127.0.0.1",
        dispatch,
        lambda stream, problem, method, path: refused.append((problem.status, problem.detail)),
    )
    return protocol, clock, dispatched, refused


def test_maxConcurrentStreamsRefusedOneByOne():
    """Streams beyond the advertised limit get REFUSED_STREAM; the connection stays."""
    protocol, _, dispatched, _ = serverUnderTest(maxStreams=3)
    peer = RawPeer(protocol)
    settings = peer.of(h2.events.RemoteSettingsChanged)
    advertised = settings[0].changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS]
    assert advertised.new_value == 3
    peer.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 100
    peer.conn.remote_settings.acknowledge()  # a peer that ignores the limit
    for i in range(5):
        peer.conn.send_headers(1 + 2 * i, REQUEST, end_stream=True)
    peer.exchange()
    assert len(dispatched) == 3
    resets = peer.of(h2.events.StreamReset)
    assert [(e.stream_id, e.error_code) for e in resets] == [
        (7, ErrorCodes.REFUSED_STREAM),
        (9, ErrorCodes.REFUSED_STREAM),
    ]
    assert not protocol.transport.disconnecting
    dispatched[0][0].sendHead(ok(0))  # one completes: a slot frees
    protocol.flush()
    peer.conn.send_headers(11, REQUEST, end_stream=True)
    peer.exchange()
    assert len(dispatched) == 4


def test_headerListTooLargeIs431():
    """A header list over max_header_size: 431 on that stream, the connection stays."""
    protocol, _, dispatched, refused = serverUnderTest(maxHeaderListSize=4096)
    peer = RawPeer(protocol)
    peer.conn.send_headers(1, [*REQUEST, (b"x-big", b"a" * 5000)], end_stream=True)
    peer.conn.send_headers(3, REQUEST, end_stream=True)
    peer.exchange()
    responses = {e.stream_id: dict(e.headers) for e in peer.of(h2.events.ResponseReceived)}
    assert responses[1][b":status"] == b"431"
    assert responses[1][b"content-type"] == b"text/plain; charset=utf-8"
    body = b"".join(e.data for e in peer.of(h2.events.DataReceived) if e.stream_id == 1)
    assert body == b"The request's header fields are larger than allowed.\n"
    assert refused == [(431, "The request's header fields are larger than allowed.")]
    assert [s.id for s, _ in dispatched] == [3]
    assert not protocol.transport.disconnecting


def test_headerListFarTooLargeEndsConnection():
    """Twice the limit is not even decoded: the connection ends (HPACK bomb guard)."""
    protocol, _, dispatched, _ = serverUnderTest(maxHeaderListSize=4096)
    peer = RawPeer(protocol)
    peer.conn.send_headers(1, [*REQUEST, (b"x-big", b"a" * 9000)], end_stream=True)
    peer.exchange()
    assert dispatched == []
    assert protocol.transport.disconnecting
    assert peer.of(h2.events.ConnectionTerminated)


def test_rapidResetInOneRead():
    """
    HEADERS + RST_STREAM in one read, in a loop (CVE-2023-44487): no stream reaches an
    exchange (so no origin is dialled), and past the budget the connection gets GOAWAY
    ENHANCE_YOUR_CALM.
    """
    protocol, _, dispatched, _ = serverUnderTest(resetBurst=50)
    peer = RawPeer(protocol)
    for i in range(200):
        peer.conn.send_headers(1 + 2 * i, REQUEST)
        peer.conn.reset_stream(1 + 2 * i, ErrorCodes.CANCEL)
        peer.send()
        if protocol.transport.disconnecting:
            break
    peer.receive()
    assert dispatched == []
    [goaway] = peer.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert i == 50  # the 51st reset is one too many


def test_rapidResetAllInOneRead():
    """300 open-and-reset pairs in a single read: GOAWAY after the budget, nothing after it."""
    protocol, _, dispatched, _ = serverUnderTest(resetBurst=50)
    peer = RawPeer(protocol)
    for i in range(300):
        peer.conn.send_headers(1 + 2 * i, REQUEST)
        peer.conn.reset_stream(1 + 2 * i, ErrorCodes.CANCEL)
    peer.send()
    assert dispatched == [] and protocol.transport.disconnecting
    peer.receive()
    [goaway] = peer.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    protocol.dataReceived(b"more bytes after the GOAWAY are not read")


def test_rapidResetAcrossReads():
    """Opened in one read, reset in the next: the exchange hears downstreamLost at once."""
    protocol, _, dispatched, _ = serverUnderTest(resetBurst=20)
    peer = RawPeer(protocol)
    for i in range(30):
        peer.conn.send_headers(1 + 2 * i, REQUEST)
        peer.send()
        peer.conn.reset_stream(1 + 2 * i, ErrorCodes.CANCEL)
        peer.send()
        if protocol.transport.disconnecting:
            break
    assert all(exchange.names() == ["downstreamLost"] for _, exchange in dispatched)
    assert protocol.transport.disconnecting and len(dispatched) == 21
    assert protocol.streams == {}


def test_resetsWithinTheRateAreFine():
    """Resets at the refill rate (a client cancelling now and then) never trip the limit."""
    protocol, clock, _dispatched, _ = serverUnderTest(resetBurst=10, resetRate=5.0)
    peer = RawPeer(protocol)
    for i in range(100):
        peer.conn.send_headers(1 + 2 * i, REQUEST)
        peer.conn.reset_stream(1 + 2 * i, ErrorCodes.CANCEL)
        peer.send()
        clock.advance(0.2)
    assert not protocol.transport.disconnecting


def test_completedStreamsResetCostNothing():
    """A reset after the response is complete is no glitch."""
    protocol, _, dispatched, _ = serverUnderTest(resetBurst=5)
    peer = RawPeer(protocol)
    for i in range(20):
        peer.conn.send_headers(1 + 2 * i, [*REQUEST[:3], (b":path", b"/up")])
        peer.exchange()
        stream = dispatched[-1][0]
        stream.sendHead(ok(0))
        protocol.flush()
        peer.exchange()
    assert not protocol.transport.disconnecting


def test_malformedRequestAnswered400():
    """A request the proxy cannot forward is answered on its stream; the others go on."""
    protocol, _, dispatched, refused = serverUnderTest()
    peer = RawPeer(protocol)
    peer.conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), *REQUEST[2:]])
    peer.conn.send_headers(3, [(b":method", b"CONNECT"), (b":authority", b"a.test:443")])
    peer.conn.send_headers(5, REQUEST, end_stream=True)
    peer.exchange()
    statuses = {
        e.stream_id: dict(e.headers)[b":status"] for e in peer.of(h2.events.ResponseReceived)
    }
    assert statuses == {1: b"400", 3: b"501"}
    assert [status for status, _ in refused] == [400, 501]
    assert [s.id for s, _ in dispatched] == [5]
    # The refused streams' requests were not complete: they are cut, not left open.
    assert {e.stream_id for e in peer.of(h2.events.StreamReset)} == {1, 3}
    assert list(protocol.streams) == [5]


def test_pingAnswered():
    protocol, _, _, _ = serverUnderTest()
    peer = RawPeer(protocol)
    peer.conn.ping(b"12345678")
    peer.exchange()
    [ack] = peer.of(h2.events.PingAckReceived)
    assert ack.ping_data == b"12345678"


def test_peerGoawayDrains():
    """A client's GOAWAY: the open stream still gets its response, then the close."""
    loop = Loop()
    _, up = loop.request(get())
    loop.pump()
    loop.client.drain()
    loop.pump()
    assert loop.server.draining and not loop.st.disconnecting
    [(down, _)] = loop.dispatched
    down.sendHead(ok(2))
    down.sendData(b"ok")
    down.end()
    down.flush()
    loop.pump()
    assert up.data("responseData") == b"ok" and up.names()[-1] == "responseEnd"
    assert loop.st.disconnecting and loop.ct.disconnecting


def test_newStreamAfterOurGoawayRefused():
    """After drain(), a stream the client opens anyway is refused, not served."""
    protocol, _, dispatched, _ = serverUnderTest()
    peer = RawPeer(protocol)
    peer.conn.send_headers(1, REQUEST)
    peer.exchange()
    protocol.drain()
    peer.conn.send_headers(3, REQUEST, end_stream=True)
    peer.send()
    assert [s.id for s, _ in dispatched] == [1]


def test_dataOnClosedStreamGivesWindowBack():
    """
    Data for a stream already over (answered, reset) does not eat the connection window:
    a client may go on sending far more than one window on new streams.
    """
    protocol, _, dispatched, _ = serverUnderTest(connectionWindow=128 * 1024)
    peer = RawPeer(protocol)
    for i in range(12):
        sid = 1 + 2 * i
        peer.conn.send_headers(sid, [(b":method", b"POST"), *REQUEST[1:]])
        peer.send()
        dispatched[-1][0].sendHead(ok(0))  # answered at once: RST_STREAM NO_ERROR, unseen
        protocol.flush()
        window = peer.conn.outbound_flow_control_window
        if window < 32768:
            pytest.fail(f"the connection window shrank to {window}")
        peer.conn.send_data(sid, b"z" * 16384)  # in flight when the reset was sent
        peer.conn.send_data(sid, b"z" * 16384)
        peer.exchange()
    assert not protocol.transport.disconnecting


# -- the origin pool and the limits from the INI ------------------------------------------------


def test_poolSharesAvailableConnections():
    """get() hands out a connection while it takes streams; GOAWAY or loss takes it out."""
    from gateway.h2.pool import H2Pool

    pool = H2Pool(maxPerKey=1)
    loop = Loop(server=H2Limits(maxStreams=2))
    key = ("https", "api.example.test", 443, None)
    assert pool.get(key) is None
    pool.add(key, loop.client)
    assert pool.get(key) is loop.client
    loop.request(get(b"/1"))
    loop.request(get(b"/2"))
    loop.pump()
    assert pool.get(key) is None  # the origin's SETTINGS allow 2 streams: both in use
    loop.dispatched[0][0].sendHead(ok(0))
    loop.server.flush()
    loop.pump()
    assert pool.get(key) is loop.client
    extra = H2ClientProtocol(H2Limits(), loop.clock)
    extra.makeConnection(StringTransport())
    pool.add(key, extra)  # over maxPerKey: drained, not kept
    assert extra.draining and len(pool) == 1
    loop.client.connectionLost(Failure(error.ConnectionDone()))
    assert pool.get(key) is None and len(pool) == 0


def test_limitsFromConfig():
    from gateway.config import parseConfig

    config = parseConfig(
        "[mitm]\nhttp2_max_streams = 7\n[proxy]\nmax_header_size = 1000\nidle_timeout = 9\n"
    )
    assert H2Limits.fromConfig(config) == H2Limits(
        maxStreams=7, maxHeaderListSize=1000, idleTimeout=9.0
    )


def test_runtimeDoesNotLoadTheH2Library():
    """
    The proxy's HTTP/2 is its own codec (gateway/h2/machine.py): python-hyper's h2, hpack
    and hyperframe, the tests' reference peer, are not loaded by it (h2 was 85% of the CPU
    of an intercepted h2 request).
    """
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from twisted.internet import task\n"
        "from twisted.internet.testing import StringTransport\n"
        "from gateway.h2.connection import H2ClientProtocol, H2Limits, H2ServerProtocol\n"
        "import gateway.proxy.h2tunnel, gateway.proxy.originleg\n"
        "from gateway.message import Request, Response\n"
        "clock = task.Clock()\n"
        "class Exchange:\n"
        "    def __getattr__(self, name):\n"
        "        return lambda *args: None\n"
        "downs = []\n"
        "server = H2ServerProtocol(H2Limits(), clock, ('https', 'o', 443, b'o'), '-',\n"
        "                          lambda stream: downs.append(stream) or Exchange())\n"
        "client = H2ClientProtocol(H2Limits(), clock)\n"
        "st, ct = StringTransport(), StringTransport()\n"
        "server.makeConnection(st)\n"
        "client.makeConnection(ct)\n"
        "def pump():\n"
        "    for _ in range(10):\n"
        "        a, b = ct.value(), st.value()\n"
        "        ct.clear(); st.clear()\n"
        "        a and server.dataReceived(a)\n"
        "        b and client.dataReceived(b)\n"
        "stream = client.openStream(Exchange())\n"
        "stream.sendHead(Request(b'GET', 'https', 'o', 443, b'o', b'/', b'HTTP/1.1', [], 0))\n"
        "stream.flush()\n"
        "pump()\n"
        "downs[0].sendHead(Response(200, b'OK', b'HTTP/1.1', [], 0))\n"
        "server.flush()\n"
        "pump()\n"
        "assert not server.streams and not client.streams and len(downs) == 1\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('h2', 'hpack', 'hyperframe')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_closedStreamsAreForgotten():
    """
    The machine's table of streams does not grow with the streams a connection served, and
    what it remembers of closed ones (to tell a late frame from a protocol error) is bounded.
    """
    from gateway.h2.machine import _REMEMBERED

    protocol, _, dispatched, _ = serverUnderTest()
    peer = RawPeer(protocol)
    sid = 1
    while sid < 2 * _REMEMBERED + 400:
        for _ in range(50):
            peer.conn.send_headers(sid, REQUEST, end_stream=True)
            sid += 2
        peer.exchange()
        for stream, _ in dispatched[-50:]:
            stream.sendHead(ok(0))
        protocol.flush()
        peer.exchange()
        assert len(protocol.conn.streams) == 0
    assert len(dispatched) > _REMEMBERED and not protocol.transport.disconnecting
    assert len(protocol.conn._closed) <= _REMEMBERED
