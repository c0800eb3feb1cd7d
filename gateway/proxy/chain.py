"""
Chaining to upstream proxies: which requests go through which (C{[upstream] rules}, then
C{no_proxy} and C{proxy}), and how to dial through one.

Plain HTTP requests go to the upstream in absolute form on pooled connections to the
upstream itself. CONNECT tunnels, and the origin legs of intercepted (MITM) tunnels, are
opened with a CONNECT of our own; the protocol that asked for the connection only sees it
once the upstream said 2xx, with TLS to the origin layered on top when needed. The
Proxy-Authorization sent upstream always comes from the configuration, never from a client.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from ..config import UpstreamConfig
from ..http1.headers import bracketed
from ..http1.parse import HTTPError, parseResponseHead
from ..http1.rewrite import splitResponseHead
from ..tls.contexts import clientCreator
from ..tls.layer import TLSLayer, describeFailure, wrapEndpoint
from ..upstream import ProxyURL
from .dial import DialError, UpstreamRefused
from .flow import noDelay

__all__ = ["Route", "Upstream"]

_MAX_HEAD = 65536


class Route:
    """
    One upstream proxy as the request path uses it: its URL, the Proxy-Authorization our
    configuration gives it, its name for messages, its TLS (an https:// upstream), and how
    to dial through it. Built once per distinct upstream URL when the configuration is
    read, so choosing a route costs no allocation.
    """

    __slots__ = ("authorization", "host", "label", "port", "proxy", "tls")

    def __init__(self, proxy: ProxyURL, caCertificate: str | None, verify: bool) -> None:
        self.proxy = proxy
        self.host = proxy.host
        self.port = proxy.port
        self.authorization = proxy.authorization()
        self.label = bracketed(proxy.host)
        self.tls = (
            clientCreator(proxy.host, caCertificate, verify) if proxy.scheme == "https" else None
        )

    def wrap(self, endpoint):
        """The endpoint of the upstream itself, with TLS when it is an https:// proxy."""
        if self.tls is None:
            return endpoint
        return wrapEndpoint(self.tls)(endpoint)

    def dialProxy(self, dialer, protocol) -> defer.Deferred:
        """A connection to the upstream proxy itself (for absolute-form requests)."""
        d = dialer.connect(self.host, self.port, protocol, self.wrap, checked=False)
        d.addErrback(self._unreachable)
        return d

    def dialThrough(
        self, dialer, host: str, port: int, protocol, originTLS=None, timeout: float = 10.0
    ) -> defer.Deferred:
        """
        Open a tunnel to C{host}:C{port} through the upstream, then connect C{protocol}
        to it (through C{originTLS}, a client connection creator, when given).

        @return: a Deferred firing with the upstream's address once the tunnel is up, or
            failing with L{UpstreamRefused} or L{DialError}.
        """
        authority = f"{bracketed(host)}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")]
        if self.authorization is not None:
            lines.append(b"Proxy-Authorization: " + self.authorization + b"\r\n")
        lines.append(b"\r\n")
        handshake = _TunnelHandshake(b"".join(lines), protocol, originTLS, self.proxy)
        d = dialer.connect(self.host, self.port, handshake, self.wrap, checked=False)
        d.addErrback(self._unreachable)
        timer = dialer.reactor.callLater(timeout, handshake.timedOut)

        def tunnelUp(ip):
            return handshake.done.addCallback(lambda _: ip)

        def notDialled(failure):
            # The timer may have failed the handshake while dialling: that result is moot.
            handshake.done.addErrback(lambda _: None)
            return failure

        def stopTimer(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addCallbacks(tunnelUp, notDialled).addBoth(stopTimer)

    def _unreachable(self, failure):
        e = failure.value
        if isinstance(e, DialError):
            raise DialError(
                e.reason,
                e.status,
                f"The upstream proxy {self.label}:{self.port} is unreachable: {e.message}",
            )
        return failure


class Upstream:
    """
    The routing of C{[upstream]}: C{rules} first (the first match decides), then
    C{no_proxy} (direct), then C{proxy}.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        routes: dict[ProxyURL, Route] = {}

        def route(proxy: ProxyURL | None) -> Route | None:
            if proxy is None:
                return None
            if proxy not in routes:
                routes[proxy] = Route(proxy, config.ca_certificate, config.verify)
            return routes[proxy]

        self.default = route(config.proxy)
        self.noProxy = config.no_proxy
        self.rules = config.rules
        self.ruleRoutes = tuple(route(rule.target) for rule in config.rules.rules)
        self.routes = tuple(routes.values())

    def routeFor(self, host: str, port: int) -> Route | None:
        """The upstream route for C{host}:C{port}, or None to go direct."""
        if self.ruleRoutes:
            index = self.rules.find(host, port)
            if index is not None:
                return self.ruleRoutes[index]
        if self.default is None or self.noProxy.matches(host, port):
            return None
        return self.default


@implementer(IHalfCloseableProtocol)
class _TunnelHandshake(Protocol):
    """
    Speaks CONNECT to the upstream, then gets out of the way: every later event is
    delegated to the inner protocol (or to a TLS layer wrapping it), so no private
    transport attribute is ever swapped.
    """

    def __init__(self, request: bytes, inner: Protocol, originTLS, proxy: ProxyURL) -> None:
        self.request = request
        self.inner = inner
        self.originTLS = originTLS
        self.proxy = proxy
        self.done: defer.Deferred = defer.Deferred()
        self._buf = b""
        self._target: Protocol | None = None
        self._label = f"{bracketed(proxy.host)}:{proxy.port}"
        self._name = f"upstream proxy {self._label}"

    def connectionMade(self) -> None:
        if self.done.called:
            # Timed out while the connection was still being made: nobody wants it now.
            self.transport.abortConnection()
            return
        noDelay(self.transport)
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self._target is not None:
            self._target.dataReceived(data)
            return
        if self.done.called:
            return  # failed (timed out, refused): the connection is being aborted
        try:
            block, self._buf = splitResponseHead(self._buf + data, _MAX_HEAD)
            if block is None:
                return
            head = parseResponseHead(block)
        except HTTPError as e:
            self._fail(DialError("reset", 502, f"The {self._name} answered badly: {e.reason}."))
            return
        rest, self._buf = self._buf, b""
        if not 200 <= head.status < 300:
            reason = head.reason.decode("latin-1")[:80]
            self._fail(UpstreamRefused(self._label, head.status, reason))
            return
        target = TLSLayer(self.originTLS, self.inner) if self.originTLS is not None else self.inner
        self._target = target
        target.makeConnection(self.transport)
        self.done.callback(None)
        if rest:
            target.dataReceived(rest)

    def _fail(self, error: Exception) -> None:
        if not self.done.called:
            self.done.errback(error)
        if self.transport is not None:
            self.transport.abortConnection()

    def timedOut(self) -> None:
        if self._target is None:
            self._fail(
                DialError("timeout", 504, f"The {self._name} did not open the tunnel in time.")
            )

    def readConnectionLost(self) -> None:
        target = self._target
        if target is not None and hasattr(target, "readConnectionLost"):
            target.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        target = self._target
        if target is not None and hasattr(target, "writeConnectionLost"):
            target.writeConnectionLost()

    def connectionLost(self, reason) -> None:
        if self._target is not None:
            self._target.connectionLost(reason)
        elif not self.done.called:
            problem = describeFailure(reason)
            if problem is not None:
                # An https:// upstream whose certificate fails verification (or any handshake
                # failure): say so, not just "closed".
                self.done.errback(
                    DialError("tls", 502, f"TLS to the {self._name} failed: {problem}")
                )
            else:
                self.done.errback(
                    DialError(
                        "reset", 502, f"The {self._name} closed the connection during CONNECT."
                    )
                )
