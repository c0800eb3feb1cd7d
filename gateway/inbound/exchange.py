# -*- test-case-name: tests.test_inbound_gateway -*-
"""
One request of the inbound gateway: an L{Exchange} whose upstream side is a backend of its
route. Everything the forward path does (framing, 1xx, the 101 splice, retries of a dead
pooled connection, what the client is told when the next hop fails) is the exchange's; this
adds what a route adds, and nothing else:

- the backend it holds: acquired when the request is routed (least_conn counts it), moved by
  the connector when a backend cannot be reached (L{moveTo}), released once, when the
  exchange ends (its response done, its WebSocket closed, or a failure);
- the response as the client sees it: backend URLs in Location, Content-Location and
  Refresh made public, and the sticky cookie of the backend that answered;
- the record: the route's metrics, the route and backend in the access line, the public URL;
- a TLS failure to the backend marks it down, as a refused connection does.

Wire-neutral like the exchange: no Twisted, no bytes of a wire.
"""

from __future__ import annotations

from ..exchange.exchange import DONE, SENDING, Exchange
from ..exchange.problems import Problem
from ..message import Request, Response, logURL
from .balance import Backend, Pick
from .routes import Routed

__all__ = ["RoutedExchange", "publicURL"]


#: The URL a client asked the gateway for, as the access log shows it.
publicURL = logURL


class RoutedExchange(Exchange):
    """
    @ivar routed: the route table's answer (the route, the public prefix and target).
    @ivar pick: the balancer's choice (and the sticky cookie it wants set).
    @ivar chosen: the backend this exchange holds now.
    @ivar tried: the backends that could not be reached, in order.
    @ivar scheme: the listener's scheme (C{https} on an ssl: listener).
    """

    __slots__ = ("chosen", "pick", "routed", "scheme", "tried")

    def __init__(
        self,
        env,
        downstream,
        request: Request,
        routed: Routed,
        pick: Pick,
        scheme: str,
        user: str | None = None,
    ) -> None:
        super().__init__(env, downstream, request, mode="reverse", user=user)
        self.routed = routed
        self.pick = pick
        self.scheme = scheme
        self.tried: list[Backend] = []
        route = routed.route
        self.route = route.name
        self.chosen = pick.backend
        route.pool.acquire(pick.backend)

    @property
    def finished(self) -> bool:
        """Ended (its backend released): a connector's late news changes nothing."""
        return self.phase == DONE

    def moveTo(self, backend: Backend) -> None:
        """The connector fails over: hold C{backend} instead of the one that failed."""
        pool = self.routed.route.pool
        pool.release(self.chosen)
        pool.acquire(backend)
        self.chosen = backend

    def responseHead(self, response: Response) -> None:
        if response.status >= 200 and self.phase == SENDING:
            routed = self.routed
            route = routed.route
            pick = self.pick
            if self.chosen is not pick.backend:
                pick = route.pool.repin(self.chosen)
            setCookie = route.pool.setCookie(pick, routed.prefix or b"/", self.scheme == "https")
            response.fields = route.responses.fields(
                response.fields,
                scheme=self.scheme,
                authority=self.request.authority,
                prefix=routed.stripped or b"",
                setCookie=setCookie,
            )
        super().responseHead(response)

    def upstreamLost(self, problem: Problem | None = None) -> None:
        if problem is not None and problem.code == "tls" and self.phase == SENDING:
            # The handshake failed after the connect: passive marking, as for a refusal.
            self.routed.route.pool.connectFailed(self.chosen)
        super().upstreamLost(problem)

    def record(self, action: str | None = None, counted: bool = True) -> None:
        """The exchange's end (it records once): the backend it held is released."""
        self.routed.route.pool.release(self.chosen)
        self.backend = self.chosen.url.url
        super().record(action, counted)

    def logURL(self) -> str:
        return publicURL(self.scheme, self.request.authority, self.routed.publicTarget)
