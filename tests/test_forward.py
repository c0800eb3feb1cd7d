"""
The HTTP forward proxy end to end: proxygate under twistd, real sockets on loopback.

Bodies both ways at the sizes that break framing code (0, 1, 64 KiB +-1, 10 MB, 1 GB), every
framing, the header rules of RFC 9110 as the origin sees them, keep-alive and pooling,
statuses for refused, failed and malformed requests (with the proxy still serving others
afterwards), backpressure measured as the proxy's RSS, the access log and the metrics.

Clients here are raw sockets (L{Wire}) so that every byte on the wire is checked; the
real-client tests (curl, requests, pip) live in test_forward_clients.py.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse

import pytest

from tests.support import (
    LOOPBACK_INI,
    Origin,
    ProxyProcess,
    payload,
    payloadChunks,
    payloadDigest,
    rawRequest,
    rss,
    waitFor,
)

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB

SIZES = [
    pytest.param(0, id="0B"),
    pytest.param(1, id="1B"),
    pytest.param(64 * KiB - 1, id="64KiB-1"),
    pytest.param(64 * KiB, id="64KiB"),
    pytest.param(64 * KiB + 1, id="64KiB+1"),
    pytest.param(10 * 1000 * 1000, id="10MB"),
]


# -- a raw HTTP/1.1 client that checks the wire ---------------------------------------------


class Response:
    def __init__(self, version: str, status: int, reason: str, headers: list) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers  # [(name, value)] as str, in order
        self.body = b""
        self.framing = "none"  # none | length | chunked | close
        self.length = 0
        self.sha256 = hashlib.sha256(b"").hexdigest()
        self.interim: list[Response] = []
        self.complete = True

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[-1] if values else None

    def tokens(self, name: str) -> list[str]:
        return [t.strip().lower() for v in self.all(name) for t in v.split(",") if t.strip()]

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.framing} {self.length}B {self.headers}>"


class Wire:
    """One client connection to the proxy; every read bounded by the socket timeout."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        url: str,
        headers=(),
        body: bytes = b"",
        version: str = "HTTP/1.1",
        host: str | None = None,
    ) -> None:
        self.send(build(method, url, headers, body, version, host))

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(256 * KiB)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if not self._fill():
                raise EOFError("connection closed in a line")

    def _exact(self, n: int, sink) -> int:
        got = 0
        while got < n:
            if not self.buf and not self._fill():
                return got
            take = min(n - got, len(self.buf))
            sink(bytes(self.buf[:take]))
            del self.buf[:take]
            got += take
        return got

    def head(self) -> Response:
        line = self._line()
        version, status, *reason = line.decode("latin-1").split(" ", 2)
        headers = []
        while True:
            field = self._line()
            if not field:
                break
            assert field[:1] not in (b" ", b"\t"), f"folded field from the proxy: {field!r}"
            name, sep, value = field.decode("latin-1").partition(":")
            assert sep and name == name.strip(), f"malformed field from the proxy: {field!r}"
            headers.append((name, value.strip(" \t")))
        return Response(version, int(status), reason[0] if reason else "", headers)

    def response(self, method: str = "GET", keep: bool = True, chunk=None) -> Response:
        """
        Read one response (after any 1xx). The body is kept when C{keep}, and always
        hashed; C{chunk(data)} sees each piece as it arrives (for pacing).
        """
        interim = []
        while True:
            r = self.head()
            if r.status >= 200 or r.status == 101:
                break
            interim.append(r)
        r.interim = interim
        h = hashlib.sha256()
        parts: list[bytes] = []
        count = [0]

        def sink(data: bytes) -> None:
            h.update(data)
            count[0] += len(data)
            if keep:
                parts.append(data)
            if chunk is not None:
                chunk(data)

        te = r.tokens("transfer-encoding")
        cl = r.all("content-length")
        if method == "HEAD" or r.status in (204, 304) or r.status == 101:
            r.framing = "none"
            if r.status in (204, 304) or r.status == 101:
                assert not te and (not cl or r.status == 304), f"framing on {r.status}: {r}"
        elif te:
            assert te == ["chunked"], r
            assert not cl, f"Content-Length with Transfer-Encoding from the proxy: {r}"
            r.framing = "chunked"
            while True:
                size = self._line()
                assert re.fullmatch(rb"[0-9a-fA-F]+", size), f"bad chunk size {size!r}"
                n = int(size, 16)
                if n == 0:
                    while self._line():
                        pass
                    break
                if self._exact(n, sink) != n or self._line() != b"":
                    r.complete = False
                    break
        elif cl:
            assert len(cl) == 1 and cl[0].isdigit(), r
            r.framing = "length"
            n = int(cl[0])
            if self._exact(n, sink) != n:
                r.complete = False
        else:
            r.framing = "close"
            while self.buf or self._fill():
                data, self.buf = bytes(self.buf), bytearray()
                sink(data)
        r.length = count[0]
        r.sha256 = h.hexdigest()
        r.body = b"".join(parts)
        return r

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the proxy closes the connection (no more bytes) within C{timeout}."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


def build(
    method: str,
    url: str,
    headers=(),
    body: bytes = b"",
    version: str = "HTTP/1.1",
    host: str | None = None,
) -> bytes:
    """A request as bytes; Host from the URL unless given (or given as '')."""
    if host is None and "://" in url:
        host = urllib.parse.urlsplit(url).netloc
    lines = [f"{method} {url} {version}".encode()]
    if host:
        lines.append(b"Host: " + host.encode())
    for name, value in headers:
        lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def fetch(proxy, method: str, url: str, headers=(), body: bytes = b"", **kw) -> Response:
    with Wire(proxy.port) as w:
        w.request(method, url, headers, body, **kw)
        return w.response(method)


def echo(proxy, url: str, headers=(), method: str = "GET", body: bytes = b"", **kw) -> dict:
    r = fetch(proxy, method, url, headers, body, **kw)
    assert r.status == 200, (r, r.body)
    return r.json()


def fieldsOf(doc: dict, name: str) -> list[str]:
    return [v for n, v in doc["headers"] if n.lower() == name.lower()]


def assertServing(proxy, origin) -> None:
    """After any abuse, a normal request on a new connection still works."""
    r = fetch(proxy, "GET", origin.url("/bytes/1000"))
    assert r.status == 200 and r.sha256 == payloadDigest(1000), r


