"""
In-process HTTP/1.1 connections for the proxy's protocol classes: a runtime on a fake clock,
client and origin connections over in-memory transports, and a connector and dialer that
hand out origins on demand. No socket is opened; a test drives both ends by hand.

    rt = runtime()
    client, down = connectClient(rt)
    client.dataReceived(b"GET http://o.test/x HTTP/1.1\\r\\nHost: o.test\\r\\n\\r\\n")
    origin, up = rt.connector.connect()
    assert up.value().startswith(b"GET /x HTTP/1.1")
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import parseConfig
from gateway.metrics import Metrics
from gateway.proxy.client import ClientConnection
from gateway.proxy.origin import OriginConnection
from gateway.proxy.runtime import Runtime
from tests.support.playbook import RecordingLog

#: Loopback origins allowed (they are all fake here), nothing else changed.
BASE_INI = "[proxy]\ndeny_destinations = 169.254.0.0/16\n"


class Transport(StringTransport):
    """A StringTransport that also half-closes and records how it was closed."""

    TLS = False

    def __init__(self, peer: str = "127.0.0.1", port: int = 50000) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer, port))
        self.writeClosed = False
        self.aborted = False
        self.producerPaused = 0  # pauseProducing calls on the transport itself

    def unregisterProducer(self) -> None:
        # As Twisted's own transports: no producer is no error.
        self.producer = None
        self.streaming = None

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def pauseProducing(self) -> None:
        self.producerPaused += 1
        super().pauseProducing()

    def take(self) -> bytes:
        """What was written since the last take."""
        data = self.value()
        self.clear()
        return data


class FakeConnector:
    """
    As the proxy's connector, a pooled origin first; else the request waits until the test
    calls L{connect}, which answers the oldest with a new origin.
    """

    def __init__(self, rt) -> None:
        self.rt = rt
        self.waiting: list = []

    def open(self, request, exchange, fresh: bool = False) -> None:
        pooled = None if fresh else self.rt.pool.get((request.scheme, request.host, request.port))
        if pooled is not None:
            exchange.upstreamReady(pooled, True)
        else:
            self.waiting.append((request, exchange, fresh))

    def connect(self, reused: bool = False) -> tuple[OriginConnection, Transport]:
        request, exchange, _ = self.waiting.pop(0)
        origin = OriginConnection(
            (request.scheme, request.host, request.port), f"the origin {request.host}"
        )
        transport = Transport("192.0.2.1", 80)
        origin.makeConnection(transport)
        origin.ip = "192.0.2.1"
        self.rt.pool.adopt(origin)
        exchange.upstreamReady(origin, reused)
        return origin, transport


class FakeDialer:
    """A Dialer whose connections succeed (or fail) when the test says."""

    connectTimeout = 10.0

    def __init__(self) -> None:
        self.calls: list = []

    def connect(self, host: str, port: int, protocol, wrap=None, checked: bool = True):
        d = defer.Deferred()
        self.calls.append((host, port, protocol, d))
        return d

    def succeed(self, ip: str = "192.0.2.9") -> Transport:
        _host, port, protocol, d = self.calls.pop(0)
        transport = Transport(ip, port)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        d.callback(ip)
        return transport


def runtime(ini: str = "", authenticator=None) -> Runtime:
    config = parseConfig(BASE_INI + ini)
    rt = Runtime(config, MemoryReactorClock(), Metrics())
    rt.accessLog = RecordingLog()
    rt.authenticator = authenticator
    rt.connector = FakeConnector(rt)
    rt.dialer = FakeDialer()
    return rt


def connectClient(rt, peer: str = "127.0.0.1") -> tuple[ClientConnection, Transport]:
    client = ClientConnection(rt)
    transport = Transport(peer)
    client.makeConnection(transport)
    return client, transport


def get(target: bytes = b"http://o.test/x", *fields: bytes, method: bytes = b"GET") -> bytes:
    host = target.split(b"/")[2] if target.startswith(b"http") else b"o.test"
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host, *fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def head(data: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, fields by lower-case name, what follows the head) of a response."""
    block, _, rest = data.partition(b"\r\n\r\n")
    first, *lines = block.split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        fields[name.lower()] = value
    return first, fields, rest
