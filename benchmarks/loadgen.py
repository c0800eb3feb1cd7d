#!/usr/bin/env python3
"""loadgen.py -- proxygate's own small load generator (asyncio, stdlib, loopback only).

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
               (default 8) GETs of 1 KiB in flight per connection, 8 conns; client and origin
               speak HTTP/2 themselves (H2Lean below; needs hpack, installed with h2)
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
import struct
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


# ----------------------------------------------------------------------------- lean HTTP/2
# tunnel-h2's client and origin speak HTTP/2 (RFC 9113) themselves: frames parsed with struct
# from one bytearray, our header blocks built once (static table and literals that are never
# indexed, so what we send never depends on the peer's HPACK state), hpack's Decoder only for the
# blocks peers send, remembered while its dynamic table stands still. Built on the h2 library, the
# two spent their CPU in it and stopped at ~4,800 req/s on their shared core, below what the
# proxies they measure can do.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME = struct.Struct(">HBBBL")  # a frame header: length (24 bits: 16 + 8), type, flags, stream
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
MAX_WINDOW = (1 << 31) - 1  # what both ends grant: window updates are rare
REFILL = 1 << 30  # received bytes after which a window is topped up again
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE: we keep the default
H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
             5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL",
             9: "COMPRESSION_ERROR", 11: "ENHANCE_YOUR_CALM"}  # fmt: skip
CHUNK = b"x" * (256 * 1024)  # every body is slices of this


class H2Error(Exception):
    """A connection error (RFC 9113 5.4.1): answered with GOAWAY and the end of the connection."""

    def __init__(self, code, why):
        super().__init__(f"{H2_ERRORS.get(code, code)}: {why}")
        self.code = code


def h2frame(ftype, flags, stream, payload=b""):
    n = len(payload)
    return FRAME.pack(n >> 8, n & 0xFF, ftype, flags, stream) + payload


def h2settings(pairs):
    return h2frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def hpack_int(value, bits, pattern=0):
    """An HPACK integer (RFC 7541 5.1) in a bits-bit prefix under pattern."""
    top = (1 << bits) - 1
    if value < top:
        return bytes([pattern | value])
    out, value = [pattern | top], value - top
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    return bytes([*out, value])


def hpack_literal(index, value):
    """A field whose name is static-table entry index, its value a plain literal never indexed
    (RFC 7541 6.2.2): the peer's dynamic table is neither used nor changed."""
    return hpack_int(index, 4) + hpack_int(len(value), 7) + value


def request_block(authority, path):
    """GET https://authority/path: :method GET (2) and :scheme https (7) fully static."""
    return (
        b"\x82\x87"
        + hpack_literal(1, authority)
        + hpack_literal(4, path)
        + hpack_literal(58, b"loadgen/1")
    )


def response_block(status, size):
    """:status 200 (8) or 404 (13) fully static, the rest never indexed."""
    return (
        (b"\x88" if status == 200 else b"\x8d")
        + hpack_literal(31, b"application/octet-stream")
        + hpack_literal(28, b"%d" % size)
    )


class BlockDecoder:
    """hpack's Decoder, with the fields of every block that left its dynamic table alone
    remembered until the table changes: the same bytes on the same table mean the same fields,
    and a proxy that indexes what it sends repeats a few identical bytes per message."""

    def __init__(self):
        import hpack

        self.dec, self.seen = hpack.Decoder(), {}
        self.table = self.dec.header_table

    def decode(self, block):
        fields = self.seen.get(block)
        if fields is not None:
            return fields
        table = self.table
        entries = table.dynamic_entries
        # every entry added is a new tuple: the newest one, held here, tells whether any was
        size, newest, limit = len(entries), entries[0] if entries else None, table.maxsize
        try:
            fields = self.dec.decode(block, raw=True)
        except Exception as e:  # every hpack error: the connection's HPACK state is lost
            raise H2Error(9, f"{type(e).__name__}: {e}") from None
        if (
            len(entries) == size
            and (entries[0] if entries else None) is newest
            and table.maxsize == limit
        ):
            if len(self.seen) < 256:
                self.seen[block] = fields
        elif self.seen:
            self.seen = {}  # the table moved: what they meant may have moved too
        return fields