def chunked(data: bytes, sizes=(1, 100, 65536, 3, 8192)) -> bytes:
    """Chunked encoding of data with irregular chunk sizes."""
    out = bytearray()
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        piece = data[pos : pos + n]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        pos += n
        i += 1
    return bytes(out + b"0\r\n\r\n")


# -- origins of this module -----------------------------------------------------------------


def startModuleProxy(tmp_path_factory, ini: str) -> ProxyProcess:
    return ProxyProcess(tmp_path_factory.mktemp("proxy"), ini).start()


ALT_INI = """
[proxy]
deny_destinations =
connect_ports = 1-65535
via = gw.example
forwarded_for = on
connect_timeout = 1
header_timeout = 1
idle_timeout = 2

[log]
format = json
"""


@pytest.fixture(scope="module")
def altProxy(tmp_path_factory):
    """Loopback allowed, Via pseudonym, X-Forwarded-For on, 1 s timeouts, JSON log."""
    p = startModuleProxy(tmp_path_factory, ALT_INI)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def defaultProxy(tmp_path_factory):
    """Built-in defaults but for the listeners: loopback destinations are denied."""
    p = startModuleProxy(tmp_path_factory, "")
    yield p
    p.stop()


# -- bodies: downloads ----------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["bytes", "chunked", "close"])
def test_downloadArrivesByteIdentical(proxy, origin, kind: str, size: int) -> None:
    with Wire(proxy.port) as w:
        w.request("GET", origin.url(f"/{kind}/{size}"))
        r = w.response(keep=False)
        assert r.status == 200 and r.complete
        assert (r.length, r.sha256) == (size, payloadDigest(size))
        # Length-delimited stays length-delimited; chunked and close-delimited reach an
        # HTTP/1.1 client chunked, so the connection lives on.
        expected = {
            "bytes": "length",
            "chunked": "chunked",
            "close": "chunked",
        }[kind]
        assert r.framing == expected, r
        w.request("GET", origin.url("/bytes/10"))
        assert w.response().body == payload(10)


@pytest.mark.parametrize("size", [0, 1, 65537, 3 * MiB])
def test_closeDelimitedToHttp10ClientIsCloseDelimited(proxy, origin, size: int) -> None:
    with Wire(proxy.port) as w:
        w.request("GET", origin.url(f"/close/{size}"), version="HTTP/1.0")
        r = w.response(keep=False)
        assert r.status == 200 and r.framing == "close"
        assert (r.length, r.sha256) == (size, payloadDigest(size))
        assert "chunked" not in r.tokens("transfer-encoding")
        assert w.eof


@pytest.mark.parametrize("size", [0, 1, 65537])
def test_chunkedToHttp10ClientIsNotChunked(proxy, origin, size: int) -> None:
    with Wire(proxy.port) as w:
        w.request("GET", origin.url(f"/chunked/{size}"), version="HTTP/1.0")
        r = w.response(keep=False)
        assert r.status == 200 and r.framing == "close"
        assert (r.length, r.sha256) == (size, payloadDigest(size))
        assert w.closed()


@pytest.mark.slow
def test_download1GiB(proxy, origin) -> None:
    started = time.monotonic()
    with Wire(proxy.port, timeout=30) as w:
        w.request("GET", origin.url(f"/bytes/{GiB}"))
        r = w.response(keep=False)
    assert r.status == 200 and r.complete
    assert (r.length, r.sha256) == (GiB, payloadDigest(GiB))
    assert time.monotonic() - started < 60


# -- bodies: uploads ------------------------------------------------------------------------


def upload(proxy, url: str, size: int, framing: str, timeout: float = 30.0, extra=()) -> dict:
    """Stream C{size} payload bytes to C{url} with C{framing}; the origin's JSON answer."""
    with Wire(proxy.port, timeout=timeout) as w:
        if framing == "length":
            w.request("POST", url, [("Content-Length", str(size)), *extra])
            for piece in payloadChunks(size):
                w.send(piece)
        else:
            w.request("POST", url, [("Transfer-Encoding", "chunked"), *extra])
            for piece in payloadChunks(size):
                w.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            w.send(b"0\r\n\r\n")
        r = w.response()
        assert r.status == 200, (r, r.body)
        return r.json()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_uploadArrivesByteIdentical(proxy, sink, framing: str, size: int) -> None:
    got = upload(proxy, sink.url(), size, framing)
    assert (got["bytes"], got["sha256"]) == (size, payloadDigest(size))
    if framing == "length":
        assert (got["te"], got["cl"]) == ("", str(size))
    else:
        assert (got["te"], got["cl"]) == ("chunked", None)


def test_uploadWithIrregularChunksAndExtensions(proxy, sink) -> None:
    data = payload(200_000)
    body = chunked(data).replace(b"\r\n", b";name=value\r\n", 1)
    r = fetch(proxy, "POST", sink.url(), [("Transfer-Encoding", "chunked")], body)
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_upload1GiB(proxy, sink, framing: str) -> None:
    started = time.monotonic()
    got = upload(proxy, sink.url(), GiB, framing, timeout=60)
    assert (got["bytes"], got["sha256"]) == (GiB, payloadDigest(GiB))
    assert time.monotonic() - started < 60


# -- backpressure: the proxy's memory stays flat -------------------------------------------


