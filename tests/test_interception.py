"""
An intercepted CONNECT from its 200 on, in process (gateway/proxy/interception.py,
h2tunnel.py, originleg.py, the connector's HTTP/2 side): the ClientHello read before it is
answered, the origin pre-dialled with the client's ALPN offer, the agreed protocol on both
legs, h2 streams as exchanges, the failures, and the server-speaks-first wait.

Real TLS between the proxy's TLS layer and an C{ssl.SSLObject} client over memory, real h2
on both legs (the h2 library as the client and as the origin), on a fake clock with a fake
dialer: every timer is a clock step, nothing touches a socket.
"""

from __future__ import annotations

import ssl

import h2.config
import h2.connection
import h2.events
import pytest
from twisted.internet import defer

from gateway.h2.connection import H2ClientProtocol
from gateway.proxy.client import ESTABLISHED
from gateway.proxy.connector import OriginConnector
from gateway.proxy.dial import DialError
from gateway.proxy.interception import SERVER_FIRST_WAIT
from gateway.proxy.origin import OriginConnection
from gateway.proxy.tunnel import TunnelOrigin
from gateway.tls.layer import AwaitHandshake
from tests.support.wire import connectClient, head, runtime

HEADER_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
TARGET = b"o.test:443"


@pytest.fixture(scope="module")
def caDir(tmp_path_factory):
    return tmp_path_factory.mktemp("interception-ca")


@pytest.fixture
def mitm(caDir):
    """A runtime that intercepts everything, with the real connector and a fake dialer."""

    def make(extra: str = ""):
        rt = runtime(
            f"[mitm]\nenabled = on\nca_cert = {caDir}/ca.pem\nca_key = {caDir}/ca.key\n{extra}"
        )
        rt.connector = OriginConnector(rt)
        offers = rt.offers = []
        originTLS = rt.interceptor.originTLS

        def recordOffer(host, alpn=("http/1.1",)):
            offers.append(alpn)
            return originTLS(host, alpn)

        rt.interceptor.originTLS = recordOffer
        rt.caFile = caDir / "ca.pem"
        return rt

    return make


class TLSClient:
    """A TLS client over memory BIOs trusting the proxy's CA, offering C{alpn}."""

    def __init__(self, caFile, alpn, name: str = "o.test") -> None:
        ctx = ssl.create_default_context(cafile=str(caFile))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        self.done = False

    def step(self, data: bytes = b"") -> bytes:
        """Feed what the proxy sent; the handshake bytes to send back."""
        if data:
            self.incoming.write(data)
        if not self.done:
            try:
                self.tls.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass
        return self.outgoing.read()

    def send(self, plain: bytes) -> bytes:
        self.tls.write(plain)
        return self.outgoing.read()

    def read(self, data: bytes) -> bytes:
        self.incoming.write(data)
        out = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return out
            if not chunk:
                return out
            out += chunk

    @property
    def alpn(self) -> str | None:
        return self.tls.selected_alpn_protocol()


def connect(rt, alpn=("h2", "http/1.1")):
    """A client through CONNECT to o.test:443, its ClientHello not sent yet."""
    client, down = connectClient(rt)
    client.dataReceived(b"CONNECT o.test:443 HTTP/1.1\r\nHost: o.test:443\r\n\r\n")
    assert down.take() == ESTABLISHED
    return client, down, TLSClient(rt.caFile, list(alpn) if alpn else None)


def finishHandshake(client, down, tls) -> None:
    """Move handshake bytes both ways until the client's handshake is done."""
    for _ in range(10):
        out = tls.step(down.take())
        if out:
            client.dataReceived(out)
        if tls.done and not down.value():
            return
    raise AssertionError("the handshake did not complete")


def originHandshake(rt, protocol: bytes | None):
    """The pending origin dial connects and its TLS handshake agrees to C{protocol}."""
    _host, _port, waiting, _d = rt.dialer.calls[0]
    assert isinstance(waiting, AwaitHandshake)
    transport = rt.dialer.succeed("192.0.2.9")
    transport.negotiatedProtocol = protocol  # as a TLS layer says once handshaken
    transport.wrappedProtocol = waiting
    waiting.handshakeCompleted()
    return transport