class H2Lean:
    """What both ends share, sans-IO: feed() the bytes read, take() the bytes to write.

    Connection-level work happens here (SETTINGS and their ACK, PING, the connection windows,
    header blocks with their CONTINUATIONs); streams go to the on_* methods of the subclass."""

    server = False

    def __init__(self, settings):
        self.inbuf, self.block = bytearray(), None
        self.out = [] if self.server else [PREFACE]
        self.out += [
            h2settings(settings),
            h2frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - 65535).to_bytes(4, "big")),
        ]
        self.need_preface = self.server
        self.received = 0  # connection-window bytes received since our last WINDOW_UPDATE
        self.send_window, self.peer_window, self.peer_frame = 65535, 65535, 16384
        self.peer_streams = 1 << 31
        self.table_update = b""  # our next header block first says "my table is 0 bytes"
        self.hpack = BlockDecoder()
        self.handlers = (
            None, self._headers, None, self._rst, self._settings, self._push,
            self._ping, self._goaway, self._window, self._continuation,
        )  # fmt: skip

    def take(self):
        out = self.out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def goaway(self, code, last=0):
        self.out.append(h2frame(GOAWAY, 0, 0, struct.pack(">LL", last, code)))

    def feed(self, data):
        buf = self.inbuf
        buf += data
        pos, end = 0, len(buf)
        if self.need_preface:
            if buf[: min(end, 24)] != PREFACE[: min(end, 24)]:
                raise H2Error(1, "not the HTTP/2 client preface")
            if end < 24:
                return
            pos, self.need_preface = 24, False
        handlers = self.handlers
        try:
            while end - pos >= 9:
                hi, lo, ftype, flags, stream = FRAME.unpack_from(buf, pos)
                n = hi << 8 | lo
                if n > MAX_FRAME:
                    raise H2Error(6, f"a frame of {n} bytes")
                start = pos + 9
                if start + n > end:
                    break
                pos = start + n
                stream &= 0x7FFFFFFF
                if self.block is not None and ftype != CONTINUATION:
                    raise H2Error(1, "a header block cut by another frame")
                if ftype == DATA:
                    self.received += n
                    if self.received >= REFILL:
                        self.out.append(
                            h2frame(WINDOW_UPDATE, 0, 0, self.received.to_bytes(4, "big"))
                        )
                        self.received = 0
                    pad = buf[start] + 1 if flags & PADDED and n else 0
                    if pad > n or not stream:
                        raise H2Error(1, "bad DATA frame")
                    self.on_data(stream, flags & END_STREAM, n - pad, n)
                elif ftype < 10 and handlers[ftype]:
                    handlers[ftype](flags, stream, bytes(buf[start:pos]))
                # PRIORITY and unknown frame types are ignored (RFC 9113 4.1, 5.3.2)
        finally:
            del buf[:pos]

    def _headers(self, flags, stream, payload):
        if flags & (PADDED | PRIORITY_FLAG):
            i, end = 0, len(payload)
            if flags & PADDED:
                i, end = 1, end - payload[0]
            i += 5 if flags & PRIORITY_FLAG else 0
            if i > end or not stream:
                raise H2Error(1, "bad HEADERS frame")
            payload = payload[i:end]
        if flags & END_HEADERS:
            self.on_headers(stream, flags & END_STREAM, self.hpack.decode(payload))
        else:
            self.block = [stream, flags, bytearray(payload)]

    def _continuation(self, flags, stream, payload):
        if self.block is None or self.block[0] != stream:
            raise H2Error(1, "CONTINUATION without its HEADERS")
        self.block[2] += payload
        if flags & END_HEADERS:
            stream, first, block = self.block
            self.block = None
            self.on_headers(stream, first & END_STREAM, self.hpack.decode(bytes(block)))

    def _settings(self, flags, stream, payload):
        if stream or len(payload) % 6 or (flags & ACK and payload):
            raise H2Error(1, "bad SETTINGS frame")
        if flags & ACK:
            return
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, i)
            if key == 1:  # the limit for our blocks' table: we index nothing, and our next
                self.table_update = b"\x20"  # block says so (RFC 7541 4.2: a size update)
            elif key == 3:
                self.peer_streams = value
            elif key == 4:
                if value > MAX_WINDOW:
                    raise H2Error(3, "INITIAL_WINDOW_SIZE too large")
                self.window_delta(value - self.peer_window)
                self.peer_window = value
            elif key == 5:
                if not 16384 <= value < 1 << 24:
                    raise H2Error(1, "bad MAX_FRAME_SIZE")
                self.peer_frame = value
        self.out.append(h2frame(SETTINGS, ACK, 0))

    def _ping(self, flags, stream, payload):
        if stream or len(payload) != 8:
            raise H2Error(1, "bad PING frame")
        if not flags & ACK:
            self.out.append(h2frame(PING, ACK, 0, payload))

    def _window(self, flags, stream, payload):
        if len(payload) != 4:
            raise H2Error(6, "bad WINDOW_UPDATE frame")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream:
            self.on_window(stream, inc)
        elif not inc:
            raise H2Error(1, "a WINDOW_UPDATE of 0")
        else:
            self.send_window += inc

    def _rst(self, flags, stream, payload):
        if len(payload) != 4 or not stream:
            raise H2Error(1, "bad RST_STREAM frame")
        self.on_reset(stream, int.from_bytes(payload, "big"))

    def _goaway(self, flags, stream, payload):
        if len(payload) < 8 or stream:
            raise H2Error(1, "bad GOAWAY frame")
        last, code = struct.unpack_from(">LL", payload)
        self.on_goaway(last & 0x7FFFFFFF, code)

    def _push(self, flags, stream, payload):
        raise H2Error(1, "PUSH_PROMISE, push is off")

    def window_delta(self, delta):
        """The peer changed INITIAL_WINDOW_SIZE: every open stream's window moves by delta."""

    def on_window(self, stream, inc):
        """A stream's WINDOW_UPDATE: only an end that sends bodies cares."""