class RSSWatch:
    """Samples a process's RSS in the background; C{peak} is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle = rss(pid)
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak - self.idle


MEMORY_BUDGET = 30 * MiB
BIG = 256 * MiB
#: How long the slow side of a memory test stays slow. A proxy without backpressure fills
#: with what loopback delivers at hundreds of MB/s, over MEMORY_BUDGET in well under a
#: second; the rest of the transfer then runs at full speed, still watched.
SLOW_SECONDS = 3


def test_slowClientKeepsProxyMemoryFlat(proxy, origin) -> None:
    """A fast origin and a client reading ~5 MB/s: the proxy must not buffer the gap."""
    watch = RSSWatch(proxy.pid)
    slowUntil = time.monotonic() + SLOW_SECONDS
    rate = 5 * 1000 * 1000

    def pace(data: bytes) -> None:
        if time.monotonic() < slowUntil:
            time.sleep(len(data) / rate)

    with Wire(proxy.port, timeout=30) as w:
        w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        w.request("GET", origin.url(f"/bytes/{BIG}"))
        # Read in small pieces while slow, so the pace is even.
        w.sock.settimeout(30)
        r = w.response(keep=False, chunk=pace)
    growth = watch.stop()
    assert (r.length, r.sha256) == (BIG, payloadDigest(BIG))
    assert growth < MEMORY_BUDGET, f"proxy RSS grew {growth / MiB:.1f} MiB"


def test_slowOriginKeepsProxyMemoryFlat(proxy, sink) -> None:
    """A fast uploader and an origin reading ~5 MB/s for a while: bounded proxy memory."""
    watch = RSSWatch(proxy.pid)
    url = sink.url(f"/sink?rate={5_000_000}&slow={SLOW_SECONDS}")
    got = upload(proxy, url, BIG, "length", timeout=60)
    growth = watch.stop()
    assert (got["bytes"], got["sha256"]) == (BIG, payloadDigest(BIG))
    assert growth < MEMORY_BUDGET, f"proxy RSS grew {growth / MiB:.1f} MiB"


# -- methods, HEAD, 1xx, 204, 304 ----------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_everyMethodForwarded(proxy, origin, method: str) -> None:
    body = b"" if method in ("GET", "TRACE") else b"some body"
    headers = [("Content-Length", str(len(body)))] if body else []
    doc = echo(proxy, origin.url("/echo?m=1"), headers, method=method, body=body)
    assert (doc["method"], doc["path"]) == (method, "/echo?m=1")
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "M-SEARCH", "PURGE", "BREW"])
def test_extensionMethodForwarded(proxy, rawOrigin, method: str) -> None:
    r = fetch(proxy, method, rawOrigin.url("/x"))
    assert r.status == 200 and r.body == b"ok"
    assert rawOrigin.received[-1].startswith(f"{method} /x HTTP/1.1\r\n".encode())


def test_headHasLengthButNoBody(proxy, origin) -> None:
    with Wire(proxy.port) as w:
        w.request("HEAD", origin.url("/bytes/12345"))
        r = w.response("HEAD")
        assert r.status == 200 and r.all("content-length") == ["12345"]
        # A body would be read as the next response's head.
        w.request("GET", origin.url("/bytes/7"))
        r2 = w.response()
        assert (r2.status, r2.body) == (200, payload(7))


@pytest.mark.parametrize("code", [204, 304])
def test_noBodyStatuses(proxy, origin, code: int) -> None:
    with Wire(proxy.port) as w:
        w.request("GET", origin.url(f"/status/{code}"))
        r = w.response()
        assert r.status == code and r.body == b""
        assert not r.tokens("transfer-encoding")
        if code == 204:
            assert not r.all("content-length")
        w.request("GET", origin.url("/bytes/5"))
        assert w.response().body == payload(5)


def test_304KeepsTheLengthOfTheRepresentation(proxy, rawOrigin) -> None:
    rawOrigin.response = b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 42\r\n\r\n'
    r = fetch(proxy, "GET", rawOrigin.url("/"), [("If-None-Match", '"x"')])
    assert r.status == 304 and r.body == b""
    assert r.all("content-length") in ([], ["42"])
    assert r.get("etag") == '"x"'


def test_informationalResponsesRelayedToHttp11(proxy, rawOrigin) -> None:
    rawOrigin.response = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    with Wire(proxy.port) as w:
        w.request("GET", rawOrigin.url("/"))
        r = w.response()
    assert [i.status for i in r.interim] == [103]
    assert r.interim[0].get("link") == "</s.css>; rel=preload"
    assert (r.status, r.body) == (200, b"ok")


def test_informationalResponsesNotSentToHttp10(proxy, rawOrigin) -> None:
    rawOrigin.response = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    raw = rawRequest(proxy.port, build("GET", rawOrigin.url("/"), version="HTTP/1.0"))
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\nok")


def test_expect100ContinueHonoured(proxy, origin) -> None:
    """The client waits for 100 Continue before sending its body; it must come."""
    body = payload(100_000)
    with Wire(proxy.port, timeout=5) as w:
        w.request(
            "POST",
            origin.url("/echo"),
            [("Content-Length", str(len(body))), ("Expect", "100-continue")],
        )
        interim = w.head()
        assert interim.status == 100
        w.send(body)
        r = w.response()
    assert r.status == 200
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_expectWithRefusingOriginGetsFinalStatus(proxy, rawOrigin) -> None:
    rawOrigin.response = (
        b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"
    )
    with Wire(proxy.port, timeout=5) as w:
        w.request(
            "POST", rawOrigin.url("/"), [("Content-Length", "50000000"), ("Expect", "100-continue")]
        )
        r = w.response()
        assert (r.status, r.body) == (413, b"big")
        # The unsent body cannot be told from a next request: the proxy closes.
        assert w.closed()


# -- headers the origin sees ----------------------------------------------------------------


def test_hostComesFromTheUri(proxy, origin) -> None:
    doc = echo(proxy, origin.url("/echo"), host="bogus.example:1234")
    assert fieldsOf(doc, "host") == [f"127.0.0.1:{origin.port}"]


def test_hostComesFromTheUriForHttp10WithoutHost(proxy, origin) -> None:
    doc = echo(proxy, origin.url("/echo"), host="", version="HTTP/1.0")
    assert fieldsOf(doc, "host") == [f"127.0.0.1:{origin.port}"]


def test_requestTargetBecomesOriginForm(proxy, rawOrigin) -> None:
    base = f"http://127.0.0.1:{rawOrigin.port}"
    for target, expected in [
        (base, b"GET / HTTP/1.1"),
        (base + "?q=1", b"GET /?q=1 HTTP/1.1"),
        (base + "/a%2Fb/%7e?x=%20&y=a+b", b"GET /a%2Fb/%7e?x=%20&y=a+b HTTP/1.1"),
    ]:
        assert fetch(proxy, "GET", target).status == 200
        assert bytes(rawOrigin.received[-1]).split(b"\r\n", 1)[0] == expected


def test_viaAppended(proxy, origin) -> None:
    doc = echo(proxy, origin.url("/echo"), [("Via", "1.1 upstream-a")])
    via = ", ".join(fieldsOf(doc, "via"))
    assert re.fullmatch(r"1\.1 upstream-a, 1\.1 proxygate", via), via
    doc = echo(proxy, origin.url("/echo"), version="HTTP/1.0")
    assert fieldsOf(doc, "via") == ["1.0 proxygate"]


def test_viaOnTheResponse(proxy, rawOrigin) -> None:
    rawOrigin.response = b"HTTP/1.1 200 OK\r\nVia: 1.1 cdn\r\nContent-Length: 0\r\n\r\n"
    r = fetch(proxy, "GET", rawOrigin.url("/"))
    assert ", ".join(r.all("via")) == "1.1 cdn, 1.1 proxygate"
    # The origin sent no Date: a forwarding recipient with a clock adds one (RFC 9110 6.6.1).
    assert len(r.all("date")) == 1 and r.get("date").endswith(" GMT")


def test_viaPseudonymAndForwardedForOn(altProxy, origin) -> None:
    doc = echo(altProxy, origin.url("/echo"))
    assert fieldsOf(doc, "via") == ["1.1 gw.example"]
    assert fieldsOf(doc, "x-forwarded-for") == ["127.0.0.1"]
    doc = echo(altProxy, origin.url("/echo"), [("X-Forwarded-For", "203.0.113.9")])
    assert ", ".join(fieldsOf(doc, "x-forwarded-for")) == "203.0.113.9, 127.0.0.1"


def test_noForwardedForByDefault(proxy, origin) -> None:
    doc = echo(proxy, origin.url("/echo"))
    assert fieldsOf(doc, "x-forwarded-for") == []
    assert fieldsOf(doc, "forwarded") == []
    # What a client sends itself is end-to-end and passes unchanged.
    doc = echo(proxy, origin.url("/echo"), [("X-Forwarded-For", "203.0.113.9")])
    assert fieldsOf(doc, "x-forwarded-for") == ["203.0.113.9"]


def test_emptyViaDisablesIt(startProxy, origin) -> None:
    p = startProxy(LOOPBACK_INI + "via =\n")
    doc = echo(p, origin.url("/echo"))
    assert fieldsOf(doc, "via") == []
    r = fetch(p, "GET", origin.url("/bytes/1"))
    assert r.all("via") == []
    doc = echo(p, origin.url("/echo"), [("Via", "1.1 other")])
    assert fieldsOf(doc, "via") == ["1.1 other"]


HOP_BY_HOP_REQUEST = [
    pytest.param([("Connection", "keep-alive")], (), id="connection"),
    pytest.param([("Keep-Alive", "timeout=5, max=10")], (), id="keep-alive"),
    pytest.param([("Proxy-Connection", "keep-alive")], (), id="proxy-connection"),
    pytest.param([("TE", "trailers")], (), id="te"),
    pytest.param([("Trailer", "X-Checksum")], (), id="trailer"),
    pytest.param([("Upgrade", "h2c")], (), id="upgrade-without-connection-token"),
    pytest.param([("Proxy-Authorization", "Basic dXNlcjpzZWNyZXQ=")], (), id="proxy-authorization"),
    pytest.param(
        [("Connection", "X-A, x-b"), ("X-A", "1"), ("x-B", "2"), ("X-C", "3")],
        ("X-C",),
        id="named-fields",
    ),
    pytest.param(
        [("Connection", ", X-A"), ("X-A", "1"), ("X-C", "3")],
        ("X-C",),
        id="connection-leading-comma",
    ),
    pytest.param(
        [("Connection", "X-A,, ,"), ("X-A", "1"), ("X-C", "3")],
        ("X-C",),
        id="connection-empty-members",
    ),
    pytest.param(
        [("Connection", "Connection"), ("X-C", "3")], ("X-C",), id="connection-names-itself"
    ),
    pytest.param(
        [("Connection", "x-a"), ("Connection", "X-B"), ("X-A", "1"), ("X-B", "2")],
        (),
        id="two-connection-fields",
    ),
    pytest.param(
        [("Connection", "Keep-Alive, X-A"), ("Keep-Alive", "1"), ("X-A", "1")],
        (),
        id="named-keep-alive",
    ),
    pytest.param(
        [
            ("CONNECTION", "X-Secret"),
            ("x-secret", "1"),
            ("kEeP-aLiVe", "1"),
            ("proxy-CONNECTION", "1"),
            ("tE", "trailers"),
        ],
        (),
        id="odd-case",
    ),
]
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "transfer-encoding",
}


def originHead(rawOrigin) -> list[tuple[str, str]]:
    """The fields of the last request head the raw origin received, in order."""
    head = bytes(rawOrigin.received[-1]).split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return [tuple(line.split(": ", 1)) for line in head.split("\r\n")[1:]]


@pytest.mark.parametrize(("headers", "kept"), HOP_BY_HOP_REQUEST)
def test_hopByHopNotForwarded(proxy, rawOrigin, headers, kept) -> None:
    sent = [*headers, ("X-End-To-End", "kept"), ("Authorization", "Bearer end-to-end")]
    assert fetch(proxy, "GET", rawOrigin.url("/"), sent).status == 200
    got = originHead(rawOrigin)
    names = [n.lower() for n, _ in got]
    forbidden = _HOP | {"x-a", "x-b", "x-secret"}
    assert not forbidden & set(names), got
    for name in (*kept, "X-End-To-End", "Authorization"):
        assert name in [n for n, _ in got], (name, got)
    assert ("X-End-To-End", "kept") in got and ("Authorization", "Bearer end-to-end") in got
    assert names.count("host") == 1


def test_connectionCloseCloseClosesTheClient(proxy, rawOrigin) -> None:
    with Wire(proxy.port) as w:
        w.request("GET", rawOrigin.url("/"), [("Connection", "close, close"), ("X-C", "1")])
        r = w.response()
        assert r.status == 200 and "close" in r.tokens("connection")
        assert w.closed()
    head = bytes(rawOrigin.received[-1]).split(b"\r\n\r\n", 1)[0]
    assert b"X-C: 1" in head and b"close" not in head.lower()


def test_connectionNamingHostOrLengthCannotStripThem(proxy, sink, origin) -> None:
    """Go CVE-2021-33197: a client must not make the proxy drop Host or the framing."""
    doc = echo(proxy, origin.url("/echo"), [("Connection", "Host")])
    assert fieldsOf(doc, "host") == [f"127.0.0.1:{origin.port}"]
    body = payload(1000)
    r = fetch(
        proxy,
        "POST",
        sink.url(),
        [("Connection", "Content-Length"), ("Content-Length", "1000")],
        body,
    )
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_repeatedHeadersForwardedInOrder(proxy, rawOrigin) -> None:
    sent = [
        ("X-Rep", "1"),
        ("X-Other", "a"),
        ("X-Rep", "2"),
        ("x-rep", "3"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("X-MiXeD-Case", "v"),
    ]
    assert fetch(proxy, "GET", rawOrigin.url("/"), sent).status == 200
    lines = bytes(rawOrigin.received[-1]).split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
    got = [tuple(line.split(": ", 1)) for line in lines]
    assert [
        g for g in got if g[0].lower() in ("x-rep", "x-other", "cookie", "x-mixed-case")
    ] == sent


def test_responseHeadersFilteredAndOrdered(proxy, rawOrigin) -> None:
    rawOrigin.response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic realm=x\r\nProxy-Connection: keep-alive\r\n"
        b"Trailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\n"
        b"Set-Cookie: a=1\r\nX-Rep: 1\r\nSet-Cookie: b=2\r\nServer : spaced\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    r = fetch(proxy, "GET", rawOrigin.url("/"))
    assert (r.status, r.body) == (200, b"ok")
    names = {n.lower() for n, _ in r.headers}
    assert not names & {
        "x-secret",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "upgrade",
        "te",
    }, r.headers
    assert r.all("set-cookie") == ["a=1", "b=2"]
    assert r.all("x-rep") == ["1"]
    assert r.all("server") == ["spaced"]  # whitespace before the colon removed


def test_responseWithBothLengthAndChunkedIsRechunked(proxy, rawOrigin) -> None:
    rawOrigin.response = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    r = fetch(proxy, "GET", rawOrigin.url("/"))
    assert (r.status, r.framing, r.body) == (200, "chunked", b"hello")


def test_http10OriginWithoutLength(proxy, rawOrigin) -> None:
    rawOrigin.response = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello"
    r = fetch(proxy, "GET", rawOrigin.url("/"))
    assert (r.status, r.framing, r.body) == (200, "chunked", b"hello")


def test_maxForwards(proxy, origin) -> None:
    doc = echo(proxy, origin.url("/echo"), [("Max-Forwards", "5")], method="OPTIONS")
    assert fieldsOf(doc, "max-forwards") == ["4"]
    r = fetch(proxy, "OPTIONS", origin.url("/echo?mf0"), [("Max-Forwards", "0")])
    assert r.status == 200
    assert not any(req[1] == "/echo?mf0" for req in origin.requests)


# -- keep-alive and pooling -----------------------------------------------------------------


def test_keepAliveAndPooledOrigin(proxy, origin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        ports, socks = [], []
        for i in range(4):
            conn.request("GET", origin.url(f"/echo?ka={i}"))
            r = conn.getresponse()
            assert r.status == 200 and not r.will_close
            ports.append(json.loads(r.read())["port"])
            socks.append(conn.sock)
        assert all(s is socks[0] for s in socks), "the client connection was not kept"
        assert len(set(ports)) == 1, f"origin connections not reused: {ports}"
    finally:
        conn.close()
    # A new client connection reuses the pooled origin connection too.
    assert echo(proxy, origin.url("/echo"))["port"] == ports[0]


def test_keepAliveAcrossFramings(proxy, origin, sink) -> None:
    with Wire(proxy.port) as w:
        for path, size in [
            ("/bytes/70000", 70000),
            ("/chunked/30000", 30000),
            ("/close/20000", 20000),
            ("/bytes/0", 0),
            ("/status/204", 0),
        ]:
            w.request("GET", origin.url(path))
            r = w.response()
            assert r.status in (200, 204) and r.length == size, (path, r)
        w.request("POST", sink.url(), [("Transfer-Encoding", "chunked")], chunked(payload(5000)))
        assert w.response().json()["bytes"] == 5000
        w.request("HEAD", origin.url("/bytes/99"))
        assert w.response("HEAD").get("content-length") == "99"
        w.request("GET", origin.url("/bytes/3"))
        assert w.response().body == payload(3)


def test_pipelinedRequestsAnsweredInOrder(proxy, origin) -> None:
    with Wire(proxy.port) as w:
        w.send(b"".join(build("GET", origin.url(f"/echo?p={i}")) for i in range(5)))
        paths = [w.response().json()["path"] for _ in range(5)]
    assert paths == [f"/echo?p={i}" for i in range(5)]


def test_http10ClientIsNotKeptAlive(proxy, origin) -> None:
    for headers in ([], [("Connection", "keep-alive")]):
        with Wire(proxy.port) as w:
            w.request("GET", origin.url("/bytes/100"), headers, version="HTTP/1.0")
            r = w.response()
            assert r.status == 200 and r.body == payload(100)
            assert "keep-alive" not in r.tokens("connection")
            assert w.closed(), "the proxy kept an HTTP/1.0 connection open"


def test_connectionCloseFromHttp11Client(proxy, origin) -> None:
    with Wire(proxy.port) as w:
        w.request("GET", origin.url("/bytes/100"), [("Connection", "close")])
        r = w.response()
        assert r.body == payload(100) and "close" in r.tokens("connection")
        assert w.closed()


def test_clientHalfCloseStillAnswered(proxy, origin) -> None:
    with Wire(proxy.port) as w:
        w.request("GET", origin.url("/bytes/1000"))
        w.sock.shutdown(socket.SHUT_WR)
        r = w.response()
        assert r.body == payload(1000)
        assert w.closed()


def test_pooledConnectionClosedByOriginIsRetried(proxy, rawOrigin) -> None:
    """The raw origin answers keep-alive-looking responses, then closes every connection."""
    for _ in range(3):
        r = fetch(proxy, "GET", rawOrigin.url("/"))
        assert (r.status, r.body) == (200, b"ok")
    time.sleep(0.2)
    assert fetch(proxy, "GET", rawOrigin.url("/")).body == b"ok"


def test_originCloseAfterResponseIsNotPooled(proxy, origin) -> None:
    with Wire(proxy.port) as w:
        for _ in range(3):
            w.request("GET", origin.url("/close/10"))
            assert w.response().body == payload(10)


# -- truncation and broken origins ----------------------------------------------------------


def test_truncatedLengthBodyIsVisiblyTruncated(proxy, rawOrigin, origin) -> None:
    rawOrigin.response = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500
    with Wire(proxy.port) as w:
        w.request("GET", rawOrigin.url("/"))
        try:
            r = w.response()
            assert not r.complete and r.length < 1000
        except (ConnectionResetError, EOFError):
            pass
    assertServing(proxy, origin)


def test_extraBytesAfterAResponseAreNeverAResponse(proxy, rawOrigin) -> None:
    """An origin that sends more than its framing said must not answer the next request."""
    rawOrigin.response = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    )
    with Wire(proxy.port) as w:
        w.send(build("GET", rawOrigin.url("/1")) + build("GET", rawOrigin.url("/2")))
        assert w.response().body == b"ok"
        assert w.response().body == b"ok"
    assert len(rawOrigin.received) == 2


@pytest.mark.parametrize(
    ("headers", "partial"),
    [
        pytest.param([("Content-Length", "100000")], b"x" * 5000, id="length"),
        pytest.param([("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n", id="chunked"),
    ],
)
def test_clientCutOffMidBodyNeverCompletesTheRequest(proxy, rawOrigin, headers, partial) -> None:
    with Wire(proxy.port) as w:
        w.request("POST", rawOrigin.url("/upload"), headers)
        w.send(partial)
        time.sleep(0.3)
    assert waitFor(lambda: rawOrigin.received and b"/upload" in rawOrigin.received[-1])
    time.sleep(0.3)
    got = bytes(rawOrigin.received[-1])
    body = got.partition(b"\r\n\r\n")[2]
    assert not body.endswith(b"0\r\n\r\n"), got[-100:]
    if headers[0][0] == "Content-Length":
        assert len(body) < 100000


def test_slowRequestHeadGets408(altProxy, origin) -> None:
    """header_timeout = 1 there: a head trickling in is cut off, and others are served."""
    with Wire(altProxy.port, timeout=5) as w:
        w.send(b"GET " + origin.url("/bytes/1").encode() + b" HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        raw = bytearray()
        while True:
            data = w.sock.recv(4096)
            if not data:
                break
            raw += data
        assert 0.5 < time.monotonic() - started < 4
    assert raw == b"" or raw.startswith(b"HTTP/1.1 408 "), raw
    assertServing(altProxy, origin)


def test_activeDownloadOutlivesIdleTimeout(altProxy, origin) -> None:
    """idle_timeout = 2 there: a 3.5 s response that keeps flowing is not idle."""
    size = 14 * 1000 * 1000
    rate = 4 * 1000 * 1000

    def pace(data: bytes) -> None:
        time.sleep(len(data) / rate)

    with Wire(altProxy.port, timeout=10) as w:
        w.request("GET", origin.url(f"/bytes/{size}"))
        r = w.response(keep=False, chunk=pace)
    assert (r.length, r.sha256) == (size, payloadDigest(size))


def test_activeUploadOutlivesIdleTimeout(altProxy, sink) -> None:
    size = 14 * 1000 * 1000
    got = upload(altProxy, sink.url(f"/sink?rate={4_000_000}&slow=10"), size, "length")
    assert (got["bytes"], got["sha256"]) == (size, payloadDigest(size))


def test_idleKeepAliveConnectionIsClosed(altProxy, origin) -> None:
    with Wire(altProxy.port, timeout=10) as w:
        w.request("GET", origin.url("/bytes/1"))
        assert w.response().body == payload(1)
        started = time.monotonic()
        assert w.closed(timeout=6)
        assert 1.5 < time.monotonic() - started < 5


def test_ipv6Origin(proxy) -> None:
    try:
        o6 = Origin("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        doc = echo(proxy, o6.url("/echo?v6"))
        assert fieldsOf(doc, "host") == [f"[::1]:{o6.port}"]
        assert doc["path"] == "/echo?v6"
    finally:
        o6.close()


def test_truncatedChunkedBodyNeverGetsALastChunk(proxy, rawOrigin, origin) -> None:
    rawOrigin.response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    with Wire(proxy.port) as w:
        w.request("GET", rawOrigin.url("/"))
        r = w.head()
        assert r.status == 200
        rest = bytearray()
        try:
            while w.buf or w._fill():
                rest += w.buf
                w.buf.clear()
        except (ConnectionResetError, TimeoutError):
            pass
    assert not bytes(rest).endswith(b"0\r\n\r\n"), rest
    assertServing(proxy, origin)


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"garbage\r\n\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            id="two-lengths",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n", id="nul"),
        pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", id="bare-lf"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx", id="te-gzip"),
        pytest.param(b"", id="empty-close"),
    ],
)
def test_brokenOriginGets502(proxy, rawOrigin, origin, response: bytes) -> None:
    rawOrigin.response = response
    r = fetch(proxy, "GET", rawOrigin.url("/"))
    assert r.status == 502, r
    assertServing(proxy, origin)


# -- statuses for failures ------------------------------------------------------------------


def test_refusedOriginGets502WithReason(proxy, origin, closedPort: int) -> None:
    before = proxy.metric("proxygate_upstream_errors_total", reason="refused")
    r = fetch(proxy, "GET", f"http://127.0.0.1:{closedPort}/")
    assert r.status == 502
    assert "refused" in r.body.decode().lower()
    assert r.body.count(b"\n") <= 2
    assert waitFor(
        lambda: proxy.metric("proxygate_upstream_errors_total", reason="refused") == before + 1
    )
    assertServing(proxy, origin)


def test_unresolvableNameGets502(proxy, origin) -> None:
    before = proxy.metric("proxygate_upstream_errors_total", reason="dns")
    started = time.monotonic()
    r = fetch(proxy, "GET", "http://nonexistent.invalid/")
    assert r.status == 502
    assert "resolve" in r.body.decode().lower() and "nonexistent.invalid" in r.body.decode()
    assert time.monotonic() - started < 10
    assert waitFor(
        lambda: proxy.metric("proxygate_upstream_errors_total", reason="dns") == before + 1
    )
    assertServing(proxy, origin)


def test_connectTimeoutGets504(altProxy, origin, blackhole: int) -> None:
    before = altProxy.metric("proxygate_upstream_errors_total", reason="timeout")
    started = time.monotonic()
    r = fetch(altProxy, "GET", f"http://127.0.0.1:{blackhole}/")
    elapsed = time.monotonic() - started
    assert r.status == 504, r
    assert 0.8 < elapsed < 5, elapsed
    assert waitFor(
        lambda: altProxy.metric("proxygate_upstream_errors_total", reason="timeout") == before + 1
    )
    assertServing(altProxy, origin)


GARBAGE = [
    pytest.param(b"HELLO\r\n\r\n", 400, id="not-http"),
    pytest.param(b"GET http://127.0.0.1:1/ HTTP/1.1\nHost: x\n\n", 400, id="bare-lf"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n", 400, id="origin-form-http10"),
    pytest.param(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
        400,
        id="origin-form-with-body",
    ),
    pytest.param(b"GET http://{o}/ HTTP/1.1\r\n\r\n", 400, id="http11-without-host"),
    pytest.param(b"GET http://{o}/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
    pytest.param(
        b"POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="cl-and-te",
    ),
    pytest.param(
        b"POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nContent-Length: +5\r\n\r\nhello",
        400,
        id="cl-plus",
    ),
    pytest.param(
        b"POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!",
        400,
        id="two-lengths",
    ),
    pytest.param(
        b"GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\nX: a\r\n b\r\n\r\n", 400, id="obs-fold"
    ),
    pytest.param(b"GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\nX: a\x00b\r\n\r\n", 400, id="nul"),
    pytest.param(b"GET http://{o}/ HTTP/1.1\r\nHost : {o}\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(b"GET http://{o}/#frag HTTP/1.1\r\nHost: {o}\r\n\r\n", 400, id="fragment"),
    pytest.param(b"GET http://u:p@{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n", 400, id="userinfo"),
    pytest.param(b"GET gopher://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n", 400, id="gopher-scheme"),
    pytest.param(b"GET file:///etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="file-scheme"),
    pytest.param(b"GET http://{o}/ HTTP/2.0\r\nHost: {o}\r\n\r\n", 505, id="http2-version"),
    pytest.param(
        b"POST http://{o}/echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="te-in-http10",
    ),
    pytest.param(
        b"POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: Chunked, gzip"
        b"\r\n\r\n0\r\n\r\n",
        400,
        id="te-chunked-not-last",
    ),
    pytest.param(
        b"POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
        id="chunk-size-0x",
    ),
    pytest.param(
        b"POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n" + b"f" * 20 + b"\r\n",
        400,
        id="chunk-size-oversized",
    ),
    pytest.param(
        b"GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        431,
        id="head-too-large",
    ),
]


@pytest.mark.parametrize(("data", "status"), GARBAGE)
def test_malformedRequestGetsStatusAndClose(proxy, origin, data: bytes, status: int) -> None:
    data = data.replace(b"{o}", b"127.0.0.1:%d" % origin.port)
    with Wire(proxy.port, timeout=5) as w:
        w.send(data)
        r = w.response()
        assert r.status == status, r
        assert r.body and r.body.count(b"\n") <= 2, r.body
        assert b"Traceback" not in r.body
        assert w.closed()
    assertServing(proxy, origin)


def test_originFormGets400AndExplains(proxy, origin) -> None:
    with Wire(proxy.port, timeout=5) as w:
        for target in ("/", "*", "/index.html?q=1"):
            w.request("GET", target, host="example.com")
            r = w.response()
            assert r.status == 400 and b"proxy" in r.body.lower(), r
        # A request the proxy understood completely: the connection may live on.
        w.request("GET", origin.url("/bytes/10"))
        assert w.response().body == payload(10)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(
            "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n", id="origin-form-length"
        ),
        pytest.param(
            "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n",
            id="origin-form-chunked",
        ),
        pytest.param(
            "OPTIONS {url} HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\nContent-Length: {n}\r\n\r\n",
            id="max-forwards-zero",
        ),
    ],
)
def test_bodyOfALocallyAnsweredRequestIsNeverARequest(proxy, origin, first: str) -> None:
    """A body the proxy does not forward must not be parsed as the next request."""
    marker = f"/echo?smuggled-{time.monotonic_ns()}"
    inner = build("GET", origin.url(marker))
    data = first.format(n=len(inner), url=origin.url("/bytes/1")).encode() + inner
    if "chunked" in first:
        data += b"\r\n0\r\n\r\n"
    rawRequest(proxy.port, data, timeout=2)
    time.sleep(0.1)
    assert not any(req[1] == marker for req in origin.requests)


def test_garbageBinaryAndTlsHello(proxy, origin) -> None:
    for data in (
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)) + b"\r\n\r\n",
        b"\x00" * 100 + b"\r\n\r\n",
    ):
        raw = rawRequest(proxy.port, data)
        assert raw.startswith(b"HTTP/1.1 400 "), raw[:100]
    assertServing(proxy, origin)


def test_abusedConnectionsDoNotDisturbAnotherClient(proxy, origin, closedPort) -> None:
    with Wire(proxy.port) as keeper:
        keeper.request("GET", origin.url("/bytes/10"))
        assert keeper.response().body == payload(10)
        rawRequest(proxy.port, b"GARBAGE\r\n\r\n")
        fetch(proxy, "GET", f"http://127.0.0.1:{closedPort}/")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\nX-Half: ")  # abandoned
        keeper.request("GET", origin.url("/bytes/20"))
        assert keeper.response().body == payload(20)


# -- policy: clients and destinations -------------------------------------------------------


def test_clientNotInAllowedCidrsGets403AndClose(startProxy, origin) -> None:
    p = startProxy(LOOPBACK_INI + "allowed_client_cidrs = 10.0.0.0/8\n")
    # (the start-up probe connection was refused and counted already)
    before = p.metric("proxygate_denied_total", reason="client")
    with Wire(p.port, timeout=5) as w:
        w.request("GET", origin.url("/echo?denied-client"))
        r = w.response()
        assert r.status == 403
        assert w.closed()
    assert not any(req[1] == "/echo?denied-client" for req in origin.requests)
    assert waitFor(lambda: p.metric("proxygate_denied_total", reason="client") == before + 1)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::1]", "127.1.2.3", "169.254.169.254", "0.0.0.0"]
)
def test_defaultConfigDeniesLoopbackAndLinkLocal(defaultProxy, origin, host: str) -> None:
    r = fetch(defaultProxy, "GET", f"http://{host}:{origin.port}/echo?denied={host}")
    assert r.status == 403, r
    assert not any(req[1] == f"/echo?denied={host}" for req in origin.requests)


def test_defaultDenyCountsAsDestinationDenial(defaultProxy, origin) -> None:
    before = defaultProxy.metric("proxygate_denied_total", reason="destination")
    assert fetch(defaultProxy, "GET", origin.url("/echo")).status == 403
    assert waitFor(
        lambda: defaultProxy.metric("proxygate_denied_total", reason="destination") == before + 1
    )


def test_proxyNeverDialsItsOwnListeners(altProxy) -> None:
    """deny_destinations is empty there: the proxy's own ports are still refused."""
    for port in (altProxy.port, altProxy.metricsPort):
        for host in ("127.0.0.1", "localhost"):
            r = fetch(altProxy, "GET", f"http://{host}:{port}/metrics")
            assert r.status == 403, (host, port, r)


