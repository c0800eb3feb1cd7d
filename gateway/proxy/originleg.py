"""
The origin leg of an intercepted tunnel when HTTP/2 may be spoken on it: dialled with an
ALPN offer (the client's own, mirrored: [mitm] http2), held until its TLS handshake says
what the origin chose, then given the protocol for that choice: an h2 connection shared in
the runtime's L{H2Pool}, or an HTTP/1.1 L{OriginConnection} for the HTTP/1.1 pool.

Used twice: before an intercepted client's handshake is answered (the tunnel's pre-dial,
L{gateway.proxy.interception}), and by the connector for requests that came over HTTP/2
when no pooled connection takes them. Loaded only then: it imports gateway.h2.
"""

from __future__ import annotations

from twisted.internet import defer

from ..h2.connection import H2ClientProtocol, H2Limits
from ..h2.pool import H2Pool
from ..http1.headers import bracketed
from ..tls.layer import AwaitHandshake, describeFailure
from .dial import DialError
from .origin import OriginConnection

__all__ = ["dialOrigin", "h2Pool", "originLeg"]


def h2Pool(rt) -> H2Pool:
    """The runtime's pool of origin h2 connections, made on first use."""
    pool = rt.h2pool
    if pool is None:
        pool = rt.h2pool = H2Pool()
    return pool


def dialOrigin(rt, host: str, port: int, route, alpn: tuple[str, ...]) -> defer.Deferred:
    """
    Dial C{host}:C{port} (direct, or through the upstream C{route}) with TLS verified for
    C{host}, offering C{alpn}, and wait for the handshake: the TCP connect and the
    handshake together within [proxy] connect_timeout.

    @return: a Deferred firing with (ip, L{AwaitHandshake}) once the handshake is done
        (C{waiting.transport.negotiatedProtocol} says what the origin chose), or failing
        with what L{gateway.proxy.dial.problemFor} reads (a TLS failure as a
        L{DialError} "tls" naming why).
    """
    interceptor = rt.interceptor
    waiting = AwaitHandshake()
    timeout = rt.dialer.connectTimeout
    deadline = rt.reactor.seconds() + timeout
    if route is None:
        d = rt.dialer.connect(host, port, waiting, interceptor.originTLS(host, alpn))
    else:
        d = route.dialThrough(
            rt.dialer, host, port, waiting, interceptor.originCreator(host, alpn), timeout=timeout
        )

    def connected(ip: str):
        remaining = max(deadline - rt.reactor.seconds(), 0.001)
        timer = rt.reactor.callLater(remaining, _handshakeTimedOut, waiting)

        def stop(result):
            if timer.active():
                timer.cancel()
            return result

        return waiting.done.addBoth(stop).addCallbacks(
            lambda _layer: (ip, waiting), _handshakeFailed, errbackArgs=(host, port)
        )

    return d.addCallback(connected)


def _handshakeTimedOut(waiting: AwaitHandshake) -> None:
    if not waiting.done.called:
        waiting.done.errback(_Timeout())
        waiting.transport.abortConnection()


class _Timeout(Exception):
    pass


def _handshakeFailed(failure, host: str, port: int):
    if failure.check(_Timeout):
        raise DialError(
            "timeout", 504, f"the TLS handshake with {bracketed(host)}:{port} took too long"
        )
    why = describeFailure(failure)
    if why is None:
        why = "the origin closed the connection during the handshake"
    raise DialError("tls", 502, f"TLS to the origin {host} failed: {why}")


def originLeg(rt, waiting: AwaitHandshake, ip: str, key: tuple, host: str, viaProxy: bool):
    """
    The protocol for a handshaken origin connection, attached: an L{H2ClientProtocol} when
    the origin chose h2 (the caller shares it: L{h2Pool}), else an L{OriginConnection}
    adopted by the HTTP/1.1 pool.
    """
    if waiting.transport.negotiatedProtocol == b"h2":
        conn = H2ClientProtocol(H2Limits.fromConfig(rt.config), rt.reactor, ip, viaProxy)
        waiting.switch(conn)
        return conn
    conn = OriginConnection(key, f"the origin {host}", viaProxy=viaProxy)
    conn.ip = ip
    waiting.switch(conn)
    rt.pool.adopt(conn)
    return conn
