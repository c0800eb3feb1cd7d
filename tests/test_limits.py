"""
Limits and timeouts end to end, against the real proxy under twistd:

- ``max_header_size`` (431, also for a head that never ends) and the header-count bound
  (100 fields pass, 101 get 431);
- ``header_timeout``: a slowloris run (1,000 connections that send half a head and stall)
  leaves the proxy serving a normal client, and every stalled connection gets 408 or is
  closed by about header_timeout after it started; trickling bytes or empty lines does not
  restart the clock;
- ``idle_timeout`` for a silent connection, a kept-alive one and a tunnel;
- ``max_connections``: beyond it a connection gets 503;
- every refusal is counted in ``proxygate_denied_total{reason}`` and logged (JSON access log)
  with its reason.

Everything is on loopback, every socket has a timeout, counts are bounded, and the soft
RLIMIT_NOFILE is raised (within the hard limit) for the slowloris run.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import threading
import time

import pytest

from tests.support import LOOPBACK_INI, ProxyProcess, readResponse

# Short, so that waiting for them is quick; the margins each test allows are absolute (a
# loaded machine is late by the same amount whatever the timeout).
HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
SLOWLORIS_HEADER_TIMEOUT = 2.0
MAX_HEADER_SIZE = 4096
SLOWLORIS = 1000


def waitClosed(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Read until EOF (or a reset); the seconds it took and everything that arrived."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {timeout} s; received {data!r}") from None
    return time.monotonic() - started, data


def accessRecords(proxy, skip: int = 0) -> list[dict]:
    out = []
    for line in proxy.accessLines()[skip:]:
        try:
            out.append(json.loads(line.partition("] ")[2]))
        except ValueError:
            pass
    return out


def waitForRecords(proxy, skip: int, count: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = accessRecords(proxy, skip)
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def getRequest(origin, path: str = "/echo", extra: str = "") -> bytes:
    head = f"GET http://127.0.0.1:{origin.port}{path} HTTP/1.1\r\nHost: h\r\n{extra}\r\n"
    return head.encode("latin-1")


def limitsINI(headerTimeout: float = HEADER_TIMEOUT) -> str:
    return (
        LOOPBACK_INI.replace(
            "[proxy]",
            f"[proxy]\nheader_timeout = {headerTimeout:g}\nidle_timeout = {IDLE_TIMEOUT:g}\n"
            f"max_header_size = {MAX_HEADER_SIZE}",
        )
        + "\n[log]\nformat = json\n"
    )


@pytest.fixture(scope="module")
def limitsProxy(tmp_path_factory):
    p = ProxyProcess(tmp_path_factory.mktemp("limits"), limitsINI()).start()
    yield p
    p.stop()


def limitDenials(proxy) -> float:
    return proxy.metric("proxygate_denied_total", reason="limit")


# -- head size and field count ---------------------------------------------------------------


def test_headOverMaxHeaderSizeGets431(limitsProxy, origin) -> None:
    skip = len(limitsProxy.accessLines())
    before = limitDenials(limitsProxy)
    request = getRequest(origin, extra=f"X-Big: {'a' * MAX_HEADER_SIZE}\r\n")
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=5) as s:
        s.sendall(request)
        status, headers, body = readResponse(s)
        assert status == 431
        assert headers["connection"] == "close"
        assert b"aaaa" not in body
        waitClosed(s, 5)
    assert limitDenials(limitsProxy) == before + 1
    (record,) = waitForRecords(limitsProxy, skip, 1)
    assert record["code"] == 431
    assert record["reason"] == "header_too_large"
    assert "larger than" in record["detail"]


def test_headThatNeverEndsGets431AsSoonAsItIsTooLarge(limitsProxy) -> None:
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=5) as s:
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Endless: ")
        started = time.monotonic()
        for _ in range(MAX_HEADER_SIZE // 512 + 2):
            try:
                s.sendall(b"b" * 512)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.01)
        status, _, _ = readResponse(s)
    assert status == 431
    assert time.monotonic() - started < HEADER_TIMEOUT


def test_headJustUnderTheLimitPasses(limitsProxy, origin) -> None:
    base = getRequest(origin, extra="X-Fill: \r\n")
    fill = MAX_HEADER_SIZE - len(base)
    request = getRequest(origin, extra=f"X-Fill: {'c' * fill}\r\n")
    assert len(request) == MAX_HEADER_SIZE
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=5) as s:
        s.sendall(request)
        assert readResponse(s)[0] == 200


@pytest.mark.parametrize(("count", "status"), [(100, 200), (101, 431)])
def test_headerFieldCount(limitsProxy, rawOrigin, count: int, status: int) -> None:
    """
    Host is one of the fields: 100 in all pass, 101 are refused. The origin is the raw one:
    Python's http.server itself refuses more than 100 fields, and the proxy adds Via.
    """
    fields = "".join(f"X-F{i}: {i}\r\n" for i in range(count - 1))
    request = f"GET {rawOrigin.url('/')} HTTP/1.1\r\nHost: h\r\n{fields}\r\n"
    assert len(request) < MAX_HEADER_SIZE
    before = limitDenials(limitsProxy)
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=5) as s:
        s.sendall(request.encode())
        got, _, body = readResponse(s)
    assert got == status, body
    if status == 200:
        (received,) = rawOrigin.received
        assert received.count(b"\r\nX-F") == count - 1
    else:
        assert b"ore than 100 header fields" in body
        assert limitDenials(limitsProxy) == before + 1
        assert rawOrigin.received == []


@pytest.fixture(scope="module")
def roomyProxy(tmp_path_factory):
    """Default max_header_size (64 KiB), so the field count is what is tested."""
    ini = LOOPBACK_INI + "\n[log]\nformat = json\n"
    p = ProxyProcess(tmp_path_factory.mktemp("roomy"), ini).start()
    yield p
    p.stop()


@pytest.mark.parametrize(("count", "status"), [(100, 200), (101, 431), (1000, 431)])
def test_headerFieldCountUnderTheDefaultSize(roomyProxy, rawOrigin, count: int, status: int):
    fields = "".join(f"X-Field-{i}: value {i}\r\n" for i in range(count - 1))
    request = f"GET {rawOrigin.url('/')} HTTP/1.1\r\nHost: h\r\n{fields}\r\n"
    skip = len(roomyProxy.accessLines())
    before = limitDenials(roomyProxy)
    with socket.create_connection(("127.0.0.1", roomyProxy.port), timeout=5) as s:
        s.sendall(request.encode())
        got, _, _ = readResponse(s)
    assert got == status
    if status == 431:
        assert limitDenials(roomyProxy) == before + 1
        (record,) = waitForRecords(roomyProxy, skip, 1)
        assert record["code"] == 431
        assert record["reason"] == "header_too_large"
        assert "header fields" in record["detail"]


# -- header_timeout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern", ["half-head", "byte-by-byte", "empty-lines", "empty-lines-then-half-head"]
)
def test_slowHeadIsCutOffAtHeaderTimeout(limitsProxy, origin, pattern: str) -> None:
    """
    However the client dribbles, the head must be complete header_timeout after its first
    byte: trickled bytes and the empty lines allowed before a request line do not restart
    the clock.
    """
    skip = len(limitsProxy.accessLines())
    head = getRequest(origin)[:-2]  # all but the final CRLF
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"\r\n" if pattern.startswith("empty-lines") else head[:20])
        if pattern == "empty-lines-then-half-head":
            time.sleep(HEADER_TIMEOUT / 2)
            s.sendall(head[:20])
        data = b""
        position = 20
        while time.monotonic() - started < HEADER_TIMEOUT + 3:
            try:
                if pattern == "byte-by-byte" and position < len(head):
                    s.sendall(head[position : position + 1])
                    position += 1
                elif pattern == "empty-lines":
                    s.sendall(b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.2)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.3 < elapsed < HEADER_TIMEOUT + 2.5, (elapsed, data)
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
    records = waitForRecords(limitsProxy, skip, 1)
    # Only empty lines: no request was ever started, so no 408 is sent (see below).
    assert [r["code"] for r in records] == [0 if pattern == "empty-lines" else 408]
    assert records[0]["reason"] == ("idle" if pattern == "empty-lines" else "header_timeout")
    assert "header_timeout" in records[0]["detail"] or "too long" in records[0]["detail"]


@pytest.fixture
def moreFiles():
    """Raise the soft RLIMIT_NOFILE (within the hard limit) for one test, then restore it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SLOWLORIS + 1024
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class NormalClient(threading.Thread):
    """Fetches through the proxy on a fresh connection every 50 ms and records latencies."""

    def __init__(self, proxy, origin) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.request = getRequest(origin, "/bytes/1000", "Connection: close\r\n")
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) as s:
                    s.sendall(self.request)
                    status, _, body = readResponse(s)
                    if status != 200 or len(body) != 1000:
                        self.failures.append(f"status {status}, {len(body)} bytes")
            except OSError as e:
                self.failures.append(repr(e))
            self.latencies.append(time.monotonic() - started)
            self.stop.wait(0.05)


