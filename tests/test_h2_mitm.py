"""
HTTP/2 through intercepted tunnels, end to end: ``twistd proxygate`` with ``[mitm]`` on and a
CA it created, real clients (curl --http2, grpcio, the h2 library on a socket) and real h2
and HTTP/1.1 origins (tests/support/h2origin.py, tests/support/grpcservice.py).

What is checked: ALPN mirrored (h2 on both legs; http/1.1 on both when the origin only speaks
that; ``http2 = off``), 20 parallel streams on one tunnel and one origin connection, gRPC
(unary with trailing metadata, server streaming, 3 MB each way, an error status) with its
per-method metrics and grpc-status counts, the translations (an h2 client to an origin that
fell back to HTTP/1.1, an HTTP/1.1 client over a pooled h2 origin connection), RST_STREAM of
one stream leaving the others, Rapid Reset (GOAWAY, no origin dial per reset, the proxy
serving others after), a PING flood from a client that reads nothing (cut), a slow reader
of 60 MB with the proxy's memory measured, and one access line per stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from tests.support import LOOPBACK_INI, ProxyProcess, payload, rss, waitFor
from tests.support.grpcservice import BIG, SERVICE, GRPCServer, channel, methods
from tests.support.h2origin import H2Origin
from tests.support.mitmorigin import OriginPKI
from tests.support.tunnel import readHead

CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    and k not in ("CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
}


def h2Ini(pki: OriginPKI, extra: str = "") -> str:
    return (
        LOOPBACK_INI
        + f"\n[mitm]\nenabled = on\nupstream_ca_bundle = {pki.caCert}\n{extra}"
        + "\n[log]\nformat = json\n"
    )


def startProxy(folder: Path, ini: str) -> ProxyProcess:
    proxy = ProxyProcess(folder, ini).start()
    url = f"http://127.0.0.1:{proxy.metricsPort}/ca.pem"
    with urllib.request.urlopen(url, timeout=5) as r:
        proxy.ca = folder / f"ca-{proxy.port}.pem"
        proxy.ca.write_bytes(r.read())
    return proxy


def accessRecords(proxy: ProxyProcess) -> list[dict]:
    lines = proxy.accessLines()
    return [json.loads(line[line.index("{") :]) for line in lines]


def curl(proxy: ProxyProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--proxy", proxy.url, "--cacert", str(proxy.ca), *args],
        capture_output=True,
        timeout=timeout,
        env=CLEAN_ENV,
        stdin=subprocess.DEVNULL,
    )


def assertServesOthers(proxy: ProxyProcess, pki: OriginPKI) -> None:
    """After cutting one abusive client, the proxy serves an h2 request to a fresh origin."""
    other = H2Origin(pki)
    try:
        done = curl(proxy, "--http2", "-w", "%{http_version}", "-o", "/dev/null",
                    other.url("/bytes/10"))  # fmt: skip
        assert done.stdout == b"2", done.stderr
    finally:
        other.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> OriginPKI:
    return OriginPKI(tmp_path_factory.mktemp("h2mitm-pki"))


@pytest.fixture(scope="module")
def h2origin(pki):
    o = H2Origin(pki)
    yield o
    o.close()


@pytest.fixture(scope="module")
def h1origin(pki):
    o = H2Origin(pki, http2=False)
    yield o
    o.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, pki):
    """One intercepting proxy (http2 on) for the tests that only add traffic."""
    p = startProxy(tmp_path_factory.mktemp("h2mitm"), h2Ini(pki))
    yield p
    p.stop()


@pytest.fixture
def fresh(tmp_path, pki):
    """A proxy of the test's own (its metrics and log start empty)."""
    started: list[ProxyProcess] = []

    def start(extra: str = "") -> ProxyProcess:
        p = startProxy(tmp_path, h2Ini(pki, extra))
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