class H2ClientSession(H2Lean):
    """The load's side: one pre-encoded GET, many streams; owner.done(state) when a response
    ends, owner.failed(state, error) when the peer resets its stream, owner.lost(error) on GOAWAY.
    A stream's state: [start time, :status, body bytes, flow-controlled bytes since a refill]."""

    def __init__(self, authority, path, owner):
        # no push; the peer may send 2 GiB per stream and per connection before it has to wait
        super().__init__([(2, 0), (4, MAX_WINDOW)])
        self.owner, self.streams, self.next_stream, self.closed = owner, {}, 1, False
        self.req = request_block(authority, path)

    def request(self, start):
        stream, block = self.next_stream, self.req
        self.next_stream += 2
        if self.table_update:
            block, self.table_update = self.table_update + block, b""
        n = len(block)
        self.out.append(
            FRAME.pack(n >> 8, n & 0xFF, HEADERS, END_STREAM | END_HEADERS, stream) + block
        )
        self.streams[stream] = [start, 0, 0, 0]
        return stream

    def on_headers(self, stream, end, fields):
        st = self.streams.get(stream)
        if st is None:  # a stream we gave up: its block was still decoded, for the table
            return
        if not st[1]:
            status = fields[0][1] if fields and fields[0][0] == b":status" else b""
            st[1] = int(status) if status.isdigit() and len(status) == 3 else -1
            if 100 <= st[1] < 200 and not end:  # informational: the real answer follows
                st[1] = 0
                return
        if end:
            del self.streams[stream]
            self.owner.done(st)

    def on_data(self, stream, end, size, flowed):
        st = self.streams.get(stream)
        if st is None:
            return
        st[2] += size
        st[3] += flowed
        if st[3] >= REFILL:
            self.out.append(h2frame(WINDOW_UPDATE, 0, stream, st[3].to_bytes(4, "big")))
            st[3] = 0
        if end:
            del self.streams[stream]
            self.owner.done(st)

    def on_reset(self, stream, code):
        st = self.streams.pop(stream, None)
        if st is not None:
            self.owner.failed(st, ConnectionError(f"stream reset {H2_ERRORS.get(code, code)}"))

    def on_goaway(self, last, code):
        self.closed = True
        self.owner.lost(ConnectionError(f"GOAWAY {H2_ERRORS.get(code, code)}"))