def test_slowlorisLeavesTheProxyServingOthers(startProxy, origin, moreFiles) -> None:
    # A longer header_timeout than the module's: the normal client's sample of requests
    # made while the stalled connections are held must be large enough to judge.
    headerTimeout = SLOWLORIS_HEADER_TIMEOUT
    limitsProxy = startProxy(limitsINI(headerTimeout))
    skip = len(limitsProxy.accessLines())
    before = limitDenials(limitsProxy)

    baseline = NormalClient(limitsProxy, origin)
    baseline.start()
    time.sleep(0.5)
    baseline.stop.set()
    baseline.join(10)

    client = NormalClient(limitsProxy, origin)
    client.start()
    half = getRequest(origin)[:30]
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    closedAfter: dict[socket.socket, float] = {}
    got408 = 0

    def watch(timeout: float) -> None:
        nonlocal got408
        for key, _ in selector.select(timeout=timeout):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if data.startswith(b"HTTP/1.1 408 "):
                got408 += 1
            elif not data:
                closedAfter[s] = time.monotonic() - opened[s]
                selector.unregister(s)

    try:
        started = time.monotonic()
        slowestConnect = 0.0
        for i in range(SLOWLORIS):
            connecting = time.monotonic()
            s = socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=10)
            slowestConnect = max(slowestConnect, time.monotonic() - connecting)
            s.sendall(half)
            s.setblocking(False)
            opened[s] = time.monotonic()
            selector.register(s, selectors.EVENT_READ)
            if i % 50 == 0:
                watch(0)
        openSeconds = time.monotonic() - started
        deadline = time.monotonic() + headerTimeout + 5
        while len(closedAfter) < len(opened) and time.monotonic() < deadline:
            watch(0.05)
    finally:
        client.stop.set()
        client.join(15)
        for s in opened:
            s.close()
        selector.close()

    lifetimes = sorted(closedAfter.values())
    latencies = sorted(client.latencies)
    print(
        f"\nslowloris: {SLOWLORIS} stalled connections opened in {openSeconds:.2f} s "
        f"(slowest connect {slowestConnect * 1000:.0f} ms); "
        f"closed {len(lifetimes)} ({got408} with a 408) after "
        f"{lifetimes[0]:.2f}..{lifetimes[-1]:.2f} s (header_timeout {headerTimeout:g} s); "
        f"normal client: {len(latencies)} requests, median "
        f"{latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms "
        f"(baseline median {sorted(baseline.latencies)[len(baseline.latencies) // 2] * 1000:.1f}"
        " ms)"
    )
    assert client.failures == []
    # A dropped SYN (listen backlog full) costs its client a one-second retransmission.
    assert slowestConnect < 1.0
    assert len(latencies) >= 20
    assert latencies[-1] < 2.0
    assert len(lifetimes) == SLOWLORIS
    assert lifetimes[0] > headerTimeout - 0.5
    assert lifetimes[-1] < headerTimeout + 1.5
    assert got408 > SLOWLORIS * 0.9
    assert limitDenials(limitsProxy) >= before + SLOWLORIS
    records = waitForRecords(limitsProxy, skip, SLOWLORIS, timeout=10)
    assert sum(1 for r in records if r["code"] == 408) == SLOWLORIS


