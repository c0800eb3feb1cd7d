"""
gateway.h2's two roles joined by a minimal relay exchange (the shape the exchange core will
have: DownstreamEvents and UpstreamEvents in, Side calls out), with real clients and servers
on both ends over loopback TLS: grpcio through it to a grpcio server (unary with trailing
metadata, server streaming, a 3 MB message, an error status), curl --http2 with 20 parallel
streams and a slow reader to the h2 test origin, and trailers.

The relay is not the proxy (no policy, no metrics, no CONNECT): it checks that the h2 layer
carries real HTTP/2 and gRPC traffic intact, with flow control bounding what it holds,
before the wiring lands.
"""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread

from gateway.h2.connection import H2ClientProtocol, H2Limits, H2ServerProtocol
from gateway.tls import H2, alpnOffer, clientCreator, createCA
from gateway.tls.hostcontexts import ServerContextCache
from gateway.tls.layer import AwaitHandshake, TLSFactory, wrapEndpoint
from tests.support import payload
from tests.support.grpcservice import BIG, GRPCServer, channel, methods
from tests.support.h2origin import H2Origin, h2fetch
from tests.support.mitmorigin import OriginPKI

CURL = shutil.which("curl")
needsCurl = pytest.mark.skipif(CURL is None, reason="no curl")


class Relay:
    """One exchange: a client's stream (down) to a stream on the origin connection (up)."""

    def __init__(self, down, origin: H2ClientProtocol, stats: dict) -> None:
        self.down = down
        self.stats = stats
        self.up = origin.openStream(self)
        down.throttle(self.up)  # the client reads slowly: the origin's stream is paused
        self.up.throttle(down)  # the origin reads slowly: the client's stream is paused
        self.up.sendHead(down.request)
        self.headSent = False

    # DownstreamEvents
    def requestData(self, data: bytes) -> None:
        self.up.sendData(data)

    def requestEnd(self, trailers=None) -> None:
        self.up.end(trailers)

    def requestFlush(self) -> None:
        self.up.flush()

    def downstreamLost(self) -> None:
        self.up.release(False)

    def timedOut(self) -> None:
        self.down.abort()

    # UpstreamEvents
    def responseHead(self, response) -> None:
        self.headSent = response.status >= 200
        self.down.sendHead(response)

    def responseData(self, data: bytes) -> None:
        self.down.sendData(data)

    def responseEnd(self, trailers=None) -> None:
        self.down.end(trailers)
        self.up.release(True)

    def responseFlush(self) -> None:
        self.down.flush()

    def upstreamFailed(self, problem) -> None:
        if self.headSent:
            self.down.abort()
        else:
            self.down.answer(problem.status, problem.detail)

    def upstreamLost(self, reason) -> None:
        self.down.abort()


@pytest.fixture(scope="module")
def ca():
    return createCA("h2 relay CA")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return OriginPKI(tmp_path_factory.mktemp("h2relay"))


