#!/usr/bin/env python3
"""
The Datakit scenario through proxygate, TLS interception off and on, in one run.

    /work/venv/bin/python benchmarks/datakit_mitm.py                 # 16 x 100 POSTs, 3 rounds
    /work/venv/bin/python benchmarks/datakit_mitm.py --clients 16 --requests 100 --rounds 5
    /work/venv/bin/python benchmarks/datakit_mitm.py --origin python  # no nginx on the box

Each of --clients clients (threads of one load process) opens ONE keep-alive connection:
CONNECT localhost:ORIGIN through the proxy, TLS inside, then --requests POSTs of --size bytes
to https://localhost:ORIGIN/v1/write/x (http.client over the CONNECT tunnel, verifying the
certificate it gets). Two proxygate processes run side by side, one with [mitm] off (the
tunnel is a blind splice) and one with [mitm] on (decrypted, forwarded over a pooled,
verified TLS connection to the origin); rounds alternate between them and the median is
reported, with the on/off ratio (the goal is >= 0.5).

The origin is nginx (a POST sink that reads the whole body, as the shared harness uses) when
nginx and its echo module are installed, else a threaded Python HTTPS origin. With two or
more CPUs the proxies are pinned to CPU0 and the load generator and origin to CPU1.
Everything listens on 127.0.0.1 on free ports; every process is stopped by PID; every wait
is bounded. The figures are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from gateway.tls.ca import createCA  # noqa: E402
from gateway.tls.mint import mintLeaf, newLeafKey  # noqa: E402

ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"

NGINX_CONF = """load_module {echo};
worker_processes 1;
daemon off;
pid {o}/nginx.pid;
error_log {o}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {o}/tmp_body;
  proxy_temp_path {o}/tmp_proxy;
  fastcgi_temp_path {o}/tmp_fcgi;
  uwsgi_temp_path {o}/tmp_uwsgi;
  scgi_temp_path {o}/tmp_scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  ssl_protocols TLSv1.2 TLSv1.3;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {o}/leaf.pem;
    ssl_certificate_key {o}/leaf.key;
    location /v1/write/ {{ client_max_body_size 10m; client_body_buffer_size 1m;
                          echo_read_request_body; echo "ok"; }}
  }}
}}
"""


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port} did not listen within {timeout}s")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def taskset(cpu: int) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


# -- the origin ------------------------------------------------------------------------------


def makePKI(folder: Path) -> Path:
    """The origin's CA (returned) and a leaf for localhost (leaf.pem/leaf.key)."""
    ca = createCA("datakit bench origin CA")
    key = newLeafKey()
    leaf = mintLeaf(ca, key, "localhost", datetime.now(UTC))
    (folder / "ca.pem").write_bytes(ca.pem())
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder / "ca.pem"


class _SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")


