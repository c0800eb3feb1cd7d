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

from .flow import ReadPauser, widenReads, writeNow

__all__ = ["ABORT_GRACE", "Splice", "TunnelOrigin"]

ABORT_GRACE = 2.0  # seconds an aborted tunnel may spend flushing before it is cut off


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
        widenReads(self.clientTransport)
        widenReads(originTransport)
        self.metrics = metrics
        self.onEnd = onEnd
        self.fromClientBytes = 0
        self.fromOriginBytes = 0
        self._clientOpen = True
        self._originOpen = True
        self._clientWriteClosed = False
        self._originWriteClosed = False
        self._cutTimer = None
        rt = getattr(client, "rt", None)
        if rt is not None:
            self._reactor, self._flushGrace = rt.reactor, rt.idleTimeout
        else:
            from twisted.internet import reactor

            self._reactor, self._flushGrace = reactor, 300.0
        # Cross-register: a full buffer on one side pauses reading on the other.
        self.clientTransport.registerProducer(originPauser, True)
        originTransport.registerProducer(client.pauser, True)

    def fromClient(self, data: bytes) -> None:
        self.fromClientBytes += len(data)
        self.client.touch()
        writeNow(self.originTransport, data)

    def fromOrigin(self, data: bytes) -> None:
        self.fromOriginBytes += len(data)
        self.client.touch()
        writeNow(self.clientTransport, data)

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
        # Nothing more will be written to it: stop consuming from the peer (see _close).
        transport.unregisterProducer()
        if _isTLS(transport):
            # Twisted's TLS has no half-close: loseWriteConnection would reach the TCP
            # transport under the TLS layer and end the stream with no close_notify (a
            # truncation, to the peer). close_notify is how TLS ends one direction; the
            # peer may go on sending until it answers with its own.
            transport.loseConnection()
            return
        try:
            transport.loseWriteConnection()
        except Exception:
            self._close(transport, self._flushGrace)

    def _closeBoth(self) -> None:
        self._close(self.clientTransport, self._flushGrace)
        self._close(self.originTransport, self._flushGrace)

    def _close(self, transport, grace: float) -> None:
        """
        Close after flushing, and cut it off if flushing takes longer than C{grace}.

        A Twisted transport whose buffer drains while its (paused) producer is registered
        resumes the producer instead of closing (abstract.FileDescriptor.doWrite), so a
        loseConnection on a full tunnel never completed: unregister first. And a peer that
        never reads never drains: the timer aborts it.
        """
        transport.unregisterProducer()
        transport.loseConnection()
        if not (self._clientOpen or self._originOpen):
            return  # both gone already: nothing left to cut
        timer = self._cutTimer
        if timer is None or not timer.active():
            self._cutTimer = self._reactor.callLater(grace, self._cut)
        elif timer.getTime() > self._reactor.seconds() + grace:
            timer.reset(grace)

    def _cut(self) -> None:
        self._cutTimer = None
        if self._clientOpen:
            self.clientTransport.abortConnection()
        if self._originOpen:
            self.originTransport.abortConnection()

    def clientLost(self) -> None:
        self._clientOpen = False
        if self._originOpen:
            # Send what the client sent before it went, then close.
            self._close(self.originTransport, self._flushGrace)
        self._maybeEnd()

    def originLost(self) -> None:
        self._originOpen = False
        if self._clientOpen:
            # loseConnection sends what is still buffered first.
            self._close(self.clientTransport, self._flushGrace)
        self._maybeEnd()

    def abort(self) -> None:
        """Idle timeout or shutdown: close both sides now (a stuck side within seconds)."""
        self._close(self.clientTransport, ABORT_GRACE)
        self._close(self.originTransport, ABORT_GRACE)

    def _maybeEnd(self) -> None:
        if not self._clientOpen and not self._originOpen and self.onEnd is not None:
            if self._cutTimer is not None and self._cutTimer.active():
                self._cutTimer.cancel()
            self._cutTimer = None
            onEnd, self.onEnd = self.onEnd, None
            m = self.metrics
            m.moved(
                self.fromClientBytes,
                self.fromClientBytes,
                self.fromOriginBytes,
                self.fromOriginBytes,
            )
            onEnd()


def _isTLS(transport) -> bool:
    """A TLS layer (an ssl: listener, an intercepted tunnel, an https:// upstream), not TCP."""
    return getattr(transport, "TLS", False) is True


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