class H2OriginSession(H2Lean):
    """The origin's side: GET /bytes/N -> N bytes (else 404), answered as soon as the request's
    HEADERS arrive, the body within the client's windows. Answers are built once per path."""

    server = True
    answers = {}  # :path -> (header block, body size, body if it fits one frame)

    def __init__(self):
        super().__init__([(4, MAX_WINDOW)])
        self.pending = {}  # stream -> [its send window, body bytes left]
        self.last_stream = 0

    def on_headers(self, stream, end, fields):
        if stream <= self.last_stream or not stream & 1:  # trailers, or not a client stream
            return
        self.last_stream = stream
        path = b""
        for name, value in fields:
            if name == b":path":
                path = value
                break
        answer = self.answers.get(path)
        if answer is None:
            _, bytes_, tail = path.rpartition(b"/bytes/")
            size = int(tail) if bytes_ and tail.isdigit() else -1
            block = response_block(200, size) if size >= 0 else response_block(404, 0)
            answer = (block, max(size, 0), CHUNK[:size] if 0 <= size <= MAX_FRAME else None)
            if len(self.answers) < 64:
                self.answers[path] = answer
        block, size, body = answer
        if self.table_update:
            block, self.table_update = self.table_update + block, b""
        n, out = len(block), self.out
        out.append(
            FRAME.pack(
                n >> 8, n & 0xFF, HEADERS, END_HEADERS if size else END_HEADERS | END_STREAM, stream
            )
            + block
        )
        if not size:
            return
        if (
            body is not None
            and size <= self.peer_frame
            and size <= self.peer_window
            and size <= self.send_window
        ):
            self.send_window -= size
            out.append(FRAME.pack(size >> 8, size & 0xFF, DATA, END_STREAM, stream) + body)
        else:
            self.pending[stream] = [self.peer_window, size]

    def pump(self, limit=1 << 18):
        """DATA for the waiting streams, as far as the windows allow, about limit bytes."""
        sent, out = 0, self.out
        for stream, st in list(self.pending.items()):
            while st[1] and st[0] > 0 and self.send_window > 0 and sent < limit:
                n = min(st[1], st[0], self.send_window, self.peer_frame, len(CHUNK))
                st[0] -= n
                st[1] -= n
                self.send_window -= n
                sent += n
                out.append(FRAME.pack(n >> 8, n & 0xFF, DATA, 0 if st[1] else END_STREAM, stream))
                out.append(CHUNK if n == len(CHUNK) else CHUNK[:n])
            if not st[1]:
                del self.pending[stream]
            if self.send_window <= 0 or sent >= limit:
                break
        return sent

    def on_data(self, stream, end, size, flowed):
        pass  # request bodies: counted against the connection window (H2Lean), nothing kept

    def on_window(self, stream, inc):
        st = self.pending.get(stream)
        if st is not None:
            st[0] += inc

    def window_delta(self, delta):
        for st in self.pending.values():
            st[0] += delta

    def on_reset(self, stream, code):
        self.pending.pop(stream, None)

    def on_goaway(self, last, code):
        pass  # the client keeps its open streams; it closes when it is done


# ----------------------------------------------------------------------------- origin
class Origin(asyncio.Protocol):
    """GET /bytes/N -> N bytes; POST anything -> reads the whole body, then "ok\\n"."""

    cache = {}
    chunk = CHUNK

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
    """HTTP/2 (ALPN h2) on the TLS port: H2OriginSession on the wire, DATA while not paused."""

    def connection_made(self, tr):
        self.tr, self.h2, self.paused = tr, H2OriginSession(), False
        self._flush()

    def data_received(self, data):
        try:
            self.h2.feed(data)
        except Exception as e:  # H2Error, or something this small origin cannot read
            self.h2.goaway(e.code if isinstance(e, H2Error) else 1, self.h2.last_stream)
            self.tr.write(self.h2.take())
            self.tr.close()
            return
        self._flush()

    def _flush(self):
        h2 = self.h2
        while True:
            if h2.pending and not self.paused:
                h2.pump()
            out = h2.take()
            if not out:
                return
            self.tr.write(out)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self._flush()


