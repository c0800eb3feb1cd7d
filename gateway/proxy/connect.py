"""
CONNECT: check the target, then either dial it and splice, or intercept it (TLS with
proxygate's CA, and the requests inside served like any other).

The 200 is written raw, with no Content-Length or Transfer-Encoding (RFC 9110 §9.3.6), and
the bytes the client sent right behind the CONNECT head (an eager TLS ClientHello) are the
first bytes relayed or decrypted, never dropped.

An intercepted tunnel is answered 200 at once; what comes next says what it carries
(L{gateway.proxy.interception}): a TLS ClientHello is decrypted, anything else (ws://, plain
HTTP, SSH) is relayed blind as if the host were not intercepted, and so is a tunnel whose
server speaks first (FTP, SMTP). Decrypting means a TLS layer on the client's stream and,
inside it, a second client connection (L{gateway.proxy.client.ClientConnection} with this
tunnel as its C{tunnel}), or an HTTP/2 connection (L{gateway.proxy.h2tunnel}) when the client
and the origin agreed on h2; either way the requests go to the CONNECT target only.
"""

from __future__ import annotations

from ..exchange.problems import Problem
from ..exchange.transaction import Transaction
from ..http1.headers import bracketed, parseAuthority
from ..http1.parse import HTTPError, RequestHead
from ..policy import checkPort
from ..tls.contexts import H2, HTTP11
from ..tls.layer import TLSLayer, describeFailure
from .dial import problemFor
from .flow import CONNECTING
from .tunnel import Splice, Stream, TunnelOrigin

__all__ = ["Tunnel"]

#: tunnels_total{result} of each problem code; a code not listed is its own result.
_RESULTS = {
    "bad_request": "bad_request",
    "port": "denied",
    "destination": "denied",
    "destination_ip": "denied",
    "upstream_refused": "upstream_refused",
    "incomplete": "reset",
    "internal": "error",
    "client_gone": "client_gone",
    "client_tls": "client_tls_error",
}