class H2Origin:
    """The h2 library as the origin, on the transport the proxy dialled."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.events: list = []

    def pump(self) -> None:
        for _ in range(10):
            data = self.transport.take()
            if data:
                self.events += self.conn.receive_data(data)
            out = self.conn.data_to_send()
            if out:
                self.transport.protocol.dataReceived(out)
            if not data and not out:
                return

    def requests(self) -> list:
        return [e for e in self.events if isinstance(e, h2.events.RequestReceived)]


class H2Client:
    """The h2 library as the client, over the client's TLS to the proxy."""

    def __init__(self, client, down, tls) -> None:
        from tests.support.h2origin import GracefulH2Connection  # drains on GOAWAY

        self.client, self.down, self.tls = client, down, tls
        self.conn = GracefulH2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.events: list = []

    def pump(self) -> None:
        for _ in range(10):
            plain = self.tls.read(self.down.take())
            if plain:
                self.events += self.conn.receive_data(plain)
            out = self.conn.data_to_send()
            if out:
                self.client.dataReceived(self.tls.send(out))
            if not plain and not out:
                return

    def get(self, path: bytes, fields=()) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"o.test"),
             (b":path", path), *fields],
            end_stream=True,
        )  # fmt: skip
        return sid

    def of(self, kind, sid: int | None = None) -> list:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)
        ]


# -- HTTP/2 on both legs ------------------------------------------------------------------------


def test_anH2ClientMeetsAnH2OriginOnBothLegs(mitm) -> None:
    rt = mitm()
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())  # the ClientHello
    assert down.value() == b"", "not answered before the origin chose"
    assert rt.offers == [("h2", "http/1.1")], "the client's own offer, mirrored"
    originTransport = originHandshake(rt, b"h2")
    finishHandshake(client, down, tls)
    assert tls.alpn == "h2"
    (tunnel,) = rt.accessLog.records
    assert (tunnel.method, tunnel.action, tunnel.hierarchy) == (
        "CONNECT",
        "TCP_TUNNEL",
        "HIER_DIRECT/192.0.2.9",
    )
    assert rt.metrics.live.tunnelsTotal == {"intercepted": 1}

    origin = H2Origin(originTransport)
    h2c = H2Client(client, down, tls)
    sid = h2c.get(b"/x?q=1", [(b"user-agent", b"t")])
    h2c.pump()
    origin.pump()
    (request,) = origin.requests()
    fields = dict(request.headers)
    assert fields[b":authority"] == b"o.test" and fields[b":path"] == b"/x?q=1"
    assert fields[b"via"] == b"2 proxygate"
    assert rt.dialer.calls == [], "the pre-dialled connection carried it"
    origin.conn.send_headers(request.stream_id, [(b":status", b"200")])
    origin.conn.send_data(request.stream_id, b"hello")
    origin.conn.send_headers(request.stream_id, [(b"x-t", b"1")], end_stream=True)
    origin.pump()
    h2c.pump()
    (response,) = h2c.of(h2.events.ResponseReceived, sid)
    assert dict(response.headers)[b"via"] == b"2 proxygate"
    assert b"".join(e.data for e in h2c.of(h2.events.DataReceived, sid)) == b"hello"
    (trailers,) = h2c.of(h2.events.TrailersReceived, sid)
    assert trailers.headers == [(b"x-t", b"1")]
    record = rt.accessLog.records[-1]
    assert (record.method, record.url, record.code, record.mode, record.version) == (
        "GET",
        "https://o.test/x",
        200,
        "mitm",
        "HTTP/2",
    )
    assert rt.metrics.live.requests == {("mitm", b"GET", 200): 1, ("forward", b"CONNECT", 200): 1}
    assert list(rt.metrics.live.apis) == [("o.test", "/x")]


def test_anHTTP11OriginMakesBothLegsHTTP11(mitm) -> None:
    """The origin chose http/1.1: so does the client; the pre-dialled connection serves it."""
    rt = mitm()
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    originTransport = originHandshake(rt, b"http/1.1")
    finishHandshake(client, down, tls)
    assert tls.alpn == "http/1.1"
    client.dataReceived(tls.send(b"GET /y HTTP/1.1\r\nHost: o.test\r\n\r\n"))
    assert originTransport.take().startswith(b"GET /y HTTP/1.1\r\nHost: o.test\r\n")
    assert rt.dialer.calls == []
    originTransport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    status, _fields, body = head(tls.read(down.take()))
    assert (status, body) == (b"HTTP/1.1 200 OK", b"ok")


