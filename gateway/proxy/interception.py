"""
An intercepted CONNECT between its 200 and the moment the proxy knows what the tunnel
carries, and the choices made then (L{Peek}):

- The client's first bytes are read as a TLS ClientHello (L{gateway.tls.clienthello}),
  bounded in size and in time (header_timeout). Not TLS at all (plain HTTP, ws://, SSH): the
  tunnel is relayed blind. A malformed hello: decrypted on HTTP/1.1, so that OpenSSL answers
  the client with its alert.
- With [mitm] http2 on and a client that offers h2, the origin is dialled *before* the
  client's handshake is answered, offering the client's own ALPN list; the origin's choice
  (h2, or http/1.1) is what the client is agreed, and the connection dialled serves the
  tunnel's first requests (an h2 one in the shared h2 pool, an HTTP/1.1 one in the pool).
  When the h2 pool already holds a connection to the origin that takes more streams, the
  origin chose h2 already: the client is agreed h2 with no dial.
  If that dial fails, the client still gets its handshake (HTTP/1.1) and its first request
  is answered with why (a 502, a 504, a 403 for a denied address), as when a request's own
  dial fails. Without h2 in the offer (or with http2 off) the origin is dialled per request,
  as it always was.
- A server that speaks first (FTP's banner, SMTP, SSH): when the client has sent nothing
  for L{SERVER_FIRST_WAIT} seconds, the origin is dialled raw. If it speaks while the client
  is still silent, the tunnel is relayed blind (the banner reaches the client). If the client
  sends a ClientHello first after all, interception goes on and the raw connection is closed
  unused; if it sends anything else, the raw connection is the one relayed to.
"""

from __future__ import annotations

from ..exchange.problems import Problem
from ..http1.headers import bracketed
from ..tls.clienthello import ClientHelloError, ClientHelloReader, NotTLS
from ..tls.contexts import H2, HTTP11
from .dial import problemFor
from .flow import CONNECTING

__all__ = ["SERVER_FIRST_WAIT", "Peek"]

#: Seconds of silence from the client after the 200 before the origin is dialled to hear
#: whether it speaks first. TLS clients send their hello at once (curl, browsers and gRPC
#: within milliseconds); FTP and SMTP clients wait for the server, so this is their delay.
SERVER_FIRST_WAIT = 1.0


