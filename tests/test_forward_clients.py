"""
Real clients through proxygate: curl (-x and http_proxy), python requests (proxies= and
the environment) and pip (a PEP 503 index with a wheel built here, through http_proxy and
--proxy). Each fetches from a loopback origin and the bytes are checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.support import payload, payloadChunks, payloadDigest, waitFor

CURL = "/usr/bin/curl"
MiB = 1024 * 1024


def cleanEnv(**extra: str) -> dict[str, str]:
    """The environment without any proxy settings of the machine running the tests."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and not k.startswith("PIP_")
    }
    env.update(extra)
    return env


def curl(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CURL, "-sS", "--max-time", str(int(timeout) - 2), *args],
        capture_output=True,
        timeout=timeout,
        env=env or cleanEnv(),
    )


@pytest.fixture(autouse=True)
def _noProxyFromTheMachine(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# -- curl -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 65535, 65537, 10_000_000], ids=["0B", "1B", "64KiB-1", "64KiB+1", "10MB"]
)
@pytest.mark.parametrize("kind", ["bytes", "chunked", "close"])
def test_curlDownload(proxy, origin, kind: str, size: int) -> None:
    out = curl("-x", proxy.url, origin.url(f"/{kind}/{size}"))
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).hexdigest() == payloadDigest(size)


@pytest.mark.parametrize(
    "size", [0, 1, 65535, 65537, 10_000_000], ids=["0B", "1B", "64KiB-1", "64KiB+1", "10MB"]
)
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_curlUpload(proxy, sink, tmp_path, chunked: bool, size: int) -> None:
    body = tmp_path / "body"
    with body.open("wb") as f:
        for piece in payloadChunks(size):
            f.write(piece)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    out = curl("-x", proxy.url, "--data-binary", f"@{body}", *extra, sink.url())
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["bytes"], got["sha256"]) == (size, payloadDigest(size))
    assert got["te"] == ("chunked" if chunked else "")


def test_curlThroughHttpProxyVariable(proxy, origin) -> None:
    out = curl("-i", origin.url("/bytes/1000"), env=cleanEnv(http_proxy=proxy.url))
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert body == payload(1000)
    assert re.search(rb"(?im)^via: 1\.1 proxygate\r?$", head), head


