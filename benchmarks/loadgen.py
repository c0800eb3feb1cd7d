#!/usr/bin/env python3
"""loadgen.py -- proxygate's own small load generator (asyncio, stdlib only, loopback only).

It starts a tiny HTTP/1.1 origin (plain + TLS, in a child process), points at a proxygate that
it starts itself (--start-proxy, fresh per scenario, config benchmarks/bench.ini) or at
--proxy 127.0.0.1:PORT (--direct: no proxy, shows the client+origin ceiling), and prints
req/s, p50/p99 latency and, when it knows the proxy's PID, its CPU us/request and RSS.

  python benchmarks/loadgen.py --start-proxy                      # every scenario
  python benchmarks/loadgen.py --start-proxy get new -d 5          # some of them
  python benchmarks/loadgen.py --proxy 127.0.0.1:3128 --proxy-pid 1234 dk
  python benchmarks/loadgen.py --start-squid bulk bulk-tunnel      # the same against Squid
  python benchmarks/loadgen.py --start-proxy --mitm tunnel-tls bulk-tls   # TLS intercepted
  python benchmarks/loadgen.py --start-proxy --mitm tunnel-h2 tunnel-tls grpc   # h2 vs h1 MITM
  python benchmarks/loadgen.py --start-mitmdump tunnel-h2 grpc    # the same against mitmdump
  python benchmarks/loadgen.py --direct tunnel-h2 grpc            # ceiling: no proxy

Scenarios (defaults; -c/-n/-d/--size override):
  get          GET 1 KiB, absolute-form, keep-alive, 32 conns, time-bound
  new          GET 1 KiB, new TCP connection per request (Connection: close), 16 conns
  tunnel       one CONNECT per conn, many plain-HTTP GET 1 KiB inside, 32 conns
  tunnel-tls   the same with TLS to the origin inside the tunnel
  dk           Datakit replica: 16 clients x 100 POST 172787 B, plain HTTP
  dk-tls       the same through CONNECT + TLS (Datakit's real case)
  bulk         GET 100 MB, plain (absolute-form), 1 conn x 3
  bulk-tunnel  GET 100 MB inside a CONNECT tunnel (plain TCP inside), 1 conn x 3
  bulk-tls     GET 100 MB inside a CONNECT tunnel with TLS to the origin, 1 conn x 3
  tunnel-h2    tunnel-tls over HTTP/2: one CONNECT per conn, TLS with ALPN h2, --streams
               (default 8) GETs of 1 KiB in flight per connection, 8 conns
  grpc         gRPC unary calls (a 128-byte message echoed) through CONNECT (grpc.http_proxy),
               8 channels x --streams calls in flight; needs grpcio (the test extra)
  idle         N idle tunnels (--tunnels, default 2000): proxy RSS per tunnel, idle CPU
With --mitm, tunnel-h2 and grpc are HTTP/2 on both legs (proxygate mirrors the client's ALPN
offer to the origin); --start-mitmdump runs them against mitmdump (mitmproxy), the h2 peer.
Every run is bounded: -n requests per client AND -d seconds, a per-request timeout, and a
SIGALRM kill switch; the processes it started are stopped by PID.
"""

import argparse
import asyncio
import ipaddress
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLK = os.sysconf("SC_CLK_TCK")
perf = time.perf_counter
STARTED = []  # Popen objects we started: the only ones we signal

SCEN = {  # name: (conns, requests per client, path, dict of options)
    "get": (32, 1_000_000, "/bytes/1024", {}),
    "new": (16, 1_000_000, "/bytes/1024", {"new": True}),
    "tunnel": (32, 1_000_000, "/bytes/1024", {"tunnel": True}),
    "tunnel-tls": (32, 1_000_000, "/bytes/1024", {"tunnel": True, "tls": True}),
    "dk": (16, 100, "/v1/write/xxx", {"post": 172787}),
    "dk-tls": (16, 100, "/v1/write/xxx", {"post": 172787, "tunnel": True, "tls": True}),
    "bulk": (1, 3, f"/bytes/{100_000_000}", {}),
    "bulk-tunnel": (1, 3, f"/bytes/{100_000_000}", {"tunnel": True}),
    "bulk-tls": (1, 3, f"/bytes/{100_000_000}", {"tunnel": True, "tls": True}),
    "tunnel-h2": (8, 1_000_000, "/bytes/1024", {"tunnel": True, "tls": True, "h2": True}),
    "grpc": (8, 1_000_000, "/bench.Echo/Unary", {"grpc": True}),
    "idle": (0, 0, "/bytes/16", {"tunnel": True}),
}