@pytest.mark.parametrize(
    "extra, alpn",
    [
        ("http2 = off\n", ("h2", "http/1.1")),  # off: never mirrored
        ("", ("http/1.1",)),  # nothing to mirror
        ("", None),  # no ALPN at all
    ],
)
def test_noH2OfferMeansNoPreDial(mitm, extra, alpn) -> None:
    """HTTP/1.1 as before: the handshake is answered at once, the origin dialled per request."""
    rt = mitm(extra)
    client, down, tls = connect(rt, alpn)
    client.dataReceived(tls.step())
    assert down.value() != b"", "answered at once"
    assert rt.dialer.calls == []
    finishHandshake(client, down, tls)
    assert tls.alpn in (None, "http/1.1")
    client.dataReceived(tls.send(b"GET / HTTP/1.1\r\nHost: o.test\r\n\r\n"))
    assert len(rt.dialer.calls) == 1 and rt.offers == [("http/1.1",)]


def test_theHelloIsReadWholeBeforeAnything(mitm) -> None:
    rt = mitm()
    client, down, tls = connect(rt)
    hello = tls.step()
    for i in range(0, len(hello) - 1, 100):
        client.dataReceived(hello[i : min(i + 100, len(hello) - 1)])
        assert rt.dialer.calls == [] and down.value() == b""
    client.dataReceived(hello[-1:])
    assert len(rt.dialer.calls) == 1


def test_streamsShareThePreDialledConnection(mitm) -> None:
    """Twenty streams at once: one origin connection, twenty streams on it."""
    rt = mitm()
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    origin = H2Origin(originHandshake(rt, b"h2"))
    finishHandshake(client, down, tls)
    h2c = H2Client(client, down, tls)
    sids = [h2c.get(b"/%d" % i) for i in range(20)]
    h2c.pump()
    origin.pump()
    assert len(origin.requests()) == 20 and rt.dialer.calls == []
    for request in origin.requests():
        origin.conn.send_headers(request.stream_id, [(b":status", b"204")], end_stream=True)
    origin.pump()
    h2c.pump()
    assert {e.stream_id for e in h2c.of(h2.events.StreamEnded)} == set(sids)
    assert len([r for r in rt.accessLog.records if r.mode == "mitm"]) == 20


# -- failures -------------------------------------------------------------------------------------


def test_aFailedPreDialAnswersTheFirstRequestWithWhy(mitm) -> None:
    rt = mitm()
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    _host, _port, _waiting, d = rt.dialer.calls.pop()
    d.errback(DialError("refused", 502, "connection to o.test:443 refused"))
    finishHandshake(client, down, tls)
    assert tls.alpn == "http/1.1", "the client still gets its handshake, on HTTP/1.1"
    client.dataReceived(tls.send(b"GET / HTTP/1.1\r\nHost: o.test\r\n\r\n"))
    status, fields, body = head(tls.read(down.take()))
    assert status.startswith(b"HTTP/1.1 502") and b"refused" in body
    assert fields[b"proxy-status"] == b"proxygate; error=connection_refused"
    assert rt.dialer.calls == [], "answered with the pre-dial's failure, not dialled again"
    client.dataReceived(tls.send(b"GET /2 HTTP/1.1\r\nHost: o.test\r\n\r\n"))
    assert len(rt.dialer.calls) == 1, "the next request dials"
    assert rt.metrics.upstreamErrors.labels("refused")._value.get() == 1


def test_aPreDialWhoseHandshakeStallsIsA504(mitm) -> None:
    rt = mitm()
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    origin = rt.dialer.succeed()
    rt.reactor.advance(CONNECT_TIMEOUT)
    assert origin.aborted
    finishHandshake(client, down, tls)
    client.dataReceived(tls.send(b"GET / HTTP/1.1\r\nHost: o.test\r\n\r\n"))
    status, _fields, body = head(tls.read(down.take()))
    assert status.startswith(b"HTTP/1.1 504") and b"TLS handshake" in body


