"""
The inbound gateway's wiring, in process: a reverse listener's connection (ReverseConnection)
and the backend connector on string transports and a fake clock, with the backends' dials
decided by the test. Every decision of the gateway between the client's head and the
backend's bytes: routing, 404, redirect, 401, 413 before the backend, failover, 502/504,
all-down 503 with Retry-After, sticky pins and re-pins, the route's idle limit, the record.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from gateway.accesslog import AccessLog
from gateway.config import parseConfig
from gateway.inbound.runtime import Inbound, settleStickySecret
from gateway.metrics import Metrics
from gateway.proxy.dial import DialError
from gateway.proxy.reverse import ReverseConnection, ReverseRuntime
from gateway.proxy.runtime import Runtime

INI = """
[proxy]
idle_timeout = 300

[auth]
htpasswd = users

[route app]
match = /app/
backends = http://127.0.0.1:8001 http://127.0.0.1:8002
max_body_size = 1K
request_headers = X-RStudio-Root-Path: {prefix}

[route sticky]
match = /s/
backends = http://127.0.0.1:8011 http://127.0.0.1:8012
balance = sticky
timeout = 5

[route one]
match = /one/
backends = http://127.0.0.1:8031

[route private]
match = private.example.com
backends = http://127.0.0.1:8021
auth = on
user_header = X-Auth-Username
"""

ALICE = b"Basic YWxpY2U6c2VjcmV0"  # alice:secret
#: Where the INI "is": its htpasswd (read at start-up; the tests' Users answers instead).
_HOME = Path(tempfile.mkdtemp(prefix="proxygate-gateway-"))
(_HOME / "users").write_text("alice:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Transport(StringTransport):
    """A string transport as lenient as a TCP one about (un)registering producers."""

    def registerProducer(self, producer, streaming) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None


class Users:
    """The authenticator's interface: alice:secret is the one good credential."""

    def authenticate(self, value):
        return defer.succeed("alice" if value == ALICE else None)

    def challenge(self) -> bytes:
        return b'Basic realm="gw", charset="UTF-8"'


class Dials:
    """The backends' dials, decided by the test: connect or fail, in order."""

    def __init__(self) -> None:
        self.pending: list = []

    def __call__(self, url, caBundle, protocol) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((url.url, protocol, d))
        return d

    def urls(self) -> list[str]:
        return [url for url, _, _ in self.pending]

    def connect(self):
        """The oldest dial succeeds: (the backend's protocol, its transport)."""
        _, protocol, d = self.pending.pop(0)
        transport = Transport()
        protocol.makeConnection(transport)
        d.callback("127.0.0.1")
        return protocol, transport

    def fail(self, reason: str = "refused") -> str:
        url, _, d = self.pending.pop(0)
        status = 504 if reason == "timeout" else 502
        d.errback(DialError(reason, status, f"{url} failed: {reason}"))
        return url


class Gateway:
    def __init__(self, ini: str = INI) -> None:
        self.clock = task.Clock()
        config = settleStickySecret(parseConfig(ini, str(_HOME / "gw.ini")))
        self.metrics = Metrics()
        self.records: list = []
        log = AccessLog("json", observer=lambda e: self.records.append(json.loads(e["line"])))
        runtime = Runtime(config, self.clock, self.metrics)
        runtime.accessLog = log
        runtime.authenticator = Users()
        self.inbound = Inbound(config, self.clock.seconds)
        self.rt = ReverseRuntime(runtime, config, self.inbound)
        self.dials = Dials()
        self.rt.connector.dial = self.dials

    def connect(self, scheme: str = "http"):
        conn = ReverseConnection(self.rt, scheme)
        transport = Transport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
        conn.makeConnection(transport)
        return conn, transport

    def pool(self, route: str):
        return self.inbound.byName[route].pool

    def metric(self, name: str, **labels) -> float:
        from prometheus_client import generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        text = generate_latest(self.metrics.registry).decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0


