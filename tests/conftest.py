"""
Shared fixtures: real processes and real sockets on loopback.

- ``startProxy(ini)`` runs proxygate the way users do (``twistd -n proxygate --config``) in
  a subprocess, waits until it listens, and stops it by PID at teardown.
- ``origin`` is a threaded HTTP/1.1 origin with deterministic payloads (``/bytes/N``),
  an echo of what it received (``/echo``), chosen statuses, chunked and close-delimited
  responses, and a WebSocket-free upgrade refusal.
- ``rawOrigin`` is a socket-level origin that records the exact bytes it receives and
  replies with scripted bytes: for the conformance tables.

Every server binds 127.0.0.1 on a free port; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TWISTD = [
    PYTHON,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]
#: twistd as in an install from the README (C{pip install .}), which has no pyOpenSSL: the
#: test venv has it (test origins use Twisted's TLS), so it is hidden from imports here.
TWISTD_WITHOUT_PYOPENSSL = [
    PYTHON,
    "-c",
    "import sys; sys.modules['OpenSSL'] = None; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; run()",
]

# -- helpers -------------------------------------------------------------------------------


_handedOut: set[int] = set()


def freePort(host: str = "127.0.0.1") -> int:
    """
    A port nothing listens on now, and one this test run has not handed out before: the
    kernel may give a just-closed probe port again, and a test that picks a port and then
    starts a proxy picking its own (listener, metrics) must not get the same one twice.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handedOut:
            _handedOut.add(port)
            return port


