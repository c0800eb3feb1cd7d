#!/usr/bin/env python3
"""reverse.py -- the inbound gateway against nginx as a reverse proxy (loopback only, bounded).

One run, three rows, the same load on each (loadgen.py's client: GET 1 KiB, origin-form,
keep-alive, 32 connections, time-bound):

  direct     the origin itself (the ceiling of this client and origin)
  nginx      Debian's nginx as a reverse proxy: one process, an upstream keep-alive pool,
             the X-Forwarded-* headers proxygate sets, no buffering, no access log
  proxygate  twistd proxygate with [reverse] listen and one [route bench] (match = /) to the
             same origin, no access log, no metrics listener

The origin is nginx serving a static 1 KiB file (as the peer harness's origin does). The
proxy under test runs on CPU0, the origin and the client on CPU1 (--no-pin turns that off),
as in loadgen.py and the peer harness. The figure that counts is the proxy's CPU time per
request ("per core"): the Python client may be the limit of req/s (see client%).

  python benchmarks/reverse.py                    # all rows, 5 s each
  python benchmarks/reverse.py -d 3 --rounds 3    # best of 3 per row
  python benchmarks/reverse.py --rows nginx,proxygate --json

Needs nginx (apt-get install nginx). Every process it starts is stopped by PID.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadgen  # noqa: E402  (this folder's load generator: its client and helpers)

ROWS = ("direct", "nginx", "proxygate")

# One nginx process, no access log, everything it writes in the run's folder.
NGINX_HEAD = """worker_processes 1;
master_process off;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
"""

ORIGIN_CONF = """  sendfile on;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {d}/www;
  }}
}}
"""

# nginx doing what a [route] does: Host kept, X-Forwarded-* set, keep-alive to the backend,
# bodies streamed both ways, no size limit (proxygate's max_body_size = 0).
NGINX_REVERSE_CONF = """  upstream bench {{
    server 127.0.0.1:{origin};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    client_max_body_size 0;
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""

PROXYGATE_INI = """[proxy]
listen = tcp:{proxyPort}:interface=127.0.0.1

[metrics]
listen =

[log]
access_log =

[reverse]
listen = tcp:{port}:interface=127.0.0.1
allowed_client_cidrs = 127.0.0.0/8

[route bench]
match = /
backends = http://127.0.0.1:{origin}
"""


def nginx():
    found = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if not found:
        sys.exit("nginx is not installed: apt-get install nginx")
    return found


def start_origin(d, pin):
    os.makedirs(os.path.join(d, "www", "bytes"), exist_ok=True)
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    with open(os.path.join(d, "www", "bytes", "1024"), "wb") as f:
        f.write(os.urandom(1024))
    port = loadgen.free_port()
    conf = os.path.join(d, "origin.conf")
    with open(conf, "w") as f:
        f.write(NGINX_HEAD.format(d=d, name="origin") + ORIGIN_CONF.format(d=d, port=port))
    proc = loadgen._launch("origin", [nginx(), "-c", conf, "-p", d], port, d, False, None)
    if pin:
        os.sched_setaffinity(proc.pid, {1})
    return proc, port


def start_row(row, d, origin, pin, twistd):
    """Start the reverse proxy of a row on a free port: (process, port)."""
    port = loadgen.free_port()
    if row == "nginx":
        conf = os.path.join(d, "reverse.conf")
        with open(conf, "w") as f:
            f.write(NGINX_HEAD.format(d=d, name="reverse"))
            f.write(NGINX_REVERSE_CONF.format(port=port, origin=origin))
        cmd, env = [nginx(), "-c", conf, "-p", d], None
    else:
        ini = os.path.join(d, "reverse.ini")
        with open(ini, "w") as f:
            f.write(PROXYGATE_INI.format(proxyPort=loadgen.free_port(), port=port, origin=origin))
        cmd = [twistd, "-n", "--pidfile=", "proxygate", "--config", ini]
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))  # this working tree
    return loadgen._launch(row, cmd, port, d, pin, env), port


class Args:
    """What loadgen.Run reads of its command line."""

    def __init__(self, a):
        self.concurrency, self.requests, self.size = a.concurrency, 0, 0
        self.timeout, self.warmup, self.duration = a.timeout, a.warmup, a.duration


