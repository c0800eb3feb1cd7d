# -*- test-case-name: tests.test_inbound_gateway -*-
"""
The inbound gateway's front door: a connection on a C{[reverse] listen} endpoint, and the
downstream side of each routed exchange.

It is the forward proxy's client connection (head limits and timers, keep-alive and
pipelining, the downstream side of an exchange, the proxy's own answers) with one thing
changed, the dispatch: a request goes to the route the table picks for its Host and path,
never to a host it names, and the credentials a route asks for are the user's (401 with
C{WWW-Authenticate}, the C{Authorization} field), not a proxy's (407). CONNECT and
absolute-form requests for hosts no route names are forward-proxy requests: refused. (The
forward listeners, the other way round, never consult the routes.)

Between routing and the exchange, in this order, as the gateway's own answers: the route's
login (401), a stated body over C{max_body_size} (413, before any backend is dialled), every
backend down (503 with Retry-After). A chunked body is counted as it streams, and cut with
413 when it passes the limit. These decisions are L{gateway.inbound.frontdoor}'s, shared
with the HTTP/2 door (L{gateway.proxy.reverseh2}), to which a connection on an ssl: listener
hands its socket when the client chose h2.
"""

from __future__ import annotations

from ..exchange.answers import answer
from ..exchange.problems import Problem, problemForStatus
from ..exchange.targets import gatewayTarget, maxForwards
from ..http1.framing import CHUNKED, LENGTH, NONE, Framing, requestFraming
from ..http1.headers import Target
from ..http1.parse import HTTPError, RequestHead
from ..http1.rewrite import requestFromHead, upgradeOffer
from ..inbound.exchange import RoutedExchange, publicURL
from ..inbound.frontdoor import (
    ALLOW,
    NOT_A_PROXY,
    Local,
    admit,
    backendFields,
    loginRequired,
    routeOf,
)
from ..inbound.routes import Routed
from ..tls.contexts import clientCreator
from ..tls.layer import wrapEndpoint
from .backend import BackendConnector
from .client import CLOSED, WAIT, ClientConnection, ClientFactory
from .flow import PIPELINE
from .origin import OriginPool

__all__ = ["LimitedBody", "ReverseConnection", "ReverseFactory", "ReverseRuntime"]


class ReverseRuntime:
    """
    What the connections of the C{[reverse]} listeners share: the proxy's runtime where it
    applies (metrics, access log, clock, head limits and timeouts, the connection limit and
    the set of open connections, so one drain stops both kinds; the dialer and its resolver
    cache), and their own: the client CIDRs, the routes (C{inbound}, replaced by a reload),
    the backends' keep-alive pool and the connector over it. Also the environment of every
    routed exchange (L{gateway.exchange.exchange.Exchange}).
    """

    answer = staticmethod(answer)

    def __init__(self, runtime, config, inbound) -> None:
        self.runtime = runtime
        self.inbound = inbound
        self.reactor = runtime.reactor
        self.metrics = runtime.metrics
        self.now = runtime.now
        self.connections = runtime.connections
        self.maxHeaders = runtime.maxHeaders
        self.clientCIDRs = config.reverse.allowed_client_cidrs
        # Credentials are a route's business (401, Authorization), never the listener's
        # (407, Proxy-Authorization): the connection asks no one; the routes ask `users`.
        self.authenticator = None
        # The route's rewriter writes X-Forwarded-For and its family. Via goes to backends
        # (RFC 9110 §7.6.3: a gateway MUST send it on requests and MAY on responses) and
        # not to clients: an app's public face carries no proxy banner.
        self.forwardedFor = False
        self.viaResponse: dict[bytes, list] = {}
        self.splice = runtime.splice
        self.dialer = runtime.dialer
        self.pool = OriginPool(self.reactor)
        self.connector = BackendConnector(self.pool, self.dialBackend)

    # What a reload of the configuration changes is read from the proxy's runtime when it is
    # needed (the runtime swaps its settings on SIGHUP), never copied here.

    @property
    def accessLog(self):
        return self.runtime.accessLog

    @property
    def users(self):
        return self.runtime.authenticator

    @property
    def maxConnections(self) -> int:
        return self.runtime.maxConnections

    @property
    def maxHeaderSize(self) -> int:
        return self.runtime.maxHeaderSize

    @property
    def headerTimeout(self) -> float:
        return self.runtime.headerTimeout

    @property
    def idleTimeout(self) -> float:
        return self.runtime.idleTimeout

    @property
    def viaRequest(self) -> dict:
        return self.runtime.viaRequest

    def dialBackend(self, url, caBundle: str | None, protocol):
        """
        Connect C{protocol} to a backend: its address as configured (trusted, so the
        destination policy does not apply), TLS verified against C{caBundle} for https://.
        """
        wrap = None
        if url.scheme == "https":
            wrap = wrapEndpoint(clientCreator(url.host, caBundle, True))
        return self.dialer.connect(url.host, url.port, protocol, wrap, checked=False)


class LimitedBody:
    """A chunked request body counted as it streams: past the route's limit, a 413 cut."""

    __slots__ = ("count", "limit", "reader", "route")

    def __init__(self, reader, limit: int, route: str) -> None:
        self.reader = reader
        self.limit = limit
        self.route = route
        self.count = 0

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        body, done, rest = self.reader.feed(data)
        self.count += len(body)
        if self.count > self.limit:
            raise HTTPError(
                413,
                f"the request body is larger than route {self.route} accepts ({self.limit} bytes)",
            )
        return body, done, rest