def test_aPreDialFailingTLSSaysWhy(mitm) -> None:
    from twisted.python.failure import Failure

    rt = mitm()
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    _host, _port, waiting, _d = rt.dialer.calls[0]
    rt.dialer.succeed()
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code, error.verify_message = 20, "unable to get local issuer certificate"
    waiting.connectionLost(Failure(error))
    finishHandshake(client, down, tls)
    client.dataReceived(tls.send(b"GET / HTTP/1.1\r\nHost: o.test\r\n\r\n"))
    status, _fields, body = head(tls.read(down.take()))
    assert status.startswith(b"HTTP/1.1 502")
    assert b"TLS to the origin o.test failed: certificate verify failed" in body


def test_theClientLeavingDuringThePreDialClosesWhatComes(mitm) -> None:
    rt = mitm()
    client, _down, tls = connect(rt)
    client.dataReceived(tls.step())
    client.connectionLost(None)
    assert rt.metrics.live.tunnelsTotal == {"client_gone": 1}
    origin = originHandshake(rt, b"h2")
    assert origin.disconnecting and rt.h2pool is None


def test_aMalformedHelloIsLeftToOpenSSL(mitm) -> None:
    """Not a hello proxygate can read: decrypted anyway, and OpenSSL's alert ends it."""
    rt = mitm()
    client, down, _tls = connect(rt)
    client.dataReceived(b"\x16\x03\x01\x00\x06\x02\x00\x00\x02\x00\x00")  # a ServerHello
    assert rt.dialer.calls == []
    assert down.value()[:1] == b"\x15", "a TLS alert"
    client.connectionLost(None)
    assert rt.metrics.live.tunnelsTotal == {"client_tls_error": 1}


# -- the h2 client leg ---------------------------------------------------------------------------


def h2Tunnel(rt):
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    origin = H2Origin(originHandshake(rt, b"h2"))
    finishHandshake(client, down, tls)
    return H2Client(client, down, tls), origin


def test_maxForwardsIsAnsweredAtTheProxy(mitm) -> None:
    rt = mitm()
    h2c, origin = h2Tunnel(rt)
    sid = h2c.conn.get_next_available_stream_id()
    h2c.conn.send_headers(
        sid,
        [(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":authority", b"o.test"),
         (b":path", b"*"), (b"max-forwards", b"0")],
        end_stream=True,
    )  # fmt: skip
    trace = sid + 2
    h2c.conn.send_headers(
        trace,
        [(b":method", b"TRACE"), (b":scheme", b"https"), (b":authority", b"o.test"),
         (b":path", b"/"), (b"max-forwards", b"1")],
        end_stream=True,
    )  # fmt: skip
    h2c.pump()
    origin.pump()
    assert [dict(r.headers)[b":status"] for r in h2c.of(h2.events.ResponseReceived)] == [b"200"]
    (forwarded,) = origin.requests()
    assert dict(forwarded.headers)[b"max-forwards"] == b"0"
    local = [r for r in rt.accessLog.records if r.mode == "local"]
    assert [(r.method, r.code) for r in local] == [("OPTIONS", 200)]


def test_refusedStreamsAreLoggedWithTheirMethod(mitm) -> None:
    rt = mitm()
    h2c, _origin = h2Tunnel(rt)
    h2c.conn.send_headers(
        1, [(b":method", b"CONNECT"), (b":authority", b"elsewhere.test:443")], end_stream=False
    )
    h2c.pump()
    (response,) = h2c.of(h2.events.ResponseReceived)
    fields = dict(response.headers)
    assert fields[b":status"] == b"501"
    assert fields[b"proxy-status"] == b"proxygate; error=http_request_error"
    record = rt.accessLog.records[-1]
    assert (record.method, record.code, record.mode, record.reason) == (
        "CONNECT",
        501,
        "local",
        "not_implemented",
    )


def test_aGRPCCallThroughTheTunnelCountsItsMethodAndStatus(mitm) -> None:
    rt = mitm()
    h2c, origin = h2Tunnel(rt)
    sid = h2c.conn.get_next_available_stream_id()
    h2c.conn.send_headers(
        sid,
        [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"o.test"),
         (b":path", b"/pkg.v1.Things/Get"), (b"content-type", b"application/grpc"),
         (b"te", b"trailers")],
    )  # fmt: skip
    h2c.conn.send_data(sid, b"\x00\x00\x00\x00\x01x", end_stream=True)
    h2c.pump()
    origin.pump()
    (request,) = origin.requests()
    assert (b"te", b"trailers") in request.headers
    origin.conn.send_headers(
        request.stream_id,
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"5")],
        end_stream=True,
    )
    origin.pump()
    h2c.pump()
    figures = rt.metrics.live.apis[("o.test", "/pkg.v1.Things/Get")]
    assert figures.grpc == {"5": 1} and figures.codes == {(b"POST", 200): 1}
    assert figures.requestBytes == 6


