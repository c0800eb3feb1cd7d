"""
The inbound gateway end to end: proxygate started as users start it (twistd, an INI with
[reverse] and [route] sections) in front of loopback echo backends (tests/backends.py), driven
by real clients (requests, curl, websocket-client) over real sockets.

Routes by prefix and host, stripped or kept, the forwarding headers; 404 and the slash
redirect; round robin, sticky pins, failover, all-down 503, active health checks and
backend_up; 413 before the backend and a 200 MB upload that is never buffered; WebSocket
through a route and the route's idle limit; edge auth and identity header hygiene; Location
rewriting; static headers, TLS termination and an https backend; route metrics and access
lines; the forward listener that never serves routes; workers sharing the gateway.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import threading
import time

import pytest
import requests
import websocket

from tests.support import (
    LOOPBACK_INI,
    nonAcceptingPort,
    payloadChunks,
    payloadDigest,
    readResponse,
    rss,
    sslListen,
    waitFor,
)
from tests.support.backends import EchoBackend


@pytest.fixture
def backend():
    """Echo backends for one test, stopped at its end."""
    made: list[EchoBackend] = []

    def make(name: str, port: int = 0) -> EchoBackend:
        b = EchoBackend(name, port)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def startGateway(startProxy):
    """proxygate with a [reverse] listener on a free port and the given routes."""

    def start(routes: str, *, reverse: str = "", ini: str = LOOPBACK_INI, listen=None, **kw):
        endpoint = listen(0) if listen else "tcp:0:interface=127.0.0.1"
        p = startProxy(f"{ini}\n[reverse]\nlisten = {endpoint}\n{reverse}\n{routes}", **kw)
        p.gatewayPort = p.gatewayPorts[0]
        p.gateway = f"http://127.0.0.1:{p.gatewayPort}"
        return p

    return start


def client() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # never an http_proxy from the environment
    return s


def echoed(r: requests.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text)
    doc = r.json()
    doc["fields"] = {name.lower(): value for name, value in doc["headers"]}
    return doc


# -- routes and forwarding --------------------------------------------------------------------


def test_prefixAndHostRoutesStripOrKeepWithForwardedHeaders(startGateway, backend) -> None:
    app, keep, host, hostApi = (backend(n) for n in ("app", "keep", "host", "hostApi"))
    gw = startGateway(
        f"""
[route app]
match = /app/
backends = {app.url}

[route keep]
match = /keep/
backends = {keep.url}
strip_prefix = off

[route host]
match = apps.example.test
backends = {host.url}

