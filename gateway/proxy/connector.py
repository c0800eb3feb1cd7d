"""
Where an exchange's upstream side comes from: a pooled HTTP/1.1 connection, or a new one,
direct, through the upstream proxy, or with verified TLS to the origin of an intercepted
tunnel. The exchange asks; this finds (L{gateway.exchange.side.Connector}).
"""

from __future__ import annotations

from ..http1.headers import bracketed
from ..message import Request
from .dial import problemFor
from .origin import OriginConnection

__all__ = ["OriginConnector"]


class OriginConnector:
    """The forward proxy's connector: pool first, then dial (see L{open})."""

    def __init__(self, rt) -> None:
        self.rt = rt

    def open(self, request: Request, exchange, fresh: bool = False) -> None:
        rt = self.rt
        route = rt.upstream.routeFor(request.host, request.port)
        key = _poolKey(request, route)
        if not fresh:
            conn = rt.pool.get(key)
            if conn is not None:
                exchange.upstreamReady(conn, True)
                return
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

        def failed(failure) -> None:
            problem = problemFor(failure.value)
            if problem.code == "internal":
                rt.log.failure("dialling {host}", failure, host=bracketed(request.host))
            exchange.upstreamUnavailable(problem)

        d.addCallbacks(connected, failed)


def _poolKey(request: Request, route) -> tuple:
    if route is None:
        return (request.scheme, request.host, request.port)
    if request.scheme == "http":
        # Absolute-form requests share connections to the upstream, whatever the origin.
        return ("upstream", route.host, route.port)
    return (request.scheme, request.host, request.port, "upstream")