# ----------------------------------------------------------------------------- origin
class Origin(asyncio.Protocol):
    """GET /bytes/N -> N bytes; POST anything -> reads the whole body, then "ok\\n"."""

    cache = {}
    chunk = b"x" * (256 * 1024)

    def connection_made(self, tr):
        self.tr, self.buf, self.need, self.left, self.paused = tr, b"", 0, 0, False

    def data_received(self, data):
        if self.need:  # request body: count it, keep nothing
            n = min(self.need, len(data))
            self.need -= n
            data = data[n:]
            if self.need:
                return
            self.tr.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        self.buf += data
        while not self.need and not self.left:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head, self.buf = self.buf[:i].decode("latin-1").split("\r\n"), self.buf[i + 4 :]
            _method, target = head[0].split(" ")[:2]
            hdrs = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])
            }
            if "content-length" in hdrs:
                n = min(int(hdrs["content-length"]), len(self.buf))
                self.need, self.buf = int(hdrs["content-length"]) - n, self.buf[n:]
                if not self.need:
                    self.tr.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                continue
            size = int(target.rsplit("/", 1)[1]) if "/bytes/" in target else -1
            if size < 0:
                self.tr.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            elif size <= 1 << 20:
                r = self.cache.get(size)
                if r is None:
                    r = self.cache[size] = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
                        size,
                        b"x" * size,
                    )
                self.tr.write(r)
            else:
                self.tr.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                self.left = size
                self._stream()

    def _stream(self):
        while self.left and not self.paused:
            n = min(self.left, len(self.chunk))
            self.tr.write(self.chunk if n == len(self.chunk) else self.chunk[:n])
            self.left -= n
        if not self.left and self.buf:
            self.data_received(b"")

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self._stream()


class H2Origin(asyncio.Protocol):
    """HTTP/2 (ALPN h2) on the TLS port: GET /bytes/N -> N bytes, within the client's windows."""

    def connection_made(self, tr):
        import h2.config
        import h2.connection

        self.tr, self.pending = tr, {}
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 << 20)
        tr.write(self.conn.data_to_send())

    def data_received(self, data):
        import h2.events

        conn = self.conn
        try:
            events = conn.receive_data(data)
        except Exception:
            self.tr.abort()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                path = dict(ev.headers).get(b":path", b"")
                size = int(path.rsplit(b"/", 1)[1]) if b"/bytes/" in path else 0
                status = b"200" if b"/bytes/" in path else b"404"
                headers = [(b":status", status), (b"content-length", b"%d" % size)]
                conn.send_headers(ev.stream_id, headers, end_stream=not size)
                if size:
                    self.pending[ev.stream_id] = size
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.pending.pop(ev.stream_id, None)
        self._send()

    def _send(self):
        conn = self.conn
        for sid, left in list(self.pending.items()):
            while left:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, left)
                if n <= 0:
                    break
                left -= n
                conn.send_data(sid, Origin.chunk[:n], end_stream=not left)
            if left:
                self.pending[sid] = left
            else:
                del self.pending[sid]
        data = conn.data_to_send()
        if data:
            self.tr.write(data)


class AlpnOrigin(asyncio.Protocol):
    """The TLS port: HTTP/2 when the client's ALPN chose h2, else HTTP/1.1."""

    def connection_made(self, tr):
        tls = tr.get_extra_info("ssl_object")
        self.inner = H2Origin() if tls and tls.selected_alpn_protocol() == "h2" else Origin()
        self.inner.connection_made(tr)

    def data_received(self, data):
        self.inner.data_received(data)

    def pause_writing(self):
        if isinstance(self.inner, Origin):
            self.inner.pause_writing()

    def resume_writing(self):
        if isinstance(self.inner, Origin):
            self.inner.resume_writing()


async def serve_grpc(certdir):
    """A gRPC echo (bench.Echo/Unary) over TLS if grpcio is installed: its port, else 0."""
    try:
        import grpc
    except ImportError:
        return 0

    async def echo(request, context):
        return request

    server = grpc.aio.server()
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    with open(os.path.join(certdir, "key.pem"), "rb") as k:
        key = k.read()
    with open(os.path.join(certdir, "cert.pem"), "rb") as c:
        cert = c.read()
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    serve_grpc.server = server  # kept for the life of the loop
    return port


