# -*- test-case-name: tests.test_inbound_runtime -*-
"""
The inbound gateway of one configuration, ready for requests: each route with its pool and
its field rewriters, the route table over them, the health checker and the metrics hook.
What the reverse listener and the backend connector hold (one L{Inbound} per process,
rebuilt on a reload); everything here is built once, nothing per request.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from .balance import Pool
from .rewrite import RequestRewriter, ResponseRewriter
from .routes import Redirect, Routed, RouteTable

if TYPE_CHECKING:
    from ..config import Config, RouteConfig
    from ..metrics import Metrics
    from .health import HealthChecker

__all__ = ["MEMO_SIZE", "Inbound", "Route", "settleStickySecret"]

#: (Host, target) pairs whose route is remembered (L{Inbound.match}), if they are at most
#: MEMO_LENGTH bytes together: a few MB at worst, whatever clients send.
MEMO_SIZE = 2048
MEMO_LENGTH = 512
_UNKNOWN = object()


class Route:
    """One C{[route NAME]} at request time."""

    __slots__ = ("config", "match", "name", "pool", "requests", "responses", "strip_prefix")

    def __init__(self, config: RouteConfig, pool: Pool) -> None:
        self.config = config
        self.name = config.name
        self.match = config.match  # for the route table
        self.strip_prefix = config.strip_prefix
        self.pool = pool
        userHeader = config.user_header.encode("ascii") if config.user_header else None
        self.requests = RequestRewriter(userHeader, config.request_headers, config.auth)
        self.responses = ResponseRewriter(config.backends, config.rewrite_location)

    def bodyTooLarge(self, length: int) -> bool:
        """Over C{max_body_size} (a stated Content-Length, or the bytes counted so far)?"""
        limit = self.config.max_body_size
        return 0 < limit < length

    def __repr__(self) -> str:
        return f"<Route {self.name} {self.match}>"


class Inbound:
    """
    The routes of C{config}.

    @param clock: seconds (C{reactor.seconds}), for the pools' passive marking.
    @param previous: the gateway this one replaces (a reload): backends that stay keep their
        up/down state, so a reload neither revives a dead backend nor forgets a live one.
        (Requests in flight finish on the old pools; least_conn counts start afresh.)
    """

    def __init__(
        self, config: Config, clock: Callable[[], float], previous: Inbound | None = None
    ) -> None:
        if config.reverse.sticky_secret is None:
            raise ValueError("settle the sticky secret first (settleStickySecret)")
        secret = config.reverse.sticky_secret.encode("utf-8")
        self.routes = [
            Route(
                rc,
                Pool(
                    rc.name,
                    rc.backends,
                    rc.balance,
                    secret,
                    interval=rc.health_interval,
                    activeChecks=rc.health_check is not None,
                    clock=clock,
                ),
            )
            for rc in config.routes
        ]
        self.byName = {route.name: route for route in self.routes}
        self.table = RouteTable(self.routes)
        self._memo: dict[tuple[bytes, bytes], Routed | Redirect | None] = {}
        if previous is not None:
            for route in self.routes:
                old = previous.byName.get(route.name)
                if old is None:
                    continue
                states = {b.url.url: b for b in old.pool.backends}
                for backend in route.pool.backends:
                    was = states.get(backend.url.url)
                    if was is not None:
                        backend.up, backend.downUntil = was.up, was.downUntil
                        backend.fails, backend.passes = was.fails, was.passes

    def match(self, authority: bytes, target: bytes) -> Routed | Redirect | None:
        """
        See L{RouteTable.match}; a L{Routed}'s C{route} is a L{Route}. Answers are
        remembered per (Host, target): clients repeat them, and a dictionary look-up is a
        fraction of a walk down the path (short ones only, and the memo is emptied when
        full, so what clients send cannot grow it).
        """
        key = (authority, target)
        memo = self._memo
        result = memo.get(key, _UNKNOWN)
        if result is _UNKNOWN:
            result = self.table.match(authority, target)  # raises before anything is kept
            if len(target) + len(authority) <= MEMO_LENGTH:
                if len(memo) >= MEMO_SIZE:
                    memo.clear()
                memo[key] = result
        return result

    def namesHost(self, host: str) -> bool:
        """See L{RouteTable.namesHost}."""
        return self.table.namesHost(host)

    def healthChecker(self, reactor=None) -> HealthChecker:
        """The active checks of the routes that have a C{health_check} (an IService)."""
        from .health import HealthChecker

        return HealthChecker(
            [(r.name, r.pool, r.config.health_check, r.config.ca_bundle) for r in self.routes],
            reactor,
        )

    def watch(self, metrics: Metrics, previous: Inbound | None = None) -> None:
        """Export every backend's state as C{proxygate_backend_up}; forget removed routes."""
        for route in self.routes:
            metrics.watchBackends(route.name, route.pool.upStates())
        if previous is not None:
            for name in previous.byName.keys() - self.byName.keys():
                metrics.forgetRoute(name)


def settleStickySecret(config: Config, running: Config | None = None) -> Config:
    """
    C{config} with a sticky secret: its own, else the running configuration's (a reload
    keeps the pins), else a new random one. The master settles it before it hands the
    configuration to its workers, so every process sets and follows the same cookies.
    """
    if config.reverse.sticky_secret is not None:
        return config
    if running is not None and running.reverse.sticky_secret is not None:
        secret = running.reverse.sticky_secret
    else:
        secret = os.urandom(16).hex()
    return attrs.evolve(config, reverse=attrs.evolve(config.reverse, sticky_secret=secret))
