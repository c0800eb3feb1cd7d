"""
The HTTP/1.1 sides in process: ClientConnection, OriginConnection, the pool, the CONNECT
path and the splice, over in-memory transports on a fake clock (tests/wire.py). Header and
timeout cases run in milliseconds; the end-to-end files keep what needs real clients.
"""

from __future__ import annotations

import pytest

from gateway.proxy.client import ESTABLISHED
from tests.support.wire import FakeDialer, connectClient, get, head, runtime

HEADER_TIMEOUT = 30.0  # the defaults: the clock is fake
IDLE_TIMEOUT = 300.0


# --- forwarding -------------------------------------------------------------------------


def test_aGetIsForwardedInOriginFormAndItsResponseComesBack() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get(b"http://o.test/x?q=1", b"Accept: */*", b"Connection: keep-alive"))
    origin, up = rt.connector.connect()
    assert up.take() == (
        b"GET /x?q=1 HTTP/1.1\r\nHost: o.test\r\nAccept: */*\r\nVia: 1.1 proxygate\r\n\r\n"
    )
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: x\r\n\r\nok")
    status, fields, body = head(down.take())
    assert status == b"HTTP/1.1 200 OK"
    assert fields[b"content-length"] == b"2" and b"keep-alive" not in fields
    assert fields[b"via"] == b"1.1 proxygate" and b"date" in fields
    assert body == b"ok"
    assert not down.disconnecting
    assert rt.pool.get(("http", "o.test", 80)) is origin, "kept for the next request"


def test_pipelinedRequestsAreAnsweredInOrderOnOnePooledOrigin() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get(b"http://o.test/1") + get(b"http://o.test/2"))
    origin, up = rt.connector.connect()
    assert up.take().startswith(b"GET /1 ")
    assert rt.connector.waiting == [], "the second waits for the first's answer"
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    # the second request took the pooled connection at once
    assert up.take().startswith(b"GET /2 ")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
    answers = down.take()
    assert answers.count(b"HTTP/1.1 200 OK") == 2 and answers.endswith(b"b")


@pytest.mark.parametrize(
    "version, expected",
    [
        (b"HTTP/1.1", b"5\r\nhello\r\n0\r\n\r\n"),  # re-chunked
        (b"HTTP/1.0", b"hello"),  # close-delimited
    ],
)
def test_aChunkedResponseIsFramedForTheClient(version, expected) -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get().replace(b"HTTP/1.1", version, 1))
    origin, _up = rt.connector.connect()
    origin.dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    _status, fields, body = head(down.take())
    assert body == expected
    assert (b"transfer-encoding" in fields) == (version == b"HTTP/1.1")
    assert down.disconnecting == (version == b"HTTP/1.0")


def test_aChunkedRequestBodyIsReChunkedUpstream() -> None:
    rt = runtime()
    client, _down = connectClient(rt)
    client.dataReceived(
        get(b"http://o.test/u", b"Transfer-Encoding: chunked", method=b"POST") + b"3\r\nabc\r\n"
    )
    _origin, up = rt.connector.connect()
    client.dataReceived(b"0\r\n\r\n")
    sent = up.take()
    assert b"Transfer-Encoding: chunked\r\n" in sent
    assert sent.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


def test_informationalResponsesReachHTTP11ClientsOnly() -> None:
    for version, sees in ((b"HTTP/1.1", True), (b"HTTP/1.0", False)):
        rt = runtime()
        client, down = connectClient(rt)
        client.dataReceived(get().replace(b"HTTP/1.1", version, 1))
        origin, _up = rt.connector.connect()
        origin.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n")
        assert (down.value().startswith(b"HTTP/1.1 103 Early Hints\r\n")) == sees


def test_extraBytesAfterAResponseKeepTheOriginOutOfThePool() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get())
    origin, up = rt.connector.connect()
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\n")
    assert head(down.take())[2] == b"a"
    assert rt.pool.get(("http", "o.test", 80)) is None
    assert up.disconnecting


def test_bytesOnAnIdlePooledOriginCloseIt() -> None:
    rt = runtime()
    client, _down = connectClient(rt)
    client.dataReceived(get())
    origin, up = rt.connector.connect()
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\n")  # answers no request
    assert up.aborted


@pytest.mark.parametrize(
    "reply, why",
    [
        (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", b"bare LF"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000, b"too large"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", b"Content-Length"),
    ],
)
def test_aBrokenResponseHeadIs502(reply, why) -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get())
    origin, up = rt.connector.connect()
    origin.dataReceived(reply)
    status, fields, body = head(down.take())
    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert fields[b"proxy-status"] == b"proxygate; error=http_protocol_error"
    assert why in body
    assert up.aborted


