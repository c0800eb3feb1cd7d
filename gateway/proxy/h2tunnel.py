"""
The client leg of an intercepted tunnel that agreed on HTTP/2: an h2 connection
(L{gateway.h2.connection.H2ServerProtocol}) over the tunnel's TLS layer, whose every stream
is one exchange, with what an HTTP/1.1 request inside a tunnel gets
(L{gateway.proxy.client.ClientConnection} with a C{tunnel}): the CONNECT's user, the
tunnel's origin and nothing else (the h2 head's :authority is checked, never routed on),
Max-Forwards, mode "mitm" in the metrics and the access log, per-API figures (a gRPC call's
per method, with its grpc-status), and the tunnel's connector. Limits are the h2
connection's own (streams, header list, Rapid Reset, idle), from the same INI keys.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from ..exchange.exchange import Exchange
from ..exchange.grpc import GRPCExchange, isGRPC
from ..exchange.problems import Problem
from ..exchange.transaction import Transaction
from ..h2.connection import H2Limits, H2ServerProtocol
from ..http1.headers import bracketed

__all__ = ["TunnelH2Server", "maxForwardsProblem"]


@implementer(IHandshakeListener)
class TunnelH2Server(H2ServerProtocol):
    """
    HTTP/2 inside the intercepted CONNECT C{tunnel} (a L{gateway.proxy.connect.Tunnel}).
    Its TLS handshake, like the HTTP/1.1 client connection's, says whether the client
    accepted the proxy's certificate (the tunnel is logged as intercepted, or as a
    client_tls_error).
    """

    def __init__(self, tunnel) -> None:
        rt = tunnel.rt
        authority = bracketed(tunnel.host)
        if tunnel.port != 443:
            authority += f":{tunnel.port}"
        super().__init__(
            H2Limits.fromConfig(rt.config),
            rt.reactor,
            ("https", tunnel.host, tunnel.port, authority.encode("ascii")),
            tunnel.client,
            self._dispatchStream,
            self._refusedStream,
        )
        self.rt = rt
        self.tunnel = tunnel
        self.authority = authority
        self._handshook = False

    def handshakeCompleted(self) -> None:
        self._handshook = True
        if self.transport.negotiatedProtocol != b"h2":
            # Cannot happen with a client that offered h2 to a context agreeing to h2 only;
            # speaking h2 to anyone else would be worse than closing.
            self.rt.log.warn("MITM: the client did not agree to h2: closing its tunnel")
            self.transport.abortConnection()
            return
        self.tunnel.handshakeDone()

    def connectionLost(self, reason) -> None:
        if not self._handshook:
            self.tunnel.handshakeFailed(reason)
        super().connectionLost(reason)

    def _dispatchStream(self, stream):
        """A new stream's exchange (begun), or None when the proxy answered it itself."""
        rt = self.rt
        tunnel = self.tunnel
        request = stream.request
        if request.method == b"TRACE" or request.method == b"OPTIONS":
            problem = maxForwardsProblem(request)
            if problem is not None:
                self._answer(stream, problem, request.method, request.path)
                return None
        kind = GRPCExchange if isGRPC(request.fields) else Exchange
        exchange = kind(
            rt, stream, request, mode="mitm", user=tunnel.user, connector=tunnel.connector
        )
        exchange.begin()
        return exchange

    def _refusedStream(self, stream, problem: Problem, method: bytes, path: bytes) -> None:
        """A stream answered by the h2 layer (malformed: 400, CONNECT: 501, 431): logged."""
        self._log(problem, method, path, len(problem.detail.encode("utf-8", "replace")) + 1)

    def _answer(self, stream, problem: Problem, method: bytes, path: bytes) -> None:
        proxyStatus = problem.proxyStatus
        if proxyStatus == "proxy_internal_response":
            proxyStatus = None  # not an error: nothing to report
        stream.answer(problem.status, problem.detail, proxyStatus)
        size = 0 if method == b"HEAD" else len(problem.detail.encode("utf-8", "replace")) + 1
        self._log(problem, method, path, size)

    def _log(self, problem: Problem, method: bytes, path: bytes, size: int) -> None:
        rt = self.rt
        t = Transaction(rt, self.client, method, "mitm", self.tunnel.user, b"HTTP/2")
        t.logMode = "local"
        target = path.split(b"?", 1)[0].decode("ascii", "replace")
        url = f"https://{self.authority}{target}" if target[:1] == "/" else "-"
        t.localAnswer(problem, size, url)
        problem.count(rt.metrics)
        t.record()


def maxForwardsProblem(request) -> Problem | None:
    """
    RFC 9110 §7.6.2 for TRACE and OPTIONS, as on HTTP/1.1: the proxy answers a Max-Forwards
    of 0 itself (200 for OPTIONS, 405 for TRACE) and refuses an invalid one (400); any
    other is decremented for the next hop (None: forward it).
    """
    fields = request.fields
    for i, (name, value) in enumerate(fields):
        if name == b"max-forwards":
            if not value.isdigit() or len(value) > 10:
                return Problem(400, "bad_request", "Invalid Max-Forwards.")
            hops = int(value)
            if hops == 0:
                status = 200 if request.method == b"OPTIONS" else 405
                return Problem(status, "max_forwards", "Max-Forwards reached zero at proxygate.")
            fields[i] = (name, b"%d" % (hops - 1))
            return None
    return None
