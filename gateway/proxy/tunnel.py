"""
Connections handed over to raw bytes, and the pipe between two of them.

A connection stops speaking HTTP in one way only: its protocol hands its transport over as a
L{Stream} (a CONNECT established, a 101 relayed, an intercepted tunnel's TLS) and from then
on delivers its socket events to the stream's receiver. The receiver is a L{Splice} end, a
TLS layer, or the first-byte peek of an intercepted CONNECT. Nobody rewires anybody else's
protocol.

Once a tunnel is up the proxy relays bytes, nothing else: no HTTP is ever written into the
stream (Squid injects an error page into upgraded WebSockets; this must not). Each side's
full send buffer pauses the other side's reading, a half-close on one side is passed on as a
half-close on the other (RFC 9110 §9.3.6: send what is outstanding, then close), and an idle
tunnel is closed after [proxy] idle_timeout by the connection that owns the timer.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from ..seam import widenReads, writeNow
from .flow import ReadPauser, noDelay

__all__ = ["ABORT_GRACE", "Splice", "Stream", "TunnelOrigin"]

ABORT_GRACE = 2.0  # seconds an aborted tunnel may spend flushing before it is cut off


def _nothing() -> None:
    pass


class Stream:
    """
    A connection handed over to raw bytes.

    Its owner (the protocol of the connection) calls L{dataReceived},
    L{readConnectionLost} and L{connectionLost}; they reach the receiver set with
    L{setReceiver}, after the bytes the owner had read past the handover (early bytes: an
    eager ClientHello behind a CONNECT, a server's first bytes behind a 101).

    @ivar transport: the transport to write to (TCP, or a TLS layer).
    @ivar pauser: pauses the transport's reading (see L{gateway.proxy.flow.ReadPauser}).
    @ivar touch: pushes the owner's idle deadline out (no-op if it has none).
    @ivar owner: the protocol that handed over.
    @ivar idle: what ends the stream when the owner's idle deadline passes or the service
        shuts down (the receiver sets it: a splice aborts both sides); None: close it.
    """

    __slots__ = ("_early", "_ended", "idle", "owner", "pauser", "receiver", "touch", "transport")

    def __init__(self, transport, pauser: ReadPauser, touch=_nothing, early=b"", owner=None):
        self.transport = transport
        self.pauser = pauser
        self.touch = touch
        self.owner = owner
        self.receiver = None
        self.idle = None
        self._early = [early] if early else []
        self._ended: list = []  # readConnectionLost / connectionLost before a receiver

    def setReceiver(self, receiver) -> None:
        """Deliver everything to C{receiver} from now on, what was held back first."""
        self.receiver = receiver
        early, self._early = self._early, []
        for data in early:
            receiver.dataReceived(data)
        ended, self._ended = self._ended, []
        for event, args in ended:
            getattr(receiver, event)(*args)

    def unread(self, data: bytes) -> None:
        """Give C{data} back: the next receiver gets it first."""
        self._early.insert(0, data)

    def dataReceived(self, data: bytes) -> None:
        receiver = self.receiver
        if receiver is not None:
            receiver.dataReceived(data)
        else:
            self._early.append(data)

    def readConnectionLost(self) -> None:
        if self.receiver is not None:
            self.receiver.readConnectionLost()
        else:
            self._ended.append(("readConnectionLost", ()))

    def connectionLost(self, reason) -> None:
        if self.receiver is not None:
            self.receiver.connectionLost(reason)
        else:
            self._ended.append(("connectionLost", (reason,)))


class _End:
    """One end of a splice, as its stream's receiver."""

    __slots__ = ("_lost", "_readClosed", "_received")

    def __init__(self, received, readClosed, lost) -> None:
        self._received = received
        self._readClosed = readClosed
        self._lost = lost

    def dataReceived(self, data: bytes) -> None:
        self._received(data)

    def readConnectionLost(self) -> None:
        self._readClosed()

    def connectionLost(self, reason) -> None:
        self._lost()


class Splice:
    """
    Relays between a client stream and an origin stream until both are gone, then calls
    C{onEnd(bytes from the client, bytes from the origin)} once.
    """

    def __init__(
        self,
        client: Stream,
        origin: Stream,
        reactor,
        flushGrace: float,
        onEnd: Callable[[int, int], None],
    ) -> None:
        self.client = client
        self.origin = origin
        self.clientTransport = client.transport
        self.originTransport = origin.transport
        widenReads(self.clientTransport)
        widenReads(self.originTransport)
        self.onEnd = onEnd
        self.fromClientBytes = 0
        self.fromOriginBytes = 0
        self._clientOpen = True
        self._originOpen = True
        self._clientWriteClosed = False
        self._originWriteClosed = False
        self._cutTimer = None
        self._reactor = reactor
        self._flushGrace = flushGrace
        self._touch = client.touch
        # Cross-register: a full buffer on one side pauses reading on the other.
        self.clientTransport.registerProducer(origin.pauser, True)
        self.originTransport.registerProducer(client.pauser, True)
        client.idle = self.abort
        client.setReceiver(_End(self.fromClient, self.clientReadClosed, self.clientLost))
        origin.setReceiver(_End(self.fromOrigin, self.originReadClosed, self.originLost))

    def fromClient(self, data: bytes) -> None:
        self.fromClientBytes += len(data)
        self._touch()
        writeNow(self.originTransport, data)

    def fromOrigin(self, data: bytes) -> None:
        self.fromOriginBytes += len(data)
        self._touch()
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
            # TLS has no half-close here: close_notify is how TLS ends one direction, and
            # the peer may go on sending until it answers with its own.
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
            onEnd(self.fromClientBytes, self.fromOriginBytes)


def _isTLS(transport) -> bool:
    """A TLS layer (an ssl: listener, an intercepted tunnel, an https:// upstream), not TCP."""
    return getattr(transport, "TLS", False) is True


@implementer(IHalfCloseableProtocol)
class TunnelOrigin(Protocol):
    """
    The origin side of a CONNECT tunnel: a connection that is a L{Stream} from the start.
    Bytes a server sends before the splice exists (a banner) are held for it.
    """

    def __init__(self) -> None:
        self.stream: Stream | None = None

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.stream = Stream(self.transport, ReadPauser(self.transport), owner=self)

    def dataReceived(self, data: bytes) -> None:
        self.stream.dataReceived(data)

    def readConnectionLost(self) -> None:
        self.stream.readConnectionLost()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self.stream is not None:
            self.stream.connectionLost(reason)
