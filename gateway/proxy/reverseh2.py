# -*- test-case-name: tests.test_reverse_h2 -*-
"""
HTTP/2 at the inbound gateway's front door: a connection on an C{ssl:} C{[reverse]}
listener whose client chose h2 (ALPN, offered with C{[reverse] http2 = on}), each of its
streams one routed request.

A stream gets what a request on the HTTP/1.1 door (L{gateway.proxy.reverse}) gets, decided
by the same functions (L{gateway.inbound.frontdoor}): the route its :authority and path pick,
or 404 and the slash redirect; the route's login (401); a stated body over the route's
C{max_body_size} (413, before any backend is dialled; a body whose length is not stated is
counted as it streams, and cut with 413, or a reset once the response has begun); every
backend down (503 with Retry-After); then a L{RoutedExchange} to a backend, which speaks
HTTP/1.1 and gets the same forwarding fields. CONNECT is refused (405).

Each stream has its route's C{timeout} as its idle limit (L{H2Exchange}), as a request on
HTTP/1.1 has; the connection's own (C{[proxy] idle_timeout}) counts once no stream is open.

What differs is HTTP/2's: no WebSocket over this connection (RFC 8441's extended CONNECT is
not offered, so browsers open an HTTP/1.1 connection for it, which the same listener
serves), and the limits of an h2 connection (streams, header list, Rapid Reset), the same as
intercepted tunnels' (L{H2Limits.fromConfig}).
"""

from __future__ import annotations

from ..exchange.exchange import DONE, UPGRADED
from ..exchange.problems import Problem, problemForStatus
from ..exchange.transaction import Transaction
from ..h2.connection import H2Limits, H2ServerProtocol
from ..h2.headers import gatewayRequestFromHead
from ..http1.parse import HTTPError
from ..inbound.exchange import RoutedExchange, publicURL
from ..inbound.frontdoor import Local, admit, backendFields, loginRequired, routeOf
from ..inbound.routes import Routed
from .h2tunnel import maxForwardsProblem

__all__ = ["ReverseH2Server"]


class ReverseH2Server(H2ServerProtocol):
    """
    The h2 side of one gateway connection. It takes over from the HTTP/1.1 connection that
    accepted the socket (L{gateway.proxy.reverse.ReverseConnection}, once the handshake
    said h2): its place among the runtime's connections (the count, the drain) included.
    """

    def __init__(self, rt, client: str, scheme: str = "https") -> None:
        super().__init__(
            H2Limits.fromConfig(rt.runtime.config),
            rt.reactor,
            (scheme, "", 0, b""),
            client,
            self._dispatchStream,
            self._refusedStream,
        )
        self.rt = rt
        self.scheme = scheme

    def connectionMade(self) -> None:
        super().connectionMade()
        self.rt.connections.add(self)

    def connectionLost(self, reason) -> None:
        rt = self.rt
        if self in rt.connections:
            rt.connections.discard(self)
            rt.metrics.live.clientConnections -= 1
        super().connectionLost(reason)

    def shutdown(self) -> None:
        """The drain's grace is over: cut what is still open."""
        if not self.lost:
            self.transport.abortConnection()

    def _idle(self) -> None:
        if self.streams:
            # Each routed stream keeps its route's idle limit (H2Exchange): a connection
            # is idle once none is open, whatever [proxy] idle_timeout says meanwhile.
            self._arm()
            return
        super()._idle()

    def requestOf(self, head: tuple, endStream: bool):
        return gatewayRequestFromHead(head, self.scheme, endStream)

    # -- a stream's way: route, login, admission, exchange ----------------------------------

    def _dispatchStream(self, stream):
        """A new stream's exchange (begun), or None when the gateway answered it (or will)."""
        request = stream.request
        if request.method == b"TRACE" or request.method == b"OPTIONS":
            problem = maxForwardsProblem(request)
            if problem is not None:
                self._local(stream, Local(problem), request.path)
                return None
        try:
            result = routeOf(
                self.rt.inbound, request.method, request.authority, request.path, False, None
            )
        except HTTPError as e:
            self._local(stream, Local(problemForStatus(e.status, e.reason)), request.path)
            return None
        if type(result) is Local:
            self._local(stream, result, request.path)
            return None
        if result.route.config.auth:
            return self._logIn(stream, result)
        return self._forward(stream, result, None)

    def _logIn(self, stream, routed: Routed):
        """Edge authentication, as on HTTP/1.1; the stream's body waits (held) meanwhile."""
        values = _values(stream.request.fields, b"authorization")
        d = self.rt.users.authenticate(values[0] if len(values) == 1 else None)
        if d.called:  # a cached credential: at once
            result: list = []
            d.addBoth(result.append)
            return self._loggedIn(result[0], stream, routed)
        d.addBoth(self._checked, stream, routed)
        return None

    def _checked(self, user, stream, routed: Routed) -> None:
        if stream.closed or self.lost:
            return
        exchange = self._loggedIn(user, stream, routed)
        if exchange is not None and not stream.closed:
            stream.attach(exchange)
        self.flushSoon()

    def _loggedIn(self, user, stream, routed: Routed):
        if isinstance(user, str):
            return self._forward(stream, routed, user)
        self._local(stream, loginRequired(self.rt.users, routed), routed.publicTarget)
        return None

    def _forward(self, stream, routed: Routed, user: str | None):
        request = stream.request
        length = request.length
        fields = request.fields
        pick = admit(
            routed,
            None if length is None or length < 0 else length,
            lambda name: _values(fields, name),
        )
        if type(pick) is Local:
            self._local(stream, pick, routed.publicTarget, user)
            return None
        route = routed.route
        backend = pick.backend.url
        authority = request.authority
        request.scheme = backend.scheme
        request.host = backend.host
        request.port = backend.port
        request.path = routed.target
        request.fields = backendFields(routed, fields, self.client, self.scheme, authority, user)
        kind = CountedExchange if length is None and route.config.max_body_size else H2Exchange
        exchange = kind(self.rt, stream, request, routed, pick, self.scheme, user)
        exchange.begin()
        return exchange

    # -- the gateway's own answers -------------------------------------------------------------

    def _local(self, stream, local: Local, target: bytes, user: str | None = None) -> None:
        """Answer on C{stream} (the body, if any, is not read: the stream is reset after)."""
        request = stream.request
        problem = local.problem
        response, body = self.rt.answer(problem, request.method == b"HEAD", local.fields)
        stream.sendHead(response)
        if body:
            stream.sendData(body)
        stream.end()
        routed = local.routed
        self._log(
            problem,
            request.method,
            publicURL(self.scheme, request.authority, target),
            len(body),
            user,
            None if routed is None else routed.route.name,
        )

    def _refusedStream(self, stream, problem: Problem, method: bytes, path: bytes) -> None:
        """A stream answered by the h2 layer (malformed: 400, CONNECT: 405, 431): logged."""
        self._log(problem, method, "-", len(problem.detail.encode("utf-8", "replace")) + 1)

    def _log(
        self,
        problem: Problem,
        method: bytes,
        url: str,
        size: int,
        user: str | None = None,
        route: str | None = None,
    ) -> None:
        rt = self.rt
        t = Transaction(rt, self.client, method, "reverse", user, b"HTTP/2")
        if route is None:
            t.logMode = "local"
        t.route = route
        t.localAnswer(problem, size, url)
        problem.count(rt.metrics)
        t.record()


