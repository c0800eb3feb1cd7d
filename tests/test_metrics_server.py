"""
The metrics listener's HTTP server (gateway.metricsserver): what a scraper gets over real
sockets from ``twistd proxygate`` (formats, HEAD, 404, 405, keep-alive, pipelining, refusals
of malformed, oversized and body-carrying requests, a configured multi-segment path), that
the proxy process never imports twisted.web, and the edge cases of the protocol that need a
clock or a Deferred under control (timeouts, a client gone before an asynchronous answer,
backpressure, draining), on a StringTransport.
"""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import textwrap

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs

from gateway.metricsserver import (
    MAX_HEAD_SIZE,
    MetricsServerFactory,
    routePath,
    staticHandler,
)
from tests.support import LOOPBACK_INI, PYTHON, REPO, ProxyProcess, readResponse, waitFor

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    p = ProxyProcess(tmp_path_factory.mktemp("metricsserver"), LOOPBACK_INI).start()
    yield p
    p.stop()


def connect(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.metricsPort), timeout=5)


def request(method: str, path: str, *fields: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1", *fields, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def exchange(proxy: ProxyProcess, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(proxy) as s:
        s.sendall(data)
        return readResponse(s)


def closedAfter(s: socket.socket) -> bool:
    """Whether the server closes the connection (nothing more comes, then EOF)."""
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True


# -- over real sockets ---------------------------------------------------------------------


def test_textExposition(proxy) -> None:
    status, headers, body = exchange(proxy, request("GET", "/metrics"))
    assert status == 200
    assert headers["content-type"] == TEXT_TYPE
    assert int(headers["content-length"]) == len(body)
    assert b"# TYPE proxygate_client_connections gauge" in body
    assert "date" in headers


def test_openMetrics(proxy) -> None:
    status, headers, body = exchange(proxy, request("GET", "/metrics", f"Accept: {OPENMETRICS}"))
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


def test_queryAndTrailingSlashAreIgnored(proxy) -> None:
    for path in ("/metrics?name[]=x", "/metrics/", "/metrics/?x=1"):
        status, headers, _ = exchange(proxy, request("GET", path))
        assert status == 200, path
        assert headers["content-type"] == TEXT_TYPE


def test_absoluteFormTarget(proxy) -> None:
    """RFC 9112 §3.2.2: a server accepts the absolute form and routes by its path."""
    target = f"http://127.0.0.1:{proxy.metricsPort}/metrics"
    assert exchange(proxy, request("GET", target))[0] == 200


def test_headSendsTheHeadAlone(proxy) -> None:
    with connect(proxy) as s:
        responses = Responses(s)
        s.sendall(request("HEAD", "/metrics"))
        status, headers, _ = responses.next(head=True)
        assert status == 200
        assert headers["content-type"] == TEXT_TYPE
        assert int(headers["content-length"]) > 0
        # Had a body followed the head, it would be read here as the next response.
        s.sendall(request("GET", "/nowhere"))
        status, _, body = responses.next()
        assert (status, body) == (404, b"not found\n")
        assert responses.buffer == b""


def test_unknownPaths(proxy) -> None:
    for path in ("/", "/nowhere", "/metrics/x", "/metricsx", "/ca.pem", "/ca.der"):
        status, headers, body = exchange(proxy, request("GET", path))
        assert status == 404, path
        assert int(headers["content-length"]) == len(body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "get"])
def test_otherMethods(proxy, method: str) -> None:
    with connect(proxy) as s:
        s.sendall(request(method, "/metrics", "Content-Length: 0"))
        status, headers, _ = readResponse(s)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        # Nothing was wrong with the framing: the connection stays open.
        s.sendall(request("GET", "/metrics"))
        assert readResponse(s)[0] == 200


def test_keepAliveWithHttpClient(proxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.metricsPort, timeout=5)
    try:
        conn.request("GET", "/metrics")
        first = conn.getresponse()
        assert first.status == 200 and first.read()
        sock = conn.sock
        assert sock is not None
        conn.request("GET", "/metrics", headers={"Accept": OPENMETRICS})
        second = conn.getresponse()
        assert second.status == 200
        assert second.read().endswith(b"# EOF\n")
        assert conn.sock is sock  # the same connection, not a silent reconnect
    finally:
        conn.close()