# -- idle_timeout ------------------------------------------------------------------------------


def test_silentConnectionIsClosedAtHeaderTimeout(limitsProxy) -> None:
    """
    A connection that never sends a byte is a slowloris too (it holds a max_connections
    slot): the first head is due header_timeout after the accept, not idle_timeout. Nothing
    was asked, so it is closed without a 408; the refusal is still counted and logged.
    """
    skip = len(limitsProxy.accessLines())
    before = limitDenials(limitsProxy)
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=10) as s:
        elapsed, data = waitClosed(s, IDLE_TIMEOUT + 5)
    assert HEADER_TIMEOUT - 0.3 < elapsed < HEADER_TIMEOUT + 1.5
    assert data == b""
    assert limitDenials(limitsProxy) == before + 1
    (record,) = waitForRecords(limitsProxy, skip, 1)
    assert record["code"] == 0
    assert record["reason"] == "idle"
    assert record["detail"] == "No request within header_timeout."


def test_firstHeadIsDueHeaderTimeoutAfterTheAccept(limitsProxy, origin) -> None:
    """Waiting before the first byte does not buy a fresh header_timeout."""
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=10) as s:
        started = time.monotonic()
        time.sleep(HEADER_TIMEOUT * 0.75)
        s.sendall(getRequest(origin)[:20])
        elapsed, data = waitClosed(s, IDLE_TIMEOUT + 5)
    elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.3 < elapsed < HEADER_TIMEOUT + 1.5
    assert data.startswith(b"HTTP/1.1 408 ")


