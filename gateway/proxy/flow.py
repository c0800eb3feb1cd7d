"""
Flow control shared by every relay: a transport's reading is paused while *any* reason
holds (the peer's send buffer is full, a pipelined request waits, the origin is still being
dialled), and resumed only when the last reason clears.

Registering a peer's raw transport as the producer (what twisted.protocols.portforward
does) cannot express several reasons at once, and leaves a pooled connection paused after
the relay that paused it is gone. This class can.

L{writeNow} is the write every relay uses: it sends at once when nothing is queued; and
L{widenReads} makes bulk relays read 256 KB at a time.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.internet.tcp import Connection
from zope.interface import implementer

__all__ = ["CONNECTING", "PEER", "PIPELINE", "ReadPauser", "widenReads", "writeNow"]

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


def writeNow(transport, data: bytes) -> None:
    """
    C{transport.write(data)}, but sent before returning when the transport has nothing
    queued.

    Why: a Twisted TCP transport only queues a write and asks the reactor to watch for
    writability, so every write costs two C{epoll_ctl} calls and a pass of the reactor
    loop before its C{send}; on a keep-alive GET that bookkeeping was a sixth of the
    proxy's CPU. When nothing is queued, sending now keeps the order and the
    backpressure (whatever the kernel does not take is queued the usual way and the
    producer is paused by it). Anything but a plain, open TCP transport (a TLS layer, a
    transport closing) takes the ordinary path.
    """
    if (
        not isinstance(transport, Connection)
        or transport.TLS
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        or transport.disconnecting
        or not transport.connected
        or transport._writeDisconnecting
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)  # let the transport notice the error on its own path
        return
    if sent < len(data):
        transport.write(data[sent:])


#: Socket reads on relays that move bulk (tunnels, TLS layers). Twisted reads 64 KB at a
#: time; a 170 KB upload is then one read, one pass through the relay (and one decryption)
#: and one send instead of three of each. It is also the transport's write-buffer mark for
#: pausing its producer, so it stays modest: memory stays bounded per connection.
BULK_READ = 262144


def widenReads(transport) -> None:
    """Read up to L{BULK_READ} bytes per socket read on C{transport} (a plain TCP one)."""
    if isinstance(transport, Connection):
        transport.bufferSize = BULK_READ