class Peek:
    """
    The receiver of an intercepted tunnel's stream until it is known what the tunnel
    carries. A client that closes before sending anything is closed at once (its socket
    would otherwise sit in CLOSE-WAIT, holding a connection slot).
    """

    def __init__(self, tunnel, stream) -> None:
        self.tunnel = tunnel
        self.stream = stream
        self.rt = rt = tunnel.rt
        self.reader = ClientHelloReader()
        self.held: list[bytes] = []  # every byte the client sent, for what comes next
        self.decided = False
        self.raw = None  # (ip, TunnelOrigin): the origin dialled to hear it speak first
        self.rawDialling = False
        self.blindWanted = False  # the client spoke, not TLS: relay once the raw dial is up
        self._serverFirst = rt.reactor.callLater(SERVER_FIRST_WAIT, self._listenToServer)
        self._deadline = rt.reactor.callLater(rt.headerTimeout, self._silent)
        stream.setReceiver(self)

    # --- the client's stream --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.held.append(data)
        if self.decided:
            return  # the origin is being dialled: kept for the TLS layer
        _cancel(self._serverFirst)
        try:
            hello = self.reader.feed(data)
        except NotTLS:
            self._blind()
            return
        except ClientHelloError:
            self._intercept(None)  # decrypted anyway: OpenSSL tells the client what is wrong
            return
        if hello is not None:
            self._intercept(hello)

    def readConnectionLost(self) -> None:
        self.stream.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._stopTimers()
        self._dropRaw()
        self.tunnel.downstreamLost()

    # --- timers ---------------------------------------------------------------------------

    def _stopTimers(self) -> None:
        _cancel(self._serverFirst)
        _cancel(self._deadline)

    def _silent(self) -> None:
        """header_timeout passed and the tunnel is still undecided: close it."""
        if self.decided:
            return
        _cancel(self._serverFirst)
        self.decided = True
        self._dropRaw()
        self.tunnel.silent(self.stream)

    # --- a server that speaks first -------------------------------------------------------

    def _listenToServer(self) -> None:
        if self.held or self.decided or self.tunnel.done:
            return
        self.rawDialling = True
        self.tunnel.dialRaw().addCallbacks(self._rawConnected, self._rawFailed)

    def _rawConnected(self, result) -> None:
        self.rawDialling = False
        ip, origin = result
        if self.blindWanted:
            self.tunnel.relay(self.stream, ip, origin)
            return
        if self.decided or self.tunnel.done:
            origin.transport.loseConnection()  # intercepted after all, or the client left
            return
        self.raw = result
        origin.stream.setReceiver(_Listen(self, origin.stream))

    def _rawFailed(self, failure) -> None:
        self.rawDialling = False
        if self.blindWanted:
            self.tunnel.dialFailed(failure, self.stream)
        # Otherwise nobody is waiting for it: the client may still send a ClientHello, whose
        # requests will report a failure of their own.

    def serverSpoke(self) -> None:
        """The origin sent its first bytes: relay blind, unless the client began a hello."""
        if self.decided or self.held:
            self._dropRaw()  # the client speaks TLS: what the server says is not wanted
            return
        self.decided = True
        self._stopTimers()
        ip, origin = self.raw
        self.raw = None
        self.tunnel.relay(self.stream, ip, origin)

    def serverLeft(self) -> None:
        """The origin closed without a word: nothing to relay; wait for the client."""
        raw, self.raw = self.raw, None
        if raw is not None:
            raw[1].transport.loseConnection()

    def _dropRaw(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            raw[1].transport.loseConnection()

    # --- not TLS: blind -------------------------------------------------------------------

    def _blind(self) -> None:
        self.decided = True
        self._stopTimers()
        self._giveBack()
        self.stream.receiver = None  # hold what follows until the splice takes it
        raw, self.raw = self.raw, None
        if raw is not None:
            self.tunnel.relay(self.stream, *raw)
        elif self.rawDialling:
            self.blindWanted = True
            self.stream.pauser.pause(CONNECTING)
        else:
            self.tunnel.dial(self.stream)

    def _giveBack(self) -> None:
        """Put what the client sent back in its stream, in order, for the next receiver."""
        held, self.held = self.held, []
        for data in reversed(held):
            self.stream.unread(data)

    # --- TLS: decrypt ---------------------------------------------------------------------

    def _intercept(self, hello) -> None:
        self.decided = True
        self._stopTimers()
        self._dropRaw()
        tunnel = self.tunnel
        interceptor = self.rt.interceptor
        if hello is None or not interceptor.http2 or b"h2" not in (hello.alpn or ()):
            self._decrypt(HTTP11)
            return
        route = self.rt.upstream.routeFor(tunnel.host, tunnel.port)
        tunnel.viaProxy = route is not None
        key = (
            ("https", tunnel.host, tunnel.port)
            if route is None
            else ("https", tunnel.host, tunnel.port, "upstream")
        )
        pool = self.rt.h2pool
        if pool is not None and pool.get(key) is not None:
            # The origin chose h2 before and a connection to it takes more streams: no dial.
            self._decrypt(H2)
            return
        from .originleg import dialOrigin

        # Read nothing more until the origin has chosen: what arrives meanwhile is kept.
        self.stream.pauser.pause(CONNECTING)
        offer = interceptor.originOffer(hello.alpn)
        dialOrigin(self.rt, tunnel.host, tunnel.port, route, offer).addCallbacks(
            self._dialled, self._notDialled, (key, route)
        )

    def _dialled(self, result, key: tuple, route) -> None:
        from .originleg import h2Pool, originLeg

        ip, handshake = result
        tunnel = self.tunnel
        if tunnel.done:
            handshake.transport.loseConnection()  # the client left meanwhile
            return
        tunnel.ip = ip
        leg = originLeg(self.rt, handshake, ip, key, tunnel.host, route is not None)
        if handshake.transport.negotiatedProtocol == b"h2":
            h2Pool(self.rt).add(key, leg)
            protocol = self.rt.interceptor.clientProtocol(b"h2")
        else:
            # For this tunnel's first request (or anyone's: it is the pool's now).
            leg.reusable = True
            self.rt.pool.put(leg)
            protocol = HTTP11
        self._decrypt(protocol)

    def _notDialled(self, failure) -> None:
        if self.tunnel.done:
            return
        problem = problemFor(failure.value)
        if problem.code == "internal":
            self.rt.log.failure("dialling {host}", failure, host=bracketed(self.tunnel.host))
        self.tunnel.connector = DialFailed(self.rt, problem)
        self._decrypt(HTTP11)

    def _decrypt(self, protocol: str) -> None:
        stream = self.stream
        self._giveBack()
        stream.pauser.resume(CONNECTING)
        self.tunnel.decrypt(stream, protocol if protocol == H2 else HTTP11)


class _Listen:
    """The raw origin's stream receiver until it says something (or goes)."""

    def __init__(self, peek: Peek, stream) -> None:
        self.peek = peek
        self.stream = stream

    def dataReceived(self, data: bytes) -> None:
        # Kept for the splice, in order: later bytes queue behind these.
        stream = self.stream
        stream.receiver = None
        stream.unread(data)
        self.peek.serverSpoke()

    def readConnectionLost(self) -> None:
        self.peek.serverLeft()

    def connectionLost(self, reason) -> None:
        if self.peek.raw is not None and self.peek.raw[1].stream is self.stream:
            self.peek.raw = None


class DialFailed:
    """
    The connector of a tunnel whose pre-dial failed: its first request is answered with
    that failure (the client waited for it already); the next ones dial as usual.
    """

    def __init__(self, rt, problem: Problem) -> None:
        self.rt = rt
        self.problem: Problem | None = problem

    def open(self, request, exchange, fresh: bool = False) -> None:
        problem, self.problem = self.problem, None
        if problem is None:
            self.rt.connector.open(request, exchange, fresh)
        else:
            exchange.upstreamUnavailable(problem)


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()
