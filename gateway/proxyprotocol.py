# -*- test-case-name: tests.test_proxyprotocol -*-
"""
The PROXY protocol (HAProxy's, versions 1 and 2) on ``haproxy:`` listeners: a load balancer
in front of proxygate opens each connection with a header naming the client it accepted, and
from then on that client is the connection's peer for everything: C{allowed_client_cidrs},
the access log, X-Forwarded-For.

Why the address used to be lost with Twisted's own C{haproxy:} prefix
(L{twisted.protocols.haproxy.HAProxyProtocolWrapper}): the wrapper connects the wrapped
protocol at once, when the TCP connection is accepted, and only parses the header when the
first bytes arrive. The client protocol reads its peer in C{connectionMade}
(L{gateway.proxy.client.ClientConnection}): at that moment the wrapper's C{getPeer} still
answers with the balancer's address, so the policy, the log and X-Forwarded-For all saw the
balancer. The wrapper also stays between the socket and the protocol for the whole
connection, so every write takes its extra call and misses the direct send of
L{gateway.seam.writeNow} (which only takes a plain TCP transport), and its parsers
(private modules) refuse a version 2 header that arrives in reads shorter than 16 bytes,
accept any text as a version 1 address, and raise C{ValueError} out of C{dataReceived} on a
bad port.

Here, L{ProxyHeaderReader} owns the connection until the header is complete (or refuses it:
no header, a malformed one, or none within the header timeout closes the connection), and
only then builds the real protocol and hands it the TCP transport itself, with the header's
source as its peer. Nothing stays in between: the relays see a plain TCP connection, and
C{writeNow}'s direct send applies behind a balancer exactly as without one.

The header is trusted from whoever can connect: a C{haproxy:} listener belongs on an
address only the balancer can reach (and C{allowed_client_cidrs} then applies to the
clients the balancer names, not to the balancer).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from .seam import replacePeer, replaceProtocol

__all__ = [
    "ProxiedEndpoint",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderFactory",
    "ProxyHeaderReader",
    "parseProxyHeader",
]

V1_PREFIX = b"PROXY "
#: The longest version 1 line, CRLF included (the specification's figure).
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16
_PORT = re.compile(rb"[0-9]{1,5}")


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header; the message says why, in a few words."""


@frozen
class ProxyHeader:
    """
    What the balancer said. C{source} is None when the header names no client (version 1
    C{UNKNOWN}, version 2 C{LOCAL}: the balancer's own health checks): the connection's
    real peer is then the peer.
    """

    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def _port(text: bytes) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError("bad port in the PROXY header")
    return int(text)


def _v1(data: bytes) -> tuple[ProxyHeader | None, int]:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header without CRLF in 107 bytes")
        return None, 0
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(1), end + 2
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    kind = ipaddress.IPv4Address if fields[1] == b"TCP4" else ipaddress.IPv6Address
    try:
        source = str(kind(fields[2].decode("ascii")))
        destination = str(kind(fields[3].decode("ascii")))
    except ValueError:
        raise ProxyHeaderError("bad address in the PROXY v1 header") from None
    return ProxyHeader(1, (source, _port(fields[4])), (destination, _port(fields[5]))), end + 2


def _v2(data: bytes) -> tuple[ProxyHeader | None, int]:
    if len(data) < _V2_FIXED:
        return None, 0
    versionCommand, family, length = struct.unpack_from("!BBH", data, 12)
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    command = versionCommand & 0x0F
    if command > 1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    total = _V2_FIXED + length
    if len(data) < total:
        return None, 0
    if command == 0 or family == 0x00:
        # LOCAL (the balancer's own connection) or UNSPEC: no client is named.
        return ProxyHeader(2), total
    body = data[_V2_FIXED:total]
    if family == 0x11 and length >= 12:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        make = ipaddress.IPv4Address
    elif family == 0x21 and length >= 36:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        make = ipaddress.IPv6Address
    else:
        # UDP or UNIX sources, or an address block too short: nothing a TCP client
        # policy can be decided on.
        raise ProxyHeaderError("PROXY v2 header without a TCP source address")
    return ProxyHeader(2, (str(make(src)), sport), (str(make(dst)), dport)), total


