"""
Proxy authentication end to end: the real proxy under twistd, real clients (python-requests,
curl, pip) and raw sockets trying the bypasses other proxies shipped.

What is checked, for plain HTTP and CONNECT alike:

- every method and both HTTP versions need credentials, including a bare
  ``CONNECT host:port HTTP/1.0`` with no header at all (proxy.py #1267);
- a refusal is a 407 that carries ``Proxy-Authenticate: Basic realm="..."`` (proxy.py #49),
  is counted in ``proxygate_denied_total{reason="auth"}`` and logged with its reason;
- passwords with ``@ : % / #`` and non-ASCII characters work when percent-encoded in a proxy
  URL (requests, curl, pip), and as raw ``-U user:pass`` (curl);
- ``Proxy-Authorization`` is never forwarded, logged or echoed (Squid CVE-2025-62168);
- ``Expect: 100-continue`` without credentials gets the 407 before the body is sent;
- verified credentials are cached; the htpasswd file is re-read when it changes and on
  SIGHUP.

The htpasswd files are generated here with the bcrypt module (cost 4: fast), so the tests do
not need Apache's htpasswd binary. Every socket has a timeout, every wait is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import bcrypt
import pytest
import requests

from tests.support import LOOPBACK_INI, ProxyProcess, waitFor

REALM = "proxygate test"

# user -> password. alice's is the awkward one from the issue; carol's is non-ASCII but
# latin-1 (what python-requests can send); dave's is outside latin-1 (curl sends UTF-8).
USERS = {
    "alice": "p@ss:w%rd/#",
    "carol": "pässwörd",
    "dave": "€uro ☃ x",
}
SLOW_USER = ("slow", "a slow bcrypt password")
SLOW_COST = 12


def htpasswdLine(user: str, password: str, cost: int = 4) -> str:
    hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(cost)).decode("ascii")
    return f"{user}:{hashed}\n"


def basic(user: str, password: str, encoding: str = "utf-8", scheme: str = "Basic") -> str:
    token = base64.b64encode(f"{user}:{password}".encode(encoding)).decode("ascii")
    return f"{scheme} {token}"


def proxyURL(port: int, user: str, password: str) -> str:
    """A proxy URL with the credentials percent-encoded, as users are told to write it."""
    return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}"


def cleanEnv(**extra: str) -> dict[str, str]:
    """The environment for a client subprocess: no proxy settings but the ones given."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and not k.startswith("PIP_")
        and not k.startswith("CURL")
    }
    env.update(extra)
    return env


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, raw: bytes):
        self.status = status
        self.headers = headers
        self.body = body
        self.raw = raw

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name.lower()]
        return values[0] if values else None