class Tunnel(Transaction):
    """
    A CONNECT from the moment its head is parsed to the end of its tunnel (or its refusal).
    Counted as a request of the forward proxy, logged as a tunnel.
    """

    __slots__ = (
        "connection",
        "connector",
        "creator",
        "done",
        "head",
        "host",
        "port",
        "rt",
        "splice",
    )

    def __init__(self, rt, connection, head: RequestHead, user: str | None) -> None:
        super().__init__(rt, connection.client, b"CONNECT", connection.mode, user, head.version)
        self.logMode = "tunnel"
        self.rt = rt
        self.connection = connection
        self.head = head
        self.host = ""
        self.port = 0
        self.splice: Splice | None = None
        self.creator = None
        # What the decrypted requests' exchanges open their upstream with: None for the
        # runtime's connector (see L{gateway.proxy.interception})
        self.connector = None
        self.done = False  # logged: nothing more is counted

    def logURL(self) -> str:
        return f"{bracketed(self.host)}:{self.port}" if self.host else "-"

    def begin(self) -> None:
        rt = self.rt
        try:
            self.host, self.port = parseAuthority(self.head.target, None)
        except HTTPError as e:
            self._refuse(Problem(400, "bad_request", f"Bad CONNECT target: {e.reason}."))
            return
        decision = checkPort(rt.connectPorts, self.port)
        if not decision.allowed:
            self._refuse(
                Problem(
                    403,
                    "port",
                    f"CONNECT to port {self.port} is not allowed by this proxy "
                    f"({decision.detail}).",
                )
            )
            return
        decision = rt.destinations.checkName(self.host, self.port)
        if not decision.allowed:
            self._refuse(Problem(403, "destination", f"Destination denied: {decision.detail}"))
            return
        mitm = rt.interceptor
        if mitm is not None and mitm.intercepts(self.host, self.port):
            if not mitm.permits(self.host):
                # Inspection was asked for, and the CA may not sign for this host: refused,
                # never relayed blind.
                self._refuse(
                    Problem(
                        403,
                        "destination",
                        f"Destination denied: the proxy's CA may not certify {self.host} "
                        "([mitm] name_constraints), and the tunnel would be inspected.",
                    )
                )
                return
            self._intercept(mitm)
        else:
            self.dial(None)

    # --- a blind tunnel -------------------------------------------------------------------

    def dial(self, stream: Stream | None) -> None:
        """
        Dial the target, then splice. C{stream}: the client's, when the 200 is out already
        (an intercepted tunnel found not to carry TLS); else the 200 waits for the dial and
        the client's early bytes stay in its buffer, unread further.
        """
        if stream is not None:
            stream.pauser.pause(CONNECTING)
        self.dialRaw().addCallbacks(
            lambda result: self._connected(*result, stream), self.dialFailed, None, None, (stream,)
        )

    def dialRaw(self):
        """The target, dialled for a blind relay: a Deferred of (ip, L{TunnelOrigin})."""
        rt = self.rt
        origin = TunnelOrigin()
        route = rt.upstream.routeFor(self.host, self.port)
        self.viaProxy = route is not None
        if route is None:
            d = rt.dialer.connect(self.host, self.port, origin)
        else:
            d = route.dialThrough(
                rt.dialer, self.host, self.port, origin, timeout=rt.dialer.connectTimeout
            )
        return d.addCallback(lambda ip: (ip, origin))

    def _connected(self, ip: str, origin: TunnelOrigin, stream: Stream | None) -> None:
        self.ip = ip
        if self.done:
            origin.transport.loseConnection()  # the client left while this was dialled
            return
        self.code = 200
        self.rt.metrics.live.tunnels += 1
        if stream is None:
            stream = self.connection.establish()
        else:
            stream.pauser.resume(CONNECTING)
        self.splice = Splice(
            stream, origin.stream, self.rt.reactor, self.rt.idleTimeout, self._ended
        )

    def dialFailed(self, failure, stream: Stream | None) -> None:
        if self.done:
            return
        problem = problemFor(failure.value)
        if problem.code == "internal":
            self.rt.log.failure("dialling {host}", failure, host=self.host)
        if stream is not None:
            # The 200 is out: the tunnel can only end (HTTP bytes here would be tunnel data).
            self.problem = problem
            problem.count(self.rt.metrics)
            self._end(problem.status)
            stream.transport.loseConnection()
            return
        self._refuse(problem)

    def _ended(self, fromClient: int, fromOrigin: int) -> None:
        self.rt.metrics.live.tunnels -= 1
        self.received = self.sentUpstream = fromClient
        self.sent = fromOrigin
        self._end(200, "ok", "TCP_TUNNEL")

    # --- interception ---------------------------------------------------------------------

    def _intercept(self, mitm) -> None:
        try:
            self.creator = mitm.serverCreator(self.host)
        except ValueError as e:
            self._refuse(Problem(400, "bad_request", f"Bad CONNECT target: {e}."))
            return
        from .interception import Peek

        Peek(self, self.connection.establish())

    def relay(self, stream: Stream, ip: str, origin: TunnelOrigin) -> None:
        """An intercepted tunnel that is not decrypted after all: relay it blind."""
        self._connected(ip, origin, stream)

    def decrypt(self, stream: Stream, protocol: str = HTTP11) -> None:
        """
        The client speaks TLS: be the origin to it (agreeing to ALPN C{protocol}: h2, or
        http/1.1), and serve what it asks inside.
        """
        if protocol == H2:
            from .h2tunnel import TunnelH2Server

            inner = self.connection.nested(self, TunnelH2Server(self))
            creator = self.rt.interceptor.serverCreator(self.host, H2)
        else:
            inner = self.connection.nested(self)
            creator = self.creator
        layer = TLSLayer(creator, inner)
        layer.makeConnection(stream.transport)
        stream.setReceiver(layer)

    def handshakeDone(self) -> None:
        """The client accepted proxygate's certificate: the tunnel is intercepted."""
        self.code = 200
        self._end(200, "intercepted", "TCP_TUNNEL")

    def handshakeFailed(self, reason) -> None:
        """
        The client's TLS handshake with proxygate failed (most often: it does not trust the
        CA, and said so with an alert): the one thing an admin rolling out MITM must see.
        """
        if self.done:
            return
        why = describeFailure(reason) or "the client closed the connection"
        self.problem = Problem(0, "client_tls", f"The client's TLS handshake failed: {why}")
        self._end(200, action="TCP_TUNNEL")

    # --- endings --------------------------------------------------------------------------

    def _refuse(self, problem: Problem) -> None:
        """No tunnel: answer and close (early tunnel bytes may follow the head)."""
        self.problem = problem
        problem.count(self.rt.metrics)
        self.code = problem.status
        self.sent = self.connection.refuse(problem, close=True)
        self._end(problem.status)

    def timedOut(self) -> None:
        """The client's idle deadline passed while the target was being dialled."""
        self.downstreamLost()
        self.connection.abort()

    def silent(self, stream: Stream) -> None:
        """An intercepted tunnel whose client sent nothing usable in header_timeout: closed."""
        if not self.done:
            self.problem = Problem(
                0, "header_timeout", "The client sent no TLS ClientHello within header_timeout."
            )
            self.problem.count(self.rt.metrics)
            self._end(200, action="TCP_TUNNEL")
        stream.transport.abortConnection()

    def downstreamLost(self) -> None:
        """Client gone before the tunnel was up."""
        if self.done:
            return
        self.problem = Problem(0, "client_gone", "The client closed the connection.")
        self._end(self.code, action="TCP_TUNNEL_ABORTED")

    def _end(self, code: int, result: str | None = None, action: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.code = code
        if result is None:
            why = self.problem.code if self.problem is not None else "internal"
            result = _RESULTS.get(why, why)
        self.rt.metrics.live.tunnelEnded(result)
        self.record(action)
