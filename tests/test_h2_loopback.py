"""
gateway.h2 against real HTTP/2 peers over loopback TLS (proxygate's own TLS layer and ALPN
contexts), before the exchange core wires it into the proxy:

 - the client-facing protocol (H2ServerProtocol, ALPN h2 from a per-host context) serving
   curl --http2 (nghttp2): single, 20 parallel streams, and a rate-limited reader of a large
   body with what the proxy holds measured;
 - the origin-facing protocol (H2ClientProtocol, dialled with a mirrored ALPN offer) against
   the h2 test origin: bodies, trailers, and the ALPN choice of an http/1.1-only origin.

The exchanges here are small stand-ins that answer from memory; the reactor is the test's
(pytest-twisted), curl runs in a thread.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread

from gateway.h2.connection import H2ClientProtocol, H2Limits, H2ServerProtocol
from gateway.message import Response
from gateway.tls import H2, alpnOffer, clientCreator, createCA
from gateway.tls.hostcontexts import ServerContextCache
from gateway.tls.layer import AwaitHandshake, TLSFactory, wrapEndpoint
from tests.support import payload, payloadChunks
from tests.support.h2origin import H2Origin
from tests.support.mitmorigin import OriginPKI

CURL = shutil.which("curl")
needsCurl = pytest.mark.skipif(CURL is None, reason="no curl")


class BytesExchange:
    """Answers GET /bytes/N with conftest's payload, produced while the stream lets it."""

    def __init__(self, stream, record: dict) -> None:
        self.stream = stream
        self.record = record
        self.paused = False
        n = int(stream.request.path.split(b"/")[2])
        self.chunks = payloadChunks(n, 16384)
        stream.throttle(self)
        stream.sendHead(Response(200, b"OK", b"HTTP/1.1", [(b"content-type", b"a/b")], n))

    def requestData(self, data: bytes) -> None:
        pass

    def requestEnd(self, trailers=None) -> None:
        self._produce()

    def requestFlush(self) -> None:
        pass

    def _produce(self) -> None:
        stream = self.stream
        while not self.paused and not stream.closed:
            chunk = next(self.chunks, None)
            if chunk is None:
                stream.end()
                break
            stream.sendData(chunk)
            self.record["peak"] = max(self.record.get("peak", 0), stream.buffered)
        stream.flush()

    def pause(self) -> None:
        self.paused = True
        self.record["pauses"] = self.record.get("pauses", 0) + 1

    def resume(self) -> None:
        self.paused = False
        reactor.callLater(0, self._produce)

    # the stream pauses what it is throttling as a producer
    @property
    def producer(self):
        return self

    pauseProducing = pause
    resumeProducing = resume

    def downstreamLost(self) -> None:
        self.record["lost"] = self.record.get("lost", 0) + 1

    def timedOut(self) -> None:
        pass


@pytest.fixture(scope="module")
def ca():
    return createCA("h2 loopback CA")


@pytest.fixture
def h2server(ca, tmp_path):
    """H2ServerProtocol behind proxygate's TLS, agreeing to h2 for 'localhost'."""
    cache = ServerContextCache(ca)
    record: dict = {"streams": 0}
    caFile = tmp_path / "ca.pem"
    caFile.write_bytes(ca.pem())

    def dispatch(stream):
        record["streams"] += 1
        return BytesExchange(stream, record)

    class Factory(protocol.Factory):
        def buildProtocol(self, addr):
            return H2ServerProtocol(
                H2Limits(), reactor, ("https", "localhost", 443, b"localhost"), "-", dispatch
            )

    factory = TLSFactory(Factory(), cache.serverCreator("localhost", H2))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port, caFile, record
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CURL, "-sS", *args], capture_output=True, timeout=60)


@needsCurl
@pytest_twisted.inlineCallbacks
def test_curlParallelStreams(h2server):
    """curl --http2 -Z: 20 streams on one connection, every body whole."""
    port, caFile, record = h2server
    args = ["--http2", "-Z", "--cacert", str(caFile), "-w", "%{http_version} %{size_download}\n"]
    for i in range(20):
        args += ["-o", "/dev/null", f"https://localhost:{port}/bytes/{50000 + i}"]
    done = yield deferToThread(curl, *args)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.decode().split("\n")[:-1]) == sorted(
        f"2 {50000 + i}" for i in range(20)
    )
    assert record["streams"] == 20