class Responses:
    """Responses read one by one from a socket that may hold several (pipelining)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {self.buffer!r}")
        self.buffer += chunk

    def next(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response; C{head}: it answers a HEAD (no body, whatever its length)."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        block, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = block.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        headers = {name.lower(): value for name, value in fields.items()}
        length = 0 if head else int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split(" ")[1]), headers, body


def _pipelined() -> bytes:
    """Four requests in one send: a scrape, a 404, a HEAD, an OpenMetrics scrape that closes."""
    return (
        request("GET", "/metrics")
        + request("GET", "/nowhere")
        + request("HEAD", "/metrics")
        + request("GET", "/metrics", f"Accept: {OPENMETRICS}", "Connection: close")
    )


def test_pipelinedRequestsAnsweredInOrder(proxy) -> None:
    with connect(proxy) as s:
        s.sendall(_pipelined())
        responses = Responses(s)
        status, headers, body = responses.next()
        assert (status, headers["content-type"]) == (200, TEXT_TYPE)
        assert b"# EOF" not in body
        assert responses.next()[:3:2] == (404, b"not found\n")
        status, headers, _ = responses.next(head=True)
        assert (status, headers["content-type"]) == (200, TEXT_TYPE)
        status, headers, body = responses.next()
        assert status == 200
        assert headers["connection"] == "close"
        assert body.endswith(b"# EOF\n")
        assert responses.buffer == b""
        assert closedAfter(s)


def test_mergedScrapesPipelined(startProxy) -> None:
    """With workers the scrape is answered asynchronously: later requests wait their turn."""
    proxy = startProxy(LOOPBACK_INI.replace("[proxy]", "[proxy]\nworkers = 2", 1))
    assert waitFor(lambda: proxy.metric("proxygate_workers") == 2, timeout=15)
    with connect(proxy) as s:
        s.sendall(_pipelined())
        responses = Responses(s)
        status, _, body = responses.next()
        assert status == 200
        assert b"\nproxygate_workers 2.0\n" in body
        assert responses.next()[0] == 404
        assert responses.next(head=True)[0] == 200
        status, headers, body = responses.next()
        assert (status, headers["connection"]) == (200, "close")
        assert body.endswith(b"# EOF\n")
        assert closedAfter(s)


def test_connectionCloseAndHTTP10(proxy) -> None:
    with connect(proxy) as s:
        s.sendall(request("GET", "/metrics", "Connection: close"))
        status, headers, _ = readResponse(s)
        assert (status, headers["connection"]) == (200, "close")
        assert closedAfter(s)
    with connect(proxy) as s:
        s.sendall(request("GET", "/metrics", version="HTTP/1.0"))
        status, headers, _ = readResponse(s)
        assert (status, headers["connection"]) == (200, "close")
        assert closedAfter(s)
    with connect(proxy) as s:
        s.sendall(request("GET", "/metrics", "Connection: keep-alive", version="HTTP/1.0"))
        status, headers, _ = readResponse(s)
        assert (status, headers["connection"]) == (200, "keep-alive")
        s.sendall(request("GET", "/metrics", version="HTTP/1.0"))
        assert readResponse(s)[0] == 200


def test_halfCloseStillGetsItsAnswer(proxy) -> None:
    with connect(proxy) as s:
        s.sendall(request("GET", "/metrics") + request("GET", "/nowhere"))
        s.shutdown(socket.SHUT_WR)
        responses = Responses(s)
        assert responses.next()[0] == 200
        assert responses.next()[0] == 404
        assert closedAfter(s)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\nHost: a\n\n", 400),  # bare LF: refused before any timeout
        (b"GET  /metrics HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nX: " + b"a" * MAX_HEAD_SIZE + b"\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nX: " + b"a" * MAX_HEAD_SIZE, 431),  # unfinished
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", 413),
        (b"POST /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
    ],
)
def test_refusedThenClosed(proxy, data: bytes, status: int) -> None:
    with connect(proxy) as s:
        s.sendall(data)
        got, headers, body = readResponse(s)
        assert got == status, body
        assert headers["connection"] == "close"
        assert closedAfter(s)


def test_stillServingAfterRefusals(proxy) -> None:
    exchange(proxy, b"\x00\x01\x02\r\n\r\n")
    assert exchange(proxy, request("GET", "/metrics"))[0] == 200


def test_scrapesAreNotLogged(proxy) -> None:
    exchange(proxy, request("GET", "/metrics", "User-Agent: scraper-marker"))
    exchange(proxy, request("GET", "/nowhere-marker"))
    proxy.settle()
    assert "scraper-marker" not in proxy.log()
    assert "nowhere-marker" not in proxy.log()
    assert "Traceback" not in proxy.log()


def test_configuredMultiSegmentPath(startProxy) -> None:
    proxy = startProxy(LOOPBACK_INI + "\n[metrics]\npath = /x/y/metrics\n")
    for path in ("/x/y/metrics", "/x/y/metrics/", "/x/y/metrics?q"):
        status, _, body = exchange(proxy, request("GET", path))
        assert status == 200, path
        assert b"proxygate_client_connections" in body
    for path in ("/metrics", "/x", "/x/y", "/x/y/", "/y/metrics"):
        assert exchange(proxy, request("GET", path))[0] == 404, path


def test_proxyProcessNeverImportsTwistedWeb(tmp_path) -> None:
    """Import, build and start the service on port 0, scrape it: no twisted.web module."""
    script = textwrap.dedent(
        """
        import sys, urllib.request
        import attrs
        import gateway, gateway.service, gateway.workers, gateway.metrics
        from twisted.internet import reactor, task, threads
        from gateway.config import loadConfig

        def main(reactor):
            config = loadConfig(None)
            config = attrs.evolve(
                config,
                proxy=attrs.evolve(config.proxy, listen=("tcp:0:interface=127.0.0.1",)),
                metrics=attrs.evolve(config.metrics, listen=("tcp:0:interface=127.0.0.1",)),
            )
            service = gateway.makeService(config)
            service.startService()
            port = service.metricsPorts[0].getHost().port

            def scrape():
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.status, r.read()

            d = threads.deferToThread(scrape)

            def check(result):
                status, body = result
                assert status == 200 and b"proxygate_" in body, result
                print(sorted(m for m in sys.modules if m.startswith("twisted.web")))
                return service.stopService()

            return d.addCallback(check)

        task.react(main)
        """
    )
    out = subprocess.run(
        [PYTHON, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip().splitlines()[-1] == "[]"


# -- the protocol on a StringTransport -------------------------------------------------------

GET = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
TIMEOUT = 30.0


class Harness:
    """One connection to a factory with a task.Clock, a recorded transport and a route
    whose answer the test controls (C{answers}: None for a Deferred kept in C{pending})."""

    def __init__(self, answer=None) -> None:
        self.clock = task.Clock()
        self.pending: list[defer.Deferred] = []
        self.answer = answer
        self.factory = MetricsServerFactory(
            {routePath("/metrics"): self.handle, b"/static": staticHandler(b"a/b", b"static")},
            timeout=TIMEOUT,
            reactor=self.clock,
        )
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def handle(self, head):
        if self.answer is None:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def lose(self) -> None:
        self.proto.connectionLost(None)


def statuses(data: bytes) -> list[int]:
    """The status codes of the responses in C{data} (bodies here never contain a status line)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def test_unitSynchronousAnswerAndKeepAlive() -> None:
    h = Harness((200, b"text/plain", b"body"))
    h.proto.dataReceived(GET + GET)
    data = h.take()
    assert statuses(data) == [200, 200]
    assert data.count(b"Content-Length: 4\r\n") == 2
    assert not h.transport.disconnecting