_leftovers: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def readResponse(sock: socket.socket, toHead: bool = False) -> Response:
    """
    One response from a socket with a timeout: head, then a Content-Length body. Bytes read
    past it (a pipelined response) are kept for the next call on the same socket.
    """
    buf = _leftovers.pop(sock, b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    length = 0 if toHead else next((int(v) for n, v in headers if n == "content-length"), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    if rest[length:]:
        _leftovers[sock] = rest[length:]
    return Response(status, headers, rest[:length], head + b"\r\n\r\n" + rest[:length])


def exchange(port: int, data: bytes, timeout: float = 5.0, head: bool = False) -> Response:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return readResponse(s, head)


def isChallenge(response: Response) -> bool:
    challenge = response.header("proxy-authenticate") or ""
    return (
        response.status == 407
        and challenge.lower().startswith("basic ")
        and f'realm="{REALM}"' in challenge
    )


def originSaw(origin, marker: str) -> list:
    return [r for r in origin.requests if marker in r[1]]


# -- the proxy -------------------------------------------------------------------------------


def authINI(htpasswd: Path, extra: str = "") -> str:
    return (
        LOOPBACK_INI
        + f"\n[auth]\nhtpasswd = {htpasswd}\nrealm = {REALM}\n\n[log]\nformat = json\n"
        + extra
    )


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "users.htpasswd"
    lines = [htpasswdLine(u, p) for u, p in USERS.items()]
    lines.append(htpasswdLine(*SLOW_USER, cost=SLOW_COST))
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def authProxy(tmp_path_factory, users: Path):
    p = ProxyProcess(tmp_path_factory.mktemp("authproxy"), authINI(users)).start()
    yield p
    p.stop()


def accessRecords(proxy) -> list[dict]:
    records = []
    for line in proxy.accessLines():
        _, _, text = line.partition("] ")
        try:
            records.append(json.loads(text))
        except ValueError:
            pass
    return records


# -- real clients ----------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "carol"])
def test_requestsWithEncodedCredentialsInProxyURL(authProxy, origin, user: str) -> None:
    """
    python-requests percent-decodes the proxy URL's user info and sends it as latin-1; the
    password with @ : % / # (alice) and the non-ASCII one (carol) both get through.
    """
    marker = uuid.uuid4().hex
    url = proxyURL(authProxy.port, user, USERS[user])
    if user == "alice":
        assert url == f"http://alice:p%40ss%3Aw%25rd%2F%23@127.0.0.1:{authProxy.port}"
    with requests.Session() as session:
        session.trust_env = False
        r = session.get(origin.url(f"/echo/{marker}"), proxies={"http": url}, timeout=10)
    assert r.status_code == 200
    seen = {name.lower() for name, _ in r.json()["headers"]}
    assert "proxy-authorization" not in seen
    assert "via" in seen  # it did go through the proxy


def test_requestsWithCredentialsInHttpProxyEnvironment(authProxy, origin, monkeypatch) -> None:
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxyURL(authProxy.port, "alice", USERS["alice"]))
    r = requests.get(origin.url("/echo/env"), timeout=10)
    assert r.status_code == 200
    assert "proxy-authorization" not in {n.lower() for n, _ in r.json()["headers"]}
    monkeypatch.setenv("http_proxy", proxyURL(authProxy.port, "alice", "p@ss:w%rd/"))
    assert requests.get(origin.url("/echo/env"), timeout=10).status_code == 407


def test_requestsWithoutOrWithWrongCredentials(authProxy, origin) -> None:
    marker = uuid.uuid4().hex
    with requests.Session() as session:
        session.trust_env = False
        for proxy in (
            f"http://127.0.0.1:{authProxy.port}",
            proxyURL(authProxy.port, "alice", "p@ss:w%rd/"),
            proxyURL(authProxy.port, "alice", "p@ss"),  # what an unencoded URL would give
            proxyURL(authProxy.port, "nobody", USERS["alice"]),
        ):
            r = session.get(origin.url(f"/echo/{marker}"), proxies={"http": proxy}, timeout=10)
            assert r.status_code == 407
            assert r.headers["Proxy-Authenticate"].startswith(f'Basic realm="{REALM}"')
    assert originSaw(origin, marker) == []


curl = shutil.which("curl")
needsCurl = pytest.mark.skipif(curl is None, reason="curl is not installed")


def runCurl(
    args: list[str], env: dict[str, str] | None = None, code: str = "http_code"
) -> tuple[int, bytes]:
    result = subprocess.run(
        [curl, "-sS", "--max-time", "10", "-o", "-", "-w", f"\n%{{{code}}}", *args],
        capture_output=True,
        timeout=20,
        env=env or cleanEnv(),
    )
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), body


@needsCurl
@pytest.mark.parametrize("user", sorted(USERS))
@pytest.mark.parametrize("option", ["-U", "--proxy-user"])
def test_curlProxyUser(authProxy, origin, user: str, option: str) -> None:
    """curl sends -U credentials as given (UTF-8): the awkward and non-ASCII ones work."""
    proxy = f"http://127.0.0.1:{authProxy.port}"
    code, body = runCurl(["-x", proxy, option, f"{user}:{USERS[user]}", origin.url("/echo/c")])
    assert code == 200
    assert "proxy-authorization" not in {n.lower() for n, _ in json.loads(body)["headers"]}
    code, body = runCurl(["-x", proxy, option, f"{user}:wrong", origin.url("/echo/c")])
    assert code == 407
    assert USERS[user].encode() not in body
    code, _ = runCurl(["-x", proxy, origin.url("/echo/c")])
    assert code == 407


@needsCurl
def test_curlCredentialsInHttpProxyEnvironment(authProxy, origin) -> None:
    for user in ("alice", "dave"):
        env = cleanEnv(http_proxy=proxyURL(authProxy.port, user, USERS[user]))
        assert runCurl([origin.url("/echo/env")], env)[0] == 200
    env = cleanEnv(http_proxy=proxyURL(authProxy.port, "dave", "€uro"))
    assert runCurl([origin.url("/echo/env")], env)[0] == 407