def test_aCloseDelimitedBodyEndsWhenTheOriginCloses() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get())
    origin, _up = rt.connector.connect()
    origin.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    origin.connectionLost(None)
    assert down.take().endswith(b"4\r\nsome\r\n0\r\n\r\n")
    assert not down.disconnecting, "the client's connection lives on"


def test_anUpgradeBecomesABlindPipeBothWays() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get(b"http://o.test/ws", b"Connection: Upgrade", b"Upgrade: websocket"))
    origin, up = rt.connector.connect()
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in up.take()
    origin.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi"
    )
    status, _fields, rest = head(down.take())
    assert status == b"HTTP/1.1 101 Switching Protocols" and rest == b"hi"
    client.dataReceived(b"\x81\x00")
    assert up.take() == b"\x81\x00"
    origin.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # no HTTP meaning any more
    assert down.take() == b"GET / HTTP/1.1\r\n\r\n"


# --- the proxy's own answers ------------------------------------------------------------


def test_aHeadOverTheLimitIs431AndCloses() -> None:
    rt = runtime("max_header_size = 1024\n")
    client, down = connectClient(rt)
    client.dataReceived(get(b"http://o.test/", b"X-Big: " + b"a" * 2000))
    status, fields, _body = head(down.value())
    assert status.startswith(b"HTTP/1.1 431 ")
    assert fields[b"proxy-status"] == b"proxygate; error=http_request_error"
    assert down.disconnecting
    assert rt.metrics.denied.labels("limit")._value.get() == 1


def test_refusalsAllSayWhyInProxyStatus() -> None:
    rt = runtime("allow_destinations = allowed.test\n")
    client, down = connectClient(rt)
    client.dataReceived(get(b"http://denied.test/"))
    status, fields, body = head(down.take())
    assert status.startswith(b"HTTP/1.1 403 ")
    assert fields[b"proxy-status"] == b"proxygate; error=http_request_denied"
    assert b"Destination denied" in body
    (record,) = rt.accessLog.records
    assert (record.reason, record.size, record.mode) == ("destination", len(body), "local")


def test_anOriginFormRequestIsToldThisIsAProxy() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
    status, _fields, body = head(down.take())
    assert status.startswith(b"HTTP/1.1 400 ") and b"forward proxy" in body
    assert not down.disconnecting, "no body to skip: the connection lives on"


@pytest.mark.parametrize("method, status", [(b"OPTIONS", b"200"), (b"TRACE", b"405")])
def test_maxForwardsZeroIsAnsweredHere(method, status) -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get(b"http://o.test/", b"Max-Forwards: 0", method=method))
    assert head(down.take())[0].split(b" ")[1] == status
    assert rt.connector.waiting == []


def test_maxForwardsIsDecrementedOnTheWay() -> None:
    rt = runtime()
    client, _down = connectClient(rt)
    client.dataReceived(get(b"http://o.test/", b"Max-Forwards: 5", method=b"OPTIONS"))
    _origin, up = rt.connector.connect()
    assert b"Max-Forwards: 4\r\n" in up.take()


class _Authenticator:
    def __init__(self, user) -> None:
        self.user = user

    def authenticate(self, value):
        from twisted.internet.defer import succeed

        return succeed(self.user if value == b"Basic good" else None)

    def challenge(self) -> bytes:
        return b'Basic realm="proxygate"'


def test_missingCredentialsGet407WithProxyStatus() -> None:
    rt = runtime(authenticator=_Authenticator("alice"))
    client, down = connectClient(rt)
    client.dataReceived(get())
    status, fields, _body = head(down.take())
    assert status.startswith(b"HTTP/1.1 407 ")
    assert fields[b"proxy-authenticate"] == b'Basic realm="proxygate"'
    assert fields[b"proxy-status"] == b"proxygate; error=http_request_denied"
    client.dataReceived(get(b"http://o.test/", b"Proxy-Authorization: Basic good"))
    _origin, up = rt.connector.connect()
    assert b"Proxy-Authorization" not in up.take(), "never forwarded"


def test_aDestinationDenialLogsTheAuthenticatedUser() -> None:
    rt = runtime("allow_destinations = allowed.test\n", authenticator=_Authenticator("alice"))
    client, _down = connectClient(rt)
    client.dataReceived(get(b"http://denied.test/", b"Proxy-Authorization: Basic good"))
    (record,) = rt.accessLog.records
    assert (record.code, record.user) == (403, "alice")