class AlpnOrigin(asyncio.Protocol):
    """The TLS port: HTTP/2 when the client's ALPN chose h2, else HTTP/1.1."""

    def connection_made(self, tr):
        tls = tr.get_extra_info("ssl_object")
        self.inner = H2Origin() if tls and tls.selected_alpn_protocol() == "h2" else Origin()
        self.inner.connection_made(tr)

    def data_received(self, data):
        self.inner.data_received(data)

    def pause_writing(self):
        self.inner.pause_writing()

    def resume_writing(self):
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
    """Conn for the CONNECT, then H2ClientSession after TLS: --streams GETs in flight, each
    answer recorded and followed at once by the next request, until the deadline."""

    h2 = None
    finished = None
    why = None  # what ended the connection

    def data_received(self, data):
        if self.h2 is None:
            return super().data_received(data)
        if self.closed:
            return
        try:
            self.h2.feed(data)
        except Exception as e:  # H2Error, or a malformed answer
            if isinstance(e, H2Error):
                self.h2.goaway(e.code)
            self.lost(e)
        if self.finished is not None:  # until begin(), the TLS transport is not ours yet
            out = self.h2.take()
            if out:
                self.tr.write(out)

    def begin(self, run, deadline):
        loop = asyncio.get_running_loop()
        self.run, self.deadline, self.budget = run, deadline, run.n * run.a.streams
        self.finished = loop.create_future()
        self.watch = loop.call_later(1.0, self.check)
        if self.closed:  # GOAWAY or the end before the first request
            run._error(run.measure_start, self.why)
        for _ in range(run.a.streams):
            self.issue()
        self.tr.write(self.h2.take())
        return self.finished

    def issue(self):
        h2 = self.h2
        if self.budget and not h2.closed and len(h2.streams) < h2.peer_streams:
            t = perf()
            if t < self.deadline:
                self.budget -= 1
                self.run.attempts += 1
                h2.request(t)
                return
        if not h2.streams:
            self._finish()

    def _finish(self):
        if not self.finished.done():
            self.finished.set_result(None)
            self.watch.cancel()

    def done(self, st):
        self.run._record(st[0], st[0], perf(), st[1], st[2] + 64)
        self.issue()

    def failed(self, st, e):
        self.run._error(st[0], e)
        self.issue()

    def lost(self, e):
        """The connection is over: every stream still open failed (or the connection did)."""
        h2, self.closed, self.why = self.h2, True, e
        h2.closed = True
        if self.finished is None or self.finished.done():
            return
        for _ in range(len(h2.streams) or 1):  # counted even in the warm-up: the connection
            self.run._error(self.run.measure_start, e)  # is gone for the rest of the run
        h2.streams.clear()
        self._finish()

    def check(self):
        """Once a second: a request older than --timeout ends the connection."""
        streams = self.h2.streams
        if streams and perf() - next(iter(streams.values()))[0] > self.run.a.timeout:
            self.lost(TimeoutError("request timed out"))
            self.tr.abort()
        elif not self.finished.done():
            self.watch = asyncio.get_running_loop().call_later(1.0, self.check)

    def connection_lost(self, exc):
        if self.h2 is None:
            return super().connection_lost(exc)
        self.lost(ConnectionError("closed by peer"))


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
        self.auth, self.path = auth, path
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
        if self.o.get("h2"):  # the session first: the origin's SETTINGS may come with the handshake
            conn.h2 = H2ClientSession(self.auth.encode(), self.path.encode(), conn)
            conn.tr = await loop.start_tls(tr, conn, self.h2ctx, server_hostname="127.0.0.1")
            chosen = conn.tr.get_extra_info("ssl_object").selected_alpn_protocol()
            if chosen != "h2":
                conn.tr.abort()
                raise ConnectionError(f"ALPN chose {chosen!r}, not h2")
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
        try:
            conn = await asyncio.wait_for(self.open(), self.a.timeout)
        except Exception as e:  # counted even in the warm-up: this connection never comes
            self._error(self.measure_start, e)
            return
        try:
            await conn.begin(self, deadline)
            if not conn.closed:
                conn.h2.goaway(0)
                conn.tr.write(conn.h2.take())
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
        snap = dict(
            t=perf(), cpu=proc_cpu(pid), ocpu=proc_cpu(origin_pid), me=resource.getrusage(0)
        )
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
