"""
Where an exchange's upstream side comes from: a stream on a shared HTTP/2 origin connection,
a pooled HTTP/1.1 connection, or a new one, direct, through the upstream proxy, or with
verified TLS to the origin of an intercepted tunnel. The exchange asks; this finds
(L{gateway.exchange.side.Connector}).

HTTP/2 to origins exists inside intercepted tunnels only ([mitm] http2): a decrypted request
(https://) takes a stream on a pooled h2 connection to its origin whenever one takes another,
whatever its client spoke (the heads are wire-neutral: an HTTP/1.1 client's request goes out
as an h2 stream), except an upgrade, which only HTTP/1.1 can carry. A request that came over
HTTP/2 and finds nothing pooled dials offering h2 (and http/1.1), and the origin's choice
decides its protocol; requests of the same origin that come meanwhile wait for that dial
rather than open connections of their own. Every other dial offers http/1.1, as before.
"""

from __future__ import annotations

from ..http1.headers import bracketed
from ..message import Request
from ..tls.contexts import H2, HTTP11
from .dial import problemFor
from .origin import OriginConnection

__all__ = ["OriginConnector"]

#: What a request that came over HTTP/2 offers an origin it dials for itself.
_H2_OFFER = (H2, HTTP11)


class OriginConnector:
    """The forward proxy's connector: pools first, then dial (see L{open})."""

    def __init__(self, rt) -> None:
        self.rt = rt
        self._h2Dials: dict[tuple, list] = {}  # key -> requests waiting for its h2 dial

    def open(self, request: Request, exchange, fresh: bool = False) -> None:
        rt = self.rt
        route = rt.upstream.routeFor(request.host, request.port)
        key = _poolKey(request, route)
        if not fresh:
            h2pool = rt.h2pool
            if (
                h2pool is not None
                and request.scheme == "https"
                and request.upgrade is None
                and rt.interceptor.http2
            ):
                conn = h2pool.get(key)
                if conn is not None:
                    exchange.upstreamReady(conn.openStream(exchange), True)
                    return
            conn = rt.pool.get(key)
            if conn is not None:
                exchange.upstreamReady(conn, True)
                return
        if (
            request.version == b"HTTP/2"
            and request.scheme == "https"
            and rt.interceptor is not None
            and rt.interceptor.http2
        ):
            self._openH2(request, exchange, route, key)
            return
        self._dial(request, exchange, route, key)

    def _dial(self, request: Request, exchange, route, key: tuple) -> None:
        """A new HTTP/1.1 connection for C{exchange}."""
        rt = self.rt
        if route is None:
            conn = OriginConnection(key, f"the origin {request.host}")
            wrap = rt.interceptor.originTLS(request.host) if request.scheme == "https" else None
            d = rt.dialer.connect(request.host, request.port, conn, wrap)
        elif request.scheme == "http":
            # Absolute form to the upstream proxy, on connections shared by every origin.
            conn = OriginConnection(
                key,
                f"the upstream proxy {route.label}:{route.port}",
                absolute=True,
                authorization=route.authorization,
                viaProxy=True,
            )
            d = route.dialProxy(rt.dialer, conn)
        else:
            conn = OriginConnection(key, f"the origin {request.host}", viaProxy=True)
            d = route.dialThrough(
                rt.dialer,
                request.host,
                request.port,
                conn,
                rt.interceptor.originCreator(request.host),
                timeout=rt.dialer.connectTimeout,
            )
        rt.pool.adopt(conn)

        def connected(ip: str) -> None:
            conn.ip = ip
            exchange.upstreamReady(conn, False)

        d.addCallbacks(connected, self._failed, errbackArgs=(request, (exchange,)))

    def _failed(self, failure, request: Request, exchanges) -> None:
        problem = problemFor(failure.value)
        if problem.code == "internal":
            self.rt.log.failure("dialling {host}", failure, host=bracketed(request.host))
        for exchange in exchanges:
            exchange.upstreamUnavailable(problem)

    def _openH2(self, request: Request, exchange, route, key: tuple) -> None:
        """
        Dial offering h2 and http/1.1, once per origin at a time: the exchanges that come
        while it is under way wait for it, and take streams on it if the origin chose h2.
        """
        waiting = self._h2Dials.get(key)
        if waiting is not None:
            waiting.append((request, exchange))
            return
        from .originleg import dialOrigin, h2Pool, originLeg

        rt = self.rt
        waiting = self._h2Dials[key] = []

        def connected(result) -> None:
            del self._h2Dials[key]
            ip, handshake = result
            leg = originLeg(rt, handshake, ip, key, request.host, route is not None)
            if isinstance(leg, OriginConnection):
                exchange.upstreamReady(leg, False)
                # The origin speaks HTTP/1.1: the others get connections of their own.
                for other, otherExchange in waiting:
                    self._dial(other, otherExchange, route, key)
                return
            exchange.upstreamReady(leg.openStream(exchange), False)
            h2Pool(rt).add(key, leg)
            for other, otherExchange in waiting:
                self.open(other, otherExchange)

        def failed(failure) -> None:
            del self._h2Dials[key]
            self._failed(failure, request, [exchange, *(e for _, e in waiting)])

        dialOrigin(rt, request.host, request.port, route, _H2_OFFER).addCallbacks(connected, failed)


def _poolKey(request: Request, route) -> tuple:
    if route is None:
        return (request.scheme, request.host, request.port)
    if request.scheme == "http":
        # Absolute-form requests share connections to the upstream, whatever the origin.
        return ("upstream", route.host, route.port)
    return (request.scheme, request.host, request.port, "upstream")
