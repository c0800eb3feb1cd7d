"""
Chaining to an upstream proxy ([upstream] proxy, no_proxy, ca_certificate, verify), end to end.

Real third-party upstreams from Debian, started here on loopback with their own credentials
and configuration in temporary folders, and stopped by PID:

- Squid 5 (C{squid -N -f conf}) with Basic auth against an NCSA file through
  C{/usr/lib/squid/basic_ncsa_auth}; its access log names the user it accepted.
- tinyproxy 1.11 (C{tinyproxy -d -c conf}) with C{BasicAuth} (it answers a failed
  authentication with 401, not 407).

plus proxygate itself as an upstream (with [auth], over an C{ssl:} listener), and a raw
socket recorder that shows the exact bytes an upstream receives. curl and requests are the
clients. Templates of the upstreams' configurations are in C{tests/data/upstream/}.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from gateway.auth import md5Crypt
from tests.support import (
    LOOPBACK_INI,
    Origin,
    ProxyProcess,
    freePort,
    payload,
    rawRequest,
    sslListen,
    waitForPort,
)
from tests.support.tlsorigin import HELLO, HTTPSOrigin, TLSFiles, makeCA
from tests.support.tunnel import TCPServer

DATA = Path(__file__).parent / "data" / "upstream"

CURL = shutil.which("curl")
SQUID = shutil.which("squid") or shutil.which("squid", path="/usr/sbin:/sbin")
NCSA = "/usr/lib/squid/basic_ncsa_auth"
TINYPROXY = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/bin")

needsCurl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt: curl)")

# The upstream's own credentials: the password has every character a URL reserves.
UP_USER = "bob"
UP_PASSWORD = "p@ss:w%rd/#1"
UP_USERINFO = f"{UP_USER}:{quote(UP_PASSWORD, safe='')}"  # bob:p%40ss%3Aw%25rd%2F%231
UP_BASIC = "Basic " + base64.b64encode(f"{UP_USER}:{UP_PASSWORD}".encode()).decode()

# The client's credentials for proxygate A, which must never travel upstream.
CLIENT_USER = "alice"
CLIENT_PASSWORD = "alice-Secret-9"
CLIENT_BASIC = "Basic " + base64.b64encode(f"{CLIENT_USER}:{CLIENT_PASSWORD}".encode()).decode()

# Names only the upstream can resolve (Squid's own hosts file): reaching the origin with one
# of them proves the request went through Squid; proxygate going direct cannot resolve them.
SQUID_NAMES = ("corp.test", "api.corp.test", "deep.api.corp.test", "badcorp.test", "www.other.test")

PROCESS_WAIT = 15.0


def marker() -> str:
    return uuid.uuid4().hex[:12]


def htpasswdLine(user: str, password: str) -> str:
    return f"{user}:{md5Crypt(password.encode(), '$apr1$' + uuid.uuid4().hex[:8])}\n"


def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """curl with bounded times; never reads ~/.curlrc or the proxy environment."""
    return subprocess.run(
        [CURL, "-q", "--silent", "--show-error", "--noproxy", "", "--max-time", "20", *args],
        capture_output=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},
    )


def stopProcess(proc: subprocess.Popen | None) -> None:
    """SIGTERM, a bounded wait, then SIGKILL: by PID only."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=PROCESS_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def waitFor(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def headersOf(doc: dict) -> dict[str, str]:
    """The /echo document's headers, lower-cased names (repeats joined)."""
    out: dict[str, str] = {}
    for name, value in doc["headers"]:
        name = name.lower()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


# -- the upstreams -------------------------------------------------------------------------