class H2Session:
    """An h2 client (the h2 library) on a TLS socket through a CONNECT, ALPN h2 only."""

    def __init__(self, proxy: ProxyProcess, port: int, host: str = "localhost") -> None:
        self.authority = f"{host}:{port}"
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
        sock.sendall(
            f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode()
        )
        status, _, rest = readHead(sock)
        assert status == 200 and rest == b""
        ctx = ssl.create_default_context(cafile=str(proxy.ca))
        ctx.set_alpn_protocols(["h2"])
        self.tls = ctx.wrap_socket(sock, server_hostname=host)
        assert self.tls.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.send()
        self.events: list = []
        self.bodies: dict[int, int] = {}
        self.data: dict[int, bytes] = {}  # the bodies of small answers

    def send(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.tls.sendall(data)

    def request(self, path: str, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(b":method", b"GET"), (b":scheme", b"https"),
             (b":authority", self.authority.encode()), (b":path", path.encode())],
            end_stream=end,
        )  # fmt: skip
        return sid

    def until(self, done, timeout: float = 30.0) -> None:
        """Read (acknowledging data) until C{done(self)} or the connection ends."""
        deadline = time.monotonic() + timeout
        while not done(self):
            if time.monotonic() > deadline:
                raise TimeoutError("the h2 session waited too long")
            data = self.tls.recv(65536)
            if not data:
                raise ConnectionError("closed")
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    sid = event.stream_id
                    self.bodies[sid] = self.bodies.get(sid, 0) + len(event.data)
                    if self.bodies[sid] <= 65536:
                        self.data[sid] = self.data.get(sid, b"") + event.data
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            self.send()

    def post(self, path: str, body: bytes) -> int:
        """A POST without content-length, its body sent as the windows allow."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(b":method", b"POST"), (b":scheme", b"https"),
             (b":authority", self.authority.encode()), (b":path", path.encode())],
        )  # fmt: skip
        sent = 0
        while sent < len(body):
            window = self.conn.local_flow_control_window(sid)
            if window <= 0:
                self.send()
                seen = len(self.events)
                self.until(lambda s, seen=seen: len(s.events) > seen)
                continue
            chunk = body[sent : sent + min(window, self.conn.max_outbound_frame_size)]
            self.conn.send_data(sid, chunk)
            sent += len(chunk)
        self.conn.end_stream(sid)
        self.send()
        return sid

    def ended(self, sid: int) -> bool:
        return any(
            isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
            for e in self.events
        )

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass


# -- ALPN: what each leg speaks ------------------------------------------------------------------


def test_curlGetsH2OnBothLegs(proxy, h2origin):
    seen = len(h2origin.h2requests)
    done = curl(proxy, "--http2", "-w", "\n%{http_version}", h2origin.url("/hello?x=1"))
    assert done.returncode == 0, done.stderr
    body, _, version = done.stdout.decode().rpartition("\n")
    assert (body, version) == ("h2 origin\n", "2")
    (request,) = h2origin.h2requests[seen:]
    assert request["protocol"] == "h2" and request["path"] == "/hello?x=1"
    assert (b"via", b"2 proxygate") in request["headers"]
    assert h2origin.alpn[-1] == "h2"
    assert waitFor(lambda: any(r["url"].endswith("/hello") for r in accessRecords(proxy)))
    record = next(r for r in accessRecords(proxy) if r["url"].endswith("/hello"))
    assert (record["mode"], record["protocol"], record["code"]) == ("mitm", "HTTP/2", 200)


def test_curlGetsHTTP11WhenTheOriginOnlySpeaksIt(proxy, h1origin):
    done = curl(proxy, "--http2", "-w", "%{http_version}", "-o", "/dev/null",
                h1origin.url("/bytes/1000"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"1.1"
    assert h1origin.alpn[-1] == "http/1.1"


def test_http2OffKeepsBothLegsHTTP11(fresh, h2origin):
    proxy = fresh("http2 = off\n")
    before = len(h2origin.alpn)
    done = curl(proxy, "--http2", "-w", "%{http_version}", "-o", "/dev/null",
                h2origin.url("/bytes/1000"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"1.1"
    assert h2origin.alpn[before:] == ["http/1.1"]


def test_twentyParallelStreamsShareOneTunnel(proxy, h2origin):
    before = len(h2origin.alpn)
    args = ["--http2", "-Z", "-w", "%{http_version} %{size_download}\n"]
    for i in range(20):
        args += ["-o", "/dev/null", h2origin.url(f"/bytes/{50000 + i}?parallel")]
    done = curl(proxy, *args)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.decode().splitlines()) == sorted(f"2 {50000 + i}" for i in range(20))
    assert len(h2origin.alpn) - before <= 1, "one origin connection (the pre-dialled one)"

    def lines():
        return [r for r in accessRecords(proxy) if "/bytes/5" in r["url"]]

    assert waitFor(lambda: len(lines()) == 20)
    assert {r["bytes"] for r in lines()} == {50000 + i for i in range(20)}
    assert all(r["mode"] == "mitm" and r["protocol"] == "HTTP/2" for r in lines())


# -- gRPC ----------------------------------------------------------------------------------------


def test_grpcThroughInterception(fresh, pki):
    proxy = fresh()
    server = GRPCServer(pki.certFiles["localhost"], pki.keyFile)
    try:
        with channel(server.target, proxy.ca, proxy=proxy.url) as ch:
            stub = methods(ch)
            response, call = stub["Unary"].with_call(b"hello", timeout=10)
            assert response == b"hello"
            assert ("x-trailer", "yes") in call.trailing_metadata()
            assert list(stub["Count"](b"40", timeout=10)) == [b"message %d" % i for i in range(40)]
            assert stub["Big"](b"", timeout=30) == payload(BIG)
            assert stub["Unary"](payload(BIG), timeout=30) == payload(BIG)
            with pytest.raises(grpc.RpcError) as e:
                stub["Fail"](b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == "no such thing"
    finally:
        server.close()

    def metric(name, **labels):
        return proxy.metric(name, host="localhost", **labels)

    api = f"/{SERVICE}"
    assert waitFor(lambda: metric("proxygate_api_grpc_status_total", api=f"{api}/Fail") == 1)
    for method, calls in (("Unary", 2), ("Count", 1), ("Big", 1), ("Fail", 1)):
        assert metric("proxygate_api_requests_total", api=f"{api}/{method}", method="POST") == calls
    for method, calls in (("Unary", 2), ("Count", 1), ("Big", 1)):
        assert metric("proxygate_api_grpc_status_total", api=f"{api}/{method}", status="0") == calls
    assert metric("proxygate_api_grpc_status_total", api=f"{api}/Fail", status="5") == 1
    assert metric("proxygate_api_request_bytes_total", api=f"{api}/Unary") >= BIG
    records = [r for r in accessRecords(proxy) if r["mode"] == "mitm"]
    assert len(records) == 5 and all(r["protocol"] == "HTTP/2" for r in records)


# -- translation between the legs -----------------------------------------------------------------


def test_anH2ClientOverAnOriginThatFellBackToHTTP11(fresh, pki):
    """The origin's h2 connection goes and it then speaks only http/1.1: the client's next
    streams go out as HTTP/1.1 requests, and their answers back as h2."""
    proxy = fresh()
    origin = H2Origin(pki)
    session = H2Session(proxy, origin.port)
    try:
        first = session.request("/bytes/1000")
        session.send()
        session.until(lambda s: s.ended(first))
        assert session.bodies[first] == 1000 and origin.alpn == ["h2"]
        origin.onlyHTTP11()
        time.sleep(0.3)  # the proxy sees its origin connection go (else: a retry, below)
        second = session.request("/bytes/2000")
        session.send()
        session.until(lambda s: s.ended(second))
        assert session.bodies[second] == 2000
        assert origin.alpn == ["h2", "http/1.1"]
        assert origin.requests[-1][:2] == ("GET", "/bytes/2000")
        # An upload past the stream window: no length on h2, so chunked on HTTP/1.1.
        upload = payload(700_000)
        third = session.post("/sink", upload)
        session.until(lambda s: s.ended(third))
        answer = json.loads(session.data[third])
        assert answer == {"bytes": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}
        method, path, headers = origin.requests[-1]
        assert (method, path, dict(headers).get("Transfer-Encoding")) == (
            "POST",
            "/sink",
            "chunked",
        )
    finally:
        session.close()
        origin.close()


def test_anHTTP11ClientTakesThePooledH2OriginConnection(proxy, h2origin):
    """The reverse: an HTTP/1.1 client's request goes out as a stream on the h2 connection
    another client's tunnel opened, and its answer comes back as HTTP/1.1."""
    session = H2Session(proxy, h2origin.port)
    try:
        sid = session.request("/bytes/10")
        session.send()
        session.until(lambda s: s.ended(sid))
        connections = len(h2origin.alpn)
        done = curl(proxy, "--http1.1", "-w", "%{http_version}", "-o", "/dev/null",
                    h2origin.url("/bytes/3000?from-http11"))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"1.1"
        assert any(r["path"] == "/bytes/3000?from-http11" for r in h2origin.h2requests)
        assert len(h2origin.alpn) == connections, "no new origin connection"
    finally:
        session.close()