def test_deniedRequestWithBodyClosesConnection(defaultProxy, origin) -> None:
    with Wire(defaultProxy.port) as w:
        w.request("POST", origin.url("/echo"), [("Content-Length", "5")], b"hello")
        assert w.response().status == 403
        w.request("GET", origin.url("/echo"))
        try:
            r = w.response()
            assert r.status == 403
        except (EOFError, ConnectionResetError):
            pass


# -- access log -----------------------------------------------------------------------------

SECRETS = (
    "s3cretPass",
    "hunter2",
    base64.b64encode(b"alice:s3cretPass").decode(),
    base64.b64encode(b"bob:hunter2").decode(),
    "tok3n-value",
)


def sendWithCredentials(p, url: str) -> Response:
    return fetch(
        p,
        "GET",
        url + "?access_token=tok3n-value",
        [
            ("Proxy-Authorization", "Basic " + base64.b64encode(b"alice:s3cretPass").decode()),
            ("Authorization", "Basic " + base64.b64encode(b"bob:hunter2").decode()),
            ("Cookie", "session=hunter2"),
        ],
    )


SQUID_LINE = re.compile(
    r"(\d+\.\d{3}) +(\d+) (\S+) ([A-Z_]+)/(\d{3}) (\d+) (\S+) (\S+) (\S+) (\S+) (\S+)$"
)