def test_unitIdleConnectionClosedWithoutAnAnswer() -> None:
    h = Harness((200, b"text/plain", b"body"))
    h.clock.advance(TIMEOUT - 0.1)
    assert not h.transport.disconnecting
    h.clock.advance(0.1)
    assert h.transport.disconnecting and h.take() == b""
    # A client that never completes the close is cut off after another period.
    h.clock.advance(TIMEOUT)
    assert h.transport.disconnected


def test_unitSlowHeadGets408AndBytesDoNotResetTheClock() -> None:
    h = Harness((200, b"text/plain", b"body"))
    for piece in (b"GET /met", b"rics HT", b"TP/1.1\r\n"):
        h.proto.dataReceived(piece)
        h.clock.advance(TIMEOUT / 3 - 0.01)
    assert not h.transport.disconnecting
    h.clock.advance(0.05)
    assert statuses(h.take()) == [408]
    assert h.transport.disconnecting


def test_unitTimeoutCountsFromTheLastAnswer() -> None:
    h = Harness((200, b"text/plain", b"body"))
    h.clock.advance(TIMEOUT - 1)
    h.proto.dataReceived(GET)
    assert statuses(h.take()) == [200]
    h.clock.advance(TIMEOUT - 1)
    assert not h.transport.disconnecting
    h.clock.advance(1)
    assert h.transport.disconnecting
    assert h.clock.getDelayedCalls()  # the abort of a close left hanging
    h.lose()
    assert not h.clock.getDelayedCalls()