class _Daemon:
    """A third-party daemon in a private folder (world-traversable: it may drop root)."""

    name = "daemon"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"proxygate-{self.name}-"))
        os.chmod(self.dir, 0o755)
        # Squid and tinyproxy are told their port and cannot report one they picked, so
        # they get a free one (which another process could take first: a rare failed start).
        self.port = freePort()
        self.proc: subprocess.Popen | None = None
        self.output = self.dir / "output.txt"

    def _spawn(self, argv: list[str]) -> None:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir
            )
        try:
            waitForPort("127.0.0.1", self.port, timeout=30, proc=self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{self.name} did not start ({e}):\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]

    def url(self, userinfo: str | None = UP_USERINFO) -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def stop(self) -> None:
        stopProcess(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Squid(_Daemon):
    name = "squid"

    def __init__(self, users: dict[str, str]) -> None:
        super().__init__()
        (self.dir / "passwd").write_text("".join(htpasswdLine(u, p) for u, p in users.items()))
        (self.dir / "hosts").write_text(
            "127.0.0.1 localhost " + " ".join(SQUID_NAMES) + "\n::1 ip6-localhost\n"
        )
        userLine = ""
        if os.geteuid() == 0:
            # Squid will not run as root: it switches to this user, who must own its files.
            account = _account("proxy", "nobody")
            userLine = f"cache_effective_user {account.pw_name}"
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
        template = (DATA / "squid.conf.in").read_text()
        self.conf = self.dir / "squid.conf"
        self.conf.write_text(
            template.format(port=self.port, dir=self.dir, ncsa=NCSA, user_line=userLine)
        )
        self.accessLog = self.dir / "access.log"

    def start(self) -> Squid:
        self._spawn([SQUID, "-N", "-f", str(self.conf), "-n", f"pgsquid{self.port}"])
        return self

    def diagnostics(self) -> str:
        cacheLog = self.dir / "cache.log"
        text = cacheLog.read_text(errors="replace") if cacheLog.exists() else ""
        return super().diagnostics() + text[-3000:]

    def lines(self) -> list[str]:
        try:
            return self.accessLog.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def waitForLine(self, *needles: str, timeout: float = 10.0) -> str:
        """The first access log line containing every needle (Squid logs at the end)."""

        def find():
            return next((ln for ln in self.lines() if all(n in ln for n in needles)), None)

        return waitFor(find, timeout, f"a Squid access log line with {needles}")

    def matching(self, *needles: str) -> list[str]:
        return [ln for ln in self.lines() if all(n in ln for n in needles)]

    def waitForNew(self, before: list[str], *needles: str, timeout: float = 10.0) -> list[str]:
        """
        The lines with every needle beyond the C{before} ones (as returned by L{matching}
        earlier): this module's Squid serves many tests, and logs a tunnel when it ends.
        """

        def new():
            lines = self.matching(*needles)
            return lines[len(before) :] if len(lines) > len(before) else None

        return waitFor(new, timeout, f"a new Squid access log line with {needles}")

    def flushMark(self) -> None:
        """
        Send one request straight to Squid and wait for its log line: every transaction
        that ended before it is in the log by then (to check that something is absent).
        """
        tag = marker()
        request = (
            f"GET http://127.0.0.1:1/flush-{tag} HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"
            f"Proxy-Authorization: {UP_BASIC}\r\nConnection: close\r\n\r\n"
        ).encode()
        rawRequest(self.port, request, timeout=10)
        self.waitForLine(f"flush-{tag}")


class Tinyproxy(_Daemon):
    name = "tinyproxy"
    user = "tina"
    password = "tiny-Pass-77"

    def __init__(self) -> None:
        super().__init__()
        template = (DATA / "tinyproxy.conf.in").read_text()
        self.conf = self.dir / "tinyproxy.conf"
        self.conf.write_text(
            template.format(port=self.port, dir=self.dir, user=self.user, password=self.password)
        )
        self.log = self.dir / "tinyproxy.log"

    def start(self) -> Tinyproxy:
        self._spawn([TINYPROXY, "-d", "-c", str(self.conf)])
        return self

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def diagnostics(self) -> str:
        return super().diagnostics() + "\n".join(self.lines()[-40:])


def _account(*names: str) -> pwd.struct_passwd:
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"none of the users {names} exists")