@defer.inlineCallbacks
def dialOrigin(port: int, caFile: str):
    creator = clientCreator("localhost", caFile, True, alpnOffer((b"h2", b"http/1.1")))
    endpoint = wrapEndpoint(creator)(TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    waiting = AwaitHandshake()
    yield endpoint.connect(protocol.Factory.forProtocol(lambda: waiting))
    layer = yield waiting.done
    assert layer.negotiatedProtocol == b"h2"
    conn = H2ClientProtocol(H2Limits(), reactor, "127.0.0.1")
    waiting.switch(conn)
    return conn


@defer.inlineCallbacks
def startRelay(ca, originPort: int, originCA: str, tmp_path):
    """A TLS listener (our CA, ALPN h2) relaying every stream to the origin: (port, CA file)."""
    origin = yield dialOrigin(originPort, originCA)
    stats: dict = {"relays": 0}

    def dispatch(stream):
        stats["relays"] += 1
        return Relay(stream, origin, stats)

    authority = b"localhost:%d" % originPort
    target = ("https", "localhost", originPort, authority)

    servers: list[H2ServerProtocol] = []

    class Factory(protocol.Factory):
        def buildProtocol(self, addr):
            server = H2ServerProtocol(H2Limits(), reactor, target, "127.0.0.1", dispatch)
            servers.append(server)
            return server

    def sample() -> None:
        """What every stream of both legs holds (received and not taken, or waiting)."""
        streams = [*origin.streams.values()]
        for server in servers:
            streams += server.streams.values()
        held = sum(stream.buffered for stream in streams)
        stats["peak"] = max(stats.get("peak", 0), held)

    stats["sampler"] = task.LoopingCall(sample)
    stats["sampler"].start(0.005)

    cache = ServerContextCache(ca)
    port = reactor.listenTCP(
        0, TLSFactory(Factory(), cache.serverCreator("localhost", H2)), interface="127.0.0.1"
    )
    caFile = tmp_path / "relay-ca.pem"
    caFile.write_bytes(ca.pem())
    return port, caFile, stats, origin


@pytest_twisted.inlineCallbacks
def test_grpcThroughRelay(ca, pki, tmp_path):
    """grpcio both ends: every call shape, trailers (grpc-status, metadata) intact."""
    server = GRPCServer(pki.certFiles["localhost"], pki.keyFile)
    port, caFile, stats, origin = yield startRelay(ca, server.port, str(pki.caCert), tmp_path)
    try:

        def calls():
            with channel(f"localhost:{port.getHost().port}", caFile) as ch:
                stub = methods(ch)
                response, call = stub["Unary"].with_call(b"hello", timeout=10)
                assert response == b"hello"
                assert ("x-trailer", "yes") in call.trailing_metadata()
                assert list(stub["Count"](b"50", timeout=10)) == [
                    b"message %d" % i for i in range(50)
                ]
                assert stub["Big"](b"", timeout=20) == payload(BIG)
                assert stub["Unary"](payload(BIG), timeout=20) == payload(BIG)
                with pytest.raises(grpc.RpcError) as e:
                    stub["Fail"](b"", timeout=10)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                assert e.value.details() == "no such thing"

        yield deferToThread(calls)
        assert stats["relays"] == 5
    finally:
        stats["sampler"].stop()
        yield port.stopListening()
        origin.drain()
        server.close()


@needsCurl
@pytest_twisted.inlineCallbacks
def test_curlThroughRelay(ca, pki, tmp_path):
    """curl --http2 -Z: 20 streams to the h2 origin through the relay; trailers via h2fetch."""
    h2o = H2Origin(pki)
    port, caFile, stats, origin = yield startRelay(ca, h2o.port, str(pki.caCert), tmp_path)
    relayPort = port.getHost().port
    try:
        args = [
            "--http2",
            "-Z",
            "--cacert",
            str(caFile),
            "-w",
            "%{http_version} %{size_download}\n",
        ]
        for i in range(20):
            args += ["-o", "/dev/null", f"https://localhost:{relayPort}/bytes/{100000 + i}"]
        done = yield deferToThread(
            subprocess.run, [CURL, "-sS", *args], capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert sorted(done.stdout.decode().split("\n")[:-1]) == sorted(
            f"2 {100000 + i}" for i in range(20)
        )
        status, _, body, trailers = yield deferToThread(h2fetch, relayPort, "/trailers", caFile)
        assert (status, body) == (200, b"body before trailers\n")
        assert trailers == [(b"grpc-status", b"0"), (b"x-trailer", b"yes")]
        assert h2o.alpn == ["h2"]  # one origin connection carried every stream
    finally:
        stats["sampler"].stop()
        yield port.stopListening()
        origin.drain()
        h2o.close()


@needsCurl
@pytest_twisted.inlineCallbacks
def test_slowReaderThroughRelay(ca, pki, tmp_path):
    """
    A client reading 24 MB at 4 MB/s from a fast origin: the relay holds at most the origin
    stream's window plus one delivery, however far the origin could run ahead.
    """
    h2o = H2Origin(pki)
    port, caFile, stats, origin = yield startRelay(ca, h2o.port, str(pki.caCert), tmp_path)
    n = 24 * 1024 * 1024
    try:
        done = yield deferToThread(
            subprocess.run,
            [CURL, "-sS", "--http2", "--limit-rate", "4M", "--cacert", str(caFile), "-o",
             "/dev/null", "-w", "%{size_download}",
             f"https://localhost:{port.getHost().port}/bytes/{n}"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.stdout == str(n).encode(), done.stderr
        limits = H2Limits()
        print("relay peak held", stats["peak"])
        assert 0 < stats["peak"] <= limits.streamWindow + 65536
    finally:
        stats["sampler"].stop()
        yield port.stopListening()
        origin.drain()
        h2o.close()