@needsCurl
@pytest_twisted.inlineCallbacks
def test_curlSingleBody(h2server):
    port, caFile, _ = h2server
    done = yield deferToThread(
        curl, "--http2", "--cacert", str(caFile), f"https://localhost:{port}/bytes/300000"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload(300000)


@needsCurl
@pytest_twisted.inlineCallbacks
def test_curlSlowReaderHeldBounded(h2server):
    """
    curl reading 8 MB at 2 MB/s, with a 32 MB stream window of its own: the transport's
    buffer (not curl's window) pauses the producing side, and what the stream holds never
    passes one chunk.
    """
    port, caFile, record = h2server
    n = 8 * 1024 * 1024
    done = yield deferToThread(
        curl, "--http2", "--limit-rate", "2M", "--cacert", str(caFile), "-o", "/dev/null",
        "-w", "%{size_download}", f"https://localhost:{port}/bytes/{n}",
    )  # fmt: skip
    assert done.stdout == str(n).encode(), done.stderr
    assert record["pauses"] >= 1
    assert record["peak"] <= 16384


# -- the origin-facing protocol against the h2 test origin ------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return OriginPKI(tmp_path_factory.mktemp("h2loop"))


class Collect:
    """A fake exchange for the upstream side: records events, fires when the response ends."""

    def __init__(self) -> None:
        self.head = None
        self.body = bytearray()
        self.trailers = None
        self.done: defer.Deferred = defer.Deferred()

    def responseHead(self, response) -> None:
        self.head = response

    def responseData(self, data: bytes) -> None:
        self.body += data

    def responseEnd(self, trailers=None) -> None:
        self.trailers = trailers
        self.done.callback(self)

    def responseFlush(self) -> None:
        pass

    def upstreamLost(self, problem) -> None:
        self.done.errback(Exception(problem.detail))

    def upstreamFailed(self, problem) -> None:
        self.done.errback(Exception(f"{problem.status} {problem.detail}"))


@defer.inlineCallbacks
def dial(origin: H2Origin, pki: OriginPKI, offered):
    """
    Reach the origin over proxygate's TLS offering C{offered} by ALPN, wait for its choice
    (AwaitHandshake), and attach an H2ClientProtocol if it chose h2: (choice, protocol).
    """
    creator = clientCreator("localhost", str(pki.caCert), True, alpnOffer(offered))
    endpoint = wrapEndpoint(creator)(TCP4ClientEndpoint(reactor, "127.0.0.1", origin.port))
    waiting = AwaitHandshake()
    yield endpoint.connect(protocol.Factory.forProtocol(lambda: waiting))
    layer = yield waiting.done
    chosen = layer.negotiatedProtocol
    if chosen != b"h2":
        layer.loseConnection()  # (the proxy would attach its HTTP/1.1 origin protocol)
        return chosen, None
    conn = H2ClientProtocol(H2Limits(), reactor, "127.0.0.1")
    waiting.switch(conn)
    return chosen, conn


def get(path: bytes):
    from gateway.message import Request

    return Request(b"GET", "https", "localhost", 443, b"localhost", path, b"HTTP/2", [], 0)


@pytest_twisted.inlineCallbacks
def test_originStreams(pki):
    """Mirrored offer h2, http/1.1: the origin chooses h2; bodies and trailers come back."""
    origin = H2Origin(pki)
    try:
        chosen, conn = yield dial(origin, pki, (b"h2", b"http/1.1"))
        assert chosen == b"h2"
        exchanges = []
        for path in (b"/bytes/2000000", b"/trailers", b"/bytes/10"):
            ex = Collect()
            stream = conn.openStream(ex)
            stream.sendHead(get(path))
            exchanges.append(ex)
        conn.flush()
        yield defer.gatherResults([e.done for e in exchanges]).addTimeout(20, reactor)
        big, trailers, small = exchanges
        assert big.head.status == 200 and big.head.length == 2000000
        assert bytes(big.body) == payload(2000000)
        assert trailers.trailers == [(b"grpc-status", b"0"), (b"x-trailer", b"yes")]
        assert bytes(small.body) == payload(10)
        assert origin.alpn == ["h2"] and len(origin.h2requests) == 3
        conn.drain()
    finally:
        origin.close()


@pytest_twisted.inlineCallbacks
def test_http11OnlyOriginChoice(pki):
    """An origin without h2 answers the mirrored offer with http/1.1: both legs are h1."""
    origin = H2Origin(pki, http2=False)
    try:
        chosen, conn = yield dial(origin, pki, (b"h2", b"http/1.1"))
        assert chosen == b"http/1.1" and conn is None
    finally:
        origin.close()


@pytest_twisted.inlineCallbacks
def test_awaitHandshakeFails(pki, ca, tmp_path):
    """A handshake that fails (an origin certificate from another CA) fails C{done}."""
    import ssl

    origin = H2Origin(pki)
    other = tmp_path / "other.pem"
    other.write_bytes(ca.pem())
    try:
        creator = clientCreator("localhost", str(other), True, ("h2",))
        endpoint = wrapEndpoint(creator)(TCP4ClientEndpoint(reactor, "127.0.0.1", origin.port))
        waiting = AwaitHandshake()
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: waiting))
        with pytest.raises(ssl.SSLCertVerificationError):
            yield waiting.done
    finally:
        origin.close()