@needsCurl
def test_curlConnectThroughTunnel(authProxy, origin) -> None:
    """curl -p tunnels plain HTTP through CONNECT: the same credentials gate the tunnel."""
    proxy = f"http://127.0.0.1:{authProxy.port}"
    code, body = runCurl(
        ["-p", "-x", proxy, "-U", f"alice:{USERS['alice']}", origin.url("/echo/tunnel")]
    )
    assert code == 200
    doc = json.loads(body)
    assert doc["path"] == "/echo/tunnel"
    assert "proxy-authorization" not in {n.lower() for n, _ in doc["headers"]}
    assert "via" not in {n.lower() for n, _ in doc["headers"]}  # a tunnel, not forwarded
    args = ["-p", "-x", proxy, "-U", "alice:wrong", origin.url("/echo/tunnel")]
    assert runCurl(args, code="http_connect")[0] == 407
    assert runCurl(args[:3] + args[5:], code="http_connect")[0] == 407


# -- pip against a tiny PEP 503 index ----------------------------------------------------------


def buildWheel(directory: Path) -> Path:
    """A minimal, valid pure-Python wheel built with zipfile."""
    files = {
        "tinypkg/__init__.py": b"VALUE = 42\n",
        "tinypkg-0.1.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\nSummary: test package\n"
        ),
        "tinypkg-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: proxygate-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("tinypkg-0.1.dist-info/RECORD,,")
    files["tinypkg-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


class PackageIndex(ThreadingHTTPServer):
    """A PEP 503 simple index with one project; records what each request carried."""

    daemon_threads = True

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel.read_bytes()
        self.wheelName = wheel.name
        self.seen: list[tuple[str, dict[str, str]]] = []
        super().__init__(("127.0.0.1", 0), _IndexHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _IndexHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        index: PackageIndex = self.server  # type: ignore[assignment]
        index.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        digest = hashlib.sha256(index.wheel).hexdigest()
        pages = {
            "/simple/": b'<!DOCTYPE html><html><body><a href="/simple/tinypkg/">tinypkg</a>'
            b"</body></html>",
            "/simple/tinypkg/": (
                f'<!DOCTYPE html><html><body><a href="/files/{index.wheelName}#sha256={digest}">'
                f"{index.wheelName}</a></body></html>"
            ).encode(),
        }
        if self.path in pages:
            body, kind = pages[self.path], "text/html"
        elif self.path == f"/files/{index.wheelName}":
            body, kind = index.wheel, "application/octet-stream"
        else:
            body, kind = b"not found", "text/plain"
            self.send_response(404)
        if self.path in pages or kind == "application/octet-stream":
            self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def packageIndex(tmp_path_factory):
    index = PackageIndex(buildWheel(tmp_path_factory.mktemp("wheel")))
    yield index
    index.close()


def runPip(index: PackageIndex, dest: Path, proxy: str | None, env: dict[str, str]):
    args = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--no-cache-dir", "--no-input", "--retries", "0", "--timeout", "10",
        "--index-url", f"http://127.0.0.1:{index.port}/simple/", "tinypkg", "-d", str(dest),
    ]  # fmt: skip
    if proxy is not None:
        args += ["--proxy", proxy]
    env = {**env, "PIP_CONFIG_FILE": os.devnull}
    return subprocess.run(args, capture_output=True, timeout=120, env=env, text=True)


@pytest.mark.parametrize(
    ("how", "user"), [("--proxy", "alice"), ("http_proxy", "alice"), ("--proxy", "carol")]
)
def test_pipDownloadsThroughTheProxy(
    authProxy, packageIndex, tmp_path, how: str, user: str
) -> None:
    """
    pip with the awkward (or the non-ASCII) password percent-encoded in its proxy URL
    fetches the index and the wheel through the proxy (the index sees Via and no
    Proxy-Authorization).
    """
    url = proxyURL(authProxy.port, user, USERS[user])
    before = len(packageIndex.seen)
    if how == "--proxy":
        result = runPip(packageIndex, tmp_path, url, cleanEnv())
    else:
        result = runPip(packageIndex, tmp_path, None, cleanEnv(http_proxy=url))
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = tmp_path / packageIndex.wheelName
    assert wheel.read_bytes() == packageIndex.wheel
    seen = packageIndex.seen[before:]
    assert any(path.startswith("/files/") for path, _ in seen)
    for _, headers in seen:
        assert "proxy-authorization" not in headers
        assert "proxygate" in headers.get("via", "")


def test_pipWithWrongCredentialsFails(authProxy, packageIndex, tmp_path) -> None:
    before = len(packageIndex.seen)
    denied = authProxy.metric("proxygate_denied_total", reason="auth")
    url = proxyURL(authProxy.port, "alice", "not it")
    result = runPip(packageIndex, tmp_path, url, cleanEnv())
    assert result.returncode != 0
    assert packageIndex.seen[before:] == []
    assert authProxy.metric("proxygate_denied_total", reason="auth") > denied
    assert not list(tmp_path.iterdir())


# -- raw sockets: the bypasses ---------------------------------------------------------------

GOOD = basic("alice", USERS["alice"])
WRONG = basic("alice", "wrong")


def _token(user: bytes) -> str:
    return "Basic " + base64.b64encode(user).decode()


# name -> (request line + headers, without the final CRLF). {o} is the origin port, {m} a
# marker the origin would see in the path if the request got through.
BYPASSES = {
    "connect-http10-no-headers": "CONNECT 127.0.0.1:{o} HTTP/1.0\r\n",
    "connect-http11-host-only": "CONNECT 127.0.0.1:{o} HTTP/1.1\r\nHost: 127.0.0.1:{o}\r\n",
    "connect-wrong-password": "CONNECT 127.0.0.1:{o} HTTP/1.1\r\n"
    f"Proxy-Authorization: {WRONG}\r\n",
    "get-http10-no-headers": "GET http://127.0.0.1:{o}/{m} HTTP/1.0\r\n",
    "lowercase-scheme-wrong-password": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: basic {WRONG.split()[1]}\r\n",
    "uppercase-scheme-wrong-password": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: BASIC {WRONG.split()[1]}\r\n",
    "digest-for-another-realm": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    'Proxy-Authorization: Digest username="alice", realm="other", nonce="abc", uri="/", '
    'response="0123456789abcdef0123456789abcdef"\r\n',
    "basic-with-realm-parameter": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f'Proxy-Authorization: {GOOD}, realm="other"\r\n',
    "bearer-scheme": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: Bearer {GOOD.split()[1]}\r\n",
    "two-headers-good-good": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {GOOD}\r\nProxy-Authorization: {GOOD}\r\n",
    "two-headers-wrong-good": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {WRONG}\r\nProxy-Authorization: {GOOD}\r\n",
    "two-headers-good-wrong": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {GOOD}\r\nproxy-authorization: {WRONG}\r\n",
    "two-credentials-one-header": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {WRONG}, {GOOD}\r\n",
    "connect-two-headers": f"CONNECT 127.0.0.1:{{o}} HTTP/1.1\r\nProxy-Authorization: {WRONG}\r\n"
    f"Proxy-Authorization: {GOOD}\r\n",
    "basic-empty-token": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    "Proxy-Authorization: Basic\r\n",
    "basic-space-token": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    "Proxy-Authorization: Basic \r\n",
    "empty-value": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\nProxy-Authorization:\r\n",
    "user-no-colon": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {_token(b'alice')}\r\n",
    "user-only-with-colon": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {_token(b'alice:')}\r\n",
    "empty-user": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {_token(b':' + USERS['alice'].encode())}\r\n",
    "nul-after-password": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {_token(b'alice:' + USERS['alice'].encode() + bytes(1) + b'x')}\r\n",
    "bad-base64": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    "Proxy-Authorization: Basic !!!not-base64!!!\r\n",
    "truncated-base64": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: {GOOD[:-2]}\r\n",
    "oversized-header": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    f"Proxy-Authorization: Basic {'QUFB' * 2500}\r\n",
    "authorization-not-proxy-authorization": "GET http://127.0.0.1:{o}/{m} HTTP/1.1\r\n"
    f"Host: h\r\nAuthorization: {GOOD}\r\n",
    "options-max-forwards-zero": "OPTIONS http://127.0.0.1:{o}/{m} HTTP/1.1\r\nHost: h\r\n"
    "Max-Forwards: 0\r\n",
    "origin-form": "GET /{m} HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "unknown-method-http10": "PROPFIND http://127.0.0.1:{o}/{m} HTTP/1.0\r\n",
}


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_bypassAttemptGets407(authProxy, origin, name: str) -> None:
    marker = uuid.uuid4().hex
    request = BYPASSES[name].format(o=origin.port, m=marker).encode("latin-1") + b"\r\n"
    response = exchange(authProxy.port, request)
    assert isChallenge(response), response.raw
    assert GOOD.split()[1].encode() not in response.raw
    assert b"alice" not in response.body
    assert originSaw(origin, marker) == []


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
@pytest.mark.parametrize(
    "method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"]
)
def test_everyMethodAndVersionNeedsCredentials(authProxy, origin, method, version) -> None:
    marker = uuid.uuid4().hex
    if method == "CONNECT":
        target = f"127.0.0.1:{origin.port}"
    else:
        target = f"http://127.0.0.1:{origin.port}/{marker}"
    body = b"x" * 5 if method in ("POST", "PUT", "PATCH") else b""
    head = f"{method} {target} {version}\r\nHost: 127.0.0.1:{origin.port}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    isHead = method == "HEAD"
    response = exchange(authProxy.port, head.encode() + b"\r\n" + body, head=isHead)
    assert isChallenge(response), response.raw
    assert originSaw(origin, marker) == []
    # ... and the same with credentials goes through.
    request = head + f"Proxy-Authorization: {GOOD}\r\nConnection: close\r\n"
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=5) as s:
        s.sendall(request.encode() + b"\r\n" + body)
        if method == "CONNECT":
            assert readResponse(s).status == 200
            s.sendall(f"GET /echo/{marker} HTTP/1.0\r\n\r\n".encode())
            ok = readResponse(s)
        else:
            ok = readResponse(s, isHead)
    assert ok.status == 200
    assert len(originSaw(origin, marker)) == 1