async def serve_origin(certdir):
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(certdir, "cert.pem"), os.path.join(certdir, "key.pem"))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    plain = await loop.create_server(Origin, "127.0.0.1", 0, backlog=4096)
    tls = await loop.create_server(AlpnOrigin, "127.0.0.1", 0, backlog=4096, ssl=ctx)
    grpc_port = await serve_grpc(certdir)
    print(plain.sockets[0].getsockname()[1], tls.sockets[0].getsockname()[1], grpc_port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # parent gone (EOF) -> exit


def start_origin(certdir, pin):
    cmd = [sys.executable, __file__, "--serve-origin", certdir] + (["--pin"] if pin else [])
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    STARTED.append(p)
    ports = tuple(int(x) for x in p.stdout.readline().split())
    if len(ports) != 3:
        _cleanup()
        sys.exit("origin did not start")
    return p, ports


def make_cert(d):
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            d + "/key.pem",
            "-out",
            d + "/cert.pem",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )


# ----------------------------------------------------------------------------- proxy
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(a, logdir, pin):
    port = free_port()
    twistd = a.twistd or os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.path.exists(twistd):
        twistd = shutil.which("twistd") or sys.exit("no twistd: pass --twistd")
    cmd = [
        twistd,
        "-n",
        "--pidfile=",
        "proxygate",
        "--config",
        a.config,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--metrics-listen",
        "",
    ]
    if a.mitm:
        # proxygate creates the CA on its first start (the client trusts it from then on) and
        # verifies the origin's self-signed certificate.
        for key, value in (
            ("enabled", "on"),
            ("ca_cert", os.path.join(logdir, "mitm-ca.pem")),
            ("ca_key", os.path.join(logdir, "mitm-ca.key")),
            ("upstream_ca_bundle", os.path.join(logdir, "cert.pem")),
        ):
            cmd += ["--set", f"mitm.{key}={value}"]
    # this working tree's gateway/ and twisted/plugins, whatever the cwd or the install state
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    return _launch("proxygate", cmd, port, logdir, pin, env), port


# The peer for the scenarios the shared harness lacks (bulk through a tunnel): Squid as
# ../shared/bench configures it, except that CONNECT may reach the origin's random port.
SQUID_CONF = """http_port 127.0.0.1:{port}
workers 1
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
logfile_rotate 0
pinger_enable off
shutdown_lifetime 0 seconds
visible_hostname bench
via off
forwarded_for transparent
max_filedescriptors 65536
acl bench_client src 127.0.0.1/32
http_access allow bench_client
http_access deny all
"""


def start_squid(a, logdir, pin):
    squid = shutil.which("squid") or shutil.which("/usr/sbin/squid") or sys.exit("no squid")
    port = free_port()
    d = tempfile.mkdtemp(prefix="squid-", dir=logdir)
    os.chmod(d, 0o777)  # squid drops to its own user for the cache log
    conf = os.path.join(d, "squid.conf")
    with open(conf, "w") as f:
        f.write(SQUID_CONF.format(port=port, d=d))
    return _launch("squid", [squid, "-N", "-f", conf], port, logdir, pin, None), port


def start_mitmdump(a, logdir, pin):
    """mitmdump (mitmproxy) intercepting, trusting the origin's certificate: the h2 peer."""
    exe = a.mitmdump or shutil.which("mitmdump") or "/tmp/benchvenv/bin/mitmdump"
    if not os.path.exists(exe):
        sys.exit("no mitmdump: pass --mitmdump PATH (benchmarks/run_peers.sh --install has one)")
    port = free_port()
    confdir = os.path.join(logdir, "mitmdump")
    cmd = [
        exe, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
        "--set", f"confdir={confdir}",
        "--set", f"ssl_verify_upstream_trusted_ca={os.path.join(logdir, 'cert.pem')}",
    ]  # fmt: skip
    return _launch("mitmdump", cmd, port, logdir, pin, None), port


