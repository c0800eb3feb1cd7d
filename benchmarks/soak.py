#!/usr/bin/env python3
"""
soak.py -- sustained mixed traffic through one proxygate, watching its memory (not in CI).

It starts its own origins in a child process (an HTTP/1.1 origin with keep-alive, bodies
both ways and a WebSocket echo; a TCP echo; with --mitm an HTTPS origin signed by a
throwaway CA) and a proxygate under twistd (or uses --proxy HOST:PORT --pid PID), then runs
client threads for --duration seconds, each picking one scenario at a time:

  get        keep-alive connection, 20 absolute-form GETs of 0..64 KiB
  post       keep-alive connection, 10 POSTs (Content-Length and chunked) of 0..256 KiB
  tunnel     CONNECT to the TCP echo, 8 x 16 KiB both ways, then half-close
  ws-connect CONNECT to the origin, WebSocket upgrade inside the tunnel, 10 echoes
  ws-upgrade absolute-form GET with Upgrade: websocket through the proxy, 10 echoes
  mitm       (--mitm) CONNECT, TLS to the proxy's minted certificate, 5 GETs inside

Every 10 s it prints the proxy's RSS (VmRSS from /proc/PID/status) and the operation and
error counts; at the end the verdict: RSS after warm-up stays flat, i.e. it grows less than
--max-growth (default 10%) between the 25% mark of the run and its end. Exit status 0 on
PASS, 1 on FAIL (or on errors above --max-error-rate).

    /work/venv/bin/python benchmarks/soak.py                  # 120 s, 16 clients
    /work/venv/bin/python benchmarks/soak.py --duration 180 --mitm
    /work/venv/bin/python benchmarks/soak.py --proxy 127.0.0.1:3128 --pid 1234

Everything is loopback; the processes it starts are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import multiprocessing
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BLOCK = random.Random(7).randbytes(1 << 18)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- origins (child process, asyncio) -----------------------------------------------------------


async def _readHead(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head[:-4].split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    return lines[0], fields


async def _readBody(reader: asyncio.StreamReader, fields: dict[bytes, bytes]) -> int:
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return total
            await reader.readexactly(size + 2)
            total += size
    n = int(fields.get(b"content-length", b"0") or 0)
    if n:
        await reader.readexactly(n)
    return n


async def _wsEcho(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
        data = _xor(await reader.readexactly(n), mask)
        writer.write(_wsFrame(b0 & 0x0F, data, masked=False))
        await writer.drain()
        if b0 & 0x0F == 8:
            return


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            got = await _readHead(reader)
            if got is None:
                return
            line, fields = got
            method, target, _ = line.split(b" ", 2)
            if fields.get(b"upgrade", b"").lower() == b"websocket":
                key = fields[b"sec-websocket-key"]
                accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                await _wsEcho(reader, writer)
                return
            received = await _readBody(reader, fields)
            if target.startswith(b"/bytes/"):
                n = int(target[7:].split(b"?")[0])
                body = BLOCK[:n]
            else:
                body = b"received=%d" % received
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError):
        pass
    finally:
        writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _originMain(pipe, tlsFiles) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        http = await asyncio.start_server(_http, "127.0.0.1", 0, backlog=512)
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=512)
        found = [http.sockets[0].getsockname()[1], echo.sockets[0].getsockname()[1], 0]
        if tlsFiles:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tlsFiles)
            https = await asyncio.start_server(_http, "127.0.0.1", 0, ssl=ctx, backlog=512)
            found[2] = https.sockets[0].getsockname()[1]
        pipe.send(found)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the proxy ------------------------------------------------------------------------------------


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startProxy(folder: Path, mitmBundle: Path | None) -> tuple[subprocess.Popen, int]:
    port = freePort()
    ini = folder / "soak.ini"
    text = (
        "[proxy]\n"
        f"listen = tcp:{port}:interface=127.0.0.1\n"
        "deny_destinations = 169.254.0.0/16 fe80::/10\n"
        "connect_ports = 1-65535\n"
        "idle_timeout = 60\n"
        "[metrics]\nlisten =\n"
        "[log]\naccess_log =\n"
    )
    if mitmBundle is not None:
        text += f"[mitm]\nenabled = on\nupstream_ca_bundle = {mitmBundle}\n"
    ini.write_text(text)
    twistd = Path(sys.executable).with_name("twistd")
    log = open(folder / "proxygate.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "proxygate", "--config", str(ini)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"proxygate exited: {(folder / 'proxygate.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("proxygate did not start listening in 20 s")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- clients --------------------------------------------------------------------------------------


class SoakError(Exception):
    pass


class Conn:
    """A blocking client connection with a small strict HTTP/1.1 response reader."""

    def __init__(self, proxy: tuple[str, int], timeout: float = 15) -> None:
        self.sock = socket.create_connection(proxy, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise SoakError("connection closed by the proxy")
        self.buf += data

    def line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def head(self) -> tuple[int, dict[bytes, bytes]]:
        status = self.line().split(b" ", 2)
        fields = {}
        while line := self.line():
            name, _, value = line.partition(b":")
            fields[name.lower()] = value.strip()
        return int(status[1]), fields

    def response(self) -> tuple[int, bytes]:
        status, fields = self.head()
        if fields.get(b"transfer-encoding") == b"chunked":
            parts = []
            while size := int(self.line(), 16):
                parts.append(self.exact(size))
                self.line()
            while self.line():
                pass
            return status, b"".join(parts)
        return status, self.exact(int(fields.get(b"content-length", b"0")))

    def connect(self, authority: str) -> None:
        self.sock.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % ((authority.encode(),) * 2))
        status, _ = self.head()
        if status != 200:
            raise SoakError(f"CONNECT {authority}: {status}")


def _wsFrame(opcode: int, data: bytes, masked: bool = True) -> bytes:
    n = len(data)
    head = bytes([0x80 | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + data
    mask = os.urandom(4)
    return head + mask + _xor(data, mask)


def _xor(data: bytes, mask: bytes) -> bytes:
    """WebSocket masking, fast: one big-integer XOR."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _wsTalk(c: Conn, rng: random.Random) -> None:
    for _ in range(10):
        data = BLOCK[: rng.choice([1, 125, 126, 4000, 70000])]
        c.sock.sendall(_wsFrame(2, data))
        b0, b1 = c.exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", c.exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", c.exact(8))[0]
        if c.exact(n) != data or b0 != 0x82:
            raise SoakError("WebSocket echo differs")
    c.sock.sendall(_wsFrame(8, b"\x03\xe8"))
    c.exact(4)


