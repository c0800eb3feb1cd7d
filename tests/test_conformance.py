"""
The RFC 9110/9112 intermediary checklist (shared/reference/rfc-checklist-and-cves.md,
sections A-E) and the CVE shapes of other forward proxies, as one table.

Each row is data: an id, the RFC section (or CVE) it proves, the raw bytes a client sends,
what a recording loopback origin (tests/support/recorder.py) answers, what the client must get back,
and what the origin must have received: its exact bytes, a predicate on them, or nothing at
all. One parametrized runner sends every row through one proxygate under twistd, reads the
answers with a strict reader (anything that is not well-formed HTTP/1.1 fails the row), and
after every row checks that the proxy still serves a normal request on a new connection and
that the origin saw exactly that request. A few rows that need timing or interaction
(100-continue, half-close, upgraded streams, TLS ALPN) are small functions after the table.

Templates in the bytes: C{{o}} is the origin's C{127.0.0.1:port}, C{{r}} the row's own path
(the origin's script for the row is keyed by it), C{{p}} the proxy's port, C{{x}} a closed
port, C{{b}} a port that never completes a connection. Ids read
``<checklist item>-<what>--<RFC section or CVE>``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.support import LOOPBACK_INI, ProxyProcess, nonAcceptingPort
from tests.support.recorder import (
    BODY,
    CLOSE,
    ECHO,
    OK,
    RESET,
    Client,
    Recorder,
    Response,
    View,
    send,
    sleep,
)

# -- the proxy and the origin ---------------------------------------------------------------

# ftp = off: the rows are HTTP's; with it off an ftp:// URL is refused like any other scheme
# (A8). The FTP gateway, on by default, has tests/test_ftp_proxy.py.
INI = LOOPBACK_INI.replace("connect_ports = 1-65535", "connect_ports = 1024-65535") + (
    "header_timeout = 5\nidle_timeout = 20\nconnect_timeout = 1\nftp = off\n"
)


@pytest.fixture(scope="module")
def rec():
    r = Recorder()
    yield r
    r.close()


OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@pytest.fixture(scope="module")
def fresh():
    """An origin that closes after every response: the proxy always dials it anew, so a
    request body arrives while the connection is still being made."""
    r = Recorder(default=[BODY, send(OK_CLOSE), CLOSE])
    yield r
    r.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    p = ProxyProcess(tmp_path_factory.mktemp("conformance"), INI).start()
    yield p
    p.stop()


PASSWORD = "s3cret"


@pytest.fixture(scope="module")
def authProxy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conformance-auth")
    digest = base64.b64encode(hashlib.sha1(PASSWORD.encode()).digest()).decode()
    (folder / "htpasswd").write_text(f"alice:{{SHA}}{digest}\n")
    p = ProxyProcess(folder, INI + f"\n[auth]\nhtpasswd = {folder / 'htpasswd'}\n").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def blackhole():
    """A loopback port whose full accept queue drops further SYNs: a connect never ends."""
    with nonAcceptingPort() as port:
        yield port


# -- the table ---------------------------------------------------------------------------------

NOTHING = "nothing"  # the origin received no byte at all
CLOSED = "closed"  # the client gets no response: the proxy just closes
TRUNCATED = "truncated"  # a response head, then a body that never completes, then a close


@dataclass(frozen=True)
class Row:
    id: str
    rfc: str
    request: bytes
    reply: list[tuple] | bytes | None  # the origin's script (bytes: read body, then send)
    client: int | list[int] | str | Callable[[list[Response]], object]
    origin: bytes | str | Callable[[View], object]
    close: bool | None = None  # the proxy closes after (True) / keeps the connection (False)
    methods: tuple[bytes, ...] = ()  # per response; default GET (HEAD/CONNECT change reading)
    originClosed: bool = False  # the origin connection that served the row is not reused
    tail: bytes = b""  # exact bytes after the responses (an upgraded or tunnelled stream)
    then: bytes = b""  # sent by the client once the responses are read
    shut: bool = False  # the client half-closes after sending the request
    proxy: str = "proxy"  # or "authProxy"
    origin_: str = "rec"  # or "fresh": an origin the proxy never pools (always dialled)


def R(id: str, rfc: str, request: bytes, reply, client, origin, **kw) -> pytest.param:
    return pytest.param(Row(id, rfc, request, reply, client, origin, **kw), id=f"{id}--{rfc}")


SMUGGLED_ORIGIN_FORM = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
VIA = b"Via: 1.1 proxygate\r\n"
VIA10 = b"Via: 1.0 proxygate\r\n"


def fwd(start: bytes = b"GET {r}", fields: bytes = b"", body: bytes = b"", via: bytes = VIA):
    """The exact request head (and body) the origin gets for a simple forwarded request."""
    return start + b" HTTP/1.1\r\nHost: {o}\r\n" + fields + via + b"\r\n" + body


def get(
    target: bytes = b"http://{o}{r}",
    fields: bytes = b"",
    version: bytes = b"HTTP/1.1",
    host: bytes | None = b"{o}",
    method: bytes = b"GET",
    body: bytes = b"",
) -> bytes:
    hostLine = b"Host: " + host + b"\r\n" if host is not None else b""
    return method + b" " + target + b" " + version + b"\r\n" + hostLine + fields + b"\r\n" + body


def post(fields: bytes, body: bytes = b"", target: bytes = b"http://{o}{r}") -> bytes:
    return get(target, fields, method=b"POST", body=body)


def status(code: int, *checks: Callable[[Response], object]):
    """A client check: one final response with C{code}, and C{checks} on it."""

    def check(responses: list[Response]) -> None:
        r = responses[-1]
        assert r.status == code, r
        for c in checks:
            assert c(r) is not False, (c, r)

    check.status = code
    return check


def chunkedBody(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)


H101 = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
BASIC_OK = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:" + PASSWORD.encode())
CONNECT = b"CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n"
TUNNELLED = b"GET {r} HTTP/1.1\r\nHost: tunnel.test\r\n\r\n"

A = [
    # A1 absolute-form in, origin-form out, path and query byte for byte (A5)
    R(
        "A1-absolute-form-to-origin-form",
        "9112-3.2.2",
        get(b"http://{o}{r}?q=1&b=%20"),
        None,
        200,
        fwd(b"GET {r}?q=1&b=%20"),
        close=False,
    ),
    R(
        "A1-empty-path-becomes-slash",
        "9112-3.2.4",
        get(b"http://{o}"),
        None,
        200,
        fwd(b"GET /"),
        close=False,
    ),
    R(
        "A1-query-without-path",
        "9112-3.2.4",
        get(b"http://{o}?x=1"),
        None,
        200,
        fwd(b"GET /?x=1"),
        close=False,
    ),
    R(
        "A1-options-empty-path-is-asterisk",
        "9112-3.2.4",
        get(b"http://{o}", method=b"OPTIONS"),
        None,
        200,
        fwd(b"OPTIONS *"),
        close=False,
    ),
    R(
        "A1-options-slash-stays-slash",
        "9112-3.2.4",
        get(b"http://{o}/", method=b"OPTIONS"),
        None,
        200,
        fwd(b"OPTIONS /"),
        close=False,
    ),
    R(
        "A1-scheme-case-insensitive",
        "3986-3.1",
        get(b"HTTP://{o}{r}"),
        None,
        200,
        fwd(),
        close=False,
    ),
    R(
        "A5-path-not-normalised",
        "9110-7.7",
        get(b"http://{o}{r}/a/../b/./%2e%2E/c%2F\\d?x=/../"),
        None,
        200,
        fwd(b"GET {r}/a/../b/./%2e%2E/c%2F\\d?x=/../"),
        close=False,
    ),
    # A2 Host comes from the target; A3 Host rules
    R(
        "A2-host-replaced-from-target",
        "9112-3.2.2",
        get(host=b"evil.example"),
        None,
        200,
        fwd(),
        close=False,
    ),
    R(
        "A2-http10-without-host",
        "9112-3.2",
        get(version=b"HTTP/1.0", host=None),
        None,
        200,
        fwd(via=VIA10),
        close=True,
    ),
    R("A3-http11-missing-host", "9112-3.2", get(host=None), None, 400, NOTHING, close=True),
    R(
        "A3-two-host-lines",
        "9112-3.2",
        get(fields=b"Host: other\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R("A3-host-invalid-value", "9112-3.2", get(host=b"a b"), None, 400, NOTHING, close=True),
    R("A3-host-with-userinfo", "9112-3.2", get(host=b"user@{o}"), None, 400, NOTHING, close=True),
    R("A3-host-bad-port", "9112-3.2", get(host=b"127.0.0.1:http"), None, 400, NOTHING, close=True),
    # A4 origin-form and asterisk-form to the proxy itself
    R("A4-origin-form-400", "9112-3.2.1", get(b"{r}"), None, 400, NOTHING, close=False),
    R(
        "A4-asterisk-form-400",
        "9112-3.2.4",
        get(b"*", method=b"OPTIONS"),
        None,
        400,
        NOTHING,
        close=False,
    ),
    R(
        "A4-origin-form-with-body-closes",
        "9112-3.2.1",
        get(
            b"{r}", b"Content-Length: %d\r\n" % len(SMUGGLED_ORIGIN_FORM), body=SMUGGLED_ORIGIN_FORM
        ),
        None,
        400,
        NOTHING,
        close=True,
    ),
    # A6 fragment, whitespace and control characters in the target
    R(
        "A6-fragment",
        "9112-3.2+CVE-2023-45539",
        get(b"http://{o}{r}#frag"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A6-space-in-target",
        "9112-3.2+CVE-2020-25097",
        get(b"http://{o}{r} x"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R("A6-htab-in-target", "9112-3.2", get(b"http://{o}{r}\tx"), None, 400, NOTHING, close=True),
    R("A6-ctl-in-target", "9112-3.2", get(b"http://{o}{r}\x01"), None, 400, NOTHING, close=True),
    R("A6-del-in-target", "9112-3.2", get(b"http://{o}{r}\x7f"), None, 400, NOTHING, close=True),
    R(
        "A6-obs-text-in-target",
        "9112-3.2",
        get(b"http://{o}{r}\xc3\xa9"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A6-double-space-request-line",
        "9112-3",
        b"GET  http://{o}{r} HTTP/1.1\r\nHost: {o}\r\n\r\n",
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A6-trailing-space-request-line",
        "9112-3",
        b"GET http://{o}{r} HTTP/1.1 \r\nHost: {o}\r\n\r\n",
        None,
        400,
        NOTHING,
        close=True,
    ),
    R("A6-lowercase-version", "9112-2.3", get(version=b"http/1.1"), None, 400, NOTHING, close=True),
    R("A6-http2-version", "9112-2.3", get(version=b"HTTP/2.0"), None, 505, NOTHING, close=True),
    # A7 loops back to the proxy
    R(
        "A7-loop-to-proxy",
        "9110-7.6",
        get(b"http://127.0.0.1:{p}/", host=b"127.0.0.1:{p}"),
        None,
        403,
        NOTHING,
    ),
    R(
        "A7-loop-to-proxy-by-name",
        "9110-7.6",
        get(b"http://localhost:{p}/", host=b"x"),
        None,
        403,
        NOTHING,
    ),
    R(
        "A7-connect-loop-to-proxy",
        "9110-7.6",
        b"CONNECT 127.0.0.1:{p} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n",
        None,
        403,
        NOTHING,
        close=True,
        methods=(b"CONNECT",),
    ),
    # A8 userinfo; only http:// is forwarded (Squid's gopher/urn/ftp CVEs)
    R("A8-userinfo", "9110-4.2.4", get(b"http://u:p@{o}{r}"), None, 400, NOTHING, close=True),
    R(
        "A8-userinfo-user-only",
        "9110-4.2.4",
        get(b"http://u@{o}{r}"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R("A8-userinfo-empty", "9110-4.2.4", get(b"http://@{o}{r}"), None, 400, NOTHING, close=True),
    R("A8-empty-authority", "9110-4.2.1", get(b"http:///x"), None, 400, NOTHING, close=True),
    R(
        "A8-host-empty-label",
        "9110-4.2.1+1035-2.3.4",
        get(b"http://a..b/x"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A8-host-leading-dot",
        "9110-4.2.1+1035-2.3.4",
        get(b"http://.a/x"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A8-host-label-too-long",
        "9110-4.2.1+1035-2.3.4",
        get(b"http://" + b"a" * 64 + b".b/x"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A8-connect-host-empty-label",
        "9110-9.3.6",
        b"CONNECT a..b:1080 HTTP/1.1\r\nHost: x\r\n\r\n",
        None,
        400,
        NOTHING,
        close=True,
        methods=(b"CONNECT",),
    ),
    R(
        "A8-scheme-https-in-plain",
        "9110-4.2.2",
        get(b"https://{o}{r}"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R("A8-scheme-ftp", "CVE-2026-47729", get(b"ftp://{o}{r}"), None, 400, NOTHING, close=True),
    R(
        "A8-scheme-gopher",
        "CVE-2023-46728",
        get(b"gopher://{o}{r}"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A8-scheme-urn",
        "CVE-2021-28651",
        get(b"urn:isbn:0451450523"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A8-scheme-file",
        "5.10-scheme-allow-list",
        get(b"file:///etc/passwd"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "A8-scheme-unix",
        "CVE-2021-40438",
        get(b"unix:/run/x.sock|http://{o}/"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R("A8-scheme-ws", "6455-3", get(b"ws://{o}{r}"), None, 400, NOTHING, close=True),
]

B = [
    # B9 Connection processing
    R(
        "B9-connection-listed-fields-removed",
        "9110-7.6.1",
        get(
            fields=b"Connection: x-a, , X-B\r\nconnection: x-c\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n"
            b"X-D: 4\r\n"
        ),
        None,
        200,
        fwd(fields=b"X-D: 4\r\n"),
        close=False,
    ),
    R(
        "B10-hop-by-hop-always-removed",
        "9110-7.6.1",
        get(
            fields=b"Proxy-Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
            b"Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eDp5\r\n"
            b"Proxy-Authenticate: Basic\r\nX-E: 5\r\n"
        ),
        None,
        200,
        fwd(fields=b"X-E: 5\r\n"),
        close=False,
    ),
    R(
        "B11-connection-cannot-strip-host-length-via",
        "9110-7.6.1+CVE-2021-33197",
        post(
            b"Connection: via, x-forwarded-for, host, content-length\r\nContent-Length: 5\r\n",
            b"hello",
        ),
        None,
        200,
        fwd(b"POST {r}", b"Content-Length: 5\r\n", b"hello"),
        close=False,
    ),
    R(
        "B12-connection-connection",
        "CVE-2023-49606",
        get(fields=b"Connection: Connection\r\n"),
        None,
        200,
        fwd(),
        close=False,
    ),
    R(
        "B12-connection-proxy-connection",
        "CVE-2023-49606",
        get(fields=b"Connection: Proxy-Connection\r\nProxy-Connection: close\r\n"),
        None,
        200,
        fwd(),
        close=False,
    ),
    R(
        "B12-connection-close-close",
        "9110-7.6.1",
        get(fields=b"Connection: close, close\r\n"),
        None,
        200,
        fwd(),
        close=True,
    ),
    R(
        "B12-connection-close-case",
        "9110-7.6.1",
        get(fields=b"Connection: CLOSE\r\n"),
        None,
        200,
        fwd(),
        close=True,
    ),
    # B13 end-to-end fields forwarded, order of same-name lines kept
    R(
        "B13-order-preserved",
        "9110-5.3",
        get(fields=b"X-M: 1\r\nAccept: a\r\nX-M: 2\r\nCookie: a=1\r\nCookie: b=2\r\nx-m: 3\r\n"),
        None,
        200,
        fwd(fields=b"X-M: 1\r\nAccept: a\r\nX-M: 2\r\nCookie: a=1\r\nCookie: b=2\r\nx-m: 3\r\n"),
        close=False,
    ),
    R(
        "B13-set-cookie-never-joined",
        "9110-5.3",
        get(),
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2, c=3\r\n"
        b"Content-Length: 2\r\n\r\nok",
        status(200, lambda r: r.all("set-cookie") == [b"a=1", b"b=2, c=3"]),
        fwd(),
        close=False,
    ),
    # B14 Via; B22 Date
    R(
        "B14-via-appended-request",
        "9110-7.6.3",
        get(fields=b"Via: 1.0 first\r\n"),
        None,
        200,
        fwd(fields=b"Via: 1.0 first\r\n"),
        close=False,
    ),
    R(
        "B14-via-appended-response",
        "9110-7.6.3",
        get(),
        b"HTTP/1.1 200 OK\r\nVia: 1.0 upstream\r\nContent-Length: 2\r\n\r\nok",
        status(200, lambda r: r.all("via") == [b"1.0 upstream", b"1.1 proxygate"]),
        fwd(),
        close=False,
    ),
    R(
        "B22-date-added",
        "9110-6.6.1",
        get(),
        OK,
        status(
            200,
            lambda r: (
                len(r.all("date")) == 1
                and re.fullmatch(
                    rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT", r.get("date")
                )
            ),
        ),
        fwd(),
        close=False,
    ),
    R(
        "B22-date-kept",
        "9110-6.6.1",
        get(),
        b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n\r\nok",
        status(200, lambda r: r.all("date") == [b"Sun, 06 Nov 1994 08:49:37 GMT"]),
        fwd(),
        close=False,
    ),
    # B15 Max-Forwards
    R(
        "B15-trace-max-forwards-decremented",
        "9110-7.6.2",
        get(fields=b"Max-Forwards: 2\r\n", method=b"TRACE"),
        None,
        200,
        fwd(b"TRACE {r}", b"Max-Forwards: 1\r\n"),
        close=False,
    ),
    R(
        "B15-options-max-forwards-decremented",
        "9110-7.6.2",
        get(fields=b"Max-Forwards: 5\r\n", method=b"OPTIONS"),
        None,
        200,
        fwd(b"OPTIONS {r}", b"Max-Forwards: 4\r\n"),
        close=False,
    ),
    R(
        "B15-options-max-forwards-0-answered",
        "9110-7.6.2",
        get(fields=b"Max-Forwards: 0\r\n", method=b"OPTIONS"),
        None,
        200,
        NOTHING,
        close=False,
    ),
    R(
        "B15-trace-max-forwards-0-answered",
        "9110-7.6.2",
        get(fields=b"Max-Forwards: 0\r\n", method=b"TRACE"),
        None,
        405,
        NOTHING,
        close=False,
    ),
    R(
        "B15-never-added",
        "9110-9.3.7",
        get(method=b"TRACE"),
        None,
        200,
        fwd(b"TRACE {r}"),
        close=False,
    ),
    R(
        "B15-other-methods-untouched",
        "9110-7.6.2",
        get(fields=b"Max-Forwards: x\r\n"),
        None,
        200,
        fwd(fields=b"Max-Forwards: x\r\n"),
        close=False,
    ),
    R(
        "B15-invalid-on-trace",
        "9110-7.6.2",
        get(fields=b"Max-Forwards: 1\r\nMax-Forwards: x\r\n", method=b"TRACE"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B15-list-on-options",
        "9110-7.6.2",
        get(fields=b"Max-Forwards: 3, 4\r\n", method=b"OPTIONS"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    # B16 end-to-end authentication fields untouched
    R(
        "B16-authorization-untouched",
        "9110-11.6.2",
        get(fields=b"Authorization: Basic dTpw\r\n"),
        b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="o"\r\n'
        b"Allow: GET, HEAD\r\nContent-Length: 0\r\n\r\n",
        status(
            401,
            lambda r: r.all("www-authenticate") == [b'Basic realm="o"'],
            lambda r: r.all("allow") == [b"GET, HEAD"],
        ),
        fwd(fields=b"Authorization: Basic dTpw\r\n"),
        close=False,
    ),
    # B17 CR, LF, NUL in values
    R("B17-nul-in-value", "9110-5.5", get(fields=b"X: a\x00b\r\n"), None, 400, NOTHING, close=True),
    R(
        "B17-bare-cr-in-value",
        "9110-5.5",
        get(fields=b"X: a\rb\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B17-vt-ff-del-in-value",
        "9110-5.5",
        get(fields=b"X: a\x0b\x0c\x7fb\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B17-response-nul-in-value",
        "9110-5.5",
        get(),
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        502,
        fwd(),
        originClosed=True,
    ),
    R(
        "B17-response-bare-cr",
        "9112-2.2",
        get(),
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 2\r\n\r\nok",
        502,
        fwd(),
        originClosed=True,
    ),
    # B18 whitespace before the colon
    R(
        "B18-request-space-before-colon",
        "9112-5.1",
        get(fields=b"X-A : b\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B18-request-te-space-before-colon",
        "9112-5.1",
        post(b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"hello"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B18-response-space-removed",
        "9112-5.1",
        get(),
        b"HTTP/1.1 200 OK\r\nX-Bad : v\r\nContent-Length: 2\r\n\r\nok",
        status(200, lambda r: r.all("x-bad") == [b"v"]),
        fwd(),
        close=False,
    ),
    # B19 obs-fold
    R(
        "B19-request-obs-fold",
        "9112-5.2",
        get(fields=b"X-F: a\r\n b\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B19-response-obs-fold-unfolded",
        "9112-5.2",
        get(),
        b"HTTP/1.1 200 OK\r\nX-F: a\r\n\t b\r\nContent-Length: 2\r\n\r\nok",
        status(200, lambda r: r.all("x-f") == [b"a b"]),
        fwd(),
        close=False,
    ),
    R(
        "B19-response-obs-fold-first-line",
        "9112-5.2",
        get(),
        b"HTTP/1.1 200 OK\r\n X: a\r\nContent-Length: 2\r\n\r\nok",
        502,
        fwd(),
        originClosed=True,
    ),
    # B20 bare CR / bare LF
    R(
        "B20-bare-lf-line-ends",
        "9112-2.2",
        get().replace(b"\r\n", b"\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B20-bare-lf-one-line",
        "9112-2.2",
        get(fields=b"X: 1\nY: 2\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B20-bare-cr-request-line",
        "9112-2.2",
        b"GET http://{o}{r}\rHTTP/1.1\r\nHost: {o}\r\n\r\n",
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "B20-response-bare-lf",
        "9112-2.2",
        get(),
        OK.replace(b"\r\n", b"\n"),
        502,
        fwd(),
        originClosed=True,
    ),
    # B21 own version; HTTP/1.0 clients never get chunked
    R(
        "B21-http10-client-forwarded-as-11",
        "9112-2.3",
        get(version=b"HTTP/1.0"),
        None,
        200,
        fwd(via=VIA10),
        close=True,
    ),
    R(
        "B21-chunked-to-http10-client-is-close-delimited",
        "9112-6.1",
        get(version=b"HTTP/1.0"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        status(200, lambda r: r.framing == "close" and r.body == b"hello"),
        fwd(via=VIA10),
        close=True,
    ),
    # B23 limits
    R(
        "B23-request-head-too-large",
        "9110-15.5.32",
        get(fields=b"X: " + b"a" * 70000 + b"\r\n"),
        None,
        431,
        NOTHING,
        close=True,
    ),
    R(
        "B23-too-many-fields",
        "9110-15.5.32",
        get(fields=b"X: 1\r\n" * 101),
        None,
        431,
        NOTHING,
        close=True,
    ),
    R(
        "B23-response-head-too-large",
        "9110-15.6.3",
        get(),
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok",
        502,
        fwd(),
        originClosed=True,
    ),
    R(
        "B23-response-too-many-fields",
        "9110-15.6.3",
        get(),
        b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 201 + b"Content-Length: 2\r\n\r\nok",
        502,
        fwd(),
        originClosed=True,
    ),
]

SMUGGLED = get(b"http://{o}/smuggled")

C = [
    # C24 CL + TE (request)
    R(
        "C24-cl-and-te",
        "9112-6.1+CVE-2026-54387",
        post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C24-te-and-cl",
        "9112-6.1",
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", b"0\r\n\r\n" + SMUGGLED),
        None,
        400,
        NOTHING,
        close=True,
    ),
    # C25 codings
    R(
        "C25-chunked-not-final",
        "9112-6.3",
        post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C25-unknown-coding",
        "9112-6.1",
        post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
        None,
        501,
        NOTHING,
        close=True,
    ),
    # C26 TE obfuscations
    R(
        "C26-chunked-any-case",
        "CVE-2026-31842",
        post(b"Transfer-Encoding: Chunked\r\n", chunkedBody(b"hello") + SMUGGLED),
        None,
        [200, 200],
        fwd(b"POST {r}", b"Transfer-Encoding: chunked\r\n", chunkedBody(b"hello"))
        + fwd(b"GET /smuggled"),
        close=False,
    ),
    R(
        "C26-CHUNKED-upper",
        "CVE-2026-31842",
        post(b"transfer-encoding: CHUNKED\r\n", chunkedBody(b"hello")),
        None,
        200,
        fwd(b"POST {r}", b"Transfer-Encoding: chunked\r\n", chunkedBody(b"hello")),
        close=False,
    ),
    R(
        "C26-htab-before-chunked-is-ows",
        "9110-5.6.3",
        post(b"Transfer-Encoding:\tchunked\r\n", chunkedBody(b"hello")),
        None,
        200,
        fwd(b"POST {r}", b"Transfer-Encoding: chunked\r\n", chunkedBody(b"hello")),
        close=False,
    ),
    R(
        "C26-xchunked",
        "9112-6.3",
        post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C26-chunked-chunked",
        "9112-6.3",
        post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C26-two-te-lines",
        "9112-6.3",
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C26-identity",
        "9112-6.3",
        post(b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C26-empty-te",
        "9112-6.3+CVE-2023-40225",
        post(b"Transfer-Encoding: \r\nContent-Length: 5\r\n", b"hello"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C26-vtab-before-chunked",
        "9112-6.3",
        post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C26-nul-after-chunked",
        "9112-6.3",
        post(b"Transfer-Encoding: chunked\x00\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C26-folded-te",
        "9112-5.2",
        post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    # C27 TE in HTTP/1.0
    R(
        "C27-te-in-http10",
        "9112-6.1",
        get(
            method=b"POST",
            version=b"HTTP/1.0",
            fields=b"Transfer-Encoding: chunked\r\n",
            body=b"0\r\n\r\n",
        ),
        None,
        400,
        NOTHING,
        close=True,
    ),
    # C28 duplicate Content-Length
    R(
        "C28-two-different-lengths",
        "9112-6.3",
        post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C28-length-list-differs",
        "9112-6.3",
        post(b"Content-Length: 5, 6\r\n", b"hello!"),
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C28-identical-lengths-collapsed",
        "9110-8.6",
        post(b"Content-Length: 5\r\nContent-Length: 5, 5\r\n", b"hello"),
        None,
        200,
        fwd(b"POST {r}", b"Content-Length: 5\r\n", b"hello"),
        close=False,
    ),
    # C29 Content-Length grammar
    *[
        R(
            f"C29-content-length-{name}",
            "9110-8.6+CVE-2020-15049",
            post(b"Content-Length: " + value + b"\r\n", b"hello" + SMUGGLED),
            None,
            400,
            NOTHING,
            close=True,
        )
        for name, value in [
            ("plus", b"+5"),
            ("minus", b"-1"),
            ("hex", b"0x5"),
            ("two-numbers", b"5 5"),
            ("empty", b""),
            ("underscore", b"1_0"),
            ("trailing-junk", b"5a"),
            ("overflow", b"9" * 30),
            ("decimal-point", b"5.0"),
        ]
    ],
    R(
        "C29-leading-whitespace-is-ows",
        "9112-5.1+CVE-2020-15810",
        post(b"Content-Length:   5\r\n", b"hello"),
        None,
        200,
        fwd(b"POST {r}", b"Content-Length: 5\r\n", b"hello"),
        close=False,
    ),
    # C30 chunk-size grammar and chunk framing
    *[
        R(
            f"C30-chunked-{name}",
            "9112-7.1" + cve,
            post(b"Transfer-Encoding: chunked\r\n", body + SMUGGLED),
            None,
            400,
            lambda v: b"/smuggled" not in v.bytes and b"\r\n0\r\n\r\n" not in v.bytes,
            close=True,
        )
        for name, cve, body in [
            ("0x", "", b"0x5\r\nhello\r\n0\r\n\r\n"),
            ("plus", "", b"+5\r\nhello\r\n0\r\n\r\n"),
            ("minus", "", b"-1\r\nhello\r\n0\r\n\r\n"),
            ("leading-space", "", b" 5\r\nhello\r\n0\r\n\r\n"),
            ("trailing-space", "", b"5 \r\nhello\r\n0\r\n\r\n"),
            ("underscore", "", b"5_0\r\nhello\r\n0\r\n\r\n"),
            ("empty", "", b"\r\nhello\r\n0\r\n\r\n"),
            ("oversized-17", "+CVE-2026-3945", b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n"),
            ("llong-max", "+CVE-2026-3945", b"7fffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            ("data-not-followed-by-crlf", "+h11-GHSA", b"5\r\nhelloXX0\r\n\r\n"),
            ("data-longer-than-size", "+CVE-2023-46846", b"3\r\nhello\r\n0\r\n\r\n"),
            ("bare-lf-after-size", "+CVE-2025-22871", b"5\nhello\r\n0\r\n\r\n"),
            ("bare-lf-after-data", "+CVE-2025-22871", b"5\r\nhello\n0\r\n\r\n"),
            ("bare-lf-last-chunk", "+CVE-2025-22871", b"5\r\nhello\r\n0\n\r\n"),
            ("bare-lf-end", "+CVE-2025-22871", b"5\r\nhello\r\n0\r\n\n"),
            ("bare-cr-in-ext", "", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
            ("bad-extension", "", b"5;=\r\nhello\r\n0\r\n\r\n"),
            ("extension-too-long", "", b"5;a=" + b"b" * 8000 + b"\r\nhello\r\n0\r\n\r\n"),
        ]
    ],
    R(
        "C30-chunked-bare-lf-refused-at-once",
        "9112-7.1+CVE-2025-22871",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\n"),
        None,
        400,
        lambda v: b"\r\n0\r\n\r\n" not in v.bytes,
        close=True,
    ),
    # a body that is complete before the origin connection is: queued, then sent once
    R(
        "C30-chunked-body-queued-while-dialling",
        "9112-7.1",
        post(b"Transfer-Encoding: chunked\r\n", chunkedBody(b"hello")),
        None,
        200,
        fwd(b"POST {r}", b"Transfer-Encoding: chunked\r\n", chunkedBody(b"hello")),
        close=False,
        origin_="fresh",
    ),
    R(
        "C30-empty-chunked-body-queued-while-dialling",
        "9112-7.1",
        post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        None,
        200,
        fwd(b"POST {r}", b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        close=False,
        origin_="fresh",
    ),
    R(
        "C29-length-body-queued-while-dialling",
        "9112-6.2",
        post(b"Content-Length: 5\r\n", b"hello"),
        None,
        200,
        fwd(b"POST {r}", b"Content-Length: 5\r\n", b"hello"),
        close=False,
        origin_="fresh",
    ),
    R(
        "C30-extensions-dropped",
        "9112-7.1.1",
        post(b"Transfer-Encoding: chunked\r\n", b'5;a=b;c="d e"\r\nhello\r\n0;z\r\n\r\n'),
        None,
        200,
        fwd(b"POST {r}", b"Transfer-Encoding: chunked\r\n", chunkedBody(b"hello")),
        close=False,
    ),
    # C31 trailers never change framing or routing
    R(
        "C31-request-trailers-dropped",
        "9112-7.1.2",
        post(
            b"Transfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n0\r\nContent-Length: 50\r\nTransfer-Encoding: identity\r\n"
            b"Host: evil.example\r\n\r\n",
        ),
        None,
        200,
        fwd(b"POST {r}", b"Transfer-Encoding: chunked\r\n", chunkedBody(b"hello")),
        close=False,
    ),
    R(
        "C31-response-trailers-dropped",
        "9112-7.1.2",
        get(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        b"Content-Length: 0\r\nTransfer-Encoding: identity\r\nConnection: close\r\n\r\n",
        status(
            200, lambda r: r.body == b"hello" and not r.trailers and not r.all("content-length")
        ),
        fwd(),
        close=False,
    ),
    # C32 incomplete request body: never forwarded as complete
    R(
        "C32-length-body-cut",
        "9112-6.3",
        post(b"Content-Length: 10\r\n", b"hello"),
        None,
        CLOSED,
        lambda v: not v.bytes or v.bytes.endswith(b"hello"),
        shut=True,
    ),
    R(
        "C32-chunked-body-cut",
        "9112-6.3",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"),
        None,
        CLOSED,
        lambda v: b"\r\n0\r\n\r\n" not in v.bytes,
        shut=True,
    ),
    # C33 pipelining
    R(
        "C33-pipelined-in-order",
        "9112-9.3.2",
        get(b"http://{o}{r}/1") + get(b"http://{o}{r}/2"),
        None,
        [200, 200],
        fwd(b"GET {r}/1") + fwd(b"GET {r}/2"),
        close=False,
    ),
    R(
        "C33-pipelined-after-error",
        "9112-9.3.2+CVE-2022-22720",
        post(b"Content-Length: +5\r\n", b"hello") + SMUGGLED,
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C33-pipelined-after-malformed-head",
        "9112-9.3.2",
        get(b"http://{o}{r}#x") + SMUGGLED,
        None,
        400,
        NOTHING,
        close=True,
    ),
    R(
        "C33-pipelined-after-complete-local-answer",
        "9112-9.3.2",
        get(b"/", host=b"x") + get(),
        None,
        [400, 200],
        fwd(),
        close=False,
    ),
    R(
        "C33-body-after-early-response-not-a-request",
        "9112-9.3.2",
        post(b"Content-Length: 40\r\n", SMUGGLED[:20]),
        [send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")],
        status(413, lambda r: b"close" in r.tokens("connection")),
        fwd(b"POST {r}", b"Content-Length: 40\r\n", SMUGGLED[:20]),
        close=True,
        originClosed=True,
    ),
    # C34 responses without a body end at the blank line; extra bytes dropped, no reuse
    R(
        "C34-head-response-with-body",
        "9112-6.3",
        get(method=b"HEAD"),
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        status(200, lambda r: r.get("content-length") == b"5" and r.body == b""),
        fwd(b"HEAD {r}"),
        close=False,
        methods=(b"HEAD",),
        originClosed=True,
    ),
    R(
        "C34-bytes-after-204",
        "9112-6.3",
        get(),
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello" + OK,
        status(204),
        fwd(),
        close=False,
        originClosed=True,
    ),
    R(
        "C34-bytes-after-304",
        "9112-6.3",
        get(),
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello" + OK,
        status(304, lambda r: r.get("content-length") == b"5"),
        fwd(),
        close=False,
        originClosed=True,
    ),
    R(
        "C34-1xx-before-final",
        "9110-15.2",
        get(),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK,
        status(
            200,
            lambda r: [i.status for i in r.interim] == [100, 103],
            lambda r: r.interim[1].all("link") == [b"</s.css>"],
            lambda r: r.body == b"ok",
        ),
        fwd(),
        close=False,
    ),
    R(
        "C34-1xx-never-to-http10",
        "9110-15.2",
        get(version=b"HTTP/1.0"),
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK,
        status(200, lambda r: not r.interim),
        fwd(via=VIA10),
        close=True,
    ),
    R("C34-unasked-101", "9110-15.2.2", get(), H101 + b"xx", 502, fwd(), originClosed=True),
    # C35 no length: re-chunked for HTTP/1.1, close-delimited for HTTP/1.0
    R(
        "C35-no-length-rechunked",
        "9112-6.3",
        get(),
        [BODY, send(b"HTTP/1.1 200 OK\r\n\r\nhello"), CLOSE],
        status(200, lambda r: r.framing == "chunked" and r.body == b"hello"),
        fwd(),
        close=False,
    ),
    R(
        "C35-no-length-http10-client",
        "9112-6.3",
        get(version=b"HTTP/1.0"),
        [BODY, send(b"HTTP/1.1 200 OK\r\n\r\nhello"), CLOSE],
        status(200, lambda r: r.framing == "close" and r.body == b"hello"),
        fwd(via=VIA10),
        close=True,
    ),
    # C36 response framing: CL+TE, invalid CL
    R(
        "C36-response-cl-and-te",
        "9112-6.3",
        get(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        status(200, lambda r: r.framing == "chunked" and r.body == b"hello"),
        fwd(),
        close=False,
        originClosed=True,
    ),
    R(
        "C36-response-two-lengths",
        "9112-6.3",
        get(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        502,
        fwd(),
        originClosed=True,
    ),
    R(
        "C36-response-length-plus",
        "9112-6.3+CVE-2020-15049",
        get(),
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        502,
        fwd(),
        originClosed=True,
    ),
    R(
        "C36-response-identical-lengths",
        "9110-8.6",
        get(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        status(200, lambda r: r.all("content-length") == [b"2"] and r.body == b"ok"),
        fwd(),
        close=False,
    ),
    R(
        "C36-response-unknown-coding",
        "9112-6.1",
        get(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        502,
        fwd(),
        originClosed=True,
    ),
    R(
        "C36-response-chunk-not-followed-by-crlf",
        "9112-7.1",
        get(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        TRUNCATED,
        fwd(),
        originClosed=True,
    ),
    R(
        "C36-response-chunk-size-oversized",
        "9112-7.1+CVE-2026-3945",
        get(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nx",
        TRUNCATED,
        fwd(),
        originClosed=True,
    ),
    R(
        "C36-response-chunk-bare-lf",
        "9112-7.1+CVE-2025-22871",
        get(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        TRUNCATED,
        fwd(),
        originClosed=True,
    ),
    # C37 extra data after a complete response
    R(
        "C37-extra-response-discarded",
        "9112-6.3",
        get(),
        OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil",
        status(200, lambda r: r.body == b"ok"),
        fwd(),
        close=False,
        originClosed=True,
    ),
    R(
        "C37-extra-bytes-after-length",
        "9112-6.3",
        get(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        status(200, lambda r: r.body == b"ok"),
        fwd(),
        close=False,
        originClosed=True,
    ),
    R(
        "C37-late-bytes-on-idle-connection",
        "9112-6.3",
        get(),
        [BODY, send(OK), sleep(0.1), send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")],
        status(200, lambda r: r.body == b"ok"),
        fwd(),
        originClosed=True,
    ),
]

D = [
    # D38 CONNECT target
    R(
        "D40-connect-2xx-unframed-early-bytes-relayed",
        "9110-9.3.6",
        CONNECT + TUNNELLED,
        None,
        lambda rs: (
            rs[0].raw == b"HTTP/1.1 200 Connection established\r\n\r\n"
            and rs[1].status == 200
            and rs[1].body == b"ok"
        ),
        TUNNELLED,
        methods=(b"CONNECT", b"GET"),
    ),
    *[
        R(
            f"D38-connect-target-{name}",
            "9110-9.3.6",
            b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n" + TUNNELLED,
            None,
            400,
            NOTHING,
            close=True,
            methods=(b"CONNECT",),
        )
        for name, target in [
            ("no-port", b"127.0.0.1"),
            ("empty-port", b"127.0.0.1:"),
            ("path", b"/x"),
            ("absolute-uri", b"http://{o}/"),
            ("userinfo", b"u@{o}"),
            ("port-zero", b"127.0.0.1:0"),
            ("port-too-big", b"127.0.0.1:65536"),
            ("bad-ipv6", b"[::1:{p}"),
            ("port-not-digits", b"127.0.0.1:+80"),
        ]
    ],
    R(
        "D38-connect-with-body",
        "9110-9.3.6",
        b"CONNECT {o} HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n\r\nhello",
        None,
        400,
        NOTHING,
        close=True,
        methods=(b"CONNECT",),
    ),
    R(
        "D38-connect-chunked",
        "9110-9.3.6",
        b"CONNECT {o} HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        None,
        400,
        NOTHING,
        close=True,
        methods=(b"CONNECT",),
    ),
    # D39 CONNECT ports
    R(
        "D39-connect-port-25",
        "9110-9.3.6",
        b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: x\r\n\r\n",
        None,
        403,
        NOTHING,
        close=True,
        methods=(b"CONNECT",),
    ),
    # D40 the 2xx of a CONNECT has no framing (the strict reader checks); D41: no HTTP
    # written into a tunnel when the origin resets
    R(
        "D41-tunnel-origin-reset-no-http-injected",
        "9110-9.3.6",
        CONNECT + TUNNELLED,
        [send(b"partial"), sleep(0.1), RESET],
        200,
        TUNNELLED,
        methods=(b"CONNECT",),
        tail=b"partial",
        close=True,
    ),
    # D42 Upgrade
    R(
        "D42-upgrade-101-becomes-pipe",
        "9110-7.8",
        get(fields=UPGRADE),
        [send(H101 + b"hello"), ECHO],
        status(101, lambda r: r.tokens("upgrade") == [b"websocket"]),
        fwd(fields=b"Connection: upgrade\r\nUpgrade: websocket\r\n")
        + b"GET /not-parsed HTTP/1.1\r\n\r\n",
        then=b"GET /not-parsed HTTP/1.1\r\n\r\n",
        tail=b"helloGET /not-parsed HTTP/1.1\r\n\r\n",
    ),
    R(
        "D42-upgraded-stream-origin-reset-no-http-injected",
        "9110-7.8",
        get(fields=UPGRADE),
        [send(H101 + b"bye"), sleep(0.1), RESET],
        101,
        fwd(fields=b"Connection: upgrade\r\nUpgrade: websocket\r\n"),
        tail=b"bye",
        close=True,
    ),
    R(
        "D42-101-to-a-protocol-not-offered",
        "9110-7.8",
        get(fields=UPGRADE),
        H101.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        502,
        fwd(fields=b"Connection: upgrade\r\nUpgrade: websocket\r\n"),
        originClosed=True,
    ),
    R(
        "D42-101-without-upgrade-field",
        "9110-15.2.2",
        get(fields=UPGRADE),
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n",
        502,
        fwd(fields=b"Connection: upgrade\r\nUpgrade: websocket\r\n"),
        originClosed=True,
    ),
    R(
        "D42-upgrade-refused-continues-as-http",
        "9110-7.8",
        get(fields=UPGRADE),
        OK,
        status(200, lambda r: r.body == b"ok"),
        fwd(fields=b"Connection: upgrade\r\nUpgrade: websocket\r\n"),
        close=False,
    ),
    R(
        "D42-upgrade-ignored-for-http10",
        "9110-7.8",
        get(fields=UPGRADE, version=b"HTTP/1.0"),
        None,
        200,
        fwd(via=VIA10),
        close=True,
    ),
    R(
        "D42-upgrade-not-listed-in-connection",
        "9110-7.8",
        get(fields=b"Upgrade: websocket\r\n"),
        None,
        200,
        fwd(),
        close=False,
    ),
    # D43/D44 Expect and 1xx are timed: see the functions below.
    # D45 HTTP/1.0 clients are not kept alive
    R(
        "D45-http10-keep-alive-not-kept",
        "9112-9.3",
        get(version=b"HTTP/1.0", fields=b"Connection: keep-alive\r\n"),
        None,
        status(200, lambda r: b"close" in r.tokens("connection")),
        fwd(via=VIA10),
        close=True,
    ),
    # D46 no retry of a non-idempotent request after an upstream reset
    R(
        "D46-post-not-retried-after-reset",
        "9110-9.2.2",
        get(b"http://{o}{r}/warm") + post(b"Content-Length: 0\r\n", target=b"http://{o}{r}"),
        [RESET],
        [200, 502],
        lambda v: v.requestLines().count(b"POST {r} HTTP/1.1") == 1,
    ),
    R(
        "D46-post-with-body-not-retried",
        "9110-9.2.2",
        get(b"http://{o}{r}/warm") + post(b"Content-Length: 5\r\n", b"hello"),
        [BODY, RESET],
        [200, 502],
        lambda v: v.requestLines().count(b"POST {r} HTTP/1.1") == 1,
    ),
    # D47 upstream failures; authentication (a proxy with [auth])
    R(
        "D47-refused-502",
        "9110-15.6.3",
        get(b"http://127.0.0.1:{x}/", host=b"x"),
        None,
        502,
        NOTHING,
    ),
    R(
        "D47-connect-timeout-504",
        "9110-15.6.5",
        get(b"http://127.0.0.1:{b}/", host=b"x"),
        None,
        504,
        NOTHING,
    ),
    *[
        R(
            f"D47-auth-{name}",
            "9110-11.7.1" + cve,
            request,
            None,
            status(407, lambda r: r.get("proxy-authenticate").startswith(b'Basic realm="')),
            NOTHING,
            proxy="authProxy",
            methods=(method,),
        )
        for name, cve, method, request in [
            ("missing", "", b"GET", get()),
            (
                "wrong-password",
                "+proxy.py-481",
                b"GET",
                get(
                    fields=b"Proxy-Authorization: Basic "
                    + base64.b64encode(b"alice:nope")
                    + b"\r\n"
                ),
            ),
            ("bad-base64", "", b"GET", get(fields=b"Proxy-Authorization: Basic ****\r\n")),
            (
                "no-colon",
                "",
                b"GET",
                get(fields=b"Proxy-Authorization: Basic " + base64.b64encode(b"alice") + b"\r\n"),
            ),
            ("empty", "", b"GET", get(fields=b"Proxy-Authorization: Basic\r\n")),
            ("two-headers", "", b"GET", get(fields=BASIC_OK + b"\r\n" + BASIC_OK + b"\r\n")),
            (
                "connect-http10-no-headers",
                "+proxy.py-1267",
                b"CONNECT",
                b"CONNECT {o} HTTP/1.0\r\n\r\n",
            ),
            (
                "expect-100-answered-at-once",
                "+9110-10.1.1",
                b"POST",
                post(b"Content-Length: 5\r\nExpect: 100-continue\r\n"),
            ),
        ]
    ],
    R(
        "D47-auth-ok-credentials-not-forwarded",
        "9110-11.7.2",
        get(fields=BASIC_OK + b"\r\n"),
        None,
        200,
        fwd(),
        proxy="authProxy",
        close=False,
    ),
]

TABLE = A + B + C + D


# -- the runner ----------------------------------------------------------------------------------


def fill(
    data: bytes, rec: Recorder, path: bytes, proxyPort: int, closedPort: int, blackholePort: int = 0
) -> bytes:
    return (
        data.replace(b"{o}", rec.authority.encode())
        .replace(b"{r}", path)
        .replace(b"{p}", b"%d" % proxyPort)
        .replace(b"{x}", b"%d" % closedPort)
        .replace(b"{b}", b"%d" % blackholePort)
    )


def untemplate(data: bytes, rec: Recorder, path: bytes, proxyPort: int) -> bytes:
    return (
        data.replace(path, b"{r}")
        .replace(rec.authority.encode(), b"{o}")
        .replace(b"127.0.0.1:%d" % proxyPort, b"127.0.0.1:{p}")
    )


def checkLocal(r: Response) -> None:
    """A proxy-made answer: short, no stack trace, framed."""
    assert b"Traceback" not in r.body and r.body.count(b"\n") <= 2, r


def assertServing(proxy: ProxyProcess, rec: Recorder, auth: bool = False) -> None:
    """A normal request on a fresh connection: answered, and all the origin saw."""
    mark = rec.mark()
    with Client(proxy.port) as c:
        c.send(
            b"GET http://%s/sanity HTTP/1.1\r\nHost: x\r\n%s\r\n"
            % (rec.authority.encode(), BASIC_OK + b"\r\n" if auth else b"")
        )
        r = c.response()
        assert (r.status, r.body) == (200, b"ok"), r
    rec.waitQuiet()
    lines = rec.since(mark).requestLines()
    # (a row's own request may still be arriving: only the smuggled kind is foreign here)
    assert lines.count(b"GET /sanity HTTP/1.1") == 1 and not any(b"smuggled" in x for x in lines)


@pytest.mark.parametrize("row", TABLE)
def test_row(row: Row, request, closedPort: int, blackhole: int) -> None:
    p: ProxyProcess = request.getfixturevalue(row.proxy)
    rec: Recorder = request.getfixturevalue(row.origin_)
    path = b"/t/" + row.id.encode()
    t = lambda data: fill(data, rec, path, p.port, closedPort, blackhole)  # noqa: E731
    if row.reply is not None:
        rec.script(path, [BODY, send(row.reply)] if isinstance(row.reply, bytes) else row.reply)
    rec.waitQuiet()
    mark = rec.mark()
    expected = row.client
    statuses = (
        expected
        if isinstance(expected, list)
        else []
        if expected in (CLOSED, TRUNCATED)
        else [getattr(expected, "status", expected if isinstance(expected, int) else None)]
    )
    methods = list(row.methods) + [b"GET"] * (len(statuses) - len(row.methods))
    with Client(p.port) as c:
        c.send(t(row.request))
        if row.shut:
            c.shutdown()
        responses = []
        if expected == TRUNCATED:
            with pytest.raises(EOFError):
                c.response(methods[0] if methods else b"GET")
        else:
            for method in methods:
                responses.append(c.response(method))
        if callable(expected):
            expected(responses)
        elif expected not in (CLOSED, TRUNCATED):
            assert [r.status for r in responses] == statuses, responses
        for r in responses:
            assert r.version == b"HTTP/1.1", r
            if r.status >= 400 and r.get("via") is None:
                checkLocal(r)
        if row.then:
            c.send(t(row.then))
        if row.tail:
            want = t(row.tail)
            while len(c.reader.buf) < len(want) and c.reader.fill():
                pass
            assert bytes(c.reader.buf[: len(want)]) == want
            del c.reader.buf[: len(want)]
        if row.close is True or expected in (CLOSED, TRUNCATED):
            closed, extra = c.rest()
            assert closed and extra == b"", (closed, extra)
        elif row.close is False:
            # Alive, and nothing stray before the next answer: ask once more on it.
            c.send(
                t(
                    b"GET http://{o}{r}/next HTTP/1.1\r\nHost: {o}\r\n"
                    + (BASIC_OK + b"\r\n" if row.proxy == "authProxy" else b"")
                    + b"\r\n"
                )
            )
            r = c.response()
            assert (r.status, r.body) == (200, b"ok"), r
    rec.waitQuiet()
    nxt = t(b"GET {r}/next HTTP/1.1\r\n")

    def rowView(v: View) -> View:
        """The row's bytes only (not the follow-up request), with the templates put back."""
        for conn in list(v.order):
            data = bytes(v.data[conn])
            if nxt in data:
                data = data[: data.index(nxt)]
                if not data:
                    v.order.remove(conn)
            v.data[conn] = bytearray(untemplate(data, rec, path, p.port))
        return v

    view = rowView(rec.since(mark))
    want = row.origin
    if want == NOTHING:
        assert view.bytes == b"", view.bytes
    elif isinstance(want, bytes):
        assert view.bytes == want
    else:
        assert want(view) is not False, view.bytes
    if row.originClosed:
        assert rec.waitFor(
            mark, lambda v: bool(rowView(v).order) and set(rowView(v).order) <= v.closed
        ), "the origin connection was kept after a broken response"
    assertServing(p, rec, auth=row.proxy == "authProxy")