def head(path: bytes = b"/app/x?y=1", host: bytes = b"gw.example", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


def fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [tuple(line.split(b": ", 1)) for line in lines]  # type: ignore[misc]


@pytest.fixture
def gw() -> Gateway:
    return Gateway()


def test_routedRequestReachesItsBackendAndTheAnswerIsMadePublic(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(
        head(extra=b"X-Forwarded-For: 6.6.6.6\r\nRemote-User: root\r\nConnection: keep-alive\r\n")
    )
    assert gw.dials.urls() == ["http://127.0.0.1:8001"]
    backend, wire = gw.dials.connect()
    sent = wire.value()
    assert sent.startswith(b"GET /x?y=1 HTTP/1.1\r\nHost: gw.example\r\n")
    got = fields(sent)
    assert (b"X-Forwarded-For", b"192.0.2.7") in got
    assert (b"X-Forwarded-Prefix", b"/app") in got
    assert (b"X-RStudio-Root-Path", b"/app") in got
    assert (b"Via", b"1.1 proxygate") in got
    assert b"6.6.6.6" not in sent and b"Remote-User" not in sent
    backend.dataReceived(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:8002/login\r\nContent-Length: 0\r\n\r\n"
    )
    out = client.value()
    assert out.startswith(b"HTTP/1.1 302 Found\r\n")
    assert (b"Location", b"http://gw.example/app/login") in fields(out)
    assert b"Via" not in out  # no proxy banner on the app's public face
    assert gw.metric("proxygate_route_requests_total", route="app", code="302") == 1
    assert gw.metric("proxygate_requests_total", mode="reverse", code="302") == 1
    [record] = gw.records
    assert (record["mode"], record["route"], record["backend"], record["url"]) == (
        "reverse",
        "app",
        "http://127.0.0.1:8001",
        "http://gw.example/app/x",
    )
    assert record["hierarchy"] == "app/127.0.0.1:8001"
    assert gw.pool("app").backends[0].inflight == 0
    # kept alive both ways: 8001's next request takes the pooled backend connection
    conn.dataReceived(head(b"/app/y"))
    gw.dials.connect()[0].dataReceived(RESPONSE)  # round robin: 8002's turn
    wire.clear()
    conn.dataReceived(head(b"/app/z"))
    assert gw.dials.urls() == [] and wire.value().startswith(b"GET /z HTTP/1.1")


def test_roundRobinAlternates(gw: Gateway) -> None:
    conns = [gw.connect() for _ in range(4)]
    for conn, _ in conns:
        conn.dataReceived(head())
    assert gw.dials.urls() == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"] * 2


def test_noRouteIs404CountedAsReverseOnly(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head(b"/nowhere"))
    assert client.value().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Proxy-Status: proxygate; error=destination_not_found" in client.value()
    assert gw.dials.pending == []
    assert gw.metric("proxygate_requests_total", mode="reverse", code="404") == 1
    assert gw.metric("proxygate_route_requests_total", code="404") == 0
    assert (gw.records[0]["mode"], gw.records[0]["reason"]) == ("local", "no_route")
    assert not client.disconnecting  # the connection serves the next request


def test_barePrefixRedirects(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head(b"/app?q=1"))
    out = client.value()
    assert out.startswith(b"HTTP/1.1 301 Moved Permanently\r\n")
    assert (b"Location", b"/app/?q=1") in fields(out)
    assert b"Proxy-Status" not in out


def test_bodyOverTheLimitIs413BeforeAnyBackend(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(
        b"POST /app/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1025\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    out = client.value()
    assert out.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"Connection: close" in out and client.disconnecting
    assert gw.dials.pending == []
    assert gw.metric("proxygate_route_requests_total", route="app", code="413") == 1
    assert gw.records[0]["route"] == "app" and gw.records[0]["backend"] is None


def test_bodyAtTheLimitIsForwarded(gw: Gateway) -> None:
    conn, _ = gw.connect()
    conn.dataReceived(b"PUT /app/f HTTP/1.1\r\nHost: gw\r\nContent-Length: 1024\r\n\r\n")
    _, wire = gw.dials.connect()
    conn.dataReceived(b"x" * 1024)
    assert wire.value().endswith(b"x" * 1024)


def test_chunkedBodyCutWith413WhenItPassesTheLimit(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(
        b"POST /app/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    _, wire = gw.dials.connect()
    conn.dataReceived(b"200\r\n" + b"a" * 512 + b"\r\n")
    assert wire.value().endswith(b"a" * 512 + b"\r\n")  # streamed, not held
    conn.dataReceived(b"201\r\n" + b"b" * 513 + b"\r\n")
    assert b"b" not in wire.value()
    assert wire.disconnecting  # the backend never sees a complete body
    assert client.value().startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert client.disconnecting
    assert gw.metric("proxygate_route_requests_total", route="app", code="413") == 1
    assert gw.pool("app").backends[0].inflight == 0


def test_edgeAuthAsks401AndPassesTheUserOnly(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head(b"/", b"private.example.com"))
    out = client.value()
    assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert (b"WWW-Authenticate", b'Basic realm="gw", charset="UTF-8"') in fields(out)
    assert b"Proxy-Authenticate" not in out
    assert gw.dials.pending == []
    assert gw.metric("proxygate_denied_total", reason="auth") == 1
    assert gw.records[0]["route"] == "private"
    client.clear()
    forged = b"X-Auth-Username: admin\r\nX-Forwarded-User: admin\r\nRemote_User: admin\r\n"
    conn.dataReceived(
        head(b"/", b"private.example.com", b"Authorization: " + ALICE + b"\r\n" + forged)
    )
    _, wire = gw.dials.connect()
    sent = wire.value()
    assert (b"X-Auth-Username", b"alice") in fields(sent)
    assert b"admin" not in sent
    assert b"Authorization" not in sent  # the gateway's credentials stay at the gateway


def test_failoverToTheNextBackendMarksTheFirstDown(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head())
    assert gw.dials.fail("refused") == "http://127.0.0.1:8001"
    assert gw.dials.urls() == ["http://127.0.0.1:8002"]
    backend, _ = gw.dials.connect()
    backend.dataReceived(RESPONSE)
    assert client.value().startswith(b"HTTP/1.1 200 OK\r\n")
    first, second = gw.pool("app").backends
    assert not first.up and second.up
    assert gw.metric("proxygate_backend_up", route="app", backend="http://127.0.0.1:8001") == 0
    assert (first.inflight, second.inflight) == (0, 0)
    assert gw.records[0]["backend"] == "http://127.0.0.1:8002"
    assert gw.metric("proxygate_upstream_errors_total", reason="refused") == 1


def test_nonIdempotentRequestIsNotRetried(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(b"POST /app/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi")
    gw.dials.fail("refused")
    assert gw.dials.pending == []
    out = client.value()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"127.0.0.1" not in out  # the client is not told the backend's address
    assert b"Proxy-Status: proxygate; error=connection_refused" in out
    assert not gw.pool("app").backends[0].up  # marked down all the same


def test_connectTimeoutIs504WhenNoBackendIsLeft(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head())
    gw.dials.fail("timeout")
    gw.dials.fail("timeout")
    assert client.value().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"none of the 2 backends tried" in client.value()


def test_everyBackendDownIs503WithRetryAfter(gw: Gateway) -> None:
    pool = gw.pool("app")
    for backend in pool.backends:
        pool.connectFailed(backend)  # passive marking: retried after health_interval (5 s)
    gw.clock.advance(2)
    conn, client = gw.connect()
    conn.dataReceived(head())
    out = client.value()
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert (b"Retry-After", b"3") in fields(out)
    assert b"Proxy-Status: proxygate; error=destination_unavailable" in out
    assert gw.dials.pending == []
    assert gw.metric("proxygate_route_requests_total", route="app", code="503") == 1
    gw.clock.advance(3)  # the rest is over: they are tried again
    client.clear()
    conn.dataReceived(head())
    assert gw.dials.urls() == ["http://127.0.0.1:8001"]


def test_stickyPinsFollowsAndRepins(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head(b"/s/"))
    assert gw.dials.urls() == ["http://127.0.0.1:8011"]
    backend, _ = gw.dials.connect()
    backend.dataReceived(RESPONSE)
    [cookie] = [v for n, v in fields(client.value()) if n == b"Set-Cookie"]
    assert cookie.endswith(b"; Path=/s; HttpOnly; SameSite=Lax")
    pin = cookie.split(b";")[0]
    assert b"8011" not in pin  # an opaque id, never the address
    # pinned: the same backend again and again, no new cookie
    for _ in range(2):
        client.clear()
        conn.dataReceived(head(b"/s/", extra=b"Cookie: a=1; " + pin + b"\r\n"))
        assert gw.dials.pending == []  # the pooled connection to 8011
        backend.dataReceived(RESPONSE)
        assert b"Set-Cookie" not in client.value()
    # its backend cannot be reached any more: the request fails over and is pinned again
    backend.transport.loseConnection()
    backend.connectionLost(None)
    client.clear()
    conn.dataReceived(head(b"/s/", extra=b"Cookie: " + pin + b"\r\n"))
    assert gw.dials.fail("refused") == "http://127.0.0.1:8011"
    other, _ = gw.dials.connect()
    other.dataReceived(RESPONSE)
    [repin] = [v for n, v in fields(client.value()) if n == b"Set-Cookie"]
    assert repin.split(b";")[0] != pin
    # while 8011 is down, its old pin is balanced (to 8012) and re-pinned as well
    conn2, client2 = gw.connect()
    conn2.dataReceived(head(b"/s/", extra=b"Cookie: " + pin + b"\r\n"))
    assert gw.dials.pending == []  # 8012's pooled connection
    other.dataReceived(RESPONSE)
    assert (b"Set-Cookie", repin) in fields(client2.value())


def test_deadPooledConnectionIsRetriedOnAFreshOne(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head(b"/one/"))
    backend, _ = gw.dials.connect()
    backend.dataReceived(RESPONSE)
    conn.dataReceived(head(b"/one/"))  # out on the pooled connection, which the backend closed
    assert gw.dials.pending == []
    backend.connectionLost(None)
    assert gw.dials.urls() == ["http://127.0.0.1:8031"]  # the same backend, a new connection
    fresh, _ = gw.dials.connect()
    fresh.dataReceived(RESPONSE)
    assert client.value().count(b"HTTP/1.1 200 OK") == 2
    assert gw.pool("one").backends[0].up


def test_routeTimeoutIsTheIdleLimit(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(head(b"/s/"))
    gw.dials.connect()
    gw.clock.advance(4.9)
    assert client.value() == b""
    gw.clock.advance(0.2)  # the route's timeout = 5, not [proxy] idle_timeout
    assert client.value().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    # the next request of the connection is held to it as well
    conn, client = gw.connect()
    for _ in range(2):
        client.clear()
        conn.dataReceived(head(b"/s/"))
        if gw.dials.pending:
            backend, _ = gw.dials.connect()
        gw.clock.advance(1)
        backend.dataReceived(RESPONSE)
        assert client.value().startswith(b"HTTP/1.1 200 OK\r\n")
    conn.dataReceived(head(b"/s/"))
    gw.clock.advance(5.1)
    assert b"504 Gateway Timeout" in client.value()


def test_forwardProxyRequestsAreRefused(gw: Gateway) -> None:
    conn, client = gw.connect()
    conn.dataReceived(b"GET http://example.com/app/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"not a forward proxy" in client.value()
    conn, client = gw.connect()
    conn.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"Allow: GET" in client.value() and client.disconnecting
    assert gw.dials.pending == []
    # absolute form naming a host a route names is that route's (RFC 9112 §3.2.2)
    conn, client = gw.connect()
    conn.dataReceived(
        b"GET http://private.example.com/ HTTP/1.1\r\nHost: other\r\n"
        b"Authorization: " + ALICE + b"\r\n\r\n"
    )
    assert gw.dials.urls() == ["http://127.0.0.1:8021"]


def test_httpsListenerSaysSoToBackendsAndSecuresTheCookie(gw: Gateway) -> None:
    conn, client = gw.connect("https")
    conn.dataReceived(head(b"/s/x", b"gw.example"))
    backend, wire = gw.dials.connect()
    assert (b"X-Forwarded-Proto", b"https") in fields(wire.value())
    assert (b"X-Forwarded-Port", b"443") in fields(wire.value())
    backend.dataReceived(RESPONSE)
    [cookie] = [v for n, v in fields(client.value()) if n == b"Set-Cookie"]
    assert cookie.endswith(b"; Secure")
    assert gw.records[0]["url"] == "https://gw.example/s/x"


def test_clientLeavingWhileDiallingReleasesTheBackendOnce(gw: Gateway) -> None:
    conn, _ = gw.connect()
    conn.dataReceived(head())
    conn.connectionLost(None)
    first = gw.pool("app").backends[0]
    assert first.inflight == 0
    gw.dials.fail("refused")
    assert first.inflight == 0 and not first.up  # marked, not failed over
    assert gw.dials.pending == []


def test_reloadHookServesTheNewRoutesAndKeepsBackendStates(tmp_path) -> None:
    from gateway.service import GatewayService

    (tmp_path / "users").write_text("alice:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")
    clock = task.Clock()
    ini = str(tmp_path / "gw.ini")
    service = GatewayService(parseConfig("[reverse]\nlisten = tcp:0\n" + INI, ini), clock)
    secret = service.config.reverse.sticky_secret
    old = service.reverse.inbound
    first = old.byName["app"].pool.backends[0]
    old.byName["app"].pool.connectFailed(first)
    checker = service.healthChecker
    service.reloadRoutes(
        parseConfig(
            "[reverse]\nlisten = tcp:0\nallowed_client_cidrs = 10.0.0.0/8\n"
            "[route app]\nmatch = /app/\nbackends = http://127.0.0.1:8001\n"
            "[route new]\nmatch = /new/\nbackends = http://127.0.0.1:8041\nbalance = sticky\n"
        )
    )
    new = service.reverse.inbound
    assert new is not old and service.healthChecker is not checker
    assert checker.parent is None and service.healthChecker.parent is service
    assert not new.byName["app"].pool.backends[0].up  # its state survives the reload
    assert new.match(b"gw", b"/new/x").route.name == "new"
    assert new.match(b"gw", b"/s/") is None
    assert str(service.reverse.clientCIDRs[0]) == "10.0.0.0/8"
    assert service.config.reverse.sticky_secret == secret  # pins survive too
    from prometheus_client import generate_latest

    text = generate_latest(service.metrics.registry).decode()
    assert 'route="new"' in text and 'route="sticky"' not in text
