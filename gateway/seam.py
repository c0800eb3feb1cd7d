"""
Every use of Twisted's private internals, in one place, behind one shape check.

proxygate reaches below Twisted's public API where measurement said it pays (each use says
how much), and nowhere else:

- L{writeNow}: a TCP write sent before returning when nothing is queued (the transport's
  write buffer: C{_tempDataLen}, C{dataBuffer}, C{offset}, C{_writeDisconnecting}, and its
  C{socket}). A sixth of a keep-alive GET's CPU was the reactor's write bookkeeping.
- L{widenReads}: reads of 256 KB on bulk relays (C{bufferSize}, a class attribute of
  C{FileDescriptor} that Twisted itself treats as a knob).
- L{dispatchDirectly}: the epoll loop without the per-event legacy log context (the
  reactor's C{_poller}, C{_selectables}, C{_doReadOrWrite}): get1k 108 -> 92 µs/request.
- L{clearExitSignal}: twistd re-raises the signal it stopped on (C{_exitSignal}); a drained
  stop on SIGTERM is a clean exit.
- L{replaceProtocol}: the protocol a TCP connection delivers to (C{transport.protocol}): a
  C{haproxy:} listener hands the connection to the client protocol once the PROXY header is
  read, so that the client protocol's transport is the plain TCP connection (and
  L{writeNow}'s fast path applies); a STARTTLS-style server (tests) starts TLS mid-life.
  proxygate's own connections hand over to raw bytes through
  L{gateway.proxy.tunnel.Stream} instead.
- L{replacePeer}: that connection's peer from then on is the address in the PROXY header.
- L{unreadInput}: whether bytes wait in a pooled origin connection's socket that the
  reactor has not delivered yet (C{transport.socket}): a response nobody asked for must
  never be read as the next request's.

L{problems} lists what the installed Twisted lacks of these shapes. Each user checks its
own shape before it takes the fast path and falls back to the public API otherwise, so a
Twisted that changed is slower, never wrong; setup.cfg pins Twisted's major version, and
tests/test_seam.py fails loudly on a Twisted whose shapes moved.
"""

from __future__ import annotations

import array
import fcntl
import termios

from twisted.internet.abstract import FileDescriptor
from twisted.internet.tcp import Connection
from twisted.logger import Logger

__all__ = [
    "BULK_READ",
    "clearExitSignal",
    "dispatchDirectly",
    "problems",
    "replacePeer",
    "replaceProtocol",
    "unreadInput",
    "widenReads",
    "writeNow",
]

_log = Logger()


def problems() -> list[str]:
    """The private shapes this module relies on that the installed Twisted does not have."""
    missing = []

    def needs(owner, name: str, where: str) -> None:
        # Instance attributes are found among the names their class's __init__ assigns.
        if not hasattr(owner, name) and name not in owner.__init__.__code__.co_names:
            missing.append(f"{where}.{name}")

    for name in ("dataBuffer", "offset", "_writeDisconnecting", "TLS", "disconnecting"):
        needs(Connection, name, "twisted.internet.tcp.Connection")
    needs(FileDescriptor, "_tempDataLen", "twisted.internet.abstract.FileDescriptor")
    needs(Connection, "socket", "twisted.internet.tcp.Connection")
    needs(Connection, "protocol", "twisted.internet.tcp.Connection")
    if not isinstance(getattr(FileDescriptor, "bufferSize", None), int):
        missing.append("twisted.internet.abstract.FileDescriptor.bufferSize")
    from twisted.internet.base import ReactorBase

    needs(ReactorBase, "_exitSignal", "twisted.internet.base.ReactorBase")
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux: the loop is left alone
        return missing
    if EPollReactor.doIteration is not EPollReactor.doPoll:
        missing.append("twisted.internet.epollreactor.EPollReactor.doIteration is doPoll")
    for name in ("_doReadOrWrite", "_poller", "_selectables"):
        needs(EPollReactor, name, "twisted.internet.epollreactor.EPollReactor")
    return missing