def test_accessLogSquidFormatWithoutCredentials(proxy, origin) -> None:
    doc = sendWithCredentials(proxy, origin.url("/echo/squid")).json()
    # Authorization is end-to-end: the origin gets it; Proxy-Authorization is not forwarded.
    assert fieldsOf(doc, "authorization")
    assert not fieldsOf(doc, "proxy-authorization")
    url = origin.url("/echo/squid")

    def line():
        return next((li for li in proxy.accessLines() if url in li), None)

    found = waitFor(line)
    assert found, proxy.log()[-2000:]
    m = SQUID_LINE.search(found)
    assert m, found
    _, _, client, action, code, size, method, logged, user, hier, ctype = m.groups()
    assert (client, action, code, method, logged) == ("127.0.0.1", "TCP_MISS", "200", "GET", url)
    assert int(size) == len(json.dumps(doc).encode()) or int(size) > 0
    assert hier == "HIER_DIRECT/127.0.0.1" and ctype == "application/json" and user == "-"
    log = proxy.log()
    for secret in SECRETS:
        assert secret not in log


def test_accessLogJsonFormat(altProxy, origin) -> None:
    sendWithCredentials(altProxy, origin.url("/echo/json"))

    def record():
        for li in altProxy.accessLines():
            text = li[li.index("{") :] if "{" in li else ""
            if "/echo/json" in text:
                return json.loads(text)
        return None

    rec = waitFor(record)
    assert rec, altProxy.log()[-2000:]
    assert rec["code"] == 200 and rec["method"] == "GET" and rec["client"] == "127.0.0.1"
    assert rec["url"] == origin.url("/echo/json")
    log = altProxy.log()
    for secret in SECRETS:
        assert secret not in log


