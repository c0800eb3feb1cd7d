"""
The HTTP/2 test infrastructure, checked on its own (no proxygate yet): Debian's curl speaks
HTTP/2, the h2 origin (tests/h2origin.py) serves h2 and falls back to HTTP/1.1, with
trailers and a 60 MB body, and the grpcio service and client (tests/grpcservice.py) work over
TLS from a test CA, directly and through a CONNECT proxy (a minimal relay here; proxygate in
the end-to-end tests).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import threading

import grpc
import pytest

from tests.support import payload, payloadDigest
from tests.support.grpcservice import BIG, GRPCServer, channel, methods
from tests.support.h2origin import H2Origin, h2fetch
from tests.support.mitmorigin import OriginPKI

CURL = shutil.which("curl")
needsCurl = pytest.mark.skipif(CURL is None, reason="no curl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return OriginPKI(tmp_path_factory.mktemp("h2pki"))


@pytest.fixture
def origin(pki):
    o = H2Origin(pki)
    yield o
    o.close()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CURL, "-sS", *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@needsCurl
def test_curlSupportsHTTP2():
    """The curl the tests use lists HTTP2 among its features (Debian's does: nghttp2)."""
    out = curl("-V").stdout.decode()
    features = next(line for line in out.splitlines() if line.startswith("Features:"))
    assert "HTTP2" in features.split()


@needsCurl
@pytest.mark.parametrize(
    ("flag", "version", "alpn"), [("--http2", "2", "h2"), ("--http1.1", "1.1", "http/1.1")]
)
def test_curlAgainstOrigin(origin, pki, flag, version, alpn):
    """curl gets h2 when it offers it, http/1.1 otherwise; the body is the payload."""
    done = curl(flag, "--cacert", str(pki.caCert), "-w", "%{http_version}", "-o", "-",
                origin.url("/bytes/100000"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout[: -len(version)] == payload(100000)
    assert done.stdout[-len(version) :].decode() == version
    assert origin.alpn == [alpn]


@needsCurl
def test_curlParallelStreams(origin, pki):
    """curl -Z: 20 transfers multiplexed on one h2 connection."""
    urls = [origin.url(f"/bytes/{1000 + i}") for i in range(20)]
    args = [
        "--http2",
        "-Z",
        "--cacert",
        str(pki.caCert),
        "-w",
        "%{http_version} %{size_download}\n",
    ]
    for url in urls:
        args += ["-o", "/dev/null", url]
    done = curl(*args)
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.decode().split("\n")[:-1])
    assert lines == sorted(f"2 {1000 + i}" for i in range(20))
    assert origin.alpn == ["h2"]
    assert len(origin.h2requests) == 20


@needsCurl
def test_http11OnlyOrigin(pki):
    """An origin without h2: curl --http2 falls back to HTTP/1.1."""
    o = H2Origin(pki, http2=False)
    try:
        done = curl("--http2", "--cacert", str(pki.caCert), "-w", "%{http_version}", "-o",
                    "/dev/null", o.url("/bytes/10"))  # fmt: skip
        assert done.stdout == b"1.1" and o.alpn == ["http/1.1"]
    finally:
        o.close()


def test_trailersAndEcho(origin, pki):
    """The h2 client helper: trailers arrive after the body; an echo returns the body."""
    status, _, body, trailers = h2fetch(origin.port, "/trailers", pki.caCert)
    assert status == 200 and body == b"body before trailers\n"
    assert trailers == [(b"grpc-status", b"0"), (b"x-trailer", b"yes")]
    status, _, body, _ = h2fetch(origin.port, "/echo", pki.caCert, method="POST", body=b"ping")
    assert (status, body) == (200, b"ping")
    assert [r["path"] for r in origin.h2requests] == ["/trailers", "/echo"]


@needsCurl
@pytest.mark.slow
def test_sixtyMegabytes(origin, pki):
    """The 60 MB body of the slow-reader test, over h2, intact."""
    n = 60 * 1024 * 1024
    done = curl("--http2", "--cacert", str(pki.caCert), "-o", "-", origin.url(f"/bytes/{n}"),
                timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == n
    assert hashlib.sha256(done.stdout).hexdigest() == payloadDigest(n)


# -- gRPC ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpcServer(pki):
    server = GRPCServer(pki.certFiles["localhost"], pki.keyFile)
    yield server
    server.close()


def _calls(stub):
    """Every method, as the end-to-end tests will run them through the proxy."""
    response, call = stub["Unary"].with_call(b"hello", timeout=10)
    assert response == b"hello"
    assert ("x-trailer", "yes") in call.trailing_metadata()
    assert list(stub["Count"](b"5", timeout=10)) == [b"message %d" % i for i in range(5)]
    assert stub["Big"](b"", timeout=20) == payload(BIG)
    with pytest.raises(grpc.RpcError) as e:
        stub["Fail"](b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "no such thing"


def test_grpcDirect(grpcServer, pki):
    """Unary (trailing metadata), server streaming, 3 MB, an error status: direct over TLS."""
    with channel(grpcServer.target, pki.caCert) as ch:
        _calls(methods(ch))


class _ConnectRelay:
    """A minimal CONNECT proxy on loopback (one thread per tunnel) counting its tunnels."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.targets: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            target = head.split(b" ")[1].decode()
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)), timeout=30)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        except OSError:
            conn.close()
            return

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        pipe(conn, upstream)

    def close(self) -> None:
        self.sock.close()


def test_grpcThroughConnectProxy(grpcServer, pki):
    """The channel helper's proxy option: grpcio tunnels through CONNECT to the target."""
    relay = _ConnectRelay()
    try:
        with channel(grpcServer.target, pki.caCert, proxy=f"http://127.0.0.1:{relay.port}") as ch:
            _calls(methods(ch))
        assert relay.targets and set(relay.targets) == {grpcServer.target}
    finally:
        relay.close()


def test_h2fetchThroughConnectProxy(origin, pki):
    """The h2 client helper through CONNECT, as it will go through proxygate."""
    relay = _ConnectRelay()
    try:
        status, _, body, _ = h2fetch(origin.port, "/bytes/5000", pki.caCert, proxyPort=relay.port)
        assert status == 200 and body == payload(5000)
    finally:
        relay.close()