def test_anOriginRefusingAStreamIsRetriedOnAFreshConnection(mitm) -> None:
    rt = mitm()
    h2c, origin = h2Tunnel(rt)
    sid = h2c.get(b"/again")
    h2c.pump()
    origin.pump()
    (request,) = origin.requests()
    origin.conn.reset_stream(request.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
    origin.pump()
    assert len(rt.dialer.calls) == 1, "a fresh connection for the retry"
    second = H2Origin(originHandshake(rt, b"h2"))
    second.pump()
    (retried,) = second.requests()
    second.conn.send_headers(retried.stream_id, [(b":status", b"204")], end_stream=True)
    second.pump()
    h2c.pump()
    assert dict(h2c.of(h2.events.ResponseReceived, sid)[0].headers)[b":status"] == b"204"


def test_aResetStreamLeavesTheOthers(mitm) -> None:
    rt = mitm()
    h2c, origin = h2Tunnel(rt)
    first, second = h2c.get(b"/1"), h2c.get(b"/2")
    h2c.pump()
    origin.pump()
    h2c.conn.reset_stream(first, h2.errors.ErrorCodes.CANCEL)
    h2c.pump()
    rt.reactor.advance(0)  # the origin leg's frames go at the end of this reactor turn
    origin.pump()
    r1, r2 = origin.requests()
    assert [e.stream_id for e in origin.events if isinstance(e, h2.events.StreamReset)] == [
        r1.stream_id
    ]
    origin.conn.send_headers(r2.stream_id, [(b":status", b"204")], end_stream=True)
    origin.pump()
    h2c.pump()
    assert [e.stream_id for e in h2c.of(h2.events.ResponseReceived)] == [second]
    assert [r.reason for r in rt.accessLog.records if r.mode == "mitm"] == ["client_gone", None]


# -- the connector's HTTP/2 side ----------------------------------------------------------------


class Down:
    """A downstream side that takes what it is given."""

    client = "127.0.0.1"

    def __init__(self) -> None:
        self.producer = self
        self.heads: list = []

    def sendHead(self, response) -> None:
        self.heads.append(response.status)

    def sendData(self, data: bytes) -> None:
        pass

    def end(self, trailers=None) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    pauseProducing = resumeProducing = pause

    def throttle(self, other) -> None:
        pass

    def flush(self) -> None:
        pass


def exchangeFor(rt, version: bytes, path: bytes = b"/", upgrade=None):
    from gateway.exchange.exchange import Exchange
    from gateway.message import NO_BODY, Request

    request = Request(
        b"GET", "https", "o.test", 443, b"o.test", path, version, [], NO_BODY, upgrade
    )
    exchange = Exchange(rt, Down(), request, mode="mitm")
    exchange.begin()
    return exchange


def test_h2RequestsWaitForOneDialAndShareIt(mitm) -> None:
    rt = mitm()
    first = exchangeFor(rt, b"HTTP/2", b"/1")
    second = exchangeFor(rt, b"HTTP/2", b"/2")
    assert len(rt.dialer.calls) == 1 and rt.offers == [("h2", "http/1.1")]
    H2Origin(originHandshake(rt, b"h2"))
    assert first.upstream.connection is second.upstream.connection
    assert isinstance(first.upstream.connection, H2ClientProtocol)


def test_h2RequestsToAnHTTP11OriginGetConnectionsOfTheirOwn(mitm) -> None:
    rt = mitm()
    first = exchangeFor(rt, b"HTTP/2", b"/1")
    second = exchangeFor(rt, b"HTTP/2", b"/2")
    originHandshake(rt, b"http/1.1")
    assert isinstance(first.upstream, OriginConnection)
    assert second.upstream is None and len(rt.dialer.calls) == 1, "dialled on its own"
    assert rt.offers[-1] == ("http/1.1",)


def test_anHTTP11RequestTakesAPooledH2Connection(mitm) -> None:
    """The reverse translation: an HTTP/1.1 client's request as a stream; not an upgrade."""
    rt = mitm()
    exchangeFor(rt, b"HTTP/2")
    originHandshake(rt, b"h2")
    plain = exchangeFor(rt, b"HTTP/1.1")
    assert isinstance(plain.upstream.connection, H2ClientProtocol)
    upgrade = exchangeFor(rt, b"HTTP/1.1", upgrade=b"websocket")
    assert upgrade.upstream is None and len(rt.dialer.calls) == 1


def test_aFailedH2DialFailsEveryWaiter(mitm) -> None:
    rt = mitm()
    waiting = [exchangeFor(rt, b"HTTP/2", b"/%d" % i) for i in range(3)]
    _host, _port, _protocol, d = rt.dialer.calls.pop()
    d.errback(DialError("dns", 502, "cannot resolve host 'o.test'"))
    assert [e.code for e in waiting] == [502, 502, 502]


# -- a server that speaks first ---------------------------------------------------------------


def rawOrigin(rt):
    """The raw dial of the server-first wait connects."""
    _host, _port, protocol, _d = rt.dialer.calls[0]
    assert isinstance(protocol, TunnelOrigin)
    return rt.dialer.succeed("192.0.2.21")


def test_aServerThatSpeaksFirstIsRelayedBlind(mitm) -> None:
    rt = mitm()
    client, down, _tls = connect(rt)
    rt.reactor.advance(SERVER_FIRST_WAIT - 0.01)
    assert rt.dialer.calls == []
    rt.reactor.advance(0.01)
    origin = rawOrigin(rt)
    origin.protocol.dataReceived(b"220 ftp.example ready\r\n")
    assert down.take() == b"220 ftp.example ready\r\n"
    client.dataReceived(b"USER anonymous\r\n")
    assert origin.take() == b"USER anonymous\r\n"
    origin.protocol.connectionLost(None)
    client.connectionLost(None)
    assert rt.metrics.live.tunnelsTotal == {"ok": 1}
    assert rt.accessLog.records[-1].hierarchy == "HIER_DIRECT/192.0.2.21"


def test_aLateClientHelloIsStillIntercepted(mitm) -> None:
    """The client spoke TLS after the wait, before the server said anything: intercepted."""
    rt = mitm()
    client, down, tls = connect(rt, ("http/1.1",))
    rt.reactor.advance(SERVER_FIRST_WAIT)
    origin = rawOrigin(rt)
    client.dataReceived(tls.step())
    assert origin.disconnecting, "the raw connection is closed unused"
    finishHandshake(client, down, tls)
    assert rt.metrics.live.tunnelsTotal == {"intercepted": 1}


def test_aClientHelloWhileTheRawDialIsUnderWay(mitm) -> None:
    rt = mitm()
    client, down, tls = connect(rt, ("http/1.1",))
    rt.reactor.advance(SERVER_FIRST_WAIT)
    client.dataReceived(tls.step())
    origin = rawOrigin(rt)
    assert origin.disconnecting
    finishHandshake(client, down, tls)


def test_aLatePlainClientUsesTheRawConnection(mitm) -> None:
    rt = mitm()
    client, down, _tls = connect(rt)
    rt.reactor.advance(SERVER_FIRST_WAIT)
    origin = rawOrigin(rt)
    client.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert origin.take() == b"SSH-2.0-OpenSSH_9.6\r\n" and rt.dialer.calls == []
    origin.protocol.dataReceived(b"SSH-2.0-srv\r\n")
    assert down.take() == b"SSH-2.0-srv\r\n"


def test_aPlainClientWhileTheRawDialIsUnderWayWaitsForIt(mitm) -> None:
    rt = mitm()
    client, _down, _tls = connect(rt)
    rt.reactor.advance(SERVER_FIRST_WAIT)
    client.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    origin = rawOrigin(rt)
    assert origin.take() == b"GET / HTTP/1.1\r\n\r\n"
    assert rt.dialer.calls == []


def test_aServerSpeakingAfterTheClientBeganAHelloIsIgnored(mitm) -> None:
    rt = mitm()
    client, down, tls = connect(rt, ("http/1.1",))
    rt.reactor.advance(SERVER_FIRST_WAIT)
    origin = rawOrigin(rt)
    hello = tls.step()
    client.dataReceived(hello[:10])
    origin.protocol.dataReceived(b"220 hello\r\n")
    assert origin.disconnecting and down.value() == b""
    client.dataReceived(hello[10:])
    finishHandshake(client, down, tls)


def test_silenceOnBothSidesEndsAtHeaderTimeout(mitm) -> None:
    rt = mitm()
    client, down, _tls = connect(rt)
    rt.reactor.advance(SERVER_FIRST_WAIT)
    origin = rawOrigin(rt)
    rt.reactor.advance(HEADER_TIMEOUT - SERVER_FIRST_WAIT - 0.1)
    assert not down.disconnecting
    rt.reactor.advance(0.1)
    assert down.aborted and origin.disconnecting
    client.connectionLost(None)
    assert rt.metrics.live.tunnelsTotal == {"header_timeout": 1}
    assert rt.accessLog.records[-1].reason == "header_timeout"


def test_aRawDialThatFailsLeavesTheTunnelWaiting(mitm) -> None:
    rt = mitm()
    client, down, tls = connect(rt, ("http/1.1",))
    rt.reactor.advance(SERVER_FIRST_WAIT)
    _host, _port, _protocol, d = rt.dialer.calls.pop()
    d.errback(DialError("refused", 502, "connection to o.test:443 refused"))
    assert not down.disconnecting
    client.dataReceived(tls.step())
    finishHandshake(client, down, tls)


def test_thePreDialDeferredIsNotLeftPending(mitm) -> None:
    """A pre-dial whose TCP connect fails ends the tunnel's wait at once (no timer left)."""
    rt = mitm()
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    _host, _port, _protocol, d = rt.dialer.calls.pop()
    d.errback(defer.TimeoutError())
    assert rt.reactor.getDelayedCalls() == [] or all(
        c.getTime() > rt.reactor.seconds() + 100 for c in rt.reactor.getDelayedCalls()
    )
    finishHandshake(client, down, tls)


def test_aPooledH2OriginConnectionSparesThePreDial(mitm) -> None:
    """A second tunnel to an origin whose h2 connection takes more streams: h2, no dial."""
    rt = mitm()
    h2Tunnel(rt)
    client, down, tls = connect(rt)
    client.dataReceived(tls.step())
    assert rt.dialer.calls == [] and down.value() != b"", "answered at once"
    finishHandshake(client, down, tls)
    assert tls.alpn == "h2"


def test_anH2ClientRefusingTheCAIsAClientTLSError(mitm, tmp_path) -> None:
    """The h2 leg reports a refused certificate as the HTTP/1.1 one does (issue 19, 4)."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from gateway.tls.ca import createCA

    rt = mitm()
    strange = tmp_path / "other-ca.pem"
    strange.write_bytes(createCA("someone else's CA").pem())
    client, down = connectClient(rt)
    client.dataReceived(b"CONNECT o.test:443 HTTP/1.1\r\nHost: o.test:443\r\n\r\n")
    down.take()
    tls = TLSClient(strange, ["h2", "http/1.1"])
    client.dataReceived(tls.step())
    originHandshake(rt, b"h2")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls.step(down.take())
    client.dataReceived(tls.outgoing.read())  # its alert
    client.connectionLost(Failure(ConnectionDone()))
    assert rt.metrics.live.tunnelsTotal == {"client_tls_error": 1}
    record = rt.accessLog.records[-1]
    assert record.reason == "client_tls" and "unknown ca" in record.detail


def test_aDrainSaysGoawayToH2Clients(mitm) -> None:
    """Shutdown drains an h2 tunnel as HTTP/2 does: GOAWAY, its open stream finishes."""
    rt = mitm()
    h2c, origin = h2Tunnel(rt)
    sid = h2c.get(b"/last")
    h2c.pump()
    origin.pump()
    h2c.client.drain()
    h2c.pump()
    (goaway,) = h2c.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    (request,) = origin.requests()
    origin.conn.send_headers(request.stream_id, [(b":status", b"204")], end_stream=True)
    origin.pump()
    h2c.pump()
    assert h2c.of(h2.events.StreamEnded, sid), "the open stream still got its answer"
    tls = h2c.client.nestedConnection.transport
    assert tls.disconnecting, "then the connection closes (close_notify sent)"