def _launch(name, cmd, port, logdir, pin, env):
    """Start a proxy, pinned to CPU0 if asked, and wait until it accepts on port."""
    log = open(os.path.join(logdir, f"{name}-{port}.log"), "w")  # noqa: SIM115
    p = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    STARTED.append(p)
    if pin:
        os.sched_setaffinity(p.pid, {0})
    for _ in range(300):
        if p.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p
        except OSError:
            time.sleep(0.05)
    stop(p)
    with open(log.name) as f:
        sys.exit(f"{name} did not start, see {log.name}:\n{f.read()[-2000:]}")


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    if p in STARTED:
        STARTED.remove(p)


def proc_cpu(pid):
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fl = f.read().rsplit(")", 1)[1].split()
    return (int(fl[11]) + int(fl[12])) / CLK


def proc_mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith(("VmRSS:", "VmHWM:")):
                out[ln[:5]] = int(ln.split()[1]) / 1024.0
    return out


# ----------------------------------------------------------------------------- client
class Conn(asyncio.Protocol):
    """Reads one response at a time (Content-Length or read-until-close)."""

    def __init__(self):
        self.tr, self.buf, self.fut, self.closed = None, b"", None, False
        self.left, self.nbytes = -1, 0

    def connection_made(self, tr):
        self.tr = tr

    def expect(self):
        self.fut = asyncio.get_running_loop().create_future()
        self.left, self.nbytes = -1, 0
        return self.fut

    def connection_lost(self, exc):
        self.closed = True
        if self.fut and not self.fut.done():
            if self.left == -2:  # read-until-close body
                self.fut.set_result((self.status, False, self.nbytes))
            else:
                self.fut.set_exception(ConnectionError("closed by peer"))

    def data_received(self, data):
        if 0 < len(data) < self.left and not self.buf:  # body bytes: count, keep nothing
            self.left -= len(data)
            self.nbytes += len(data)
            return
        self.buf += data
        if self.left == -1:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0 or self.fut is None or self.fut.done():
                return
            lines = self.buf[:i].lower().split(b"\r\n")
            self.buf = self.buf[i + 4 :]
            self.status = int(lines[0].split()[1])
            self.ka = not lines[0].startswith(b"http/1.0")
            self.left = -2
            for ln in lines[1:]:
                k, _, v = ln.partition(b":")
                if k == b"content-length":
                    self.left = int(v)
                elif k in (b"connection", b"proxy-connection") and b"close" in v:
                    self.ka = False
            if self.status == 200 and self.no_body:
                self.left = 0
            if 0 < len(self.buf) < self.left:  # part of the body came with the head
                self.left -= len(self.buf)
                self.nbytes += len(self.buf)
                self.buf = b""
                return
        if self.left == -2:
            self.nbytes += len(self.buf)
            self.buf = b""
        elif len(self.buf) >= self.left:
            self.nbytes += self.left
            self.buf = self.buf[self.left :]
            self.left = -1
            if not self.fut.done():
                self.fut.set_result((self.status, self.ka and self.left != -2, self.nbytes))

    def timeout(self):
        if self.fut and not self.fut.done():
            self.fut.set_exception(TimeoutError("request timed out"))


class H2Client(Conn):
    """Conn for the CONNECT, then HTTP/2 (the h2 library) after TLS: many streams at once."""

    h2 = None

    def start_h2(self):
        import h2.config
        import h2.connection

        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 << 20)
        self.streams = {}  # stream id -> [future, status, body bytes]
        self.tr.write(self.h2.data_to_send())

    def request(self, headers):
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=True)
        self.tr.write(self.h2.data_to_send())
        fut = asyncio.get_running_loop().create_future()
        self.streams[sid] = [fut, 0, 0]
        return fut

    def data_received(self, data):
        if self.h2 is None:
            return super().data_received(data)
        import h2.events

        try:
            events = self.h2.receive_data(data)
        except Exception as e:
            self._fail(e)
            return
        for ev in events:
            st = self.streams.get(getattr(ev, "stream_id", None))
            if isinstance(ev, h2.events.ResponseReceived) and st:
                st[1] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if st:
                    st[2] += len(ev.data)
            elif isinstance(ev, h2.events.StreamEnded) and st:
                del self.streams[ev.stream_id]
                if not st[0].done():
                    st[0].set_result((st[1], True, st[2]))
            elif isinstance(ev, h2.events.StreamReset) and st:
                del self.streams[ev.stream_id]
                if not st[0].done():
                    st[0].set_exception(ConnectionError(f"stream reset {ev.error_code!r}"))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._fail(ConnectionError(f"GOAWAY {ev.error_code!r}"))
        out = self.h2.data_to_send()
        if out:
            self.tr.write(out)

    def _fail(self, e):
        self.closed = True
        for fut, _, _ in self.streams.values():
            if not fut.done():
                fut.set_exception(e)
        self.streams = {}

    def connection_lost(self, exc):
        if self.h2 is None:
            return super().connection_lost(exc)
        self._fail(ConnectionError("closed by peer"))