@pytest.mark.parametrize(
    "value",
    [
        GOOD,
        "basic " + GOOD.split()[1],
        "BASIC " + GOOD.split()[1],
        "Basic   " + GOOD.split()[1] + "  ",
        basic("carol", USERS["carol"], "latin-1"),  # python-requests
        basic("carol", USERS["carol"], "utf-8"),  # curl
        basic("dave", USERS["dave"]),
    ],
)
def test_acceptedSpellings(authProxy, origin, value: str) -> None:
    """The scheme is case-insensitive (RFC 9110 §11.1); both charsets clients use work."""
    request = (
        f"GET http://127.0.0.1:{origin.port}/echo HTTP/1.1\r\nHost: h\r\n"
        f"Proxy-Authorization: {value}\r\n\r\n"
    )
    response = exchange(authProxy.port, request.encode("latin-1"))
    assert response.status == 200
    assert "proxy-authorization" not in {n.lower() for n, _ in json.loads(response.body)["headers"]}


def test_eachRequestOnAKeepAliveConnectionIsChecked(authProxy, origin) -> None:
    """Authenticating once does not authenticate the connection."""
    marker = uuid.uuid4().hex
    get = f"GET http://127.0.0.1:{origin.port}/echo/{marker} HTTP/1.1\r\nHost: h\r\n"
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=5) as s:
        s.sendall(f"{get}Proxy-Authorization: {GOOD}\r\n\r\n".encode())
        assert readResponse(s).status == 200
        s.sendall(f"{get}\r\n".encode())
        assert isChallenge(readResponse(s))
        s.sendall(f"{get}Proxy-Authorization: {WRONG}\r\n\r\n".encode())
        assert isChallenge(readResponse(s))
        s.sendall(f"{get}Proxy-Authorization: {GOOD}\r\n\r\n".encode())
        assert readResponse(s).status == 200
    assert len(originSaw(origin, marker)) == 2