# -- resets ----------------------------------------------------------------------------------------


def test_resetOfOneStreamLeavesTheOthers(proxy, h2origin):
    session = H2Session(proxy, h2origin.port)
    try:
        big = session.request("/bytes/50000000")
        small = session.request("/bytes/100000")
        session.send()
        session.until(lambda s: s.bodies.get(big, 0) > 0)
        session.conn.reset_stream(big, h2.errors.ErrorCodes.CANCEL)
        session.send()
        session.until(lambda s: s.ended(small))
        assert session.bodies[small] == 100000
        again = session.request("/bytes/5000")
        session.send()
        session.until(lambda s: s.ended(again))
        assert session.bodies[again] == 5000
        assert session.bodies.get(big, 0) < 50000000
    finally:
        session.close()
    assert waitFor(lambda: len(h2origin.resets) > 0), "the origin's stream was reset too"

    def cut():
        return [r for r in accessRecords(proxy) if r["url"].endswith("/bytes/50000000")]

    assert waitFor(lambda: len(cut()) == 1)
    assert cut()[0]["reason"] == "client_gone"


def test_rapidResetGetsGoawayAndTheProxyServesOthers(fresh, pki):
    """CVE-2023-44487: streams opened and reset in a loop; GOAWAY ENHANCE_YOUR_CALM."""
    proxy = fresh()
    origin = H2Origin(pki)
    session = H2Session(proxy, origin.port)
    goaway = []
    try:
        for i in range(2000):
            sid = session.request("/bytes/100000", end=True)
            session.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            if i % 5 == 4:  # some pairs in one read, some across reads
                try:
                    session.send()
                except OSError:
                    break
        session.tls.settimeout(10)
        try:
            while True:
                data = session.tls.recv(65536)
                if not data:
                    break
                for event in session.conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        goaway.append(event.error_code)
        except (OSError, h2.exceptions.ProtocolError):
            pass
    finally:
        session.close()
        origin.close()
    assert goaway == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    assert len(origin.alpn) == 1, "no origin dial per reset stream: the pre-dialled one only"
    assert len(origin.h2requests) <= 250, "at most the reset budget reached the origin"
    assertServesOthers(proxy, pki)