class Run:
    def __init__(self, a, name, proxy, origin, sslctx, cafile):
        self.a, self.name, self.proxy, self.sslctx, self.cafile = a, name, proxy, sslctx, cafile
        self.grpc_port = origin[2]
        self.h2ctx = ssl.create_default_context(cafile=cafile)
        self.h2ctx.set_alpn_protocols(["h2"])
        c, n, path, self.o = SCEN[name]
        self.c, self.n = a.concurrency or c, a.requests or n
        if a.size and "/bytes/" in path:
            path = f"/bytes/{a.size}"
        self.port = origin[1] if self.o.get("tls") else origin[0]
        auth = f"127.0.0.1:{self.port}"
        target = "http://" + auth + path if proxy and not self.o.get("tunnel") else path
        body = b"cpu,host=bench usage_idle=99.5 1700000000000000000\n" * 4000
        body = body[: self.o["post"]] if "post" in self.o else b""
        method = "POST" if body else "GET"
        head = f"{method} {target} HTTP/1.1\r\nHost: {auth}\r\nUser-Agent: loadgen/1\r\n"
        head += f"Content-Length: {len(body)}\r\n" if body else ""
        head += "Connection: close\r\n" if self.o.get("new") else ""
        self.req = (head + "\r\n").encode() + body
        self.connect = (f"CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n\r\n").encode()
        self.h2head = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", auth.encode()),
                       (b":path", path.encode()), (b"user-agent", b"loadgen/1")]  # fmt: skip
        self.lat, self.ok, self.bad, self.errors, self.bytes = [], 0, 0, {}, 0
        self.attempts = 0

    async def open(self):
        loop = asyncio.get_running_loop()
        host, port = self.proxy or ("127.0.0.1", self.port)
        tr, conn = await loop.create_connection(H2Client if self.o.get("h2") else Conn, host, port)
        if self.proxy and self.o.get("tunnel"):
            conn.no_body = True
            fut = conn.expect()
            tr.write(self.connect)
            status = (await asyncio.wait_for(fut, self.a.timeout))[0]
            if status != 200:
                tr.abort()
                raise ConnectionError(f"CONNECT answered {status}")
        conn.no_body = False
        if self.o.get("h2"):
            conn.tr = await loop.start_tls(tr, conn, self.h2ctx, server_hostname="127.0.0.1")
            chosen = conn.tr.get_extra_info("ssl_object").selected_alpn_protocol()
            if chosen != "h2":
                conn.tr.abort()
                raise ConnectionError(f"ALPN chose {chosen!r}, not h2")
            conn.start_h2()
        elif self.o.get("tls"):
            conn.tr = await loop.start_tls(tr, conn, self.sslctx, server_hostname="127.0.0.1")
        return conn

    async def client(self, deadline):
        loop = asyncio.get_running_loop()
        conn = None
        for _ in range(self.n):
            t0 = perf()
            if t0 >= deadline:
                break
            self.attempts += 1
            try:
                if conn is None or conn.closed:
                    conn = await asyncio.wait_for(self.open(), self.a.timeout)
                t1 = perf()
                fut = conn.expect()
                h = loop.call_later(self.a.timeout, conn.timeout)
                conn.tr.write(self.req)
                try:
                    status, ka, nb = await fut
                finally:
                    h.cancel()
            except Exception as e:  # every failure is counted, then a short pause
                if t0 >= self.measure_start:
                    k = f"{type(e).__name__}: {e}"
                    self.errors[k] = self.errors.get(k, 0) + 1
                if conn is not None:
                    conn.tr.abort()
                conn = None
                await asyncio.sleep(0.01)
                continue
            t2 = perf()
            if t0 >= self.measure_start:
                self.lat.append(t2 - (t0 if self.o.get("new") else t1))
                self.bytes += nb + len(self.req)
                self.ok += 200 <= status < 300
                self.bad += not 200 <= status < 300
                self.last = t2
            if self.o.get("new") or not ka:
                conn.tr.close()
                conn = None
        if conn is not None:
            conn.tr.close()

    def _record(self, t0, t1, t2, status, nbytes):
        if t0 >= self.measure_start:
            self.lat.append(t2 - t1)
            self.bytes += nbytes
            self.ok += 200 <= status < 300
            self.bad += not 200 <= status < 300
            self.last = t2

    def _error(self, t0, e):
        if t0 >= self.measure_start:
            k = f"{type(e).__name__}: {e}"
            self.errors[k] = self.errors.get(k, 0) + 1

    async def client_h2(self, deadline):
        """One h2 connection (through CONNECT), --streams requests in flight on it."""
        t0 = perf()
        try:
            conn = await asyncio.wait_for(self.open(), self.a.timeout)
        except Exception as e:
            self._error(t0, e)
            return

        async def stream():
            for _ in range(self.n):
                t1 = perf()
                if t1 >= deadline or conn.closed:
                    break
                self.attempts += 1
                try:
                    status, _, nb = await asyncio.wait_for(
                        conn.request(self.h2head), self.a.timeout
                    )
                except Exception as e:
                    self._error(t1, e)
                    break
                self._record(t1, t1, perf(), status, nb + 64)

        try:
            await asyncio.gather(*(stream() for _ in range(self.a.streams)))
        finally:
            conn.tr.close()

    async def client_grpc(self, deadline):
        """One gRPC channel (through the proxy's CONNECT), --streams unary calls in flight."""
        import grpc

        if self.proxy:
            options = [("grpc.http_proxy", f"http://{self.proxy[0]}:{self.proxy[1]}")]
        else:
            options = [("grpc.enable_http_proxy", 0)]
        with open(self.cafile, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.grpc_port}", credentials, options=options
        )
        call = channel.unary_unary("/bench.Echo/Unary")
        message = b"x" * 128

        async def calls():
            for _ in range(self.n):
                t1 = perf()
                if t1 >= deadline:
                    break
                self.attempts += 1
                try:
                    reply = await call(message, timeout=self.a.timeout)
                except Exception as e:
                    self._error(t1, e)
                    await asyncio.sleep(0.01)
                    continue
                self._record(t1, t1, perf(), 200 if reply == message else 500, 2 * len(message))

        try:
            await asyncio.gather(*(calls() for _ in range(self.a.streams)))
        finally:
            await channel.close()

    async def go(self, pid, origin_pid):
        a, loop = self.a, asyncio.get_running_loop()
        warm = a.warmup if self.n > 1000 else 0  # count-bound scenarios: no warmup
        self.measure_start = perf() + warm
        self.last = self.measure_start
        snap = {}
        loop.call_at(
            loop.time() + warm,
            lambda: snap.update(
                t=perf(), cpu=proc_cpu(pid), ocpu=proc_cpu(origin_pid), me=resource.getrusage(0)
            ),
        )
        deadline = self.measure_start + a.duration
        client = (
            self.client_h2
            if self.o.get("h2")
            else self.client_grpc
            if self.o.get("grpc")
            else self.client
        )
        await asyncio.gather(*(client(deadline) for _ in range(self.c)))
        t1, cpu1, ocpu1, me1 = perf(), proc_cpu(pid), proc_cpu(origin_pid), resource.getrusage(0)
        wall, n = max(t1 - snap["t"], 1e-9), len(self.lat)
        window = max(self.last - self.measure_start, 1e-9)
        lat = sorted(self.lat)
        ms = lambda q: round(1000 * lat[min(n - 1, int(q * n))], 3) if n else None  # noqa: E731
        r = dict(
            scenario=self.name,
            conns=self.c,
            requests=n,
            ok=self.ok,
            non2xx=self.bad,
            errors=self.errors,
            rps=round(n / window, 1),
            p50_ms=ms(0.5),
            p99_ms=ms(0.99),
            max_ms=ms(1.0),
            mb_s=round(self.bytes / window / 1e6, 1),
            client_cpu_pct=round(
                100
                * (me1.ru_utime + me1.ru_stime - snap["me"].ru_utime - snap["me"].ru_stime)
                / wall
            ),
            origin_cpu_pct=round(100 * (ocpu1 - snap["ocpu"]) / wall),
        )
        if pid:
            r.update(
                proxy_cpu_pct=round(100 * (cpu1 - snap["cpu"]) / wall),
                proxy_cpu_us_per_req=round(1e6 * (cpu1 - snap["cpu"]) / max(n, 1), 1),
                **{
                    ("proxy_rss_mb" if k == "VmRSS" else "proxy_peak_rss_mb"): round(v, 1)
                    for k, v in proc_mem(pid).items()
                },
            )
        return r

    async def idle(self, pid):
        """Open N tunnels, one request in each, hold them idle, report proxy RSS/CPU."""
        base = proc_mem(pid)["VmRSS"] if pid else 0
        sem, conns = asyncio.Semaphore(64), []

        async def one():
            async with sem:
                conn = await asyncio.wait_for(self.open(), self.a.timeout)
                conns.append(conn)
                fut = conn.expect()
                conn.tr.write(self.req)
                await asyncio.wait_for(fut, self.a.timeout)

        t0 = perf()
        res = await asyncio.gather(*(one() for _ in range(self.a.tunnels)), return_exceptions=True)
        errs = [r for r in res if isinstance(r, Exception)]
        setup = perf() - t0
        cpu0 = proc_cpu(pid)
        await asyncio.sleep(self.a.hold)
        r = dict(
            scenario="idle",
            tunnels=self.a.tunnels - len(errs),
            errors=len(errs),
            first_error=repr(errs[0]) if errs else None,
            setup_s=round(setup, 2),
        )
        if pid:
            m = proc_mem(pid)
            r.update(
                proxy_rss_before_mb=round(base, 1),
                proxy_rss_mb=round(m["VmRSS"], 1),
                proxy_peak_rss_mb=round(m["VmHWM"], 1),
                kb_per_tunnel=round(1024 * (m["VmRSS"] - base) / max(1, len(conns)), 1),
                idle_cpu_pct=round(100 * (proc_cpu(pid) - cpu0) / self.a.hold, 1),
            )
        for c in conns:
            c.tr.abort()
        return r


