"""
Flow control shared by every relay: a transport's reading is paused while *any* reason
holds (the peer's send buffer is full, a pipelined request waits, the origin is still being
dialled), and resumed only when the last reason clears.

Registering a peer's raw transport as the producer (what twisted.protocols.portforward
does) cannot express several reasons at once, and leaves a pooled connection paused after
the relay that paused it is gone. This class can.

The writes every relay uses (L{gateway.seam.writeNow}, sent at once when nothing is queued)
and its wide reads live in L{gateway.seam}, with Twisted's other internals.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from ..seam import writeNow

__all__ = ["CONNECTING", "PEER", "PIPELINE", "ReadPauser", "TransportSide", "noDelay"]

PEER = 1  # the other side's send buffer is full
PIPELINE = 2  # a complete request is buffered behind the one being served
CONNECTING = 4  # request body bytes wait for the origin connection


@implementer(IPushProducer)
class ReadPauser:
    """
    Owns the pause state of one transport. Registered (streaming) as the producer of the
    peer's transport, so the peer's full buffer pauses this side's reading.
    """

    __slots__ = ("reasons", "transport")

    def __init__(self, transport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                self.transport.resumeProducing()

    # IPushProducer, as the peer transport sees us
    def pauseProducing(self) -> None:
        self.pause(PEER)

    def resumeProducing(self) -> None:
        self.resume(PEER)

    def stopProducing(self) -> None:
        # The peer transport is gone; its own connectionLost tears the relay down.
        pass


def noDelay(transport) -> None:
    """
    Send small writes at once (TCP_NODELAY): a proxy's writes are whole heads and bodies,
    and Nagle's wait behind a delayed ACK would add 40 ms to a request. Transports without
    the option (a TLS layer passes it down; a test's) are left as they are.
    """
    try:
        transport.setTcpNoDelay(True)
    except Exception:
        pass


class TransportSide:
    """
    What both HTTP/1.1 sides of an exchange (the client connection, an origin connection)
    do the same way over their transport: a head held back to leave with the first body
    bytes in one write, the exchange's own pause (while an upstream side is being found),
    and the backpressure arrangement with the other side (L{gateway.exchange.side}).

    Mixed into a protocol that sets C{transport}, C{pauser} and C{_held}.
    """

    _held = b""

    def _send(self, data: bytes) -> None:
        """Write C{data}, after the held head if there is one."""
        held = self._held
        if held:
            self._held = b""
            data = held + data
        writeNow(self.transport, data)

    def flush(self) -> None:
        if self._held:
            self._send(b"")

    def pause(self) -> None:
        self.pauser.pause(CONNECTING)

    def resume(self) -> None:
        self.pauser.resume(CONNECTING)

    def throttle(self, other) -> None:
        """While this transport's buffer is full, C{other} stops producing (None: stop)."""
        if other is None:
            self.transport.unregisterProducer()
        else:
            self.transport.registerProducer(other.producer, True)
