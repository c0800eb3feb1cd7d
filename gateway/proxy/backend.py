# -*- test-case-name: tests.test_inbound_gateway -*-
"""
Where a routed exchange's upstream side comes from (L{gateway.exchange.side.Connector}): a
kept-alive HTTP/1.1 connection to the backend the exchange holds, else a new one, with TLS
verified against the route's C{ca_bundle} (or the system trust) for an https:// backend.

A backend that cannot be reached (refused, timed out, no such name, TLS) is marked down at
once (passive marking, L{gateway.inbound.balance.Pool.failover}); a request that may go
elsewhere (idempotent, and nothing of it sent: a failed connect sends nothing) moves on to
the next backend the pool offers, until none is left: then the client gets 502, or 504 for a
connect timeout. The exchange's own retry (a pooled connection that the backend had closed)
comes back here with C{fresh}: a new connection to the same backend, failing over the same
way if that backend has gone. So there is one retry path, and it is this one.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from ..exchange.problems import Problem
from ..message import Request
from .dial import problemFor
from .origin import OriginConnection, OriginPool

__all__ = ["BackendConnector"]

#: What the client is told, by problem code: never the backend's address (the access log
#: names the backend; the error log has the details).
_WHY = {
    "refused": "connection refused",
    "timeout": "no answer in time",
    "dns": "its name does not resolve",
    "tls": "TLS failed",
}

Dial = Callable[..., defer.Deferred]


class BackendConnector:
    """
    @param pool: the backends' keep-alive connections (keyed by route, backend URL and
        CA bundle, so a reload that changes a route's trust never reuses a connection).
    @param dial: C{dial(backendURL, caBundle, protocol)} connects C{protocol} to the
        backend; its Deferred fires with the address dialled, or fails with a dial error.
    """

    log = Logger(namespace="proxygate.gateway")

    def __init__(self, pool: OriginPool, dial: Dial) -> None:
        self.pool = pool
        self.dial = dial

    def open(self, request: Request, exchange, fresh: bool = False) -> None:
        backend = exchange.chosen
        url = backend.url
        route = exchange.routed.route
        # The request now goes to this backend (for its side's peer, and for a retry).
        request.scheme = url.scheme
        request.host = url.host
        request.port = url.port
        key = (route.name, url.url, route.config.ca_bundle)
        if not fresh:
            conn = self.pool.get(key)
            if conn is not None:
                exchange.upstreamReady(conn, True)
                return
        conn = OriginConnection(key, f"the backend {url.url} of route {route.name}")
        self.pool.adopt(conn)
        try:
            d = self.dial(url, route.config.ca_bundle, conn)
        except Exception as e:  # a CA bundle that became unreadable, say
            d = defer.fail(e)

        def connected(ip: str) -> None:
            conn.ip = ip
            exchange.upstreamReady(conn, False)

        def failed(failure) -> None:
            self._failed(request, exchange, backend, failure)

        d.addCallbacks(connected, failed)

    def _failed(self, request: Request, exchange, backend, failure) -> None:
        """C{backend} could not be reached: mark it down, then the next one, or the answer."""
        problem = problemFor(failure.value)
        route = exchange.routed.route
        pool = route.pool
        if problem.code == "internal":
            self.log.failure("route {route}: dialling {backend}", failure, route=route.name,
                             backend=backend.url.url)  # fmt: skip
        wasUp = backend.up
        exchange.tried.append(backend)
        if exchange.finished:  # the client left meanwhile: only the marking is left to do
            pool.connectFailed(backend)
            nextBackend = None
        else:
            nextBackend = pool.failover(backend, request.method, False, exchange.tried)
        if wasUp:
            self.log.warn(
                "route {route}: backend {backend} marked down ({detail})",
                route=route.name,
                backend=backend.url.url,
                detail=problem.detail,
            )
        if exchange.finished:
            return
        why = _WHY.get(problem.code, "cannot connect")
        tried = len(exchange.tried)
        public = Problem(
            problem.status,
            problem.code,
            f"Route {route.name}: its backend cannot be reached ({why})."
            if tried == 1
            else f"Route {route.name}: none of the {tried} backends tried can be reached "
            f"({why} at the last).",
        )
        if nextBackend is None:
            exchange.upstreamUnavailable(public)
            return
        public.count(exchange.env.metrics)  # each backend that failed is an upstream error
        exchange.moveTo(nextBackend)
        self.open(request, exchange)  # its kept-alive connections are as good as any