def test_pipelinedRequestBehindA407IsCheckedToo(authProxy, origin) -> None:
    marker = uuid.uuid4().hex
    get = f"GET http://127.0.0.1:{origin.port}/echo/{marker} HTTP/1.1\r\nHost: h\r\n"
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=5) as s:
        s.sendall(f"{get}\r\n{get}Connection: close\r\n\r\n".encode())
        assert isChallenge(readResponse(s))
        assert isChallenge(readResponse(s))
    assert originSaw(origin, marker) == []


def test_connectCredentialsAreNotForwardedIntoTheTunnel(authProxy, origin) -> None:
    marker = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=5) as s:
        s.sendall(
            f"CONNECT 127.0.0.1:{origin.port} HTTP/1.0\r\nProxy-Authorization: {GOOD}\r\n\r\n"
            f"GET /echo/{marker} HTTP/1.0\r\n\r\n".encode()
        )
        assert readResponse(s).status == 200
        response = readResponse(s)
    assert response.status == 200
    (seen,) = originSaw(origin, marker)
    assert [n for n, _ in seen[2] if n.lower() == "proxy-authorization"] == []


def test_expectContinueWithoutCredentialsGets407BeforeTheBody(authProxy, origin) -> None:
    marker = uuid.uuid4().hex
    head = (
        f"POST http://127.0.0.1:{origin.port}/sink/{marker} HTTP/1.1\r\nHost: h\r\n"
        "Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=5) as s:
        s.sendall(head.encode())  # and not one byte of the body
        started = time.monotonic()
        response = readResponse(s)
        elapsed = time.monotonic() - started
        assert isChallenge(response), response.raw
        # The body may be on its way: the proxy must not wait for it or read it as a request.
        assert "close" in (response.header("connection") or "").lower()
        s.settimeout(2)
        assert s.recv(100) == b""
    assert elapsed < 2
    assert originSaw(origin, marker) == []


def test_expectContinueWithCredentials(authProxy, origin) -> None:
    """The control: with credentials the client is told to go on, and the body arrives."""
    body = b"y" * 100000
    head = (
        f"POST http://127.0.0.1:{origin.port}/sink HTTP/1.1\r\nHost: h\r\n"
        f"Proxy-Authorization: {GOOD}\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=5) as s:
        s.sendall(head.encode())
        interim = readResponse(s)
        assert interim.status == 100
        s.sendall(body)
        response = readResponse(s)
    assert response.status == 200
    assert json.loads(response.body)["bytes"] == len(body)


def test_refusalsAreCountedAndLoggedWithoutSecrets(authProxy, origin) -> None:
    before = authProxy.metric("proxygate_denied_total", reason="auth")
    marker = uuid.uuid4().hex
    secrets = [USERS["alice"], GOOD.split()[1], WRONG.split()[1], basic("dave", USERS["dave"])]
    for value in (WRONG, GOOD, basic("dave", USERS["dave"]), "Basic !!!"):
        request = (
            f"GET http://127.0.0.1:{origin.port}/{marker}?q=1 HTTP/1.1\r\nHost: h\r\n"
            f"Proxy-Authorization: {value}\r\nConnection: close\r\n\r\n"
        )
        response = exchange(authProxy.port, request.encode())
        for secret in secrets:
            assert secret.encode() not in response.raw
    assert authProxy.metric("proxygate_denied_total", reason="auth") == before + 2

    def records():
        return [r for r in accessRecords(authProxy) if marker in r["url"]]

    assert len(waitFor(lambda: len(records()) == 4 and records())) == 4
    denied = [r for r in records() if r["code"] == 407]
    assert len(denied) == 2
    for record in denied:
        assert record["reason"] == "auth"
        assert record["user"] is None
    assert sorted(r["user"] for r in records() if r["code"] == 200) == ["alice", "dave"]
    log = authProxy.log()
    for secret in [*secrets, *USERS.values(), SLOW_USER[1]]:
        assert secret not in log
    assert "proxy-authorization" not in log.lower()
    assert "basic " not in log.lower()
    assert "q=1" not in log  # query strings are not logged either
    scrape = authProxy.metrics()
    assert "alice" not in scrape  # no user names as label values either
    assert "dave" not in scrape


def test_verifiedCredentialsAreCached(authProxy) -> None:
    """
    The first request with a credential pays for bcrypt (cost 12: hundreds of milliseconds);
    the ones after it are a cache lookup. The request is one the proxy answers itself after
    authentication (OPTIONS with Max-Forwards: 0), so no origin adds its own delays.
    """
    header = basic(*SLOW_USER)
    request = (
        "OPTIONS http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nMax-Forwards: 0\r\n"
        f"Proxy-Authorization: {header}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    assert bcrypt.hashpw(b"x", bcrypt.gensalt(SLOW_COST))  # what one verification costs
    bcryptCost = time.monotonic() - started
    timings = []
    with socket.create_connection(("127.0.0.1", authProxy.port), timeout=10) as s:
        for _ in range(21):
            started = time.monotonic()
            s.sendall(request)
            assert readResponse(s).status == 200
            timings.append(time.monotonic() - started)
    first, rest = timings[0], sorted(timings[1:])
    print(
        f"\nbcrypt cost {SLOW_COST}: {bcryptCost * 1000:.1f} ms; first request "
        f"{first * 1000:.1f} ms; cached median {rest[10] * 1000:.2f} ms"
    )
    assert first > 0.05  # bcrypt at cost 12 takes well over this anywhere
    assert rest[10] < first / 10
    assert sum(rest) < first


# -- reloading the htpasswd file -------------------------------------------------------------


def canLogIn(proxy, origin, user: str, password: str) -> bool:
    request = (
        f"GET http://127.0.0.1:{origin.port}/echo HTTP/1.1\r\nHost: h\r\n"
        f"Proxy-Authorization: {basic(user, password)}\r\nConnection: close\r\n\r\n"
    )
    status = exchange(proxy.port, request.encode()).status
    assert status in (200, 407)
    return status == 200


def test_htpasswdIsReReadWhenItChanges(startProxy, origin, tmp_path) -> None:
    path = tmp_path / "users"
    path.write_text(htpasswdLine("alice", "one"), encoding="utf-8")
    proxy = startProxy(authINI(path))
    assert canLogIn(proxy, origin, "alice", "one")
    assert not canLogIn(proxy, origin, "bob", "two")

    # Edited in place, as an editor or `htpasswd -B file bob` does.
    with path.open("a", encoding="utf-8") as f:
        f.write(htpasswdLine("bob", "two"))
    started = time.monotonic()
    assert waitFor(lambda: canLogIn(proxy, origin, "bob", "two"), timeout=6, interval=0.1)
    added = time.monotonic() - started
    assert canLogIn(proxy, origin, "alice", "one")

    # Replaced by rename, as configuration management does; alice is gone.
    replacement = tmp_path / "users.new"
    replacement.write_text(htpasswdLine("bob", "two"), encoding="utf-8")
    os.replace(replacement, path)
    started = time.monotonic()
    assert waitFor(lambda: not canLogIn(proxy, origin, "alice", "one"), timeout=6, interval=0.1)
    removed = time.monotonic() - started
    assert canLogIn(proxy, origin, "bob", "two")
    print(f"\nreload noticed: user added after {added:.2f} s, removed after {removed:.2f} s")
    assert added < 2.5
    assert removed < 2.5
    assert proxy.proc.poll() is None


def test_brokenEditKeepsTheLoadedUsers(startProxy, origin, tmp_path) -> None:
    path = tmp_path / "users"
    line = htpasswdLine("alice", "one")
    path.write_text(line, encoding="utf-8")
    proxy = startProxy(authINI(path))
    assert canLogIn(proxy, origin, "alice", "one")
    path.write_text(line + "bob:plaintext-password\n", encoding="utf-8")
    assert waitFor(lambda: "Not reloading htpasswd" in proxy.log(), timeout=6)
    assert canLogIn(proxy, origin, "alice", "one")
    assert "plaintext-password" not in proxy.log()
    assert line.split(":", 1)[1].strip() not in proxy.log()


def test_sighupReloadsTheHtpasswdFile(startProxy, origin, tmp_path) -> None:
    """
    The edit is made invisible to the once-a-second check (same inode, same size, mtime
    put back), so only the SIGHUP can make the proxy see it.
    """
    path = tmp_path / "users"
    path.write_text(htpasswdLine("alice", "one"), encoding="utf-8")
    proxy = startProxy(authINI(path))
    assert canLogIn(proxy, origin, "alice", "one")

    before = path.stat()
    replacement = htpasswdLine("carla", "two")
    assert len(replacement) == before.st_size
    with path.open("r+", encoding="utf-8") as f:
        f.write(replacement)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    time.sleep(2.5)  # several watcher ticks: none of them notices
    assert canLogIn(proxy, origin, "alice", "one")
    assert not canLogIn(proxy, origin, "carla", "two")

    os.kill(proxy.pid, signal.SIGHUP)
    started = time.monotonic()
    assert waitFor(lambda: canLogIn(proxy, origin, "carla", "two"), timeout=5, interval=0.05)
    print(f"\nSIGHUP reload took {time.monotonic() - started:.2f} s")
    assert not canLogIn(proxy, origin, "alice", "one")
    assert proxy.proc.poll() is None  # SIGHUP's default action would have ended it
    assert "Loaded htpasswd" in proxy.log()

    os.kill(proxy.pid, signal.SIGHUP)  # again, with nothing changed: harmless
    time.sleep(0.3)
    assert canLogIn(proxy, origin, "carla", "two")
    assert proxy.proc.poll() is None


def test_withoutAuthTheClientsProxyAuthorizationIsStillDropped(startProxy, origin) -> None:
    """With [auth] off the header is not for the origin either: it is hop-by-hop."""
    proxy = startProxy()
    request = (
        f"GET http://127.0.0.1:{origin.port}/echo HTTP/1.1\r\nHost: h\r\n"
        f"Proxy-Authorization: {GOOD}\r\nConnection: close\r\n\r\n"
    )
    response = exchange(proxy.port, request.encode())
    assert response.status == 200
    assert "proxy-authorization" not in {n.lower() for n, _ in json.loads(response.body)["headers"]}


# -- the cost of authentication (a measurement, not a timed test) ------------------------------

FAST_ORIGIN = r"""
import asyncio, sys

BODY = b"x" * 100
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)

async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


async def _throughput(port: int, request: bytes, seconds: float, concurrency: int) -> int:
    import asyncio

    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 "), head
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await asyncio.wait_for(reader.readexactly(length), 10)
                done += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


@pytest.mark.skipif(
    not os.environ.get("PROXYGATE_MEASURE"), reason="a measurement: PROXYGATE_MEASURE=1 -s"
)
def test_measureAuthOverhead(tmp_path, users: Path) -> None:
    """
    Keep-alive GET throughput through the proxy with [auth] on (a cached credential) and
    off, ~3 s each, alternating; and the same for a request the proxy answers itself
    (OPTIONS, Max-Forwards: 0), where the authentication is a larger share of the work.
    """
    import asyncio

    originProcess = subprocess.Popen(
        [sys.executable, "-c", FAST_ORIGIN], stdout=subprocess.PIPE, text=True
    )
    try:
        originPort = int(originProcess.stdout.readline())
        header = f"Proxy-Authorization: {basic('alice', USERS['alice'])}\r\n"
        get = f"GET http://127.0.0.1:{originPort}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        local = "OPTIONS http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nMax-Forwards: 0\r\n"
        quiet = "\n[log]\naccess_log =\n"
        authSection = f"\n[auth]\nhtpasswd = {users}\nrealm = {REALM}\n"
        proxies = {
            "off": ProxyProcess(tmp_path, LOOPBACK_INI + quiet).start(),
            "on": ProxyProcess(tmp_path, LOOPBACK_INI + quiet + authSection).start(),
        }
        # Both run at once and take turns in short bursts, so that whatever else the machine
        # is doing weighs on both alike; 6 x 0.5 s = 3 s each per kind of request.
        results: dict[tuple[str, str], list[int]] = {}
        try:
            for kind, start in (("GET via origin", get), ("local answer", local)):
                for auth, proxy in proxies.items():
                    request = (start + (header if auth == "on" else "") + "\r\n").encode()
                    asyncio.run(_throughput(proxy.port, request, 0.3, 4))  # warm up
                for _ in range(6):
                    for auth, proxy in proxies.items():
                        request = (start + (header if auth == "on" else "") + "\r\n").encode()
                        count = asyncio.run(_throughput(proxy.port, request, 0.5, 8))
                        results.setdefault((kind, auth), []).append(count)
        finally:
            for proxy in proxies.values():
                proxy.stop()
    finally:
        originProcess.kill()
        originProcess.wait(5)
    print()
    for kind in ("GET via origin", "local answer"):
        off, on = sum(results[(kind, "off")]) / 3.0, sum(results[(kind, "on")]) / 3.0
        print(
            f"{kind}: auth off {off:,.0f} req/s, auth on {on:,.0f} req/s, ratio on/off "
            f"{on / off:.3f} (bursts off {results[(kind, 'off')]}, on {results[(kind, 'on')]})"
        )

    # The in-process cost of a cached check, free of the noise of sockets and scheduling.
    from twisted.internet import reactor

    from gateway.auth import Authenticator

    authenticator = Authenticator(str(users), REALM, reactor=reactor)
    value = basic("alice", USERS["alice"]).encode()
    first = authenticator.authenticate(value)
    while not first.called:
        reactor.iterate(0.01)
    calls = 200_000
    started = time.perf_counter()
    for _ in range(calls):
        authenticator.authenticate(value).addBoth(lambda r: r)
    perCall = (time.perf_counter() - started) / calls
    print(f"cached authenticate(): {perCall * 1e6:.2f} us per request")