def _wsHandshake(c: Conn, target: bytes, host: bytes) -> None:
    key = base64.b64encode(os.urandom(16))
    c.sock.sendall(
        b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % (target, host, key)
    )
    status, fields = c.head()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    if status != 101 or fields.get(b"sec-websocket-accept") != accept:
        raise SoakError(f"WebSocket upgrade: {status}")


class Soak:
    def __init__(self, a, proxy: tuple[str, int], ports: list[int]) -> None:
        self.a = a
        self.proxy = proxy
        self.http, self.echo, self.https = ports
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.lastError = ""
        self.stop = threading.Event()
        self.lock = threading.Lock()
        scenarios = ["get", "post", "tunnel", "ws-connect", "ws-upgrade"]
        if a.mitm:
            scenarios.append("mitm")
        self.scenarios = scenarios

    def get(self, rng: random.Random) -> None:
        c = Conn(self.proxy)
        try:
            for _ in range(20):
                n = rng.choice([0, 1, 1024, 16384, 65535, 65536])
                c.sock.sendall(
                    b"GET http://127.0.0.1:%d/bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (self.http, n)
                )
                status, body = c.response()
                if status != 200 or body != BLOCK[:n]:
                    raise SoakError(f"GET {n}: {status} {len(body)}")
        finally:
            c.close()

    def post(self, rng: random.Random) -> None:
        c = Conn(self.proxy)
        try:
            for _ in range(10):
                n = rng.choice([0, 5, 4096, 65536, 262144])
                data = BLOCK[:n]
                if rng.random() < 0.5:
                    head = b"Content-Length: %d\r\n" % n
                    body = data
                else:
                    head = b"Transfer-Encoding: chunked\r\n"
                    body = (b"%x\r\n%b\r\n" % (n, data) if n else b"") + b"0\r\n\r\n"
                c.sock.sendall(
                    b"POST http://127.0.0.1:%d/sink HTTP/1.1\r\nHost: x\r\n%b\r\n%b"
                    % (self.http, head, body)
                )
                status, answer = c.response()
                if status != 200 or answer != b"received=%d" % n:
                    raise SoakError(f"POST {n}: {status} {answer[:40]!r}")
        finally:
            c.close()

    def tunnel(self, rng: random.Random) -> None:
        c = Conn(self.proxy)
        try:
            c.connect(f"127.0.0.1:{self.echo}")
            for _ in range(8):
                # (not 0x16 first: with --mitm only TLS-looking tunnels are decrypted)
                data = b"T" + BLOCK[rng.randrange(1000) :][:16383]
                c.sock.sendall(data)
                if c.exact(len(data)) != data:
                    raise SoakError("tunnel echo differs")
            c.sock.shutdown(socket.SHUT_WR)
            c.sock.settimeout(10)
            if c.sock.recv(1) != b"":
                raise SoakError("tunnel: bytes after the echo")
        finally:
            c.close()

    def wsConnect(self, rng: random.Random) -> None:
        c = Conn(self.proxy)
        try:
            c.connect(f"127.0.0.1:{self.http}")
            _wsHandshake(c, b"/ws", b"127.0.0.1:%d" % self.http)
            _wsTalk(c, rng)
        finally:
            c.close()

    def wsUpgrade(self, rng: random.Random) -> None:
        c = Conn(self.proxy)
        try:
            authority = b"127.0.0.1:%d" % self.http
            _wsHandshake(c, b"http://" + authority + b"/ws", authority)
            _wsTalk(c, rng)
        finally:
            c.close()

    def mitm(self, rng: random.Random) -> None:
        c = Conn(self.proxy)
        try:
            c.connect(f"127.0.0.1:{self.https}")
            ctx = ssl._create_unverified_context()  # soak, not a trust test (see test_mitm)
            c.sock = ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
            for _ in range(5):
                n = rng.choice([0, 100, 20000])
                c.sock.sendall(
                    b"GET /bytes/%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (n, self.https)
                )
                status, body = c.response()
                if status != 200 or body != BLOCK[:n]:
                    raise SoakError(f"MITM GET {n}: {status}")
        finally:
            c.close()

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        run = {
            "get": self.get,
            "post": self.post,
            "tunnel": self.tunnel,
            "ws-connect": self.wsConnect,
            "ws-upgrade": self.wsUpgrade,
            "mitm": self.mitm,
        }
        while not self.stop.is_set():
            name = rng.choice(self.scenarios)
            try:
                run[name](rng)
                with self.lock:
                    self.ops[name] += 1
            except (OSError, SoakError, ValueError, ssl.SSLError) as e:
                with self.lock:
                    self.errors[name] += 1
                    self.lastError = f"{name}: {type(e).__name__}: {e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (120)")
    ap.add_argument("--clients", type=int, default=16, help="client threads (16)")
    ap.add_argument("--mitm", action="store_true", help="add TLS-intercepted traffic")
    ap.add_argument("--proxy", help="HOST:PORT of a running proxygate (else one is started)")
    ap.add_argument("--pid", type=int, help="its PID, for RSS (with --proxy)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between RSS lines")
    ap.add_argument(
        "--max-growth",
        type=float,
        default=0.10,
        help="allowed RSS growth from the 25%% mark to the end (0.10)",
    )
    ap.add_argument(
        "--max-error-rate", type=float, default=0.01, help="allowed errors per operation (0.01)"
    )
    a = ap.parse_args()
    if a.proxy and not a.pid:
        ap.error("--proxy needs --pid (RSS is read from /proc/PID/status)")

    folder = Path(tempfile.mkdtemp(prefix="proxygate-soak-"))
    tlsFiles = bundle = None
    if a.mitm:
        sys.path.insert(0, str(REPO))
        from datetime import UTC, datetime

        from cryptography.hazmat.primitives import serialization

        from gateway.tls.ca import createCA
        from gateway.tls.mint import mintLeaf, newLeafKey

        ca = createCA("proxygate soak origin CA")
        bundle = folder / "origin-ca.pem"
        bundle.write_bytes(ca.pem())
        key = newLeafKey()
        (folder / "origin.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        leaf = mintLeaf(ca, key, "127.0.0.1", datetime.now(UTC))
        (folder / "origin.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        tlsFiles = (str(folder / "origin.pem"), str(folder / "origin.key"))

    parentEnd, childEnd = multiprocessing.Pipe()
    origin = multiprocessing.Process(target=_originMain, args=(childEnd, tlsFiles), daemon=True)
    origin.start()
    if not parentEnd.poll(15):
        origin.kill()
        sys.exit("the origins did not start")
    ports = parentEnd.recv()

    proc = None
    if a.proxy:
        host, _, port = a.proxy.rpartition(":")
        proxy, pid = (host, int(port)), a.pid
    else:
        proc, port = startProxy(folder, bundle)
        proxy, pid = ("127.0.0.1", port), proc.pid
    print(
        f"proxy {proxy[0]}:{proxy[1]} pid {pid}; origins http:{ports[0]} echo:{ports[1]}"
        + (f" https:{ports[2]}" if a.mitm else "")
        + f"; {a.clients} clients, {a.duration:.0f} s"
        + (" with MITM" if a.mitm else ""),
        flush=True,
    )

    soak = Soak(a, proxy, ports)
    threads = [
        threading.Thread(target=soak.worker, args=(i,), daemon=True) for i in range(a.clients)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    samples: list[tuple[float, int]] = [(0.0, rss(pid))]
    print(f"{'t(s)':>6} {'RSS MiB':>8} {'ops':>7} {'errors':>6}  per scenario", flush=True)
    try:
        while (elapsed := time.monotonic() - started) < a.duration:
            time.sleep(min(a.interval, a.duration - elapsed))
            t = time.monotonic() - started
            samples.append((t, rss(pid)))
            with soak.lock:
                ops, errors = sum(soak.ops.values()), sum(soak.errors.values())
                detail = " ".join(f"{k}={v}" for k, v in sorted(soak.ops.items()))
            print(
                f"{t:6.0f} {samples[-1][1] / 2**20:8.1f} {ops:7d} {errors:6d}  {detail}", flush=True
            )
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    soak.stop.set()
    for t in threads:
        t.join(20)
    final = rss(pid)
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    origin.terminate()
    origin.join(5)

    total = time.monotonic() - started
    mark = min(samples, key=lambda s: abs(s[0] - total * 0.25))
    end = samples[-1]
    growth = (end[1] - mark[1]) / mark[1] if mark[1] else 0.0
    ops, errors = sum(soak.ops.values()), sum(soak.errors.values())
    errorRate = errors / max(ops + errors, 1)
    print(
        f"RSS start {samples[0][1] / 2**20:.1f} MiB, at 25% (t={mark[0]:.0f}s) "
        f"{mark[1] / 2**20:.1f} MiB, end {end[1] / 2**20:.1f} MiB, "
        f"peak {max(s[1] for s in samples) / 2**20:.1f} MiB, after the clients stopped "
        f"{final / 2**20:.1f} MiB"
    )
    print(
        f"operations {ops} ({ops / total:.1f}/s): "
        + ", ".join(f"{k} {v}" for k, v in sorted(soak.ops.items()))
        + f"; errors {errors}"
        + (f" ({dict(soak.errors)}; last: {soak.lastError})" if errors else "")
    )
    ok = growth < a.max_growth and errorRate <= a.max_error_rate
    print(
        f"verdict: {'PASS' if ok else 'FAIL'}: RSS growth {growth * 100:+.1f}% after warm-up "
        f"(limit {a.max_growth * 100:.0f}%), error rate {errorRate * 100:.2f}% "
        f"(limit {a.max_error_rate * 100:.1f}%)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