# --- writes ---------------------------------------------------------------------------------


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


# --- the reactor --------------------------------------------------------------------------


def dispatchDirectly(reactor) -> bool:
    """
    Make C{reactor} dispatch socket events without the per-event log context, if it is
    Twisted's own epoll reactor with the internals this replaces (any other reactor is left
    alone). Returns whether it did.

    For every ready descriptor, Twisted's epoll reactor calls the handler through
    C{log.callWithLogger}: it asks the protocol for its log prefix, builds a context
    dictionary, and pushes and pops it on a thread-local stack, so that a legacy
    C{log.msg} inside the handler is tagged with the connection. proxygate logs through
    C{twisted.logger}, which never reads that context. The handler itself,
    C{_doReadOrWrite}, already catches and logs whatever a read or write raises, so
    dispatching to it directly loses nothing but the prefix on legacy log lines.
    Installed by proxygate's own processes only (the twistd plugin and the workers).
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:
        return False
    # Only the loop this replaces: not a subclass, not another reactor, not a Twisted whose
    # epoll loop has changed shape (then proxygate runs on Twisted's own, a little slower).
    if type(reactor) is not EPollReactor or EPollReactor.doIteration is not EPollReactor.doPoll:
        return False
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    if not isinstance(selectables, dict) or dispatch is None or not hasattr(reactor, "_poller"):
        return False

    def doIteration(timeout: float | None) -> None:
        # EPollReactor.doPoll, less callWithLogger. EINTR is retried by Python itself
        # (PEP 475); any other error is as loud as it is there.
        events = reactor._poller.poll(-1 if timeout is None else timeout, len(selectables))
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except Exception:
                    # _doReadOrWrite logs what the handler raises; this is its own failure
                    # (a connectionLost that raised), which callWithLogger also logged.
                    _log.failure(
                        "While dispatching an event on {selectable!r}", selectable=selectable
                    )

    reactor.doIteration = doIteration
    return True


def clearExitSignal(reactor) -> None:
    """
    Forget the signal the reactor stopped on: twistd (>= 20.3) re-raises it after the
    reactor stops, so a drained stop on SIGTERM would end as a death by signal, not with
    status 0.
    """
    if hasattr(reactor, "_exitSignal"):
        reactor._exitSignal = None


def exitSignal(reactor) -> int | None:
    """The signal the reactor is stopping on, if it stops on one."""
    return getattr(reactor, "_exitSignal", None)


# --- protocols ------------------------------------------------------------------------------


def replaceProtocol(transport, protocol) -> None:
    """
    Make C{transport} deliver its events to C{protocol} from now on. A TCP connection
    delivers to its C{protocol} attribute; a layer that wraps a protocol (a TLS layer)
    to its C{wrappedProtocol}.
    """
    if hasattr(transport, "wrappedProtocol"):
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol


def replacePeer(transport, address) -> None:
    """
    Make C{transport.getPeer()} answer C{address} from now on, on this transport object
    only (an instance attribute over the class's method).
    """
    transport.getPeer = lambda: address


def unreadInput(transport) -> bool:
    """
    Whether the kernel holds bytes for C{transport} (TCP, or a TLS layer over TCP) that the
    reactor has not delivered. One C{ioctl(FIONREAD)}: no exception on the usual answer
    (nothing), a quarter of what a C{MSG_PEEK} recv costs. The peer's FIN is not seen here;
    a request on a connection the origin had closed fails and is retried (the exchange).
    A transport of another kind answers False.
    """
    below = getattr(transport, "transport", None)
    if getattr(transport, "TLS", False) and below is not None:
        transport = below  # a TLS layer delivers all it decrypts: only its socket can hold more
    sock = getattr(transport, "socket", None) if isinstance(transport, Connection) else None
    if sock is None:
        return False
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, _waiting, True)
    except OSError:
        return True  # not a usable socket either
    return _waiting[0] > 0


#: FIONREAD's answer (one reactor thread: one buffer).
_waiting = array.array("i", [0])