class ReverseConnection(ClientConnection):
    """
    @ivar scheme: C{https} on an ssl: listener, else C{http}: what X-Forwarded-Proto says,
        and the scheme of the public URLs.
    """

    def __init__(self, rt: ReverseRuntime, scheme: str = "http") -> None:
        super().__init__(rt)
        self.mode = "reverse"
        self.scheme = scheme

    def handshakeCompleted(self) -> None:
        """
        The ssl: listener's handshake: a client that chose h2 (offered with C{[reverse]
        http2 = on}) is served by an h2 connection from now on, which takes this one's place
        (in the connection count and the drain); any other speaks HTTP/1.1 here.
        """
        super().handshakeCompleted()
        if self._state != CLOSED and self.transport.negotiatedProtocol == b"h2":
            # Imported here: a gateway without h2 clients never loads the h2 codec.
            from .reverseh2 import ReverseH2Server

            rt = self.rt
            self._state = CLOSED
            self._cancelTimer()
            rt.connections.discard(self)
            layer = self.transport
            server = ReverseH2Server(rt, self.client, self.scheme)
            layer.wrappedProtocol = server
            server.makeConnection(layer)

    def _dispatch(self, head: RequestHead, tokens, user: str | None) -> None:
        if head.method == b"CONNECT":
            self._answer(
                head, Problem(405, "proxy_request", NOT_A_PROXY), close=True, extraFields=ALLOW
            )
            return
        try:
            authority, target, absolute = gatewayTarget(head)
            framing = requestFraming(head)
            result = routeOf(
                self.rt.inbound, head.method, authority, target, absolute, maxForwards(head)
            )
        except HTTPError as e:
            self._reject(problemForStatus(e.status, e.reason), head)
            return
        if type(result) is Routed:
            if result.route.config.auth:
                self._logIn(head, tokens, framing, authority, result)
            else:
                self._forward(head, tokens, framing, authority, result, None)
            return
        self._local(head, result, framing, authority, target)

    def _local(
        self,
        head: RequestHead,
        local: Local,
        framing: Framing,
        authority: bytes,
        target: bytes,
        user: str | None = None,
    ) -> None:
        """The gateway's own answer (and its record: the route's, when one was matched)."""
        routed = local.routed
        self._answer(
            head,
            local.problem,
            close=local.close or not self.persistent or framing.kind != NONE,
            extraFields=local.fields,
            url=publicURL(self.scheme, authority, target),
            user=user,
            route=None if routed is None else routed.route.name,
        )

    def _logIn(
        self, head: RequestHead, tokens, framing: Framing, authority: bytes, routed: Routed
    ) -> None:
        """Edge authentication: the user's Authorization against [auth]'s htpasswd."""
        values = head.values(b"authorization")
        d = self.rt.users.authenticate(values[0] if len(values) == 1 else None)
        args = (head, tokens, framing, authority, routed)
        if d.called:  # a cached credential: at once
            result: list = []
            d.addBoth(result.append)
            self._loggedIn(result[0], *args)
            return
        # A password check in a thread: read nothing more (a body, a next request) until then.
        self._state = WAIT
        self.pauser.pause(PIPELINE)
        d.addBoth(self._checked, *args)

    def _checked(self, user, *args) -> None:
        if self._state == CLOSED:
            return
        self.pauser.resume(PIPELINE)
        self._loggedIn(user, *args)

    def _loggedIn(self, user, head: RequestHead, tokens, framing, authority, routed) -> None:
        if isinstance(user, str):
            self._forward(head, tokens, framing, authority, routed, user)
            return
        local = loginRequired(self.rt.users, routed)
        self._local(head, local, framing, authority, routed.publicTarget)

    def _forward(
        self,
        head: RequestHead,
        tokens,
        framing: Framing,
        authority: bytes,
        routed: Routed,
        user: str | None,
    ) -> None:
        """The request is the route's: check its body and backends, then the exchange."""
        pick = admit(routed, framing.length if framing.kind == LENGTH else None, head.values)
        if type(pick) is Local:
            self._local(head, pick, framing, authority, routed.publicTarget, user)
            return
        route = routed.route
        upgrade = upgradeOffer(head, framing) if b"upgrade" in tokens else None
        backend = pick.backend.url
        target = Target(backend.scheme, backend.host, backend.port, routed.target, authority)
        request = requestFromHead(head, target, framing, tokens, upgrade)
        request.fields = backendFields(
            routed, request.fields, self.client, self.scheme, authority, user
        )
        # The route's idle limit, for its body, its response and its WebSocket (the
        # connection's own was armed when the head was read).
        timeout = self.idleTimeout = route.config.timeout
        if timeout != self.rt.idleTimeout:
            self._arm("idle", timeout)
        body = None
        if framing.kind != NONE:
            body = framing.reader()
            limit = route.config.max_body_size
            if limit and framing.kind == CHUNKED:
                body = LimitedBody(body, limit, route.name)
        self._run(RoutedExchange(self.rt, self, request, routed, pick, self.scheme, user), body)


class ReverseFactory(ClientFactory):
    """Builds the connections of one C{[reverse]} listener."""

    def __init__(self, rt: ReverseRuntime, scheme: str = "http") -> None:
        super().__init__(rt)
        self.scheme = scheme

    def buildProtocol(self, addr):
        p = ReverseConnection(self.rt, self.scheme)
        p.factory = self
        return p