# --- timeouts, on the fake clock -----------------------------------------------------------


def test_aSilentConnectionIsClosedWithout408() -> None:
    rt = runtime()
    _client, down = connectClient(rt)
    rt.reactor.advance(HEADER_TIMEOUT)
    assert down.value() == b"" and down.disconnecting
    (record,) = rt.accessLog.records
    assert record.reason == "idle"


def test_aSlowHeadGets408() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(b"GET http://o.test/ HTTP/1.1\r\n")
    rt.reactor.advance(HEADER_TIMEOUT - 1)
    assert not down.disconnecting
    rt.reactor.advance(1)
    assert down.value().startswith(b"HTTP/1.1 408 ") and down.disconnecting


def test_emptyLinesDoNotRestartTheHeaderClock() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    for _ in range(29):
        client.dataReceived(b"\r\n")
        rt.reactor.advance(1)
    rt.reactor.advance(1)
    assert down.disconnecting


def test_anOriginThatNeverAnswersGets504AfterTheIdleTimeout() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get())
    _origin, up = rt.connector.connect()
    rt.reactor.advance(IDLE_TIMEOUT)
    status, fields, _body = head(down.take())
    assert status.startswith(b"HTTP/1.1 504 ")
    assert fields[b"proxy-status"] == b"proxygate; error=connection_timeout"
    assert up.aborted
    assert rt.metrics.upstreamErrors.labels("timeout")._value.get() == 1


def test_anIdleKeptAliveConnectionIsClosedGracefully() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get())
    origin, _up = rt.connector.connect()
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    rt.reactor.advance(IDLE_TIMEOUT)
    assert down.disconnecting and not down.aborted


def test_aFlowingResponseIsNotIdle() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get())
    origin, _up = rt.connector.connect()
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    for _ in range(4):
        rt.reactor.advance(IDLE_TIMEOUT - 1)
        origin.dataReceived(b"x")
    assert not down.disconnecting
    rt.reactor.advance(IDLE_TIMEOUT)
    assert down.aborted, "a stalled response is cut, never completed"


# --- CONNECT and the splice ----------------------------------------------------------------


def connectRequest(target: bytes = b"o.test:443") -> bytes:
    return b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"


def test_aConnectRelaysEarlyBytesBothWaysAndHalfCloses() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(connectRequest() + b"\x16early")
    assert down.value() == b"", "no 200 before the origin answers"
    up = rt.dialer.succeed()
    assert down.take() == ESTABLISHED
    assert up.take() == b"\x16early"
    client.dataReceived(b"more")
    assert up.take() == b"more"
    up.protocol.dataReceived(b"reply")
    assert down.take() == b"reply"
    client.readConnectionLost()
    assert up.writeClosed, "the client's FIN is passed on"
    assert rt.metrics.live.tunnels == 1


def test_aTunnelsBackpressureCrossesOver() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(connectRequest())
    up = rt.dialer.succeed()
    # each side's transport pauses the *other* side's reading when full
    down.producer.pauseProducing()
    assert up.producerState == "paused"
    down.producer.resumeProducing()
    assert up.producerState == "producing"
    up.producer.pauseProducing()
    assert down.producerState == "paused"


def test_anIdleTunnelIsAbortedAndLogged() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(connectRequest())
    up = rt.dialer.succeed()
    rt.reactor.advance(IDLE_TIMEOUT)
    assert down.disconnecting and up.disconnecting
    rt.reactor.advance(5)
    assert down.aborted and up.aborted, "cut if flushing takes longer than the grace"
    client.connectionLost(None)
    up.protocol.connectionLost(None)
    (record,) = rt.accessLog.records
    assert (record.method, record.code, record.mode) == ("CONNECT", 200, "tunnel")
    assert rt.metrics.live.tunnelsTotal == {"ok": 1}


@pytest.mark.parametrize(
    "target, status, proxyStatus",
    [
        (b"o.test:25", b"403", b"http_request_denied"),
        (b"o.test", b"400", b"http_request_error"),
        (b"169.254.1.1:443", b"403", b"http_request_denied"),
    ],
)
def test_aRefusedConnectSaysWhy(target, status, proxyStatus) -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(connectRequest(target))
    first, fields, _body = head(down.take())
    assert first.split(b" ")[1] == status
    assert fields[b"proxy-status"] == b"proxygate; error=" + proxyStatus
    assert down.disconnecting
    assert rt.dialer.calls == []