@pytest.fixture(scope="module")
def squid():
    if SQUID is None or not os.access(NCSA, os.X_OK):
        pytest.skip(f"squid or its {NCSA} helper is not installed (apt: squid)")
    s = Squid({UP_USER: UP_PASSWORD}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tinyproxy():
    if TINYPROXY is None:
        pytest.skip("tinyproxy is not installed (apt: tinyproxy)")
    t = Tinyproxy().start()
    yield t
    t.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TLSFiles:
    return makeCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def httpsOrigin(pki):
    o = HTTPSOrigin(pki)
    yield o
    o.close()


@pytest.fixture(scope="module")
def origin6():
    try:
        o = Origin("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    yield o
    o.close()


@pytest.fixture
def proxies(tmp_path):
    """Start proxygate processes with any listener (tcp or ssl, v4 or v6)."""
    started: list[ProxyProcess] = []

    def start(ini: str, *, listen: str | None = None) -> ProxyProcess:
        p = ProxyProcess(tmp_path, ini, listen=listen)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def sharedProxies(tmp_path_factory):
    """
    proxygate processes for the module's read-only tests, one per configuration text:
    tests with the same configuration share a process (they tell their requests apart by
    a marker of their own).
    """
    started: dict[str, ProxyProcess] = {}
    folder = tmp_path_factory.mktemp("shared")

    def get(ini: str) -> ProxyProcess:
        if ini not in started:
            started[ini] = ProxyProcess(folder, ini).start()
        return started[ini]

    yield get
    for p in started.values():
        p.stop()


def upstreamINI(proxyURL: str, extra: str = "", noProxy: str = "") -> str:
    return LOOPBACK_INI + f"\n[upstream]\nproxy = {proxyURL}\nno_proxy = {noProxy}\n{extra}\n"


def authINI(tmp_path: Path, user: str, password: str) -> str:
    """An [auth] section for proxygate with one user (an $apr1$ htpasswd file)."""
    path = tmp_path / f"{user}-{marker()}.htpasswd"
    path.write_text(htpasswdLine(user, password))
    return f"\n[auth]\nhtpasswd = {path}\nrealm = test\n"


def accessLinesWith(p: ProxyProcess, needle: str, count: int = 1) -> list[str]:
    """Wait for C{count} access log lines of C{p} with C{needle} (tunnels log at their end)."""

    def find():
        lines = [ln for ln in p.accessLines() if needle in ln]
        return lines if len(lines) >= count else None

    return waitFor(find, 10, f"{count} access log line(s) with {needle!r}")


def viaProxy(proxyURL: str) -> dict[str, str]:
    return {"http": proxyURL, "https": proxyURL}


# -- Squid upstream: HTTP, CONNECT, MITM, credentials ------------------------------------------


@needsCurl
def test_squidPlainHTTPWithPercentEncodedCredentials(proxies, squid, origin) -> None:
    """Absolute-form requests go to Squid with the configured (percent-decoded) credentials."""
    a = proxies(upstreamINI(squid.url()))
    tag = marker()
    r = curl("--proxy", a.url, origin.url(f"/echo?curl={tag}"))
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    seen = headersOf(doc)
    assert doc["path"] == f"/echo?curl={tag}"
    # Both proxies on the way, in order; no proxy credentials reach the origin.
    assert seen["via"].startswith("1.1 proxygate") and "squid-test" in seen["via"], seen
    assert "proxy-authorization" not in seen
    line = squid.waitForLine(f"/echo?curl={tag}")
    assert "TCP_MISS/200" in line and f" GET http://127.0.0.1:{origin.port}/" in line
    assert f" {UP_USER} " in line, line  # Squid accepted bob's credentials
    assert any("/echo" in ln and "FIRSTUP_PARENT/127.0.0.1" in ln for ln in a.accessLines())

    # requests, and a POST body through both proxies.
    tag = marker()
    with requests.Session() as s:
        s.trust_env = False
        body = payload(200_000)
        resp = s.post(
            origin.url(f"/echo?requests={tag}"), data=body, proxies=viaProxy(a.url), timeout=10
        )
    assert resp.status_code == 200
    assert resp.json()["body_length"] == len(body)
    assert f" {UP_USER} " in squid.waitForLine(f"/echo?requests={tag}", "POST")


@needsCurl
def test_squidConnectWithCredentials(proxies, squid, pki, httpsOrigin) -> None:
    """CONNECT tunnels are opened with a CONNECT of proxygate's own, with its credentials."""
    a = proxies(upstreamINI(squid.url()))
    needle = f"CONNECT 127.0.0.1:{httpsOrigin.port}"
    before = squid.matching(needle)
    base = f"https://127.0.0.1:{httpsOrigin.port}"
    size = 2 * 1024 * 1024 + 3
    r = curl("--proxy", a.url, "--cacert", str(pki.caCert), f"{base}/", f"{base}/bytes/{size}")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == HELLO + payload(size)
    (line,) = squid.waitForNew(before, needle)  # one tunnel, both requests
    assert "TCP_TUNNEL/200" in line and f" {UP_USER} " in line, line
    # proxygate logs a tunnel when it ends, just after curl is done.
    (tunnel,) = accessLinesWith(a, needle)
    assert "FIRSTUP_PARENT/127.0.0.1" in tunnel, tunnel
    with requests.Session() as s:
        s.trust_env = False
        resp = s.get(f"{base}/", proxies=viaProxy(a.url), verify=str(pki.caCert), timeout=10)
    assert resp.content == HELLO


@needsCurl
def test_squidCarriesTheMITMOriginLegs(proxies, squid, pki, httpsOrigin, tmp_path) -> None:
    """An intercepted tunnel's origin connections go through Squid with CONNECT."""
    ini = upstreamINI(
        squid.url(),
        extra=(
            f"\n[mitm]\nenabled = on\nca_cert = {tmp_path / 'mitm.pem'}\n"
            f"ca_key = {tmp_path / 'mitm.key'}\nupstream_ca_bundle = {pki.caCert}\n"
        ),
    )
    a = proxies(ini)
    needle = f"CONNECT 127.0.0.1:{httpsOrigin.port}"
    before = squid.matching(needle)
    base = f"https://127.0.0.1:{httpsOrigin.port}"
    r = curl(
        "--proxy", a.url, "--cacert", str(tmp_path / "mitm.pem"), f"{base}/", f"{base}/bytes/5000"
    )
    assert r.returncode == 0, (r.stderr.decode(), a.log()[-2000:])
    assert r.stdout == HELLO + payload(5000)
    mitmLines = [ln for ln in a.accessLines() if f"GET https://127.0.0.1:{httpsOrigin.port}/" in ln]
    assert len(mitmLines) == 2 and all("FIRSTUP_PARENT" in ln for ln in mitmLines), mitmLines
    a.stop()  # proxygate pools its origin leg (the tunnel): Squid logs it when it ends
    (line,) = squid.waitForNew(before, needle)
    assert "TCP_TUNNEL/200" in line and f" {UP_USER} " in line, line


@needsCurl
def test_clientCredentialsForProxygateNeverReachSquid(
    proxies, squid, origin, pki, httpsOrigin, tmp_path
) -> None:
    """
    proxygate with [auth]: alice authenticates to proxygate, Squid only ever sees bob (its
    log names the user it accepted), for absolute-form requests and for CONNECT.
    """
    a = proxies(upstreamINI(squid.url(), extra=authINI(tmp_path, CLIENT_USER, CLIENT_PASSWORD)))
    needle = f"CONNECT 127.0.0.1:{httpsOrigin.port}"
    before = squid.matching(needle)
    creds = ["--proxy-user", f"{CLIENT_USER}:{CLIENT_PASSWORD}"]
    tag = marker()
    r = curl("--proxy", a.url, *creds, origin.url(f"/echo?auth={tag}"))
    assert r.returncode == 0, r.stderr.decode()
    assert "proxy-authorization" not in headersOf(json.loads(r.stdout))
    r = curl(
        "--proxy",
        a.url,
        *creds,
        "--cacert",
        str(pki.caCert),
        f"https://127.0.0.1:{httpsOrigin.port}/?{tag}",
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == HELLO
    assert f" {UP_USER} " in squid.waitForLine(f"/echo?auth={tag}")
    (line,) = squid.waitForNew(before, needle)
    assert "TCP_TUNNEL/200" in line and f" {UP_USER} " in line, line
    assert not [ln for ln in squid.lines() if CLIENT_USER in ln]
    assert [ln for ln in a.accessLines() if f" {CLIENT_USER} " in ln]
    # Without valid credentials for proxygate nothing goes upstream at all.
    tag = marker()
    r = curl(
        "--proxy",
        a.url,
        "--proxy-user",
        f"{CLIENT_USER}:wrong",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        origin.url(f"/echo?denied={tag}"),
    )
    assert r.stdout == b"407"
    squid.flushMark()
    assert not [ln for ln in squid.lines() if tag in ln]


# -- the upstream's answers reach the client truthfully -----------------------------------------


def connectThrough(
    port: int, authority: str, extra: bytes = b"", early: bytes = b"", timeout: float = 10.0
) -> tuple[int, bytes]:
    """CONNECT through proxygate; (status, everything until the proxy closed)."""
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode() + extra + b"\r\n"
    data = rawRequest(port, head + early, timeout=timeout)
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12]), data


def test_squid407ToConnectIs502AndNoTunnel(proxies, squid, origin) -> None:
    """Wrong upstream credentials: a 502 naming Squid and its 407; nothing is tunnelled."""
    a = proxies(upstreamINI(squid.url(f"{UP_USER}:not-the-password")))
    needle = f"CONNECT 127.0.0.1:{origin.port}"
    before = squid.matching(needle)
    tag = marker()
    early = f"GET /echo?early={tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    status, data = connectThrough(a.port, f"127.0.0.1:{origin.port}", early=early)
    assert status == 502, data
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    assert f"127.0.0.1:{squid.port}" in body and "407" in body, body
    assert b"Proxy-Authenticate" not in data  # the client cannot fix our upstream credentials
    # The refused CONNECT opened no tunnel: the early request never reached the origin.
    assert not [req for req in origin.requests if tag in req[1]]
    (line,) = squid.waitForNew(before, needle)
    assert "TCP_DENIED/407" in line, line
    assert a.metric("proxygate_tunnels_total", result="upstream_refused") == 1
    assert a.metric("proxygate_upstream_errors_total", reason="refused") == 1


def test_squid407ToAbsoluteFormIs502(proxies, squid, origin) -> None:
    a = proxies(upstreamINI(squid.url(f"{UP_USER}:not-the-password")))
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(origin.url(f"/echo?{marker()}"), proxies=viaProxy(a.url), timeout=10)
    assert r.status_code == 502
    assert f"127.0.0.1:{squid.port}" in r.text and "407" in r.text, r.text
    assert "proxy-authenticate" not in {k.lower() for k in r.headers}
    # No credentials at all in the URL: the same 502.
    a2 = proxies(upstreamINI(squid.url(None)))
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(origin.url(f"/echo?{marker()}"), proxies=viaProxy(a2.url), timeout=10)
    assert r.status_code == 502 and "407" in r.text


def test_squid403ToConnectIs502(proxies, squid) -> None:
    """Squid refuses the destination: CONNECT gets a 502 naming it; no tunnel."""
    a = proxies(upstreamINI(squid.url()))
    before = squid.matching("CONNECT www.forbidden.test:443")
    status, data = connectThrough(
        a.port, "www.forbidden.test:443", early=b"\x16\x03\x01 hello bytes"
    )
    assert status == 502
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    assert f"127.0.0.1:{squid.port}" in body and "403" in body, body
    assert body.count("\n") <= 2  # one or two lines, no Squid error page
    (line,) = squid.waitForNew(before, "CONNECT www.forbidden.test:443")
    assert "TCP_DENIED/403" in line, line


def test_squid403ToAbsoluteFormPassesThrough(proxies, squid) -> None:
    """A 403 to a forwarded request may be the origin's: it passes through as it is."""
    a = proxies(upstreamINI(squid.url()))
    with requests.Session() as s:
        s.trust_env = False
        r = s.get("http://www.forbidden.test/page", proxies=viaProxy(a.url), timeout=10)
    assert r.status_code == 403
    assert r.headers.get("X-Squid-Error", "").startswith("ERR_ACCESS_DENIED")


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_unreachableUpstreamIs502(proxies, method, closedPort) -> None:
    closed = closedPort
    a = proxies(upstreamINI(f"http://{UP_USERINFO}@127.0.0.1:{closed}"))
    if method == "GET":
        data = rawRequest(
            a.port,
            b"GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
        )
    else:
        data = rawRequest(
            a.port, b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"
        )
    assert data.startswith(b"HTTP/1.1 502 "), data
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    assert f"upstream proxy 127.0.0.1:{closed} is unreachable" in body, body
    assert UP_PASSWORD not in body and quote(UP_PASSWORD, safe="") not in body


def test_upstreamClosingDuringConnectIs502(proxies) -> None:
    """An upstream that hangs up instead of answering the CONNECT."""

    def hangUp(server, conn: socket.socket) -> None:
        conn.recv(65536)

    upstream = TCPServer(hangUp)
    try:
        a = proxies(upstreamINI(f"http://127.0.0.1:{upstream.port}"))
        status, data = connectThrough(a.port, "example.test:443")
        assert status == 502, data
        assert b"closed the connection during CONNECT" in data
    finally:
        upstream.close()


def test_silentUpstreamIs504AfterConnectTimeout(proxies) -> None:
    """An upstream that accepts but never answers the CONNECT: 504 after connect_timeout."""
    upstream = TCPServer(None)  # holds connections open, never reads
    try:
        ini = upstreamINI(f"http://127.0.0.1:{upstream.port}").replace(
            "[proxy]", "[proxy]\nconnect_timeout = 1", 1
        )
        a = proxies(ini)
        started = time.monotonic()
        status, data = connectThrough(a.port, "example.test:443", timeout=15)
        assert status == 504, data
        assert 0.8 < time.monotonic() - started < 8
        assert b"did not open the tunnel in time" in data
    finally:
        upstream.close()


# -- exactly what an upstream receives ------------------------------------------------------------


@pytest.mark.parametrize("clientAuth", [False, True], ids=["no-auth", "with-auth"])
def test_upstreamReceivesOnlyItsOwnCredentials(proxies, rawOrigin, tmp_path, clientAuth) -> None:
    """
    The raw bytes at the upstream: absolute form, one Proxy-Authorization (the configured
    one, percent-decoded), and nothing of the client's own Proxy-Authorization.
    """
    extra = authINI(tmp_path, CLIENT_USER, CLIENT_PASSWORD) if clientAuth else ""
    a = proxies(upstreamINI(f"http://{UP_USERINFO}@127.0.0.1:{rawOrigin.port}", extra=extra))
    rawOrigin.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    data = rawRequest(
        a.port,
        (
            "GET http://example.test:8080/p?q=1 HTTP/1.1\r\nHost: example.test:8080\r\n"
            f"Proxy-Authorization: {CLIENT_BASIC}\r\nProxy-Connection: keep-alive\r\n"
            "X-Kept: yes\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert data.startswith(b"HTTP/1.1 200 "), data
    waitFor(lambda: rawOrigin.received, 5, "the upstream to receive the request")
    seen = bytes(rawOrigin.received[0])
    lines = seen.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    assert lines[0] == "GET http://example.test:8080/p?q=1 HTTP/1.1"
    auth = [ln for ln in lines if ln.lower().startswith("proxy-authorization:")]
    assert auth == [f"Proxy-Authorization: {UP_BASIC}"], lines
    assert CLIENT_BASIC.split()[1] not in seen.decode("latin-1")
    assert "X-Kept: yes" in lines and "Host: example.test:8080" in lines
    assert not [ln for ln in lines if ln.lower().startswith("proxy-connection")]


@pytest.mark.parametrize("clientAuth", [False, True], ids=["no-auth", "with-auth"])
def test_upstreamConnectCarriesOnlyItsOwnCredentials(
    proxies, rawOrigin, tmp_path, clientAuth
) -> None:
    extra = authINI(tmp_path, CLIENT_USER, CLIENT_PASSWORD) if clientAuth else ""
    a = proxies(upstreamINI(f"http://{UP_USERINFO}@127.0.0.1:{rawOrigin.port}", extra=extra))
    rawOrigin.response = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    status, data = connectThrough(
        a.port,
        "[2001:db8::7]:8443",
        extra=f"Proxy-Authorization: {CLIENT_BASIC}\r\nUser-Agent: t\r\n".encode(),
    )
    assert status == 502 and b"403 Forbidden" in data, data
    waitFor(lambda: rawOrigin.received, 5, "the upstream to receive the CONNECT")
    lines = bytes(rawOrigin.received[0]).split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    assert lines[0] == "CONNECT [2001:db8::7]:8443 HTTP/1.1"
    assert "Host: [2001:db8::7]:8443" in lines
    assert [ln for ln in lines if ln.lower().startswith("proxy-authorization")] == [
        f"Proxy-Authorization: {UP_BASIC}"
    ]


@pytest.mark.parametrize(
    "url", ["http://[2001:db8::1]:8080/v6?x", "http://192.0.2.1/", "http://Example.TEST./a%20b"]
)
def test_upstreamReceivesAbsoluteForm(proxies, rawOrigin, url) -> None:
    """The request line the upstream gets is the absolute form the client sent."""
    a = proxies(
        upstreamINI(f"http://127.0.0.1:{rawOrigin.port}").replace(
            "deny_destinations = 169.254.0.0/16 fe80::/10", "deny_destinations ="
        )
    )
    host = url.split("/")[2]
    data = rawRequest(
        a.port, f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    assert data.startswith(b"HTTP/1.1 200 "), data
    waitFor(lambda: rawOrigin.received, 5, "the upstream to receive the request")
    lines = bytes(rawOrigin.received[0]).split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    assert lines[0].lower() == f"GET {url} HTTP/1.1".lower(), lines
    hosts = [ln.lower() for ln in lines if ln.lower().startswith("host:")]
    assert hosts == [f"host: {host}".lower()], lines


def test_noCredentialsConfiguredSendsNone(proxies, rawOrigin) -> None:
    a = proxies(upstreamINI(f"http://127.0.0.1:{rawOrigin.port}"))
    rawRequest(
        a.port,
        (
            f"GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\n"
            f"Proxy-Authorization: {CLIENT_BASIC}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    waitFor(lambda: rawOrigin.received, 5, "the upstream to receive the request")
    assert b"proxy-authorization" not in bytes(rawOrigin.received[0]).lower()


# -- tinyproxy upstream ----------------------------------------------------------------------


def tinyURL(t: Tinyproxy, password: str | None = None) -> str:
    return t.url(f"{t.user}:{quote(password or t.password, safe='')}")


@needsCurl
def test_tinyproxyHTTPAndConnect(proxies, tinyproxy, origin, pki, httpsOrigin) -> None:
    a = proxies(upstreamINI(tinyURL(tinyproxy)))
    tag = marker()
    r = curl("--proxy", a.url, origin.url(f"/echo?tiny={tag}"))
    assert r.returncode == 0, r.stderr.decode()
    seen = headersOf(json.loads(r.stdout))
    assert "tinyproxy-test" in seen["via"] and "proxygate" in seen["via"], seen
    assert "proxy-authorization" not in seen
    assert waitFor(
        lambda: [
            ln
            for ln in tinyproxy.lines()
            if f"GET http://127.0.0.1:{origin.port}/echo?tiny={tag}" in ln
        ],
        5,
        "tinyproxy's request line",
    )
    r = curl(
        "--proxy",
        a.url,
        "--cacert",
        str(pki.caCert),
        f"https://127.0.0.1:{httpsOrigin.port}/bytes/300000",
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == payload(300000)
    lines = tinyproxy.lines()
    index = next(
        i for i, ln in enumerate(lines) if f"CONNECT 127.0.0.1:{httpsOrigin.port} HTTP/1.1" in ln
    )
    # Authenticated: tinyproxy went on to connect to the origin.
    assert any("Established connection" in ln for ln in lines[index:]), lines[index:]


def test_tinyproxyRefusalToConnectIs502(proxies, tinyproxy, origin) -> None:
    """tinyproxy 1.11.1 answers wrong credentials with 401 (not 407): still a 502 naming it."""
    a = proxies(upstreamINI(tinyURL(tinyproxy, "wrong-password")))
    status, data = connectThrough(a.port, f"127.0.0.1:{origin.port}")
    assert status == 502
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    assert f"127.0.0.1:{tinyproxy.port}" in body and "401 Unauthorized" in body, body
    assert "credentials" in body
    assert a.metric("proxygate_tunnels_total", result="upstream_refused") == 1
    # To an absolute-form request the same 401 passes through: proxygate cannot tell it
    # from an origin's own 401 (only a 407 is unmistakably the proxy's).
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(origin.url("/echo"), proxies=viaProxy(a.url), timeout=10)
    assert r.status_code == 401 and "tinyproxy" in r.text.lower()


# -- proxygate as the upstream (with [auth]; over TLS) -----------------------------------------


@needsCurl
def test_chainToProxygateWithAuth(proxies, origin, pki, httpsOrigin, tmp_path) -> None:
    """
    proxygate A (alice authenticates to it) -> proxygate B ([auth]: bob) -> origin: B's
    access log names bob for every request, the origin never sees any credentials.
    """
    b = proxies(LOOPBACK_INI + authINI(tmp_path, UP_USER, UP_PASSWORD))
    a = proxies(
        upstreamINI(
            f"http://{UP_USERINFO}@127.0.0.1:{b.port}",
            extra=authINI(tmp_path, CLIENT_USER, CLIENT_PASSWORD),
        )
    )
    creds = ["--proxy-user", f"{CLIENT_USER}:{CLIENT_PASSWORD}"]
    r = curl("--proxy", a.url, *creds, origin.url("/echo?chain=1"))
    assert r.returncode == 0, r.stderr.decode()
    seen = headersOf(json.loads(r.stdout))
    assert "proxy-authorization" not in seen and "authorization" not in seen
    assert seen["via"] == "1.1 proxygate, 1.1 proxygate"
    r = curl(
        "--proxy",
        a.url,
        *creds,
        "--cacert",
        str(pki.caCert),
        f"https://127.0.0.1:{httpsOrigin.port}/",
    )
    assert r.stdout == HELLO, r.stderr.decode()
    bLines = waitFor(
        lambda: [ln for ln in b.accessLines() if "TCP_TUNNEL/200" in ln] and b.accessLines(),
        5,
        "B's tunnel log line",
    )
    assert [ln for ln in bLines if "/echo" in ln and f" {UP_USER} " in ln], bLines
    assert [ln for ln in bLines if "CONNECT" in ln and f" {UP_USER} " in ln], bLines
    assert not [ln for ln in bLines if CLIENT_USER in ln]
    # A's credentials for B wrong: B's 407 is A's 502 (CONNECT and absolute form).
    a2 = proxies(upstreamINI(f"http://{UP_USER}:nope@127.0.0.1:{b.port}"))
    status, data = connectThrough(a2.port, f"127.0.0.1:{origin.port}")
    assert status == 502 and b"407" in data
    r = curl("--proxy", a2.url, "-o", "/dev/null", "-w", "%{http_code}", origin.url("/echo"))
    assert r.stdout == b"502"


@needsCurl
def test_chainToIPv6Upstream(proxies, origin) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    b = proxies(LOOPBACK_INI, listen="tcp6:0:interface=\\:\\:1")
    assert b.host == "::1"
    a = proxies(upstreamINI(f"http://[::1]:{b.port}"))
    r = curl("--proxy", a.url, origin.url("/echo?v6"))
    assert r.returncode == 0, r.stderr.decode()
    assert headersOf(json.loads(r.stdout))["via"] == "1.1 proxygate, 1.1 proxygate"
    assert [ln for ln in b.accessLines() if "/echo" in ln and " ::1 " in ln], b.accessLines()


@pytest.fixture
def tlsUpstream(proxies, pki, tmp_path):
    """proxygate B on an ssl: listener with a throwaway-CA certificate, requiring bob."""
    return proxies(LOOPBACK_INI + authINI(tmp_path, UP_USER, UP_PASSWORD), listen=sslListen(pki))


@needsCurl
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_httpsUpstreamVerifiedWithCACertificate(
    proxies, tlsUpstream, pki, origin, httpsOrigin, host
) -> None:
    b = tlsUpstream
    a = proxies(
        upstreamINI(
            f"https://{UP_USERINFO}@{host}:{b.port}", extra=f"ca_certificate = {pki.caCert}\n"
        )
    )
    r = curl("--proxy", a.url, origin.url("/echo?tls-upstream"))
    assert r.returncode == 0, (r.stderr.decode(), a.log()[-2000:])
    assert json.loads(r.stdout)["path"] == "/echo?tls-upstream"
    r = curl(
        "--proxy",
        a.url,
        "--cacert",
        str(pki.caCert),
        f"https://127.0.0.1:{httpsOrigin.port}/bytes/1000000",
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == payload(1000000)
    lines = waitFor(
        lambda: [ln for ln in b.accessLines() if "CONNECT" in ln] and b.accessLines(),
        5,
        "B's CONNECT line",
    )
    assert [ln for ln in lines if "/echo" in ln and f" {UP_USER} " in ln], lines
    assert [ln for ln in lines if "TCP_TUNNEL/200" in ln and f" {UP_USER} " in ln], lines


@needsCurl
def test_httpsUpstreamUnverifiableIs502(proxies, tlsUpstream, origin, httpsOrigin) -> None:
    """No ca_certificate: system trust does not know the throwaway CA, so nothing is sent."""
    b = tlsUpstream
    a = proxies(upstreamINI(f"https://{UP_USERINFO}@127.0.0.1:{b.port}"))
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(origin.url("/echo"), proxies=viaProxy(a.url), timeout=10)
    expected = f"TLS to the upstream proxy 127.0.0.1:{b.port} failed: certificate verify failed"
    assert r.status_code == 502 and expected in r.text, r.text
    status, data = connectThrough(a.port, f"127.0.0.1:{httpsOrigin.port}")
    assert status == 502 and expected in data.decode(errors="replace"), data
    assert a.metric("proxygate_upstream_errors_total", reason="tls") == 2
    assert not [ln for ln in b.accessLines() if "/echo" in ln or "TCP_TUNNEL/200" in ln]


@needsCurl
def test_httpsUpstreamVerifyOff(proxies, tlsUpstream, origin, pki, httpsOrigin) -> None:
    b = tlsUpstream
    a = proxies(upstreamINI(f"https://{UP_USERINFO}@127.0.0.1:{b.port}", extra="verify = off\n"))
    r = curl("--proxy", a.url, origin.url("/echo?noverify"))
    assert r.returncode == 0, r.stderr.decode()
    r = curl(
        "--proxy", a.url, "--cacert", str(pki.caCert), f"https://127.0.0.1:{httpsOrigin.port}/"
    )
    assert r.stdout == HELLO, r.stderr.decode()


@needsCurl
def test_httpsUpstreamCarriesMITMOriginLegs(
    proxies, tlsUpstream, pki, httpsOrigin, tmp_path
) -> None:
    """TLS to the origin inside a CONNECT inside TLS to the upstream (MITM through B)."""
    b = tlsUpstream
    a = proxies(
        upstreamINI(
            f"https://{UP_USERINFO}@127.0.0.1:{b.port}",
            extra=(
                f"ca_certificate = {pki.caCert}\n[mitm]\nenabled = on\n"
                f"ca_cert = {tmp_path / 'mitm.pem'}\nca_key = {tmp_path / 'mitm.key'}\n"
                f"upstream_ca_bundle = {pki.caCert}\n"
            ),
        )
    )
    base = f"https://127.0.0.1:{httpsOrigin.port}"
    r = curl(
        "--proxy", a.url, "--cacert", str(tmp_path / "mitm.pem"), f"{base}/", f"{base}/bytes/70000"
    )
    assert r.returncode == 0, (r.stderr.decode(), a.log()[-2000:])
    assert r.stdout == HELLO + payload(70000)
    assert (
        len(
            [
                ln
                for ln in a.accessLines()
                if f"GET https://127.0.0.1:{httpsOrigin.port}/" in ln and "FIRSTUP_PARENT" in ln
            ]
        )
        == 2
    ), a.accessLines()
    a.stop()  # A pools its origin leg: B logs the tunnel when it ends
    lines = waitFor(
        lambda: [ln for ln in b.accessLines() if f"CONNECT 127.0.0.1:{httpsOrigin.port}" in ln],
        5,
        "B's CONNECT",
    )
    assert len(lines) == 1 and f" {UP_USER} " in lines[0], lines  # one tunnel, both requests


# -- no_proxy ---------------------------------------------------------------------------------


NO_PROXY_CASES = [
    # (no_proxy, host in the URL, goes direct?)
    ("corp.test", "corp.test", True),
    ("corp.test", "api.corp.test", True),
    ("corp.test", "deep.api.corp.test", True),
    ("corp.test", "badcorp.test", False),
    (".corp.test", "api.corp.test", True),
    (".corp.test", "corp.test", True),
    ("*.corp.test", "api.corp.test", True),
    ("api.corp.test", "corp.test", False),
    ("other.test, corp.test", "api.corp.test", True),
    ("*", "www.other.test", True),
    ("*", "127.0.0.1", True),
    ("localhost", "localhost", True),
    ("localhost", "127.0.0.1", False),
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "localhost", False),
    ("127.0.0.0/8", "127.0.0.1", True),
    ("10.0.0.0/8", "127.0.0.1", False),
    ("127.0.0.1:{port}", "127.0.0.1", True),
    ("127.0.0.1:1", "127.0.0.1", False),
    ("localhost:{port}", "localhost", True),
    ("::1", "[::1]", True),
    ("[::1]", "[::1]", True),
    ("[::1]:{port6}", "[::1]", True),
    ("::1/128", "[::1]", True),
    ("127.0.0.1", "[::1]", False),
    ("", "127.0.0.1", False),
]


@pytest.mark.parametrize(
    ("noProxy", "host", "direct"),
    NO_PROXY_CASES,
    ids=[f"{n or 'empty'}->{h}" for n, h, _ in NO_PROXY_CASES],
)
def test_noProxy(sharedProxies, squid, origin, origin6, noProxy, host, direct) -> None:
    """
    Hosts matching no_proxy go direct and Squid never sees them; the others go through
    Squid. The .test names resolve only in Squid's hosts file, so going direct to them
    fails in proxygate's own DNS lookup (a 502 that names the host).
    """
    o = origin6 if host.startswith("[") else origin
    value = noProxy.format(port=origin.port, port6=origin6.port)
    a = sharedProxies(upstreamINI(squid.url(), noProxy=value))
    tag = marker()
    url = f"http://{host}:{o.port}/echo/np-{tag}"  # in the path: logs leave out queries
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(url, proxies=viaProxy(a.url), timeout=15)
    proxyLines = [ln for ln in a.accessLines() if f"/np-{tag}" in ln]
    if direct:
        squid.flushMark()
        assert not [ln for ln in squid.lines() if tag in ln]
        if host.endswith(".test"):
            assert r.status_code == 502 and f"cannot resolve host '{host}'" in r.text, r.text
        else:
            assert r.status_code == 200, r.text
            assert "squid" not in headersOf(r.json())["via"]
            assert [ln for ln in proxyLines if "HIER_DIRECT/" in ln], proxyLines
    else:
        assert r.status_code == 200, r.text
        assert "squid-test" in headersOf(r.json())["via"]
        assert f" {UP_USER} " in squid.waitForLine(f"/np-{tag}")
        assert [ln for ln in proxyLines if "FIRSTUP_PARENT/" in ln], proxyLines


@needsCurl
@pytest.mark.parametrize("noProxy", ["127.0.0.1", ""])
def test_noProxyConnect(proxies, squid, pki, httpsOrigin, noProxy) -> None:
    """CONNECT follows no_proxy too."""
    a = proxies(upstreamINI(squid.url(), noProxy=noProxy))
    before = len([ln for ln in squid.lines() if f"CONNECT 127.0.0.1:{httpsOrigin.port}" in ln])
    r = curl(
        "--proxy", a.url, "--cacert", str(pki.caCert), f"https://127.0.0.1:{httpsOrigin.port}/"
    )
    assert r.stdout == HELLO, r.stderr.decode()

    def squidTunnels() -> int:
        return len([ln for ln in squid.lines() if f"CONNECT 127.0.0.1:{httpsOrigin.port}" in ln])

    if noProxy:
        squid.flushMark()
        assert squidTunnels() == before
    else:
        waitFor(lambda: squidTunnels() == before + 1, 10, "Squid's tunnel line")
    (tunnel,) = accessLinesWith(a, "CONNECT 127.0.0.1:")
    assert ("HIER_DIRECT/" if noProxy else "FIRSTUP_PARENT/") in tunnel