def servePythonOrigin(folder: Path, port: int) -> None:
    """A threaded HTTPS POST sink (the fallback when nginx is missing); runs until killed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

        def finish_request(self, request, client_address) -> None:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                tls = ctx.wrap_socket(request, server_side=True)
            except OSError:
                return
            super().finish_request(tls, client_address)

    Server(("127.0.0.1", port), _SinkHandler).serve_forever()


def startOrigin(folder: Path, kind: str) -> tuple[subprocess.Popen, int, str]:
    port = freePort()
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") and os.path.exists(ECHO_MODULE) else "python"
    if kind == "nginx":
        conf = folder / "nginx.conf"
        conf.write_text(NGINX_CONF.format(echo=ECHO_MODULE, o=folder, port=port))
        cmd = [*taskset(1), shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(folder)]
    else:
        cmd = [*taskset(1), sys.executable, __file__, "--serve-origin", str(folder), str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(folder / "origin.log", "w"))  # noqa: SIM115
    waitForPort(port, proc)
    return proc, port, kind


# -- the proxies -----------------------------------------------------------------------------


def startProxy(folder: Path, name: str, mitm: bool, originCA: Path, accessLog: bool):
    port = freePort()
    ini = folder / f"{name}.ini"
    text = (
        "[proxy]\n"
        f"listen = tcp:{port}:interface=127.0.0.1\n"
        "deny_destinations = 169.254.0.0/16 fe80::/10\n"
        "connect_ports = 1-65535\n"
        "[metrics]\nlisten =\n"
        f"[log]\naccess_log = {'-' if accessLog else ''}\n"
    )
    if mitm:
        text += (
            "[mitm]\nenabled = on\n"
            f"ca_cert = {name}-ca.pem\nca_key = {name}-ca.key\n"
            f"upstream_ca_bundle = {originCA}\n"
        )
    ini.write_text(text)
    log = open(folder / f"{name}.log", "wb")  # noqa: SIM115
    twistd = [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
    ]
    proc = subprocess.Popen(
        [*taskset(0), *twistd, "-n", "--pidfile=", "proxygate", "--config", str(ini)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    waitForPort(port, proc)
    clientCA = folder / f"{name}-ca.pem" if mitm else originCA
    return proc, port, clientCA


# -- the load --------------------------------------------------------------------------------


def runClients(
    proxyPort: int, originPort: int, cafile: str, clients: int, requests: int, size: int
) -> dict:
    """C{clients} threads, each one CONNECT tunnel with C{requests} POSTs inside."""
    body = os.urandom(size)
    ctx = ssl.create_default_context(cafile=cafile)
    latencies: list[float] = []
    errors: list[str] = []
    ok = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", proxyPort, context=ctx, timeout=60)
        conn.set_tunnel("localhost", originPort)
        mine: list[float] = []
        good = 0
        try:
            conn.connect()
            barrier.wait(timeout=60)
            for _ in range(requests):
                t = time.perf_counter()
                conn.request(
                    "POST",
                    "/v1/write/x",
                    body=body,
                    headers={"Content-Type": "application/octet-stream"},
                )
                response = conn.getresponse()
                response.read()
                mine.append(time.perf_counter() - t)
                if response.status == 200:
                    good += 1
                else:
                    with lock:
                        errors.append(f"status {response.status}")
        except Exception as e:
            with lock:
                errors.append(f"{type(e).__name__}: {e}")
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)
                ok[0] += good

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=60)  # every tunnel is up: time the requests only
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    cpuStart = time.process_time()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpuStart
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1)

    return {
        "load_cpu_s": round(cpu, 2),
        "ok": ok[0],
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 3),
        "rps": round(ok[0] / wall, 1) if wall else 0.0,
        "mb_s": round(ok[0] * size / wall / 1e6, 1) if wall else 0.0,
        "p50_ms": pct(0.5) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
    }


def cpuSeconds(pid: int) -> float:
    """CPU time of a process and its children that are still running (nginx's worker)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return total + sum(cpuSeconds(c) for c in children)


def loadRound(args, proxy, port: int, originPort: int, cafile: Path, origin=None) -> dict:
    cmd = [
        *taskset(1),
        sys.executable,
        __file__,
        "--load",
        json.dumps([port, originPort, str(cafile), args.clients, args.requests, args.size]),
    ]
    before = cpuSeconds(proxy.pid)
    originBefore = cpuSeconds(origin.pid) if origin is not None else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    after = cpuSeconds(proxy.pid)
    originAfter = cpuSeconds(origin.pid) if origin is not None else 0.0
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["proxy_cpu_s"] = round(after - before, 2)
    if origin is not None:
        result["origin_cpu_s"] = round(originAfter - originBefore, 2)
    if result["ok"]:
        result["proxy_us_per_req"] = round((after - before) / result["ok"] * 1e6)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=100, help="POSTs per client")
    ap.add_argument("--size", type=int, default=172787, help="body bytes per POST")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating)")
    ap.add_argument("--origin", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--access-log", action="store_true", help="proxies write access logs")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--serve-origin", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--load", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve_origin:
        servePythonOrigin(Path(args.serve_origin[0]), int(args.serve_origin[1]))
        return 0
    if args.load:
        print(json.dumps(runClients(*json.loads(args.load))))
        return 0

    procs: list[subprocess.Popen] = []
    folder = Path(tempfile.mkdtemp(prefix="datakit-mitm-"))
    try:
        originCA = makePKI(folder)
        origin, originPort, kind = startOrigin(folder, args.origin)
        procs.append(origin)
        off, offPort, offCA = startProxy(folder, "mitm-off", False, originCA, args.access_log)
        procs.append(off)
        on, onPort, onCA = startProxy(folder, "mitm-on", True, originCA, args.access_log)
        procs.append(on)
        modes = {"off": (off, offPort, offCA), "on": (on, onPort, onCA)}
        # Warm-up: one short round each (certificate minted, pools filled, code paths hot).
        for proxy, port, ca in modes.values():
            warm = loadRound(
                argparse.Namespace(clients=2, requests=5, size=args.size),
                proxy,
                port,
                originPort,
                ca,
            )
            if warm["errors"]:
                raise RuntimeError(f"warm-up failed: {warm['first_error']}")
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for i in range(args.rounds):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                proxy, port, ca = modes[mode]
                r = loadRound(args, proxy, port, originPort, ca, origin)
                results[mode].append(r)
                print(f"round {i + 1} mitm {mode:3}: {json.dumps(r)}", file=sys.stderr)
        summary = {
            "clients": args.clients,
            "requests_per_client": args.requests,
            "body_bytes": args.size,
            "origin": kind,
            "cpus": os.cpu_count(),
            "pinned": bool(taskset(0)),
        }
        for mode in ("off", "on"):
            rps = [r["rps"] for r in results[mode]]
            summary[f"mitm_{mode}_rps"] = statistics.median(rps)
            summary[f"mitm_{mode}_rounds"] = rps
            summary[f"mitm_{mode}_errors"] = sum(r["errors"] for r in results[mode])
            summary[f"mitm_{mode}_proxy_us_per_req"] = statistics.median(
                r.get("proxy_us_per_req", 0) for r in results[mode]
            )
        summary["ratio_on_off"] = round(summary["mitm_on_rps"] / summary["mitm_off_rps"], 3)
        if args.json:
            print(json.dumps(summary))
        else:
            print(
                f"Datakit: {args.clients} clients x {args.requests} POSTs of {args.size} B, "
                f"one keep-alive CONNECT tunnel each; origin {kind}; {args.rounds} rounds"
            )
            for mode in ("off", "on"):
                print(
                    f"  mitm {mode:3}: {summary[f'mitm_{mode}_rps']:8.1f} req/s (median of "
                    f"{summary[f'mitm_{mode}_rounds']}), proxy "
                    f"{summary[f'mitm_{mode}_proxy_us_per_req']} us/req, errors "
                    f"{summary[f'mitm_{mode}_errors']}"
                )
            print(f"  ratio on/off: {summary['ratio_on_off']:.3f} (goal >= 0.5)")
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