def test_unitDeferredAnswerHoldsThePipeline() -> None:
    h = Harness()
    h.proto.dataReceived(GET + b"GET /static HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.take() == b"" and len(h.pending) == 1
    h.pending[0].callback((200, b"text/plain", b"first"))
    data = h.take()
    assert statuses(data) == [200, 200]
    assert data.index(b"first") < data.index(b"static")


def test_unitClientGoneBeforeDeferredAnswer() -> None:
    h = Harness()
    h.proto.dataReceived(GET)
    h.lose()
    with capturedLogs() as events:
        h.pending[0].callback((200, b"text/plain", b"late"))
    assert h.take() == b""
    assert not [e for e in events if e["log_level"] >= LogLevel.warn]
    assert not h.clock.getDelayedCalls()


def test_unitAnswerThatNeverComesIsCutOff() -> None:
    h = Harness()
    h.proto.dataReceived(GET)
    h.clock.advance(TIMEOUT)
    assert h.transport.disconnected  # aborted
    h.pending[0].callback((200, b"text/plain", b"late"))
    assert h.take() == b""


def test_unitHandlerFailureIs500AndLogged() -> None:
    h = Harness(RuntimeError("boom"))
    with capturedLogs() as events:
        h.proto.dataReceived(GET + b"GET /static HTTP/1.1\r\nHost: a\r\n\r\n")
    assert statuses(h.take()) == [500, 200]
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert not h.transport.disconnecting


def test_unitDeferredFailureIs500() -> None:
    h = Harness()
    h.proto.dataReceived(GET)
    with capturedLogs() as events:
        h.pending[0].errback(RuntimeError("boom"))
    assert statuses(h.take()) == [500]
    assert [e for e in events if e.get("log_failure") is not None]


def test_unitBackpressureStopsParsing() -> None:
    h = Harness((200, b"text/plain", b"body"))
    assert h.transport.producer is h.proto
    h.proto.pauseProducing()  # the transport's write buffer is full
    assert h.transport.producerState == "paused"  # reading stopped
    h.proto.dataReceived(GET + GET)
    assert h.take() == b""
    h.proto.resumeProducing()
    assert statuses(h.take()) == [200, 200]
    assert h.transport.producerState == "producing"


def test_unitInputBoundedWhileAnAnswerIsPending() -> None:
    h = Harness()
    h.proto.dataReceived(GET)
    h.proto.dataReceived(GET * (MAX_HEAD_SIZE // len(GET) + 1))
    assert h.transport.producerState == "paused"
    h.pending[0].callback((200, b"text/plain", b"x"))
    assert h.transport.producerState == "producing"


def test_unitDrainClosesIdleNowAndBusyAfterTheAnswer() -> None:
    idle, busy = Harness(), Harness()
    busy.proto.dataReceived(GET)
    for h in (idle, busy):
        h.factory.closeConnections()
    assert idle.transport.disconnecting
    assert not busy.transport.disconnecting
    busy.pending[0].callback((200, b"text/plain", b"x"))
    assert b"Connection: close\r\n" in busy.take()
    assert busy.transport.disconnecting


def test_unitFactoryTracksConnections() -> None:
    h = Harness()
    assert h.factory.connections == {h.proto}
    h.lose()
    assert h.factory.connections == set()


def test_routePath() -> None:
    assert routePath("/metrics") == b"/metrics"
    assert routePath("/x/y/metrics/") == b"/x/y/metrics"
    assert routePath("/") == b"/"