def test_accessLogCombinedFormatToFile(startProxy, origin, tmp_path) -> None:
    path = tmp_path / "access.log"
    p = startProxy(LOOPBACK_INI + f"\n[log]\nformat = combined\naccess_log = {path}\n")
    sendWithCredentials(p, origin.url("/echo/combined"))
    fetch(p, "GET", "http://127.0.0.1:1/x")  # refused: logged too
    text = waitFor(
        lambda: path.exists() and path.read_text().count("\n") >= 2 and path.read_text(), timeout=5
    )
    assert text, p.log()[-2000:]
    first = text.splitlines()[0]
    assert re.fullmatch(
        r"127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
        r'"GET http://127\.0\.0\.1:\d+/echo/combined HTTP/1\.1" 200 \d+ "[^"]*" "[^"]*"',
        first,
    ), first
    assert " 502 " in text.splitlines()[1]
    for secret in SECRETS:
        assert secret not in text and secret not in p.log()


# -- metrics --------------------------------------------------------------------------------


def test_metricsCountRequestsConnectionsAndBytes(startProxy, origin, sink) -> None:
    p = startProxy()
    text = p.metrics()
    connectionsBefore = p.metric("proxygate_client_connections_total")
    for name in (
        "proxygate_requests_total",
        "proxygate_client_connections",
        "proxygate_client_connections_total",
        "proxygate_transferred_bytes_total",
        "proxygate_denied_total",
        "proxygate_upstream_errors_total",
    ):
        assert re.search(rf"^# TYPE {name.removesuffix('_total')} ", text, re.M) or name in text, (
            name
        )
    with Wire(p.port) as w:
        # Head and whole body in one write, before the origin is dialled: the body waits.
        w.request("POST", sink.url(), [("Transfer-Encoding", "chunked")], chunked(payload(7000)))
        assert w.response().json()["bytes"] == 7000
        w.request("GET", origin.url("/bytes/100000"))
        assert w.response().length == 100000
        assert waitFor(lambda: p.metric("proxygate_client_connections") == 1)
        w.request("POST", sink.url(), [("Content-Length", "5000")], payload(5000))
        assert w.response().status == 200
    fetch(p, "GET", origin.url("/status/404"))
    assert waitFor(lambda: p.metric("proxygate_client_connections") == 0)
    assert p.metric("proxygate_client_connections_total") == connectionsBefore + 2
    assert p.metric("proxygate_requests_total", mode="forward", method="GET", code="200") == 1
    assert p.metric("proxygate_requests_total", mode="forward", method="POST", code="200") == 2
    assert p.metric("proxygate_requests_total", mode="forward", method="GET", code="404") == 1
    assert p.metric("proxygate_transferred_bytes_total", direction="to_client") >= 100000
    assert p.metric("proxygate_transferred_bytes_total", direction="from_upstream") >= 100000
    assert p.metric("proxygate_transferred_bytes_total", direction="from_client") >= 12000
    assert p.metric("proxygate_transferred_bytes_total", direction="to_upstream") >= 12000
    assert "127.0.0.1" not in "".join(
        li for li in p.metrics().splitlines() if li.startswith("proxygate_")
    )