def test_idleBetweenRequestsIsIdleTimeoutNotHeaderTimeout(limitsProxy, origin) -> None:
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=10) as s:
        s.sendall(getRequest(origin))
        assert readResponse(s)[0] == 200
        time.sleep(HEADER_TIMEOUT + 0.5)  # longer than header_timeout, shorter than idle
        s.sendall(getRequest(origin))
        assert readResponse(s)[0] == 200


def test_keptAliveConnectionIsClosedAtIdleTimeout(limitsProxy, origin) -> None:
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=10) as s:
        s.sendall(getRequest(origin))
        assert readResponse(s)[0] == 200
        time.sleep(IDLE_TIMEOUT / 2)
        s.sendall(getRequest(origin))  # activity pushes the deadline out
        assert readResponse(s)[0] == 200
        elapsed, data = waitClosed(s, IDLE_TIMEOUT + 5)
    assert IDLE_TIMEOUT - 0.3 < elapsed < IDLE_TIMEOUT + 2
    assert data == b""


def test_idleTunnelIsClosedAtIdleTimeout(limitsProxy, origin) -> None:
    with socket.create_connection(("127.0.0.1", limitsProxy.port), timeout=10) as s:
        s.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert readResponse(s)[0] == 200
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert readResponse(s)[0] == 200
        elapsed, _ = waitClosed(s, IDLE_TIMEOUT + 5)
    assert IDLE_TIMEOUT - 0.3 < elapsed < IDLE_TIMEOUT + 2


# -- max_connections ---------------------------------------------------------------------------