def test_aFailedDialIs502WithTheReason() -> None:
    from gateway.proxy.dial import DialError

    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(connectRequest())
    _host, _port, _protocol, d = rt.dialer.calls.pop()
    d.errback(DialError("refused", 502, "connection to o.test:443 refused"))
    first, _fields, body = head(down.take())
    assert first.startswith(b"HTTP/1.1 502 ") and b"refused" in body
    assert rt.metrics.live.tunnelsTotal == {"refused": 1}


class _Interceptor:
    """Intercepts every host; its contexts are never used by these tests."""

    http2 = False

    def intercepts(self, host: str, port: int) -> bool:
        return True

    def permits(self, host: str) -> bool:
        return True

    def serverCreator(self, host: str, protocol: str = "http/1.1"):
        return object()


def test_anInterceptedTunnelCarryingNoTLSIsRelayedBlind() -> None:
    rt = runtime()
    rt.interceptor = _Interceptor()
    client, down = connectClient(rt)
    client.dataReceived(connectRequest(b"o.test:443"))
    assert down.take() == ESTABLISHED, "answered at once: the first byte decides"
    client.dataReceived(b"SSH-2.0-x\r\n")
    up = rt.dialer.succeed()
    assert up.take() == b"SSH-2.0-x\r\n"


def test_anInterceptedTunnelClosedBeforeItsFirstByteIsReleased() -> None:
    """Not left in CLOSE-WAIT until the idle timeout (a max_connections slot each)."""
    rt = runtime()
    rt.interceptor = _Interceptor()
    client, down = connectClient(rt)
    client.dataReceived(connectRequest())
    client.readConnectionLost()
    assert down.disconnecting
    client.connectionLost(None)
    assert rt.metrics.live.tunnelsTotal == {"client_gone": 1}
    assert rt.connections == set()


def test_aConnectInsideAnInterceptedTunnelIsRefused() -> None:
    from gateway.proxy.client import ClientConnection
    from tests.support.wire import Transport

    class Tunnel:
        client, user, host, port, connector = "127.0.0.1", None, "o.test", 443, None

    rt = runtime()
    inner = ClientConnection(rt, Tunnel())
    down = Transport()
    inner.makeConnection(down)
    inner.dataReceived(connectRequest(b"elsewhere.test:443"))
    first, _fields, body = head(down.take())
    assert first.startswith(b"HTTP/1.1 405 ") and b"inspection" in body
    assert rt.dialer.calls == []


def test_aDecryptedRequestOnlyReachesTheTunnelsOrigin() -> None:
    from gateway.proxy.client import ClientConnection
    from tests.support.wire import Transport

    class Tunnel:
        client, user, host, port, connector = "127.0.0.1", None, "o.test", 443, None

    rt = runtime()
    inner = ClientConnection(rt, Tunnel())
    down = Transport()
    inner.makeConnection(down)
    inner.dataReceived(b"GET /a HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
    (request, exchange, _fresh) = rt.connector.waiting[0]
    assert (request.scheme, request.host, request.port, request.path) == (
        "https",
        "o.test",
        443,
        b"/a",
    )
    assert exchange.mode == "mitm"
    inner.dataReceived(b"GET https://elsewhere.test/ HTTP/1.1\r\nHost: x\r\n\r\n")


def test_theDialerFakeIsADialer() -> None:
    """The fake keeps Dialer's signature (what the paths call)."""
    import inspect

    from gateway.proxy.dial import Dialer

    assert list(inspect.signature(Dialer.connect).parameters) == list(
        inspect.signature(FakeDialer.connect).parameters
    )


def test_aLocalAnswerLeavesTheConnectionIdleNotOnTheHeaderClock() -> None:
    """After an answer made in the same read, the idle timeout applies, not a 408."""
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")  # answered 400 at once
    down.take()
    rt.reactor.advance(HEADER_TIMEOUT + 1)
    assert down.value() == b"" and not down.disconnecting
    rt.reactor.advance(IDLE_TIMEOUT)
    assert down.disconnecting and down.value() == b""


def test_aHeadInPiecesIsOnTheHeaderClockFromItsFirstByte() -> None:
    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(get())
    origin, _up = rt.connector.connect()
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    down.take()
    rt.reactor.advance(10)
    client.dataReceived(b"GET http://o.test/ HTTP/1.1\r\n")
    rt.reactor.advance(HEADER_TIMEOUT - 1)
    client.dataReceived(b"Host: o.test\r\n")
    rt.reactor.advance(1)
    assert down.value().startswith(b"HTTP/1.1 408 ")