# -- rows that need timing or interaction ---------------------------------------------------------


def _expect(proxy, rec, version: bytes) -> tuple[list[bytes], bytes, View]:
    path = b"/t/expect-" + version.replace(b"/", b"")
    rec.script(path, [send(b"HTTP/1.1 100 Continue\r\n\r\n"), BODY, send(OK)])
    mark = rec.mark()
    head = get(
        b"http://{o}" + path,
        b"Content-Length: 5\r\nExpect: 100-continue\r\n",
        version=version,
        method=b"POST",
    ).replace(b"{o}", rec.authority.encode())
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(head)
        got = b""
        if version == b"HTTP/1.1":
            while b"\r\n\r\n" not in got:
                data = s.recv(4096)
                assert data, got
                got += data
        else:
            time.sleep(0.3)  # an HTTP/1.0 client never waits for a 100: nor may it get one
        s.sendall(b"hello")
        s.settimeout(5)
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            got += data
            if got.endswith(b"\r\n\r\nok"):
                break
    rec.waitQuiet()
    lines = [line.split(b"\r\n", 1)[0] for line in re.split(rb"(?<=\r\n\r\n)(?=HTTP/)", got)]
    return lines, got, rec.since(mark)


def test_D43_expect100ContinueRelayed(proxy, rec) -> None:
    lines, got, view = _expect(proxy, rec, b"HTTP/1.1")
    assert lines[0] == b"HTTP/1.1 100 Continue", got
    assert lines[-1] == b"HTTP/1.1 200 OK", got
    head, _, body = view.bytes.partition(b"\r\n\r\n")
    assert b"\r\nExpect: 100-continue\r\n" in head + b"\r\n" and body == b"hello", view.bytes


