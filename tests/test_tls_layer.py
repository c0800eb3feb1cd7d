"""
Tests for gateway.tls.layer (TLS on the stdlib ssl module over memory BIOs) and
gateway.seam.writeNow, over real loopback sockets: a server protocol switched to
TLS with startTLS (as an intercepted tunnel is) and a client dialled through
wrapEndpoint (as an origin leg is).
"""

from __future__ import annotations

import hashlib
import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from gateway.seam import BULK_READ, writeNow
from gateway.tls.ca import createCA
from gateway.tls.contexts import clientCreator
from gateway.tls.hostcontexts import ServerContextCache
from gateway.tls.layer import HandshakeEOF, TLSLayer, describeFailure, startTLS, wrapEndpoint


@pytest.fixture(scope="module")
def ca():
    return createCA()


@pytest.fixture
def bundle(tmp_path, ca):
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.pem())
    return str(path)


class Sink(protocol.Protocol):
    """Collects what arrives; counts deliveries; C{lost} fires with the reason (wrapped)."""

    def __init__(self):
        self.data = bytearray()
        self.deliveries = 0
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data):
        self.deliveries += 1
        self.data += data

    def connectionLost(self, reason):
        self.lost.callback([reason])  # a bare Failure would fire the errback chain


class EchoServer(Sink):
    """Goes TLS at once (as after a CONNECT's 200) and echoes a hash of what it got."""

    def connectionMade(self):
        startTLS(self, self.factory.cache.serverCreator("layer.test"))
        self.factory.server = self

    def dataReceived(self, data):
        super().dataReceived(data)
        if len(self.data) == self.factory.expect:
            self.transport.write(hashlib.sha256(self.data).hexdigest().encode())
            self.transport.loseConnection()


@pytest.fixture
def server(ca):
    factory = protocol.Factory.forProtocol(EchoServer)
    factory.cache = ServerContextCache(ca)
    factory.expect = 0
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def dial(creator, port: int, client: protocol.Protocol) -> defer.Deferred:
    endpoint = wrapEndpoint(creator)(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
    return endpoint.connect(protocol.Factory.forProtocol(lambda: client))


@pytest_twisted.inlineCallbacks
def test_bulkBothWaysWrittenBeforeHandshake(server, bundle):
    """
    8 MB written by the client before the handshake is done arrives intact (the server's
    hash matches), the answer comes back, and both sides end with a clean close_notify
    (ConnectionDone, not a truncation). Records are coalesced: far fewer deliveries than
    the 512 records of 16 KB.
    """
    payload = bytes(range(256)) * (8 * 4096)
    server.expect = len(payload)
    client = Sink()
    yield dial(clientCreator("layer.test", bundle, True), server.port, client)
    assert isinstance(client.transport, TLSLayer)
    assert client.transport.transport.bufferSize == BULK_READ  # 256 KB socket reads below TLS
    client.transport.write(payload[:1000])  # before the handshake: held, then sent in order
    client.transport.writeSequence([payload[1000:5000], payload[5000:]])
    [reason] = yield client.lost.addTimeout(30, reactor)
    assert bytes(client.data) == hashlib.sha256(payload).hexdigest().encode()
    assert reason.type.__name__ == "ConnectionDone"
    assert client.transport.negotiatedProtocol == b"http/1.1"
    assert server.server.deliveries < 256


@pytest_twisted.inlineCallbacks
def test_verificationFailureIsDescribed(server, tmp_path):
    """A client that does not trust the server's CA fails with why, in one line."""
    other = tmp_path / "other.pem"
    other.write_bytes(createCA("another CA").pem())
    client = Sink()
    yield dial(clientCreator("layer.test", str(other), True), server.port, client)
    [reason] = yield client.lost.addTimeout(10, reactor)
    assert reason.check(ssl.SSLCertVerificationError)
    # (the server sends its CA along, so OpenSSL finds a self-signed root it does not trust)
    assert describeFailure(reason) == (
        "certificate verify failed: self-signed certificate in certificate chain"
    )


@pytest_twisted.inlineCallbacks
def test_nameMismatchIsDescribed(server, bundle):
    """
    The server certifies the SNI name it is sent, so the name check is tried on an IP
    literal client-side name against a certificate for another IP (no SNI is sent).
    """
    client = Sink()
    yield dial(clientCreator("127.0.0.2", bundle, True), server.port, client)
    [reason] = yield client.lost.addTimeout(10, reactor)
    assert describeFailure(reason).startswith("the certificate does not match the host name")


@pytest_twisted.inlineCallbacks
def test_peerClosingDuringHandshake():
    """A server that accepts and closes: the client learns it was the handshake."""

    class Closer(protocol.Protocol):
        def connectionMade(self):
            self.transport.loseConnection()

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Closer), interface="127.0.0.1")
    try:
        client = Sink()
        yield dial(clientCreator("layer.test", None, False), port.getHost().port, client)
        [reason] = yield client.lost.addTimeout(10, reactor)
        assert reason.check(HandshakeEOF)
        assert describeFailure(reason) == "the peer closed the connection during the handshake"
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_garbageFromClientFailsOnlyThatConnection(server, bundle):
    """Plain text where a ClientHello belongs: that connection fails, the next works."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(500):
        if hasattr(server, "server"):
            break
        yield deferLater(0.01)
    [reason] = yield server.server.lost.addTimeout(10, reactor)
    sock.close()
    assert reason.check(ssl.SSLError)
    assert describeFailure(reason) == "http request"
    server.expect = 3
    client = Sink()
    yield dial(clientCreator("layer.test", bundle, True), server.port, client)
    client.transport.write(b"abc")
    yield client.lost.addTimeout(10, reactor)
    assert bytes(client.data) == hashlib.sha256(b"abc").hexdigest().encode()


@pytest_twisted.inlineCallbacks
def test_writeNowSendsBeforeReturning():
    """
    On an idle TCP transport the bytes are in the kernel when writeNow returns (the peer
    reads them without the reactor running); behind queued bytes they queue, in order.
    """
    server = Sink()
    connected: defer.Deferred = defer.Deferred()

    class Accept(protocol.Factory):
        def buildProtocol(self, addr):
            reactor.callLater(0, connected.callback, None)
            return server

    port = reactor.listenTCP(0, Accept(), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        yield connected
        transport = server.transport
        writeNow(transport, b"now")
        assert transport._tempDataLen == 0 and not transport.dataBuffer
        assert peer.recv(16) == b"now"
        transport.write(b"queued-")
        writeNow(transport, b"after")
        assert transport._tempDataLen == len(b"queued-after")
        got = b""
        while len(got) < 12:
            yield deferLater(0.01)
            peer.setblocking(False)
            try:
                got += peer.recv(64)
            except BlockingIOError:
                pass
        assert got == b"queued-after"
    finally:
        peer.close()
        yield port.stopListening()


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
