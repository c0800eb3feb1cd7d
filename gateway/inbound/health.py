# -*- test-case-name: tests.test_inbound_health -*-
"""
Active health checks of the inbound gateway: every C{health_interval} seconds, one small
C{GET health_check HTTP/1.1} per backend of each route that has a C{health_check}; a 2xx
or 3xx head passes, anything else (a 5xx, a refused or reset connection, a TLS failure, no
head within the timeout, a malformed head) fails. The results feed the pool's state
machine (L{gateway.inbound.balance.Pool.checked}: two failures down, two passes up), which
the C{proxygate_backend_up} gauge reads.

The probe is the project's own: a protocol that writes one request and parses the response
head with L{gateway.http1.parse.parseResponseHead}, over TCP or over
L{gateway.tls.layer}'s TLS verified against the route's C{ca_bundle} (or the system trust),
the same TLS every other upstream leg uses. Nothing of the body is read: the connection is
closed as soon as the head is in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..http1.parse import HTTPError, parseResponseHead
from ..policy import parseIP
from .balance import Backend, BackendURL, Pool

__all__ = ["MAX_HEAD", "MAX_TIMEOUT", "MIN_TIMEOUT", "HealthChecker", "healthRequest"]

#: Largest response head a probe reads (then the check fails).
MAX_HEAD = 16384
#: A check's deadline (connect, TLS and the head) is its interval, within these bounds.
MIN_TIMEOUT = 1.0
MAX_TIMEOUT = 5.0


class ProbeFailed(Exception):
    """A health check got no acceptable answer; the message says what happened."""


def healthRequest(backend: BackendURL, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {backend.authority}\r\n"
        "User-Agent: proxygate-health/1\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


class _Probe(protocol.Protocol):
    """Writes one request and fires C{done} with the status of the response head."""

    def __init__(self, request: bytes, done: defer.Deferred) -> None:
        self.request = request
        self.done = done
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._finish(Failure(ProbeFailed("response head too large")))
            return
        try:
            status = parseResponseHead(self.buffer[:end]).status
        except HTTPError as e:
            self._finish(Failure(ProbeFailed(e.reason)))
            return
        self._finish(status)

    def _finish(self, result: int | Failure) -> None:
        self.transport.abortConnection()  # nothing of the body is wanted
        if self.done.called:
            return
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.errback(
                Failure(ProbeFailed(_describe(reason) or "closed before a response head"))
            )


class _ProbeFactory(protocol.Factory):
    noisy = False

    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    def buildProtocol(self, addr) -> _Probe:
        return self.probe


def _describe(reason: Failure) -> str | None:
    """One short line for a log: why a probe failed."""
    if reason.check(error.ConnectionDone):
        return None
    from ..tls.layer import describeFailure

    tls = describeFailure(reason)
    if tls is not None:
        return f"TLS: {tls}"
    value = reason.value
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, ProbeFailed | defer.CancelledError | error.TimeoutError):
        return str(value) or "timed out"
    return str(value).splitlines()[0] if str(value) else type(value).__name__


EndpointFor = Callable[[BackendURL, "str | None", float], object]


def defaultEndpoint(reactor) -> EndpointFor:
    """TCP to the backend, TLS on top for https:// (verified against C{caBundle})."""

    def endpointFor(backend: BackendURL, caBundle: str | None, timeout: float):
        address = parseIP(backend.host)
        if address is None:
            endpoint = HostnameEndpoint(
                reactor, backend.host.encode("idna"), backend.port, timeout=timeout
            )
        else:  # an address: no resolver thread
            kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = kind(reactor, str(address), backend.port, timeout=timeout)
        if backend.scheme != "https":
            return endpoint
        from ..tls.contexts import clientCreator
        from ..tls.layer import wrapEndpoint

        return wrapEndpoint(clientCreator(backend.host, caBundle, True))(endpoint)

    return endpointFor


class _Check:
    """The checks of one backend: a loop, and the probe in flight."""

    def __init__(self, checker, route: str, pool: Pool, backend: Backend, path: str, ca) -> None:
        self.checker = checker
        self.route = route
        self.pool = pool
        self.backend = backend
        self.request = healthRequest(backend.url, path)
        self.caBundle = ca
        self.timeout = min(max(pool.interval, MIN_TIMEOUT), MAX_TIMEOUT)
        self.loop = None
        self.stopped = False
        self._abort: Callable[[], None] | None = None  # stops the probe in flight
        self.lastProblem: str | None = None

    def run(self) -> defer.Deferred:
        """One check; the Deferred always succeeds (a LoopingCall stops on a failure)."""
        reactor = self.checker.reactor
        done: defer.Deferred = defer.Deferred()
        probe = _Probe(self.request, done)
        try:
            endpoint = self.checker.endpointFor(self.backend.url, self.caBundle, self.timeout)
            connecting = endpoint.connect(_ProbeFactory(probe))
        except Exception as e:  # a bad CA bundle, say: a failed check, logged
            connecting = defer.fail(e)

        def connectFailed(reason: Failure) -> None:
            if not done.called:
                done.errback(reason)

        connecting.addErrback(connectFailed)

        def abort() -> None:
            connecting.cancel()
            if probe.transport is not None:
                probe.transport.abortConnection()

        def expire() -> None:
            if not done.called:
                done.errback(Failure(ProbeFailed(f"no response head within {self.timeout:g} s")))
                abort()

        timer = reactor.callLater(self.timeout, expire)
        self._abort = abort
        done.addBoth(self._result, timer)
        return done

    def stop(self) -> None:
        """The service stops: the probe in flight is cut, and its outcome ignored."""
        self.stopped = True
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.loop = None
        if self._abort is not None:
            self._abort()

    def _result(self, result, timer) -> None:
        if timer.active():
            timer.cancel()
        self._abort = None
        if self.stopped:
            return
        if isinstance(result, Failure):
            problem = _describe(result) or "closed before a response head"
        elif 200 <= result < 400:
            problem = None
        else:
            problem = f"status {result}"
        self.lastProblem = problem
        if self.pool.checked(self.backend, problem is None):
            log = self.checker.log
            if problem is None:
                log.info(
                    "route {route}: backend {backend} is up (2 health checks passed)",
                    route=self.route,
                    backend=self.backend.url.url,
                )
            else:
                log.warn(
                    "route {route}: backend {backend} is down (2 health checks failed: {problem})",
                    route=self.route,
                    backend=self.backend.url.url,
                    problem=problem,
                )


class HealthChecker(Service):
    """
    The active checks of every route that has a C{health_check}, started and stopped with
    the gateway.

    @param routes: (route name, its pool, its C{health_check} path or None, its C{ca_bundle})
        for each route.
    @param endpointFor: makes the client endpoint of one probe (tests give their own).
    """

    log = Logger(namespace="proxygate.health")

    def __init__(
        self,
        routes: Iterable[tuple[str, Pool, str | None, str | None]],
        reactor=None,
        endpointFor: EndpointFor | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.endpointFor = endpointFor or defaultEndpoint(reactor)
        self.checks = [
            _Check(self, name, pool, backend, path, caBundle)
            for name, pool, path, caBundle in routes
            if path is not None
            for backend in pool.backends
        ]

    def startService(self) -> None:
        super().startService()
        from twisted.internet.task import LoopingCall

        for check in self.checks:
            check.stopped = False
            check.loop = LoopingCall(check.run)
            check.loop.clock = self.reactor
            check.loop.start(check.pool.interval, now=True)

    def stopService(self):
        super().stopService()
        for check in self.checks:
            check.stop()
        return defer.succeed(None)
