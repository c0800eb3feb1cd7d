"""
Active health checks: in process on a fake clock and string transports (every outcome and
the timeout, in milliseconds), then over real loopback sockets against a backend that goes
down and comes back, and against a TLS backend verified with ca_bundle.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.inbound.balance import Pool, parseBackendURL
from gateway.inbound.health import MAX_HEAD, HealthChecker, healthRequest
from tests.support.backends import EchoBackend


class FakeEndpoint:
    """Connects instantly to a StringTransport (or fails, as told), and remembers it."""

    def __init__(self, connections: list, fail: Exception | None = None) -> None:
        self.connections = connections
        self.fail = fail

    def connect(self, factory):
        if self.fail is not None:
            return defer.fail(self.fail)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


class Harness:
    def __init__(self, urls=("http://127.0.0.1:8001",), interval: float = 5.0) -> None:
        self.clock = task.Clock()
        self.pool = Pool(
            "app",
            [parseBackendURL(u) for u in urls],
            "round_robin",
            b"k",
            interval=interval,
            activeChecks=True,
            clock=self.clock.seconds,
        )
        self.connections: list = []
        self.fail: Exception | None = None
        self.asked: list = []
        self.checker = HealthChecker(
            [("app", self.pool, "/healthz", None), ("other", self.pool, None, None)],
            self.clock,
            endpointFor=self._endpoint,
        )

    def _endpoint(self, backend, caBundle, timeout):
        self.asked.append((backend.url, caBundle, timeout))
        return FakeEndpoint(self.connections, self.fail)

    def answer(self, data: bytes) -> StringTransport:
        protocol, transport = self.connections[-1]
        protocol.dataReceived(data)
        return transport

    def tick(self) -> None:
        self.clock.advance(self.pool.interval)

    @property
    def up(self) -> bool:
        return self.pool.backends[0].up


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ERROR = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


def test_probeSendsOneSmallGet() -> None:
    h = Harness()
    h.checker.startService()
    assert len(h.connections) == 1  # the first check runs at once
    _, transport = h.connections[0]
    assert transport.value() == healthRequest(h.pool.backends[0].url, "/healthz")
    assert transport.value() == (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8001\r\nUser-Agent: proxygate-health/1\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )
    assert h.asked == [("http://127.0.0.1:8001", None, 5.0)]
    closed = h.answer(OK)
    assert closed.disconnecting  # closed as soon as the head is in
    h.checker.stopService()


def test_twoFailuresDownTwoPassesUp() -> None:
    h = Harness()
    h.checker.startService()
    h.answer(ERROR)
    assert h.up
    h.tick()
    h.answer(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    assert not h.up
    h.tick()
    h.answer(OK)
    assert not h.up
    h.tick()
    h.answer(b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n")  # 3xx passes
    assert h.up
    assert len(h.connections) == 4  # one backend, one route with checks
    h.checker.stopService()


def test_headArrivingInPieces() -> None:
    h = Harness()
    h.checker.startService()
    for piece in (b"HTTP/1.1 5", b"03 No\r\n", b"X: y\r\n", b"\r\n"):
        h.answer(piece)
    assert h.checker.checks[0].lastProblem == "status 503"
    h.checker.stopService()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"garbage\r\n\r\n", "malformed status line from the origin"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * MAX_HEAD, "response head too large"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed header field from the origin"),
    ],
)
def test_badHeadsFail(data: bytes, problem: str) -> None:
    h = Harness()
    h.checker.startService()
    transport = h.answer(data)
    assert h.checker.checks[0].lastProblem == problem
    assert transport.disconnecting
    h.checker.stopService()


def test_closedBeforeTheHeadFails() -> None:
    h = Harness()
    h.checker.startService()
    protocol, _ = h.connections[0]
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert h.checker.checks[0].lastProblem == "closed before a response head"
    h.checker.stopService()


def test_connectFailuresFail() -> None:
    h = Harness()
    h.fail = error.ConnectionRefusedError()
    h.checker.startService()
    h.tick()
    assert h.checker.checks[0].lastProblem == "connection refused"
    assert not h.up
    h.checker.stopService()


def test_noHeadWithinTheTimeoutFails() -> None:
    h = Harness(interval=2.0)
    h.checker.startService()
    _, transport = h.connections[0]
    h.clock.advance(1.999)
    assert h.checker.checks[0].lastProblem is None and not transport.disconnecting
    h.clock.advance(0.001)
    assert transport.disconnecting
    assert h.checker.checks[0].lastProblem == "no response head within 2 s"
    h.checker.stopService()


@pytest.mark.parametrize(("interval", "timeout"), [(30.0, 5.0), (0.1, 1.0), (3.0, 3.0)])
def test_timeoutIsTheIntervalWithinOneToFiveSeconds(interval: float, timeout: float) -> None:
    h = Harness(interval=interval)
    h.checker.startService()
    assert h.asked[0][2] == timeout
    h.clock.advance(timeout)
    assert h.checker.checks[0].lastProblem == f"no response head within {timeout:g} s"
    h.checker.stopService()


def test_stopCutsTheProbeInFlightAndChangesNothing() -> None:
    h = Harness()
    h.checker.startService()
    h.answer(ERROR)
    h.tick()  # a second probe is in flight: its failure would mark the backend down
    _, transport = h.connections[-1]
    h.checker.stopService()
    assert transport.disconnecting
    assert h.up
    h.clock.advance(60)
    assert len(h.connections) == 2  # no more checks
    assert h.clock.getDelayedCalls() == []


def test_everyBackendOfEveryCheckedRouteIsProbed() -> None:
    h = Harness(urls=("http://127.0.0.1:8001", "https://backend.internal"))
    h.checker.startService()
    assert [a[0] for a in h.asked] == ["http://127.0.0.1:8001", "https://backend.internal"]
    _, second = h.connections[1]
    assert b"Host: backend.internal\r\n" in second.value()
    h.checker.stopService()


# -- real sockets ------------------------------------------------------------------------------


def _until(predicate, timeout: float = 10.0):
    """Let the reactor run until predicate() is true (bounded)."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        yield task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.inlineCallbacks