@contextlib.contextmanager
def nonAcceptingPort():
    """
    A loopback port whose connections never complete: a listening socket of backlog 0 whose
    accept queue is filled and never accepted, so further SYNs are dropped.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.1)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        server.close()


@pytest.fixture
def server():
    """Raw TCP origins (tlsorigin.TCPServer) for one test; the test gives each its handler."""
    from tlsorigin import TCPServer  # tlsorigin imports this module

    made = []

    def make(handler, host: str = "127.0.0.1", **kwargs):
        s = TCPServer(handler, host, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def waitFor(predicate, timeout: float = 5.0, interval: float = 0.05):
    """Poll C{predicate} until it returns something true (returned) or C{timeout} passes
    (then its last value is returned, for the caller's assert)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def waitForPort(host: str, port: int, timeout: float = 15.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not start listening in {timeout}s")


_BLOCK = random.Random(1234).randbytes(65536)


def payload(n: int) -> bytes:
    """Deterministic bytes of length n (small sizes only; stream large ones)."""
    reps, rest = divmod(n, len(_BLOCK))
    return _BLOCK * reps + _BLOCK[:rest]


def payloadChunks(n: int, size: int = 65536):
    sent = 0
    block = len(_BLOCK)
    while sent < n:
        take = min(size, n - sent)
        offset = sent % block
        if offset + take <= block:
            yield _BLOCK[offset : offset + take]
        else:
            yield (_BLOCK[offset:] + _BLOCK * (take // block + 1))[:take]
        sent += take


def payloadDigest(n: int) -> str:
    h = hashlib.sha256()
    for chunk in payloadChunks(n, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# -- the proxy under test ------------------------------------------------------------------


def sslListen(port: int, files) -> str:
    """An ssl: listener on 127.0.0.1:C{port} with C{files}' key and certificate (tlsorigin)."""
    return f"ssl:{port}:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}"


class ProxyProcess:
    """
    proxygate under twistd, configured by an INI text; listens on a free port (C{self.port}),
    over TLS with C{sslFiles}' key and certificate when given (an HTTPS proxy).
    """

    def __init__(
        self,
        workdir: Path,
        ini: str,
        *,
        metrics: bool = True,
        listen: str | None = None,
        sslFiles=None,
        twistd: list[str] = TWISTD,
    ):
        self.workdir = workdir
        self.twistd = twistd
        self.port = freePort()
        self.metricsPort = freePort() if metrics else None
        self.host = "127.0.0.1"
        if listen is None and sslFiles is not None:
            listen = sslListen(self.port, sslFiles)
        # A given listener may name the port picked here as {port}.
        listenLine = (listen or "tcp:{port}:interface=127.0.0.1").format(port=self.port)
        text = ini
        if "[proxy]" in text:
            text = text.replace("[proxy]", f"[proxy]\nlisten = {listenLine}", 1)
        else:
            text = f"[proxy]\nlisten = {listenLine}\n" + text
        metricsLine = f"tcp:{self.metricsPort}:interface=127.0.0.1" if metrics else ""
        if "[metrics]" in text:
            text = text.replace("[metrics]", f"[metrics]\nlisten = {metricsLine}", 1)
        else:
            text += f"\n[metrics]\nlisten = {metricsLine}\n"
        self.configPath = workdir / f"proxygate-{self.port}.ini"
        self.configPath.write_text(text)
        self.logPath = workdir / f"proxygate-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> ProxyProcess:
        self._log = open(self.logPath, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.twistd, "-n", "--pidfile=", "proxygate", "--config", str(self.configPath)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            # The metrics listener opens just after the proxy's: a test that scrapes as soon
            # as the proxy port answers could find it not listening yet.
            waitForPort(self.host, self.port, proc=self.proc)
            if self.metricsPort is not None:
                waitForPort("127.0.0.1", self.metricsPort, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"proxygate did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def accessLines(self) -> list[str]:
        self.settle()
        return [line for line in self.log().splitlines() if "[proxygate.access" in line]

    def settle(self) -> None:
        """
        Wait until the proxy is done with what it was doing: a response leaves before its
        access-log line is written (in the same reactor turn), so a client can read the
        log a moment too early. A metrics scrape is served by the same reactor after that
        turn; without a metrics listener, a short sleep.
        """
        if self.metricsPort is None or self.proc is None or self.proc.poll() is not None:
            time.sleep(0.05)
            return
        try:
            self.metrics()
        except OSError:
            time.sleep(0.05)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metricsPort}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """The value of one sample (0.0 when absent)."""
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            if "{" in sample:
                metricName, _, rest = sample.partition("{")
                got = dict(
                    part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part
                )
                got = {k: v.strip('"') for k, v in got.items()}
            else:
                metricName, got = sample, {}
            if metricName == name and all(got.get(k) == str(v) for k, v in labels.items()):
                return float(value)
        return 0.0

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


# INI used by most end-to-end tests: loopback origins must be reachable.
LOOPBACK_INI = """
[proxy]
deny_destinations = 169.254.0.0/16 fe80::/10
connect_ports = 1-65535
"""


@pytest.fixture
def startProxy(tmp_path):
    started: list[ProxyProcess] = []

    def start(ini: str = LOOPBACK_INI, **kwargs) -> ProxyProcess:
        p = ProxyProcess(tmp_path, ini, **kwargs).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """A proxy for read-only tests of one module (loopback destinations allowed)."""
    p = ProxyProcess(tmp_path_factory.mktemp("proxy"), LOOPBACK_INI).start()
    yield p
    p.stop()


# -- origins -------------------------------------------------------------------------------


class OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "origin/1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(out)
        if length:
            return self.rfile.read(int(length))
        return b""

    def _handle(self) -> None:
        path = self.path
        self.server.requests.append((self.command, path, list(self.headers.items())))
        if path.startswith("/bytes/"):
            n = int(path.split("/")[2].split("?")[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                for chunk in payloadChunks(n):
                    self.wfile.write(chunk)
        elif path.startswith("/chunked/"):
            n = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in payloadChunks(n, 10000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif path.startswith("/close/"):
            n = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in payloadChunks(n):
                self.wfile.write(chunk)
            self.close_connection = True
        elif path.startswith("/status/"):
            code = int(path.split("/")[2])
            body = self._body()
            self.send_response(code)
            if code not in (204, 304) and code >= 200:
                self.send_header("Content-Length", "0")
            self.end_headers()
            del body
        elif path.startswith("/sink"):
            h = hashlib.sha256()
            total = 0
            # Stream the body without keeping it: large uploads.
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = self._body()
                h.update(data)
                total = len(data)
            elif length:
                remaining = int(length)
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    h.update(chunk)
                    remaining -= len(chunk)
                    total += len(chunk)
            body = json.dumps({"bytes": total, "sha256": h.hexdigest()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:  # /echo and anything else
            body = self._body()
            doc = {
                "method": self.command,
                "path": path,
                "version": self.request_version,
                "headers": list(self.headers.items()),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
                "peer": self.client_address[0],
                "port": self.client_address[1],
            }
            out = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle

    def do_TRACE(self) -> None:
        self._handle()


class Origin(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1"):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), OriginHandler)
        self.requests: list = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "/") -> str:
        host = self.server_address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="session")
def origin():
    o = Origin()
    yield o
    o.close()


class RawOrigin:
    """
    Accepts connections, records every byte received on each, and answers each connection
    with a scripted response once it has seen a complete head (or immediately, if asked).
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.closeAfter = True
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        record = bytearray()
        self.received.append(record)
        conn.settimeout(5)
        try:
            while b"\r\n\r\n" not in record:
                data = conn.recv(65536)
                if not data:
                    return
                record += data
            time.sleep(0.05)  # let a body that follows arrive, for the record
            conn.settimeout(0.1)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    record += data
            except OSError:
                pass
            conn.sendall(self.response)
            if self.closeAfter:
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.05)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def rawOrigin():
    o = RawOrigin()
    yield o
    o.close()


def rawRequest(port: int, data: bytes, timeout: float = 5.0, host: str = "127.0.0.1") -> bytes:
    """Send raw bytes to the proxy and read until it closes (or the timeout)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = bytearray()
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
        return bytes(out)


def readResponse(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response from a socket: (status, lower-cased headers, Content-Length body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split(" ")[1]), headers, rest[:length]