def fmt(r):
    if r["scenario"] == "idle":
        if "proxy_rss_mb" not in r:
            return str(r)
        return (
            f"idle        {r['tunnels']} tunnels (errors {r['errors']}) in {r['setup_s']}s; "
            f"proxy RSS {r['proxy_rss_before_mb']} -> {r['proxy_rss_mb']} MB "
            f"({r['kb_per_tunnel']} KiB/tunnel), idle CPU {r['idle_cpu_pct']}%"
        )
    s = (
        f"{r['scenario']:<11} {r['rps']:8.0f} req/s  p50 {r['p50_ms'] or 0:7.2f} ms  "
        f"p99 {r['p99_ms'] or 0:7.2f} ms  {r['mb_s']:7.1f} MB/s  ok {r['ok']} "
        f"non2xx {r['non2xx']} err {sum(r['errors'].values())}"
    )
    if "proxy_cpu_us_per_req" in r:
        s += (
            f"  | proxy {r['proxy_cpu_pct']}% CPU {r['proxy_cpu_us_per_req']:.0f} us/req "
            f"RSS {r['proxy_rss_mb']:.1f} MB peak {r['proxy_peak_rss_mb']:.1f} MB"
        )
    s += f"  | client {r['client_cpu_pct']}% origin {r['origin_cpu_pct']}%"
    return s + (f"\n    errors: {r['errors']}" if r["errors"] else "")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("scenarios", nargs="*", help=f"default: all ({' '.join(SCEN)})")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--start-proxy", action="store_true", help="start proxygate, fresh per scenario")
    g.add_argument("--start-squid", action="store_true", help="start squid (the peer), same way")
    g.add_argument("--proxy", help="HOST:PORT of a running proxy (loopback only)")
    g.add_argument("--direct", action="store_true", help="no proxy: client+origin ceiling")
    g.add_argument("--start-mitmdump", action="store_true", help="start mitmdump (intercepting)")
    ap.add_argument("--mitm", action="store_true", help="with --start-proxy: [mitm] on")
    ap.add_argument("--mitmdump", help="mitmdump to run (default: PATH, /tmp/benchvenv)")
    ap.add_argument("--streams", type=int, default=8, help="tunnel-h2, grpc: in flight per conn")
    ap.add_argument("--proxy-pid", type=int, help="PID of --proxy, to read its CPU and RSS")
    ap.add_argument("--config", default=os.path.join(HERE, "bench.ini"))
    ap.add_argument("--twistd", help="twistd to run (default: next to this python)")
    ap.add_argument("-c", "--concurrency", type=int, default=0)
    ap.add_argument("-n", "--requests", type=int, default=0, help="max requests per client")
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="max measured seconds")
    ap.add_argument("-w", "--warmup", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=0, help="response size for get/new/tunnel/bulk")
    ap.add_argument("--tunnels", type=int, default=2000, help="idle: number of tunnels (max 8000)")
    ap.add_argument("--hold", type=float, default=2.0, help="idle: seconds to hold them")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--no-pin", action="store_true", help="default: proxy CPU0, client+origin CPU1")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve-origin", metavar="CERTDIR", help=argparse.SUPPRESS)
    ap.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_origin:
        if a.pin:
            os.sched_setaffinity(0, {1})
        signal.alarm(3600)
        return asyncio.run(serve_origin(a.serve_origin))
    bad = [s for s in a.scenarios if s not in SCEN]
    if bad or not 0 < a.duration <= 600 or not 0 < a.tunnels <= 8000:
        ap.error(f"bad scenario {bad} / duration / tunnels")
    proxy = None
    if a.proxy:
        h, _, p = a.proxy.rpartition(":")
        if not ipaddress.ip_address(socket.gethostbyname(h.strip("[]"))).is_loopback:
            sys.exit("--proxy must be a loopback address")
        proxy = (h.strip("[]"), int(p))
    elif not (a.start_proxy or a.start_squid or a.start_mitmdump or a.direct):
        ap.error(
            "one of --start-proxy, --start-squid, --start-mitmdump, --proxy HOST:PORT, --direct"
        )
    if not 0 < a.streams <= 1000:
        ap.error("--streams: 1-1000")
    if a.mitm and not a.start_proxy:
        ap.error("--mitm needs --start-proxy")
    pin = not a.no_pin and len(os.sched_getaffinity(0)) >= 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    todo = a.scenarios or list(SCEN)
    budget = len(todo) * (a.duration + a.warmup + a.timeout + 15) + 30
    signal.signal(signal.SIGALRM, lambda *_: (_cleanup(), os._exit(3)))
    signal.signal(signal.SIGTERM, lambda *_: (_cleanup(), os._exit(1)))
    signal.alarm(int(budget))
    tmp = tempfile.mkdtemp(prefix="loadgen-")
    make_cert(tmp)
    origin_proc, origin = start_origin(tmp, pin)
    if pin:
        os.sched_setaffinity(0, {1})
    if "grpc" in todo and not origin[2]:
        _cleanup()
        sys.exit("the grpc scenario needs grpcio (pip install grpcio)")
    cafile = os.path.join(tmp, "cert.pem")
    sslctx = ssl.create_default_context(cafile=cafile)
    results = []
    try:
        for name in todo:
            pproc = None
            if a.start_proxy or a.start_squid or a.start_mitmdump:
                start = start_proxy if a.start_proxy else start_squid
                pproc, port = (start_mitmdump if a.start_mitmdump else start)(a, tmp, pin)
                proxy = ("127.0.0.1", port)
                if a.mitm or a.start_mitmdump:
                    cafile = os.path.join(tmp, "mitm-ca.pem")
                    if a.start_mitmdump:
                        cafile = os.path.join(tmp, "mitmdump", "mitmproxy-ca-cert.pem")
                    sslctx = ssl.create_default_context(cafile=cafile)
            pid = pproc.pid if pproc else a.proxy_pid
            run = Run(a, name, proxy, origin, sslctx, cafile)
            try:
                r = asyncio.run(run.idle(pid) if name == "idle" else run.go(pid, origin_proc.pid))
            finally:
                if pproc:
                    if pproc.poll() is not None:
                        print(f"the proxy exited (rc {pproc.returncode}), log in {tmp}")
                    stop(pproc)
            results.append(r)
            print(json.dumps(r) if a.json else fmt(r), flush=True)
    finally:
        _cleanup()
    return 0


def _cleanup():
    for p in list(STARTED):
        if p.stdin:
            p.stdin.close()
        stop(p)


if __name__ == "__main__":
    sys.exit(main())
