"""
The byte pipe behind CONNECT and behind a 101 Switching Protocols.

Once a tunnel is up the proxy relays bytes, nothing else: no HTTP is ever written into the
stream (Squid injects an error page into upgraded WebSockets; this must not). Each side's
full send buffer pauses the other side's reading, a half-close on one side is passed on as a
half-close on the other (RFC 9110 §9.3.6: send what is outstanding, then close), and an idle
tunnel is closed after [proxy] idle_timeout.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from .flow import ReadPauser

__all__ = ["Splice", "TunnelOrigin"]


class Splice:
    """
    Relays between a client connection and an origin transport.

    The client side calls C{fromClient}, C{clientReadClosed}, C{clientLost}; the origin
    side calls C{fromOrigin}, C{originReadClosed}, C{originLost}. C{onEnd(result)} runs
    once, when both sides are gone.
    """

    def __init__(self, client, originTransport, originPauser: ReadPauser, metrics, onEnd):
        self.client = client
        self.clientTransport = client.transport
        self.originTransport = originTransport
        self.metrics = metrics
        self.onEnd = onEnd
        self.fromClientBytes = 0
        self.fromOriginBytes = 0
        self._clientOpen = True
        self._originOpen = True
        self._clientWriteClosed = False
        self._originWriteClosed = False
        # Cross-register: a full buffer on one side pauses reading on the other.
        self.clientTransport.registerProducer(originPauser, True)
        originTransport.registerProducer(client.pauser, True)

    def fromClient(self, data: bytes) -> None:
        self.fromClientBytes += len(data)
        self.client.touch()
        self.originTransport.write(data)

    def fromOrigin(self, data: bytes) -> None:
        self.fromOriginBytes += len(data)
        self.client.touch()
        self.clientTransport.write(data)

    def clientReadClosed(self) -> None:
        """The client sent FIN: pass it on, keep relaying the origin's answer."""
        if not self._originWriteClosed:
            self._originWriteClosed = True
            self._halfClose(self.originTransport)
        if self._clientWriteClosed:
            self._closeBoth()

    def originReadClosed(self) -> None:
        if not self._clientWriteClosed:
            self._clientWriteClosed = True
            self._halfClose(self.clientTransport)
        if self._originWriteClosed:
            self._closeBoth()

    def _halfClose(self, transport) -> None:
        try:
            transport.loseWriteConnection()
        except Exception:
            transport.loseConnection()

    def _closeBoth(self) -> None:
        self.clientTransport.loseConnection()
        self.originTransport.loseConnection()

    def clientLost(self) -> None:
        self._clientOpen = False
        if self._originOpen:
            self.originTransport.loseConnection()
        self._maybeEnd()

    def originLost(self) -> None:
        self._originOpen = False
        if self._clientOpen:
            # loseConnection sends what is still buffered first.
            self.clientTransport.loseConnection()
        self._maybeEnd()

    def abort(self) -> None:
        """Idle timeout or shutdown: close both sides now."""
        self.clientTransport.loseConnection()
        self.originTransport.loseConnection()

    def _maybeEnd(self) -> None:
        if not self._clientOpen and not self._originOpen and self.onEnd is not None:
            onEnd, self.onEnd = self.onEnd, None
            m = self.metrics
            m.fromClient.inc(self.fromClientBytes)
            m.toUpstream.inc(self.fromClientBytes)
            m.fromUpstream.inc(self.fromOriginBytes)
            m.toClient.inc(self.fromOriginBytes)
            onEnd()


@implementer(IHalfCloseableProtocol)
class TunnelOrigin(Protocol):
    """The origin side of a CONNECT tunnel: hands everything to the splice."""

    splice: Splice | None = None

    def __init__(self) -> None:
        self.pauser: ReadPauser | None = None
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self.pauser = ReadPauser(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.fromOrigin(data)
        else:
            self._early.append(data)  # server-speaks-first protocols, before the 200 is out

    def attach(self, splice: Splice) -> None:
        self.splice = splice
        early, self._early = self._early, []
        for data in early:
            splice.fromOrigin(data)

    def readConnectionLost(self) -> None:
        if self.splice is not None:
            self.splice.originReadClosed()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self.splice is not None:
            self.splice.originLost()
