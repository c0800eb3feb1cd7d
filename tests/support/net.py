"""
Loopback sockets for tests: bounded waits, ports that refuse or never answer, and raw
request/response helpers.

Servers a test owns bind port 0 and report the port they got; proxygate does the same
(L{tests.support.proxy.ProxyProcess} reads its ports from its log). L{freePort} is only for
programs that must be told a port in advance and cannot report the one they bound (Squid's
and tinyproxy's configurations, a proxygate configuration that names its own port).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def waitFor(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.05) -> T:
    """Poll C{predicate} until it returns something true (returned) or C{timeout} passes
    (then its last value is returned, for the caller's assert)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def waitForPort(host: str, port: int, timeout: float = 15.0, proc=None) -> None:
    """Until C{host:port} accepts a connection; fails early when C{proc} has exited."""
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


_handedOut: set[int] = set()


def freePort(host: str = "127.0.0.1") -> int:
    """
    A port nothing listens on now, for a program that must be given its port up front and
    cannot bind 0 and report it: racy by nature (another process may take it before that
    program binds it), so use it for nothing else. A port this process handed out before is
    never handed out again (the kernel may give a just-closed probe port twice).
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
def closedPort(host: str = "127.0.0.1") -> Iterator[int]:
    """
    A loopback port where connecting is refused, held for the block: a socket bound there
    that never listens, so the kernel answers RST and no other socket can take the port
    (unlike a probed-and-closed "free" port, which anything may bind in the meantime).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def nonAcceptingPort() -> Iterator[int]:
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