def parseProxyHeader(data: bytes) -> tuple[ProxyHeader | None, int]:
    """
    The PROXY header at the start of C{data}: (header, bytes it took), or (None, 0) while
    C{data} could still become one.

    @raise ProxyHeaderError: C{data} does not start with a valid header.
    """
    if data[:12] == V2_SIGNATURE[: len(data)] and data[:1] == b"\r":
        return _v2(data)
    if data[:6] == V1_PREFIX[: len(data)] and data[:1] == b"P":
        return _v1(data) if len(data) > 6 else (None, 0)
    if not data:
        return None, 0
    raise ProxyHeaderError("the connection did not start with a PROXY protocol header")


def _address(host: str, port: int):
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


class ProxyHeaderReader(Protocol):
    """
    The protocol of a C{haproxy:} connection until its header is read; then the transport
    belongs to the protocol the wrapped factory builds for the header's source.
    """

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.factory = factory
        self._buf = b""
        self._timer = None
        self._done = False

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.timeout(), self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        try:
            header, used = parseProxyHeader(self._buf)
        except ProxyHeaderError as e:
            self._refuse(str(e))
            return
        if header is not None:
            self._handOver(header, self._buf[used:])

    def _handOver(self, header: ProxyHeader, rest: bytes) -> None:
        self._done = True
        self._cancel()
        self._buf = b""
        transport = self.transport
        if header.source is not None:
            # The connection's peer from now on, for every getPeer (the client protocol's,
            # a TLS layer's above it), on this one transport object, so the transport stays
            # a plain TCP connection (see the module docstring).
            replacePeer(transport, _address(*header.source))
        protocol = self.factory.wrappedFactory.buildProtocol(transport.getPeer())
        if protocol is None:
            transport.loseConnection()
            return
        replaceProtocol(transport, protocol)
        protocol.makeConnection(transport)
        if rest and transport.connected and not transport.disconnecting:
            protocol.dataReceived(rest)

    def _refuse(self, problem: str) -> None:
        self._done = True
        self._cancel()
        self.factory.refused(self.transport.getPeer(), problem)
        self.transport.loseConnection()

    def _timedOut(self) -> None:
        self._timer = None
        if not self._done:
            self._refuse("no PROXY protocol header within header_timeout")

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason) -> None:
        self._done = True
        self._cancel()


def _ignoreRefusal(peer, problem: str) -> None:
    pass


class ProxyHeaderFactory(Factory):
    """
    Wraps C{wrappedFactory}: each connection first reads a PROXY header (within
    C{timeout()} seconds, by C{clock}); C{refused(peer, problem)} hears of every connection
    closed for want of a valid one.
    """

    noisy = False

    def __init__(
        self,
        wrappedFactory,
        clock=None,
        timeout: Callable[[], float] = lambda: 30.0,
        refused: Callable[[object, str], None] = _ignoreRefusal,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.wrappedFactory = wrappedFactory
        self.clock = clock
        self.timeout = timeout
        self.refused = refused

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = getattr(wrapped, "logPrefix", lambda: type(wrapped).__name__)()
        return f"{prefix} (PROXY)"

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr) -> ProxyHeaderReader:
        return ProxyHeaderReader(self)


class _WrappingListener:
    """
    What the inner endpoint sees as its reactor: the listening calls wrap their factory in
    a L{ProxyHeaderFactory} (so the header is read below an ssl: listener's TLS, where it
    is sent); everything else is the real reactor's (or the workers' socket sharer's).
    """

    def __init__(self, reactor, wrap: Callable[[Factory], Factory]) -> None:
        self._reactor = reactor
        self._wrap = wrap

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._reactor.listenTCP(port, self._wrap(factory), backlog, interface)

    def listenUNIX(self, address, factory, *args, **kwargs):
        return self._reactor.listenUNIX(address, self._wrap(factory), *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)


@implementer(IStreamServerEndpoint)
class ProxiedEndpoint:
    """C{haproxy:<inner endpoint>}: the inner endpoint, its connections read a PROXY header."""

    def __init__(self, reactor, inner: str, makeEndpoint, wrap=None) -> None:
        # Built now, so a bad inner description fails where the configuration is checked.
        listener = _WrappingListener(reactor, wrap if wrap is not None else ProxyHeaderFactory)
        self._endpoint = makeEndpoint(listener, inner)

    def listen(self, protocolFactory):
        return self._endpoint.listen(protocolFactory)