def test_realBackendGoesDownAndComesBack():
    from twisted.internet import reactor

    backend = EchoBackend("real")
    pool = Pool(
        "app",
        [parseBackendURL(backend.url)],
        "round_robin",
        b"k",
        interval=0.1,
        activeChecks=True,
        clock=reactor.seconds,
    )
    checker = HealthChecker([("app", pool, "/health", None)], reactor)
    checker.startService()
    b = pool.backends[0]
    try:
        yield from _until(lambda: b.passes >= 2)
        assert b.up
        backend.healthy = False  # 503
        yield from _until(lambda: not b.up)
        assert checker.checks[0].lastProblem == "status 503"
        backend.healthy = True
        yield from _until(lambda: b.up)
        backend.stop()  # refused
        yield from _until(lambda: not b.up)
        assert checker.checks[0].lastProblem == "connection refused"
        backend.start()
        yield from _until(lambda: b.up)
        assert [r["path"] for r in backend.requests[-2:]] == ["/health", "/health"]
    finally:
        yield checker.stopService()
        backend.stop()


@pytest_twisted.inlineCallbacks
def test_tlsBackendVerifiedAgainstTheCABundle(tmp_path):
    from twisted.internet import reactor

    from tests.support.tlsorigin import HTTPSOrigin, makeCA

    files = makeCA(tmp_path / "ca")
    other = makeCA(tmp_path / "other")
    origin = HTTPSOrigin(files)
    url = f"https://127.0.0.1:{origin.port}"
    pools = []
    for bundle in (str(files.caCert), str(other.caCert)):
        pools.append(
            (
                Pool("app", [parseBackendURL(url)], "round_robin", b"k", interval=0.1,
                     activeChecks=True, clock=reactor.seconds),
                bundle,
            )
        )  # fmt: skip
    checker = HealthChecker([("app", p, "/", bundle) for p, bundle in pools], reactor)
    checker.startService()
    good, bad = (p.backends[0] for p, _ in pools)
    try:
        yield from _until(lambda: good.passes >= 2 and not bad.up)
        assert good.up
        assert checker.checks[1].lastProblem.startswith("TLS: certificate verify failed")
    finally:
        yield checker.stopService()
        origin.close()