class H2Exchange(RoutedExchange):
    """
    A routed request on an h2 stream, with the route's C{timeout} as its idle limit (what
    the HTTP/1.1 connection arms for its request): nothing received from the client or the
    backend for that long, and the client gets 504 (a reset stream once the response has
    begun). One timer per stream; data moves its deadline, not the timer.
    """

    __slots__ = ("deadline", "timer")

    def begin(self) -> None:
        reactor = self.env.reactor
        timeout = self.routed.route.config.timeout
        self.deadline = reactor.seconds() + timeout
        self.timer = reactor.callLater(timeout, self._idle)
        super().begin()

    def _touch(self) -> None:
        self.deadline = self.env.reactor.seconds() + self.routed.route.config.timeout

    def requestData(self, data: bytes) -> None:
        self._touch()
        super().requestData(data)

    def responseHead(self, response) -> None:
        self._touch()
        super().responseHead(response)

    def responseData(self, data: bytes) -> None:
        self._touch()
        super().responseData(data)

    def _idle(self) -> None:
        self.timer = None
        if self.phase == DONE or self.phase == UPGRADED:
            return
        left = self.deadline - self.env.reactor.seconds()
        if left > 0:
            self.timer = self.env.reactor.callLater(left, self._idle)
            return
        self.timedOut()
        self.downstream.flush()

    def record(self, action: str | None = None, counted: bool = True) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        super().record(action, counted)


class CountedExchange(H2Exchange):
    """
    A routed request whose body states no length (HTTP/2 DATA without content-length):
    counted as it streams; past the route's C{max_body_size}, the client gets 413 (or, once
    the response has begun, a reset stream) and the backend's request is aborted.
    """

    __slots__ = ()

    def requestData(self, data: bytes) -> None:
        route = self.routed.route
        if not route.bodyTooLarge(self.received + len(data)):
            super().requestData(data)
            return
        problem = Problem(
            413,
            "too_large",
            f"The request body is larger than route {route.name} accepts "
            f"({route.config.max_body_size} bytes).",
        )
        started = self.code != 0
        stream = self.downstream
        self.received += len(data)
        if not started:
            self.sent = len(problem.detail.encode("utf-8")) + 1  # stream.answer's body
        self.downstreamLost(problem)
        if started:
            stream.abort()
        else:
            stream.answer(problem.status, problem.detail, problem.proxyStatus)
        stream.flush()


def _values(fields, name: bytes) -> list[bytes]:
    """The values of the field C{name} (HTTP/2: names are lower case)."""
    return [value for field, value in fields if field == name]
