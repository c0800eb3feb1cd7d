"""
One request or tunnel as the access log and the metrics record it: built in one place, for
forwarded requests, CONNECT tunnels and the proxy's own answers alike.

The environment (C{env}) is whatever owns the process-wide objects: C{metrics}, an
C{accessLog} (or None) and C{now()}, a monotonic clock. The service's runtime is one; tests
pass their own.
"""

from __future__ import annotations

import time

from ..accessrecord import AccessRecord, hierarchy, routeHierarchy
from ..apinames import normaliseAPI
from .problems import Problem

__all__ = ["Transaction"]


class Transaction:
    """
    The figures of one request (or tunnel) from its head to its end.

    @ivar mode: the metrics mode (forward, mitm, reverse, ftp).
    @ivar logMode: the access log's mode: the same, or tunnel (CONNECT), local (the
        proxy's own answer to a request it did not forward).
    @ivar code: the status the client got (0 when none was sent).
    @ivar sent: body bytes sent to the client; C{received}: body bytes from the client;
        C{sentUpstream}: of those, the bytes that reached the next hop.
    @ivar problem: why it was refused or failed, if it was.
    @ivar answered: the proxy answered itself: what was sent came from no upstream.
    @ivar grpcStatus: a gRPC call's grpc-status (from the trailers, or the head of a
        trailers-only response), as the origin sent it; None for anything else.
    @ivar route: the inbound gateway's route that served it (its name), else None: then it
        is also counted in the route's own metrics, and logged with the route and
        C{backend} (the backend's URL as in the INI, None when none was chosen).
    """

    __slots__ = (
        "answered",
        "backend",
        "client",
        "code",
        "contentType",
        "env",
        "grpcStatus",
        "ip",
        "logMode",
        "method",
        "mode",
        "problem",
        "received",
        "route",
        "sent",
        "sentUpstream",
        "started",
        "url",
        "user",
        "version",
        "viaProxy",
    )

    def __init__(
        self, env, client: str, method: bytes, mode: str, user: str | None, version: bytes
    ) -> None:
        self.env = env
        self.client = client
        self.method = method
        self.mode = mode
        self.logMode = mode
        self.user = user
        self.version = version
        self.started = env.now()
        self.code = 0
        self.sent = 0
        self.received = 0
        self.sentUpstream = 0
        self.ip = "-"
        self.viaProxy = False
        self.contentType = b""
        self.problem: Problem | None = None
        self.url = "-"
        self.answered = False
        self.route: str | None = None
        self.backend: str | None = None
        self.grpcStatus: bytes | None = None

    def logURL(self) -> str:
        """The URL of the access line (no query, no credentials)."""
        return self.url

    def apiKey(self) -> tuple[str, bytes] | None:
        """For decrypted traffic: the (host, path) whose per-API figures it adds to."""
        return None

    def apiName(self, path: bytes) -> str:
        """The C{api} label of C{path}: folded (L{normaliseAPI}); a gRPC call's is its method."""
        return normaliseAPI(path)

    def localAnswer(self, problem: Problem, size: int, url: str) -> None:
        """The proxy answered C{problem} itself, with a body of C{size} bytes."""
        self.problem = problem
        self.code = problem.status
        self.sent = size
        self.answered = True
        self.contentType = b"text/plain" if size else b""
        self.url = url

    def record(self, action: str | None = None, counted: bool = True) -> None:
        """
        Count the request and write its access line.

        @param action: the Squid result code; by default the problem's, else TCP_MISS.
        @param counted: False for what never was a request (a head that did not parse, a
            connection refused before one): logged, not in proxygate_requests_total.
        """
        env = self.env
        elapsed = env.now() - self.started
        metrics = env.metrics
        problem = self.problem
        if action is None:
            action = problem.action if problem is not None else "TCP_MISS"
        route = self.route
        if counted:
            if route is None:
                metrics.request(self.mode, self.method, self.code, elapsed)
            else:
                metrics.routed(route, self.method, self.code, elapsed)
            api = self.apiKey()
            if api is not None:
                metrics.api(
                    api[0],
                    self.apiName(api[1]),
                    self.method,
                    self.code,
                    elapsed,
                    self.received,
                    self.grpcStatus,
                )
            fromUpstream = 0 if self.answered else self.sent
            metrics.moved(self.received, self.sentUpstream, fromUpstream, self.sent)
        log = env.accessLog
        if log is not None:
            if route is None:
                where = hierarchy(self.ip, self.viaProxy)
            else:
                where = routeHierarchy(route, self.backend)
            log.record(
                AccessRecord(
                    start=time.time() - elapsed,
                    elapsed=elapsed,
                    client=self.client,
                    code=self.code,
                    size=self.sent,
                    method=self.method.decode("ascii", "replace"),
                    url=self.logURL(),
                    user=self.user,
                    action=action,
                    hierarchy=where,
                    contentType=self.contentType.decode("latin-1"),
                    mode=self.logMode,
                    reason=problem.code if problem is not None else None,
                    detail=problem.detail if problem is not None else None,
                    version=self.version.decode("ascii", "replace"),
                    route=route,
                    backend=self.backend,
                )
            )