[route hostApi]
match = apps.example.test/api/
backends = {hostApi.url}
"""
    )
    s = client()
    doc = echoed(s.get(gw.gateway + "/app/x/y?q=1&r=2", headers={"X-Forwarded-For": "6.6.6.6"}))
    assert (doc["backend"], doc["path"]) == ("app", "/x/y?q=1&r=2")
    f = doc["fields"]
    authority = f"127.0.0.1:{gw.gatewayPort}"
    assert f["host"] == authority  # the client's Host, port included
    assert f["x-forwarded-for"] == "127.0.0.1"  # the client's copy was dropped
    assert (f["x-forwarded-proto"], f["x-forwarded-host"]) == ("http", authority)
    assert (f["x-forwarded-port"], f["x-forwarded-prefix"]) == (str(gw.gatewayPort), "/app")
    doc = echoed(s.get(gw.gateway + "/keep/z"))
    assert (doc["backend"], doc["path"]) == ("keep", "/keep/z")
    assert "x-forwarded-prefix" not in doc["fields"]
    # a host alone; a host and a prefix (the longer match wins); curl as the client
    out = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "-w", "\n", "-H", "Host: Apps.Example.Test:8080",
         gw.gateway + "/api/v1?x", gw.gateway + "/other"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    first, second = (json.loads(line) for line in out.splitlines())
    assert (first["backend"], first["path"]) == ("hostApi", "/v1?x")
    assert (second["backend"], second["path"]) == ("host", "/other")
    assert ["X-Forwarded-Port", "8080"] in first["headers"]
    # no match: 404 from the gateway itself; the bare prefix: a redirect
    r = s.get(gw.gateway + "/api/v1")  # no host route for 127.0.0.1, no /api/ route
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["Proxy-Status"] == "proxygate; error=destination_not_found"
    r = s.get(gw.gateway + "/app?a=1", allow_redirects=False)
    assert (r.status_code, r.headers["Location"]) == (301, "/app/?a=1")
    lines = gw.accessLines()
    assert any(f" app/127.0.0.1:{app.port} " in line and "/app/x/y " in line for line in lines)
    assert not any("q=1" in line for line in lines)  # no query strings in the log


def test_forwardListenerNeverServesRoutes(startGateway, backend) -> None:
    app = backend("app")
    gw = startGateway(f"[route app]\nmatch = /\nbackends = {app.url}\n")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"GET /app/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = readResponse(sock)
    assert status == 400 and b"forward proxy" in body
    # through the forward proxy to the gateway's port: the proxy's own port, refused
    r = requests.get(gw.gateway + "/x", proxies={"http": f"http://127.0.0.1:{gw.port}"}, timeout=10)
    assert r.status_code == 403
    assert app.requests == []
    # the other way round: the gateway is not a forward proxy
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", gw.gateway,
         "http://example.com/"],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    assert out == "400"
    with socket.create_connection(("127.0.0.1", gw.gatewayPort), timeout=5) as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        status, headers, _ = readResponse(sock)
    assert status == 405 and "GET" in headers["allow"]
    assert app.requests == []


def test_gatewayLetsInItsOwnClientCIDRs(startGateway, backend) -> None:
    app = backend("app")
    gw = startGateway(
        f"[route app]\nmatch = /\nbackends = {app.url}\n",
        reverse="allowed_client_cidrs = 10.0.0.0/8",
    )
    r = client().get(gw.gateway + "/")
    assert r.status_code == 403 and r.headers["Connection"] == "close"
    assert app.requests == []
    # the proxy's own allowed_client_cidrs (loopback by default) are not the gateway's
    assert client().get(gw.url, timeout=10).status_code == 400


# -- pools ------------------------------------------------------------------------------------


def test_roundRobinFailoverAllDownAndBackendUp(startGateway, backend) -> None:
    a, b = backend("a"), backend("b")
    gw = startGateway(
        f"[route pool]\nmatch = /p/\nbackends = {a.url} {b.url}\nhealth_interval = 30\n"
    )
    s = client()
    assert [echoed(s.get(gw.gateway + "/p/"))["backend"] for _ in range(4)] == ["a", "b"] * 2
    assert a.accepted == 1 and b.accepted == 1  # kept-alive connections to the backends
    up = lambda url: gw.metric("proxygate_backend_up", route="pool", backend=url)  # noqa: E731
    assert (up(a.url), up(b.url)) == (1, 1)
    b.stop()
    # b refuses: every GET fails over to a; b is marked down at once
    assert [echoed(s.get(gw.gateway + "/p/"))["backend"] for _ in range(4)] == ["a"] * 4
    assert (up(a.url), up(b.url)) == (1, 0)
    a.stop()
    time.sleep(0.3)  # the gateway sees its kept-alive connection to a closed
    r = s.post(gw.gateway + "/p/", data=b"x")  # not idempotent, a refuses: 502
    assert r.status_code == 502
    assert str(a.port) not in r.text  # the client does not learn the backend's address
    r = s.get(gw.gateway + "/p/")
    assert r.status_code == 503
    assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert r.headers["Proxy-Status"] == "proxygate; error=destination_unavailable"
    assert (up(a.url), up(b.url)) == (0, 0)
    assert gw.metric("proxygate_route_requests_total", route="pool", code="503") == 1
    assert gw.metric("proxygate_route_requests_total", route="pool", code="502") == 1
    line = [x for x in gw.accessLines() if "/503 " in x][-1]
    assert " pool/- " in line  # no backend was chosen


def test_connectTimeoutIs504(startGateway) -> None:
    with nonAcceptingPort() as port:
        gw = startGateway(
            f"[route slow]\nmatch = /\nbackends = http://127.0.0.1:{port}\n",
            ini=LOOPBACK_INI + "connect_timeout = 1\n",
        )
        started = time.monotonic()
        r = client().get(gw.gateway + "/", timeout=30)
    assert r.status_code == 504 and time.monotonic() - started < 10
    assert r.headers["Proxy-Status"] == "proxygate; error=connection_timeout"


def test_healthChecksTakeABackendOutAndBack(startGateway, backend) -> None:
    a, b = backend("a"), backend("b")
    gw = startGateway(
        f"[route hc]\nmatch = /\nbackends = {a.url} {b.url}\n"
        "health_check = /health\nhealth_interval = 0.3\n"
    )
    up = lambda url: gw.metric("proxygate_backend_up", route="hc", backend=url)  # noqa: E731
    b.healthy = False
    assert waitFor(lambda: up(b.url) == 0, timeout=10)
    s = client()
    assert {echoed(s.get(gw.gateway + "/"))["backend"] for _ in range(4)} == {"a"}
    b.healthy = True
    assert waitFor(lambda: up(b.url) == 1, timeout=10)
    assert {echoed(s.get(gw.gateway + "/"))["backend"] for _ in range(4)} == {"a", "b"}


def test_stickyPinsAClientAndRepinsWhenItsBackendIsDown(startGateway, backend) -> None:
    a, b = backend("a"), backend("b")
    gw = startGateway(
        f"[route shiny]\nmatch = /shiny/\nbackends = {a.url} {b.url}\nbalance = sticky\n"
        "health_interval = 30\n"
    )
    s = client()
    first = s.get(gw.gateway + "/shiny/")
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith("proxygate_shiny=")
    assert "Path=/shiny" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert str(a.port) not in cookie and str(b.port) not in cookie
    pinned = echoed(first)["backend"]
    for _ in range(5):
        r = s.get(gw.gateway + "/shiny/x")
        assert echoed(r)["backend"] == pinned and "Set-Cookie" not in r.headers
    other = client()  # a second client is balanced to the other backend
    assert echoed(other.get(gw.gateway + "/shiny/"))["backend"] != pinned
    (a if pinned == "a" else b).stop()
    r = s.get(gw.gateway + "/shiny/x")
    moved = echoed(r)["backend"]
    assert moved != pinned and r.headers["Set-Cookie"] != cookie  # re-pinned
    for _ in range(3):
        assert echoed(s.get(gw.gateway + "/shiny/x"))["backend"] == moved


# -- bodies ------------------------------------------------------------------------------------


def test_bodyOverTheLimitIs413BeforeTheBackend(startGateway, backend, tmp_path) -> None:
    app = backend("app")
    gw = startGateway(f"[route up]\nmatch = /up/\nbackends = {app.url}\nmax_body_size = 1K\n")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    out = subprocess.run(
        ["curl", "-s", "-i", "--noproxy", "*", "--data-binary", f"@{big}", gw.gateway + "/up/"],
        capture_output=True, timeout=30,
    ).stdout  # fmt: skip
    assert out.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"1024 bytes" in out
    assert app.requests == []  # not a byte, not even the head
    # chunked: counted as it streams, cut with 413 when it passes the limit
    r = client().post(gw.gateway + "/up/", data=iter([b"y" * 600, b"y" * 600]))
    assert r.status_code == 413 and r.headers["Connection"] == "close"
    # at the limit: forwarded
    assert echoed(client().post(gw.gateway + "/up/", data=b"z" * 1024))["body_length"] == 1024
    assert gw.metric("proxygate_route_requests_total", route="up", code="413") == 2


@pytest.mark.slow
def test_200MBUploadStreamsWithoutBuffering(startGateway, backend) -> None:
    app = backend("app")
    gw = startGateway(f"[route up]\nmatch = /up/\nbackends = {app.url}\nmax_body_size = 1G\n")
    s = client()
    s.get(gw.gateway + "/up/")  # warm
    before = rss(gw.pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss(gw.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    size = 200 * 1000 * 1000
    try:
        r = s.post(gw.gateway + "/up/upload", data=payloadChunks(size, 1 << 20), timeout=120)
    finally:
        done.set()
        sampler.join(5)
    assert r.json() == {"backend": "app", "bytes": size, "sha256": payloadDigest(size)}
    grown = peak[0] - before
    print(f"proxygate RSS {before / 1e6:.1f} MB, peak {peak[0] / 1e6:.1f} MB during 200 MB")
    assert grown < 32 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB: the body was buffered"


# -- WebSocket -----------------------------------------------------------------------------------


def test_websocketThroughARouteAndTheRouteIdleLimit(startGateway, backend) -> None:
    app = backend("app")
    gw = startGateway(f"[route ws]\nmatch = /ws/\nbackends = {app.url}\ntimeout = 1.5\n")
    ws = websocket.create_connection(f"ws://127.0.0.1:{gw.gatewayPort}/ws/echo", timeout=10)
    try:
        ws.send("hello")
        assert ws.recv() == "hello"
        big = bytes(range(256)) * 4000
        ws.send_binary(big)
        assert ws.recv() == big
        ws.ping(b"p")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"p")
        # idle past the route's timeout: the gateway closes it
        started = time.monotonic()
        with pytest.raises(
            (websocket.WebSocketConnectionClosedException, ConnectionError, OSError)
        ):
            ws.recv()
        assert 1.0 < time.monotonic() - started < 8
    finally:
        ws.close()
    assert app.requests[-1]["path"] == "/echo"
    line = waitFor(lambda: [x for x in gw.accessLines() if "/101 " in x], timeout=5)
    assert f" ws/127.0.0.1:{app.port} " in line[-1]
    assert gw.metric("proxygate_route_requests_total", route="ws", code="101") == 1
    assert gw.metric("proxygate_websocket_upgrades_total", result="ok") == 1


# -- edge auth ------------------------------------------------------------------------------------


def test_edgeAuthWithIdentityHeaderHygiene(startGateway, backend, tmp_path) -> None:
    app = backend("app")
    users = tmp_path / "users"
    digest = base64.b64encode(hashlib.sha1(b"s3cret!").digest()).decode()
    users.write_text(f"alice:{{SHA}}{digest}\n")
    gw = startGateway(
        f"[route app]\nmatch = /app/\nbackends = {app.url}\nauth = on\n"
        "user_header = X-Auth-Username\n",
        ini=LOOPBACK_INI + f"\n[auth]\nhtpasswd = {users}\nrealm = Data platform\n",
    )
    s = client()
    r = s.get(gw.gateway + "/app/")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Basic realm="Data platform"')
    assert "Proxy-Authenticate" not in r.headers
    assert s.get(gw.gateway + "/app/", auth=("alice", "wrong")).status_code == 401
    assert app.requests == []
    forged = {
        "X-Auth-Username": "root",
        "Remote-User": "root",
        "X-Forwarded-User": "root",
        "X_Auth_Username": "root",
        "X-WEBAUTH-USER": "root",
    }
    doc = echoed(s.get(gw.gateway + "/app/", auth=("alice", "s3cret!"), headers=forged))
    assert ["X-Auth-Username", "alice"] in doc["headers"]
    assert "root" not in json.dumps(doc["headers"])
    assert "authorization" not in doc["fields"]  # the gateway's credentials stay here
    log = gw.log()
    assert "s3cret" not in log and base64.b64encode(b"alice:s3cret!").decode() not in log
    assert any(" alice " in line and "/app/" in line for line in gw.accessLines())
    assert gw.metric("proxygate_route_requests_total", route="app", code="401") == 2


# -- what the client gets back ----------------------------------------------------------------


def test_locationContentLocationAndRefreshRewritten(startGateway, backend) -> None:
    app, raw = backend("app"), backend("raw")
    gw = startGateway(
        f"[route app]\nmatch = /app/\nbackends = {app.url}\n\n"
        f"[route raw]\nmatch = /raw/\nbackends = {raw.url}\nrewrite_location = off\n"
    )
    s = client()
    public = f"http://127.0.0.1:{gw.gatewayPort}"
    r = s.get(
        gw.gateway + "/app/",
        headers={
            "X-Echo-Status": "302",
            "X-Echo-Location": f"{app.url}/login?next=/x",
            "X-Echo-Content-Location": f"http://localhost:{app.port}/doc",
            "X-Echo-Refresh": f"5; url={app.url}/later",
        },
        allow_redirects=False,
    )
    assert r.status_code == 302
    assert r.headers["Location"] == f"{public}/app/login?next=/x"
    assert r.headers["Content-Location"] == f"{public}/app/doc"
    assert r.headers["Refresh"] == f"5; url={public}/app/later"
    r = s.get(gw.gateway + "/app/", headers={"X-Echo-Location": "/relative"})
    assert r.headers["Location"] == "/relative"  # relative: left alone
    r = s.get(gw.gateway + "/raw/", headers={"X-Echo-Location": f"{raw.url}/x"})
    assert r.headers["Location"] == f"{raw.url}/x"  # rewrite_location = off


def test_staticHeadersTLSTerminationAndRouteMetrics(startGateway, backend, tmp_path) -> None:
    from tests.support.tlsorigin import makeCA

    files = makeCA(tmp_path / "pki")
    app = backend("app")
    gw = startGateway(
        f"[route rstudio]\nmatch = /rstudio/\nbackends = {app.url}\nbalance = sticky\n"
        "request_headers =\n    X-RStudio-Root-Path: {prefix}\n    X-RSC-Request: {url}\n",
        listen=lambda port: sslListen(files, port),
    )
    s = client()
    s.verify = str(files.caCert)
    base = f"https://localhost:{gw.gatewayPort}"
    for _ in range(3):
        r = s.get(base + "/rstudio/p/1?a=b", headers={"X-RStudio-Root-Path": "/evil"})
        doc = echoed(r)
    f = doc["fields"]
    assert f["x-rstudio-root-path"] == "/rstudio"
    assert f["x-rsc-request"] == f"https://localhost:{gw.gatewayPort}/rstudio/p/1?a=b"
    assert (f["x-forwarded-proto"], f["x-forwarded-port"]) == ("https", str(gw.gatewayPort))
    assert "/evil" not in json.dumps(doc["headers"])
    assert [c.secure for c in s.cookies] == [True]  # the sticky pin, over https only
    assert gw.metric("proxygate_route_requests_total", route="rstudio", code="200") == 3
    assert gw.metric("proxygate_route_request_duration_seconds_count", route="rstudio") == 3
    assert gw.metric("proxygate_requests_total", mode="reverse", method="GET", code="200") == 3
    assert any(
        f"https://localhost:{gw.gatewayPort}/rstudio/p/1 " in line for line in gw.accessLines()
    )


def test_httpsBackendVerifiedAgainstTheRouteCABundle(startGateway, tmp_path) -> None:
    from tests.support.tlsorigin import HELLO, HTTPSOrigin, makeCA

    files = makeCA(tmp_path / "pki")
    other = makeCA(tmp_path / "other")
    origin = HTTPSOrigin(files)
    try:
        url = f"https://127.0.0.1:{origin.port}"
        gw = startGateway(
            f"[route good]\nmatch = /good/\nbackends = {url}\nca_bundle = {files.caCert}\n\n"
            f"[route bad]\nmatch = /bad/\nbackends = {url}\nca_bundle = {other.caCert}\n"
        )
        s = client()
        r = s.get(gw.gateway + "/good/")
        assert (r.status_code, r.content) == (200, HELLO)
        r = s.get(gw.gateway + "/bad/")
        assert r.status_code == 502
        assert r.headers["Proxy-Status"] == "proxygate; error=tls_certificate_error"
        assert gw.metric("proxygate_backend_up", route="bad", backend=url) == 0
        assert gw.metric("proxygate_backend_up", route="good", backend=url) == 1
    finally:
        origin.close()


# -- several processes ------------------------------------------------------------------------


def test_workersShareTheGatewayAndMergeBackendUp(startGateway, backend, closedPort) -> None:
    a = backend("a")
    down = f"http://127.0.0.1:{closedPort}"  # nothing listens there
    gw = startGateway(
        f"[route w]\nmatch = /\nbackends = {a.url} {down}\nhealth_check = /health\n"
        "health_interval = 0.3\n",
        ini=LOOPBACK_INI + "workers = 2\n",
    )
    assert waitFor(lambda: gw.metric("proxygate_workers") == 2, timeout=20)
    # every process checks for itself; the scrape shows the state, not a sum of states
    assert waitFor(
        lambda: gw.metric("proxygate_backend_up", route="w", backend=down) == 0, timeout=10
    )
    assert gw.metric("proxygate_backend_up", route="w", backend=a.url) == 1
    answers = set()
    for _ in range(8):
        s = client()  # new connections: the kernel spreads them over both processes
        answers.add(echoed(s.get(gw.gateway + "/x"))["backend"])
        s.close()
    assert answers == {"a"}
    assert waitFor(lambda: gw.metric("proxygate_route_requests_total", route="w", code="200") == 8)


# -- reload ------------------------------------------------------------------------------------


def test_sighupReloadsTheRoutes(startGateway, backend) -> None:
    """SIGHUP applies an edited [route] section: new requests go where it now says."""
    import signal

    first, second = backend("first"), backend("second")
    gw = startGateway(f"[route app]\nmatch = /app/\nbackends = {first.url}\n")
    s = client()
    assert echoed(s.get(gw.gateway + "/app/x"))["backend"] == "first"
    text = gw.configPath.read_text().replace(first.url, second.url)
    text += "\n[route more]\nmatch = /more/\nbackends = " + first.url + "\n"
    gw.configPath.write_text(text)
    gw.proc.send_signal(signal.SIGHUP)
    assert waitFor(lambda: echoed(client().get(gw.gateway + "/app/x"))["backend"] == "second")
    assert echoed(client().get(gw.gateway + "/more/y"))["backend"] == "first"
    assert gw.metric("proxygate_config_reloads_total", result="ok") == 1
    assert gw.metric("proxygate_backend_up", route="app", backend=second.url) == 1
    assert gw.metric("proxygate_backend_up", route="app", backend=first.url) == 0