def run_row(a, row, d, origin_proc, origin_port, pin, twistd):
    import asyncio

    proc = None
    try:
        if row == "direct":
            port = origin_port
        else:
            try:
                proc, port = start_row(row, d, origin_port, pin, twistd)
            except SystemExit as e:  # loadgen._launch: did not start (e.g. no [reverse] yet)
                return {"row": row, "error": str(e).splitlines()[0]}
        run = loadgen.Run(Args(a), "get", None, (port, port, None), None, None)
        result = asyncio.run(run.go(proc.pid if proc else None, origin_proc.pid))
    finally:
        if proc is not None:
            loadgen.stop(proc)
    result["row"] = row
    if result["ok"] == 0:
        result["error"] = f"no 2xx answer (errors {result['errors']})"
    return result


def fmt(r):
    if "error" in r:
        return f"{r['row']:<10} error: {r['error']}"
    s = (
        f"{r['row']:<10} {r['rps']:8.0f} req/s  p50 {r['p50_ms'] or 0:6.2f} ms  "
        f"p99 {r['p99_ms'] or 0:6.2f} ms  ok {r['ok']} non2xx {r['non2xx']} "
        f"err {sum(r['errors'].values())}"
    )
    if "proxy_cpu_us_per_req" in r:
        s += (
            f"  | proxy {r['proxy_cpu_pct']}% CPU {r['proxy_cpu_us_per_req']:.0f} us/req "
            f"peak RSS {r['proxy_peak_rss_mb']:.1f} MB"
        )
    return s + f"  | client {r['client_cpu_pct']}% origin {r['origin_cpu_pct']}%"


def best(results):
    """Per row, the round with the fewest proxy CPU us/req (the most req/s for direct)."""

    def score(r):
        if "error" in r:
            return float("inf")
        return r.get("proxy_cpu_us_per_req", -r["rps"])

    out = {}
    for r in results:
        if r["row"] not in out or score(r) < score(out[r["row"]]):
            out[r["row"]] = r
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default=",".join(ROWS), help=f"some of {','.join(ROWS)}")
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds per row")
    ap.add_argument("-w", "--warmup", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=1, help="rounds (best of N per row)")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--twistd", help="twistd to run (default: next to this python)")
    ap.add_argument("--no-pin", action="store_true", help="default: proxy CPU0, rest CPU1")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = [r for r in a.rows.split(",") if r]
    if any(r not in ROWS for r in rows) or not 0 < a.duration <= 120 or not 1 <= a.rounds <= 5:
        ap.error("bad --rows, --duration (0-120) or --rounds (1-5)")
    twistd = a.twistd or os.path.join(os.path.dirname(sys.executable), "twistd")
    if "proxygate" in rows and not os.path.exists(twistd):
        sys.exit(f"no twistd at {twistd}: pass --twistd")
    pin = not a.no_pin and len(os.sched_getaffinity(0)) >= 2
    budget = a.rounds * len(rows) * (a.duration + a.warmup + a.timeout + 20) + 30
    signal.signal(signal.SIGALRM, lambda *_: (loadgen._cleanup(), os._exit(3)))
    signal.signal(signal.SIGTERM, lambda *_: (loadgen._cleanup(), os._exit(1)))
    signal.alarm(int(budget))
    d = tempfile.mkdtemp(prefix="reverse-bench-")
    results = []
    try:
        origin_proc, origin_port = start_origin(d, pin)
        if pin:
            os.sched_setaffinity(0, {1})
        for _ in range(a.rounds):
            for row in rows:
                r = run_row(a, row, d, origin_proc, origin_port, pin, twistd)
                results.append(r)
                print(json.dumps(r) if a.json else fmt(r), flush=True)
    finally:
        loadgen._cleanup()
    chosen = best(results)
    ng, pg = chosen.get("nginx"), chosen.get("proxygate")
    if ng and pg and "error" not in ng and "error" not in pg:
        ratio = ng["proxy_cpu_us_per_req"] / max(pg["proxy_cpu_us_per_req"], 1e-9)
        summary = {
            "nginx_us_per_req": ng["proxy_cpu_us_per_req"],
            "proxygate_us_per_req": pg["proxy_cpu_us_per_req"],
            "per_core_ratio": round(ratio, 2),
            "rps_ratio": round(pg["rps"] / max(ng["rps"], 1e-9), 2),
        }
        print(
            json.dumps(summary)
            if a.json
            else f"proxygate vs nginx: {summary['per_core_ratio']}x per core "
            f"({pg['proxy_cpu_us_per_req']:.0f} vs {ng['proxy_cpu_us_per_req']:.0f} us/req), "
            f"{summary['rps_ratio']}x req/s"
        )
    print(f"logs in {d}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