# -- memory ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("flag, version", [("--http2", "2"), ("--http1.1", "1.1")])
def test_slowReaderOf60MBKeepsMemoryFlat(fresh, pki, flag, version):
    """
    A client reading 60 MB at ~15 MB/s from an h2 origin that could send far faster: an h2
    client, and an HTTP/1.1 one whose request rides the pooled h2 origin connection.
    """
    proxy = fresh()
    origin = H2Origin(pki)
    n = 60 * 1024 * 1024
    try:
        # An h2 tunnel first: the origin's h2 connection is pooled for both.
        warm = curl(proxy, "--http2", "-o", "/dev/null", origin.url("/bytes/1000"))
        assert warm.returncode == 0, warm.stderr
        baseline = rss(proxy.pid)
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss(proxy.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            done = curl(proxy, flag, "--limit-rate", "15M", "-o", "/dev/null",
                        "-w", "%{http_version} %{size_download}", origin.url(f"/bytes/{n}"),
                        timeout=120)  # fmt: skip
        finally:
            stop.set()
            sampler.join(5)
        assert done.stdout == f"{version} {n}".encode(), done.stderr
        assert origin.alpn == ["h2"], "one origin connection, h2, for both clients"
        growth = peak[0] - baseline
        print(f"{flag}: proxy RSS {baseline / 2**20:.1f} MB, +{growth / 2**20:.1f} MB for 60 MB")
        assert growth < 16 * 1024 * 1024, (baseline, peak[0])
    finally:
        origin.close()


def test_h2ThroughAnUpstreamProxy(fresh, tmp_path, h2origin):
    """The origin leg goes through [upstream] with CONNECT, and is h2 all the same."""
    (tmp_path / "upstream").mkdir()
    upstream = ProxyProcess(tmp_path / "upstream", LOOPBACK_INI).start()
    try:
        proxy = fresh(f"\n[upstream]\nproxy = {upstream.url}\n")
        before = len(h2origin.alpn)
        done = curl(proxy, "--http2", "-w", "%{http_version}", "-o", "/dev/null",
                    h2origin.url("/bytes/2000?chained"))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"2"
        assert h2origin.alpn[before:] == ["h2"]
        assert waitFor(lambda: any(r["url"].endswith("/bytes/2000") for r in accessRecords(proxy)))
        record = next(r for r in accessRecords(proxy) if r["url"].endswith("/bytes/2000"))
        assert record["hierarchy"].startswith("FIRSTUP_PARENT/")
        assert upstream.metric("proxygate_tunnels") == 1, "the origin leg, open (pooled)"
        proxy.stop()  # first: the upstream would wait for the tunnel it carries
    finally:
        upstream.stop()


def test_pingFloodFromAClientThatDoesNotReadIsCut(fresh, pki):
    """
    CVE-2019-9512: PINGs from a client that reads nothing; the proxy's acknowledgements
    pile up to its cap, then GOAWAY and the connection is aborted; others are still served.
    """
    proxy = fresh()
    origin = H2Origin(pki)
    session = H2Session(proxy, origin.port)
    flood = (b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678") * 4000
    sent = 0
    try:
        session.tls.settimeout(10)
        with pytest.raises(OSError):
            while sent < 200 * 2**20:  # bounded: the proxy must cut long before
                session.tls.sendall(flood)
                sent += len(flood)
    finally:
        session.close()
        origin.close()
    assert sent < 64 * 2**20
    assertServesOthers(proxy, pki)