def test_connectionsBeyondMaxConnectionsGet503(startProxy, origin) -> None:
    limit = 20
    proxy = startProxy(LOOPBACK_INI + f"max_connections = {limit}\n\n[log]\nformat = json\n")
    skip = len(proxy.accessLines())
    deadline = time.monotonic() + 5
    while proxy.metric("proxygate_client_connections") > 0:  # start-up's probe has gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(limit)]
    try:
        deadline = time.monotonic() + 5
        while proxy.metric("proxygate_client_connections") < limit:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = limitDenials(proxy)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                s.sendall(getRequest(origin))
                status, headers, body = readResponse(s)
                assert status == 503
                assert headers["connection"] == "close"
                assert b"connection limit" in body
        assert limitDenials(proxy) == before + 3
        records = waitForRecords(proxy, skip, 3)
        assert [(r["code"], r["reason"]) for r in records] == [(503, "limit")] * 3

        # The ones already in are served; freeing slots lets new clients in.
        held[0].sendall(getRequest(origin))
        assert readResponse(held[0])[0] == 200
        for s in held[:5]:
            s.close()
        del held[:5]
        deadline = time.monotonic() + 5
        while proxy.metric("proxygate_client_connections") > limit - 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(getRequest(origin))
            assert readResponse(s)[0] == 200
    finally:
        for s in held:
            s.close()


# -- every refusal counted and logged with its reason ----------------------------------------


def test_everyRefusalReasonIsCountedAndLogged(startProxy, origin) -> None:
    proxy = startProxy(
        "[proxy]\nallowed_client_cidrs = 127.0.0.1/32\nmax_header_size = 2048\n"
        "\n[log]\nformat = json\n"
    )
    skip = len(proxy.accessLines())

    def denied(reason: str) -> float:
        return proxy.metric("proxygate_denied_total", reason=reason)

    before = {r: denied(r) for r in ("client", "port", "destination", "limit")}
    # client: a peer outside allowed_client_cidrs
    with socket.create_connection(
        ("127.0.0.1", proxy.port), timeout=5, source_address=("127.0.0.2", 0)
    ) as s:
        s.sendall(getRequest(origin))
        assert readResponse(s)[0] == 403
    # port: CONNECT outside connect_ports (443 by default)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"CONNECT example.invalid:25 HTTP/1.1\r\nHost: example.invalid:25\r\n\r\n")
        assert readResponse(s)[0] == 403
    # destination: the default policy
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(getRequest(origin))
        assert readResponse(s)[0] == 403
    # limit: a head over max_header_size
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(getRequest(origin, extra=f"X-Big: {'z' * 3000}\r\n"))
        assert readResponse(s)[0] == 431
    for reason in before:
        assert denied(reason) == before[reason] + 1, reason
    records = waitForRecords(proxy, skip, 4)
    assert [r["code"] for r in records] == [403, 403, 403, 431]
    assert [r["reason"] for r in records] == ["client", "port", "destination", "header_too_large"]
    details = [r["detail"] for r in records]
    assert "address is not allowed" in details[0]
    assert "port 25" in details[1]
    assert "deny_destinations" in details[2]
    assert "larger than" in details[3]


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:3128:interface=127.0.0.1", "tcp:3128:interface=127.0.0.1:backlog=1024"),
        ("tcp:3128:backlog=10", "tcp:3128:backlog=10"),
        ("TCP6:3128", "TCP6:3128:backlog=1024"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listenBacklogDefault(description: str, expected: str) -> None:
    """Twisted's default backlog of 50 is raised unless the endpoint string sets one."""
    from gateway.service import _withBacklog

    assert _withBacklog(description) == expected


def test_silentConnectionsCannotHoldMaxConnectionsForLong(startProxy, origin) -> None:
    """
    Silent connections filling max_connections lock others out only until header_timeout,
    not for idle_timeout (300 s by default).
    """
    limit = 20
    proxy = startProxy(
        LOOPBACK_INI + f"max_connections = {limit}\nheader_timeout = {HEADER_TIMEOUT:g}\n"
    )
    deadline = time.monotonic() + 5
    while proxy.metric("proxygate_client_connections") > 0:  # start-up's probe has gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(limit)]
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(getRequest(origin))
            assert readResponse(s)[0] == 503
        for s in held:
            waitClosed(s, HEADER_TIMEOUT + 3)
        assert time.monotonic() - started < HEADER_TIMEOUT + 2
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(getRequest(origin))
            assert readResponse(s)[0] == 200
    finally:
        for s in held:
            s.close()