def test_D44_noInterimResponseToAnHttp10Client(proxy, rec) -> None:
    lines, got, view = _expect(proxy, rec, b"HTTP/1.0")
    assert lines == [b"HTTP/1.1 200 OK"], got
    assert view.bytes.endswith(b"\r\n\r\nhello")


def test_D41_tunnelHalfCloseStillDeliversTheAnswer(proxy, rec) -> None:
    """9110-9.3.6: the client's FIN reaches the origin; the origin's reply still arrives."""
    path = b"/t/halfclose"
    rec.script(path, [send(OK), CLOSE])
    mark = rec.mark()
    authority = rec.authority.encode()
    with Client(proxy.port) as c:
        c.send(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
        assert c.response(b"CONNECT").raw == b"HTTP/1.1 200 Connection established\r\n\r\n"
        c.send(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
        c.shutdown()
        r = c.response()
        assert r.body == b"ok"
        closed, extra = c.rest()
        assert closed and extra == b""
    assert rec.waitFor(mark, lambda v: bool(v.closed))
    assert rec.since(mark).bytes == b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path


def test_D42_upgradedStreamIdleNeverGetsHTTP(proxy, rec) -> None:
    """After a 101, a pipe: an origin that closes cleanly ends it with no proxy bytes."""
    path = b"/t/upgrade-close"
    rec.script(path, [send(H101), sleep(0.2), CLOSE])
    with Client(proxy.port) as c:
        c.send(get(b"http://{o}" + path, UPGRADE).replace(b"{o}", rec.authority.encode()))
        assert c.response().status == 101
        closed, extra = c.rest()
        assert closed and extra == b""


# -- E: with [mitm] http2 = off the MITM speaks HTTP/1.1 only (RFC 9113 does not apply; with
# -- http2 on, an origin that chooses h2 gets h2 on both legs: tests/test_h2_mitm.py) -----------


@pytest.fixture(scope="module")
def tlsOrigin(tmp_path_factory):
    from tests.support.mitmorigin import OriginPKI

    pki = OriginPKI(tmp_path_factory.mktemp("conformance-pki"))
    ctx = pki.serverContext()
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # would pick h2 if the proxy offered it
    rec = Recorder(context=ctx)
    rec.pki = pki
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def mitmProxy(tmp_path_factory, tlsOrigin):
    folder = tmp_path_factory.mktemp("conformance-mitm")
    ini = (
        INI + f"\n[mitm]\nenabled = on\nhttp2 = off\nupstream_ca_bundle = {tlsOrigin.pki.caCert}\n"
    )
    p = ProxyProcess(folder, ini).start()
    yield p
    p.stop()


def _mitm(proxy, origin, alpn: list[str]) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % origin.authority.encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        data = sock.recv(1)
        assert data, head
        head += data
    assert head.startswith(b"HTTP/1.1 200 "), head
    ctx = ssl._create_unverified_context()
    ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(sock, server_hostname="localhost")


@pytest.mark.parametrize(
    ("offer", "selected"),
    [
        pytest.param(["h2", "http/1.1"], "http/1.1", id="E48-h2-first-gets-http1.1--9113-3.2"),
        pytest.param(["h2"], None, id="E48-h2-only-gets-no-alpn--9113-3.2"),
        pytest.param(["http/1.1"], "http/1.1", id="E48-http1.1--7301"),
    ],
)
def test_E48_mitmNeverSelectsH2(mitmProxy, tlsOrigin, offer, selected) -> None:
    mark = tlsOrigin.mark()
    with _mitm(mitmProxy, tlsOrigin, offer) as tls:
        assert tls.selected_alpn_protocol() == selected
        tls.sendall(b"GET /t/e48 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok"), data
    # The leg to the origin never offered h2 either (the origin prefers it).
    assert tlsOrigin.waitFor(mark, lambda v: bool(v.bytes))
    assert "h2" not in tlsOrigin.alpn
    assert tlsOrigin.since(mark).bytes.startswith(b"GET /t/e48 HTTP/1.1\r\nHost: 127.0.0.1")


def test_E48_h2PrefaceInsideTheTunnelIsRefused(mitmProxy, tlsOrigin) -> None:
    """An HTTP/2 connection preface is not a request: 505/400, and nothing reaches the origin."""
    mark = tlsOrigin.mark()
    with _mitm(mitmProxy, tlsOrigin, ["h2"]) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        data = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            data += chunk
    assert re.match(rb"HTTP/1\.1 (400|505) ", data), data
    tlsOrigin.waitQuiet()
    assert tlsOrigin.since(mark).bytes == b""


def test_noTracebackInTheProxyLog(proxy) -> None:
    """Every row above was handled, not crashed through."""
    log = proxy.log()
    assert "Traceback" not in log and "Unhandled" not in log, log[-5000:]