def test_curlExpect100ContinueWith1MB(proxy, sink, tmp_path) -> None:
    """curl waits for 100 Continue (up to 5 s here, past --max-time): it must come."""
    body = tmp_path / "1mb"
    body.write_bytes(payload(MiB))
    out = curl(
        "-v",
        "-x",
        proxy.url,
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "5",
        "--data-binary",
        f"@{body}",
        sink.url(),
        timeout=6,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert b"< HTTP/1.1 100" in out.stderr
    got = json.loads(out.stdout)
    assert (got["bytes"], got["sha256"]) == (MiB, payloadDigest(MiB))


def test_curlHead(proxy, origin) -> None:
    out = curl("-I", "-x", proxy.url, origin.url("/bytes/4242"))
    assert out.returncode == 0, out.stderr
    assert re.search(rb"(?im)^content-length: 4242\r?$", out.stdout)
    assert out.stdout.endswith(b"\r\n\r\n")


def test_curlReusesTheProxyConnection(proxy, origin) -> None:
    urls = [origin.url(f"/echo?curl={i}") for i in range(3)]
    out = curl("-v", "-x", proxy.url, *urls)
    assert out.returncode == 0, out.stderr
    assert len(re.findall(rb"Re-?using existing connection", out.stderr)) == 2, out.stderr
    docs = [json.loads(part) for part in out.stdout.replace(b"}{", b"}\n{").splitlines()]
    assert [d["path"] for d in docs] == [f"/echo?curl={i}" for i in range(3)]
    assert len({d["port"] for d in docs}) == 1  # one pooled origin connection


def test_curlHttp10CloseDelimited(proxy, origin) -> None:
    out = curl("-0", "-i", "-x", proxy.url, origin.url("/close/70000"))
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert hashlib.sha256(body).hexdigest() == payloadDigest(70000)
    assert b"chunked" not in head.lower()


def test_curlRefusedOriginSees502(proxy, closedPort) -> None:
    out = curl("-x", proxy.url, "-w", "\n%{http_code}", f"http://127.0.0.1:{closedPort}/")
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition(b"\n")
    assert code == b"502" and b"refused" in body.lower()


def test_curlUploadToDeadOriginGets502(proxy, tmp_path, closedPort) -> None:
    body = tmp_path / "body"
    body.write_bytes(payload(MiB))
    out = curl(
        "-x",
        proxy.url,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        f"@{body}",
        f"http://127.0.0.1:{closedPort}/upload",
    )
    assert out.stdout == b"502", (out.stdout, out.stderr)


def test_curlCredentialsNeverLogged(proxy, origin) -> None:
    out = curl(
        "-x",
        proxy.url,
        "-U",
        "carol:pr0xyPassw0rd",
        "-u",
        "dave:0riginPassw0rd",
        origin.url("/echo/curl-credentials?key=k3yInQuery"),
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    names = [n.lower() for n, _ in doc["headers"]]
    assert "authorization" in names and "proxy-authorization" not in names
    assert waitFor(lambda: any("/echo/curl-credentials" in li for li in proxy.accessLines()))
    log = proxy.log()
    for secret in (
        "k3yInQuery",
        "pr0xyPassw0rd",
        "0riginPassw0rd",
        base64.b64encode(b"carol:pr0xyPassw0rd").decode(),
        base64.b64encode(b"dave:0riginPassw0rd").decode(),
    ):
        assert secret not in log


# -- requests -------------------------------------------------------------------------------


def test_requestsStreamsDownloadAndUploads(proxy, origin, sink) -> None:
    proxies = {"http": proxy.url}
    with requests.Session() as s:
        r = s.get(origin.url(f"/bytes/{10_000_000}"), proxies=proxies, stream=True, timeout=20)
        h = hashlib.sha256()
        for piece in r.iter_content(1 << 16):
            h.update(piece)
        assert r.status_code == 200 and h.hexdigest() == payloadDigest(10_000_000)
        # data=bytes: Content-Length; data=generator: chunked.
        got = s.post(sink.url(), data=payload(300_000), proxies=proxies, timeout=20).json()
        assert (got["bytes"], got["te"]) == (300_000, "")
        got = s.post(sink.url(), data=payloadChunks(300_000), proxies=proxies, timeout=20).json()
        assert (got["bytes"], got["sha256"], got["te"]) == (
            300_000,
            payloadDigest(300_000),
            "chunked",
        )
        r = s.head(origin.url("/bytes/777"), proxies=proxies, timeout=10)
        assert r.headers["Content-Length"] == "777" and r.content == b""
        assert s.get(origin.url("/status/204"), proxies=proxies, timeout=10).status_code == 204


def test_requestsSessionKeepsConnectionsAlive(proxy, origin) -> None:
    with requests.Session() as s:
        ports = [
            s.get(origin.url("/echo"), proxies={"http": proxy.url}, timeout=10).json()["port"]
            for _ in range(3)
        ]
    assert len(set(ports)) == 1, ports


def test_requestsThroughHttpProxyVariable(proxy, origin, monkeypatch) -> None:
    monkeypatch.setenv("http_proxy", proxy.url)
    r = requests.get(origin.url("/bytes/2048"), timeout=10)
    assert r.content == payload(2048)
    assert r.headers["Via"] == "1.1 proxygate"


def test_requestsGetsProxyStatuses(proxy, closedPort) -> None:
    r = requests.get(f"http://127.0.0.1:{closedPort}/", proxies={"http": proxy.url}, timeout=10)
    assert r.status_code == 502 and "refused" in r.text.lower()
    r = requests.get("http://nonexistent.invalid/", proxies={"http": proxy.url}, timeout=10)
    assert r.status_code == 502


# -- pip ------------------------------------------------------------------------------------

PACKAGE = "pgdemo"
VERSION = "0.1"


def buildWheel(folder: Path) -> Path:
    """A minimal, valid pure-Python wheel of a throwaway package."""
    files = {
        f"{PACKAGE}/__init__.py": b'"""A throwaway package for the pip-through-proxy test."""\n'
        b"VALUE = 42\n",
        f"{PACKAGE}-{VERSION}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n"
            "Summary: proxygate test package\n"
        ).encode(),
        f"{PACKAGE}-{VERSION}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: proxygate-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    recordName = f"{PACKAGE}-{VERSION}.dist-info/RECORD"
    record.append(f"{recordName},,")
    files[recordName] = ("\n".join(record) + "\n").encode()
    path = folder / f"{PACKAGE}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


class IndexHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def end_headers(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Via")))
        super().end_headers()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A PEP 503 simple index serving one wheel."""
    root = tmp_path_factory.mktemp("index")
    (root / "files").mkdir()
    wheel = buildWheel(root / "files")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / PACKAGE).mkdir(parents=True)
    (root / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{PACKAGE}/">{PACKAGE}</a></body></html>\n'
    )
    (root / "simple" / PACKAGE / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../files/{wheel.name}#sha256={sha}">'
        f"{wheel.name}</a></body></html>\n"
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(IndexHandler, directory=str(root)))
    server.daemon_threads = True
    server.seen = []
    server.wheel = wheel
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("how", ["http_proxy", "--proxy"])
def test_pipDownloadThroughProxy(proxy, index, tmp_path, how: str) -> None:
    port = index.server_address[1]
    dest = tmp_path / "dl"
    index.seen.clear()
    args = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        "10",
        "--retries",
        "0",
        "--index-url",
        f"http://127.0.0.1:{port}/simple/",
        PACKAGE,
        "-d",
        str(dest),
    ]
    env = cleanEnv(PIP_CONFIG_FILE=os.devnull)
    if how == "http_proxy":
        env["http_proxy"] = proxy.url
    else:
        args += ["--proxy", proxy.url]
    out = subprocess.run(args, capture_output=True, timeout=90, env=env)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    got = dest / index.wheel.name
    assert got.read_bytes() == index.wheel.read_bytes()
    # Everything pip fetched came through the proxy.
    paths = [p for p, _ in index.seen]
    assert f"/simple/{PACKAGE}/" in paths and f"/files/{index.wheel.name}" in paths
    assert all(via == "1.1 proxygate" for _, via in index.seen), index.seen
    assert waitFor(lambda: any(index.wheel.name in li for li in proxy.accessLines()))
