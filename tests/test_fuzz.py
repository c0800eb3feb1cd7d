"""
Property-based and fuzz tests of the HTTP/1.1 parsers and of the running proxy.

Inputs are *near-valid* messages: valid heads and bodies built from parts, then mutated the
way smuggling payloads are (case changes; CR, LF, NUL, SP, HTAB, VT inserted; framing
fields duplicated with other values; odd numbers such as ``+5``, ``0x5``, ``5 5``, 30
digits; CRLF turned into LF; obs-fold). The properties:

- the sans-IO parsers (``parseRequestHead``, ``parseResponseHead``, ``requestFraming``,
  ``responseFraming``, ``ChunkedReader``) only ever return a value or raise ``HTTPError``,
  within a deadline (inputs are size-bounded, so a hang or a regex blow-up fails the test);
- a chunked body decodes the same however it is split into reads;
- ``requestFraming`` never accepts a message whose framing two reasonable peers would
  disagree on: when the proxy accepts a head, every lenient-but-reasonable reading of the
  same raw bytes (LF line ends, whitespace before the colon, first/last/atoi/int()
  Content-Length, "contains chunked", TE-over-CL or CL-over-TE) that does not reject it
  finds the same framing; the same for chunk sizes and the end of a chunked body;
- end to end: a few hundred generated requests go over sockets to one proxygate under
  twistd with a recording origin behind it; every answer is well-formed HTTP/1.1 (or just
  a close), the origin never parses a request that the client did not send as a first
  request line (smuggled payloads carry a ``/s/`` marker and sit inside bodies), and a
  normal request still works afterwards.

CI runs a derandomized, bounded campaign (well under 30 s). For a longer local campaign::

    PROXYGATE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py

which also randomizes the seed and keeps Hypothesis' example database (.hypothesis/), so
a failure found once is replayed first next time. Failures print the minimal input.
"""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.http1.framing import (
    CHUNKED,
    LENGTH,
    NONE,
    UNTIL_CLOSE,
    ChunkedReader,
    requestFraming,
    responseFraming,
)
from gateway.http1.parse import HTTPError, parseRequestHead, parseResponseHead
from tests.support import LOOPBACK_INI, ProxyProcess
from tests.support.recorder import Client, Malformed, Recorder, parseResponses

# -- budget ------------------------------------------------------------------------------------

CAMPAIGN = int(os.environ.get("PROXYGATE_FUZZ_EXAMPLES", "0") or 0)

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "campaign",
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# Applied per test (not loaded globally: other modules' Hypothesis tests keep theirs).
BASE = settings.get_profile("campaign" if CAMPAIGN else "ci")


def examples(ci: int) -> int:
    return CAMPAIGN or ci


FAST = timedelta(milliseconds=500)  # per example, sans-IO: a hang or a blow-up fails

# -- near-valid messages -------------------------------------------------------------------------

TOKENS = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"TRACE", b"DELETE", b"PATCH"]
ODD_NUMBERS = [
    b"+5",
    b"-1",
    b"0x5",
    b"05",
    b"5 5",
    b"5,5",
    b"5, 6",
    b"",
    b"1e3",
    b"9" * 30,
    b"\t5",
    b"5\t",
    b"0",
    b"1_0",
    b"5.0",
    b"\x005",
    b"ffffffffffffffff",
    b"7fffffffffffffff",
]
FRAMING_VALUES = [*ODD_NUMBERS, b"chunked", b"identity", b"gzip, chunked", b"Chunked"]
INSERTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b"\x0b",
    b"\x0c",
    b",",
    b";",
    b":",
    b"\r\n ",
    b"\r\n\r\n",
    b"\x7f",
    b"\xff",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 0\r\n",
]
EXTRA_FIELDS = [
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: Connection",
    b"Proxy-Connection: keep-alive",
    b"Keep-Alive: 5",
    b"TE: trailers",
    b"Upgrade: h2c",
    b"Expect: 100-continue",
    b"Max-Forwards: 3",
    b"Via: 1.0 x",
    b"X-A: b",
    b"Accept: */*",
    b"Cookie: a=1; b=2",
    b"Transfer_Encoding: chunked",
    b"Content-Type: text/plain",
]
SMUGGLE = b"GET /s/NNNNNN HTTP/1.1\r\nHost: a\r\n\r\n"  # NNNNNN: the example's number


@st.composite
def validRequest(draw, authority: bytes = b"127.0.0.1:9"):
    """(head without its blank line, body bytes, framing kind): a valid message."""
    method = draw(st.sampled_from(TOKENS))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    query = draw(st.sampled_from([b"", b"?a=1", b"?x=%20&y=/..", b"/sub/../x"]))
    target = b"http://" + authority + b"/f/NNNNNN" + query
    fields = []
    if version == b"HTTP/1.1" or draw(st.booleans()):
        fields.append(b"Host: " + authority)
    fields += draw(st.lists(st.sampled_from(EXTRA_FIELDS), max_size=3))
    payload = SMUGGLE if draw(st.booleans()) else draw(st.binary(max_size=40))
    kind = draw(
        st.sampled_from(
            ["none", "length", "chunked"] if version == b"HTTP/1.1" else ["none", "length"]
        )
    )
    body = b""
    if kind == "length":
        fields.append(b"Content-Length: %d" % len(payload))
        body = payload
    elif kind == "chunked":
        fields.append(b"Transfer-Encoding: chunked")
        cut = draw(st.integers(0, len(payload)))
        parts = [p for p in (payload[:cut], payload[cut:]) if p]
        body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    order = draw(st.permutations(fields))
    head = b"%s %s %s\r\n" % (method, target, version) + b"\r\n".join(order)
    return head.rstrip(b"\r\n"), body, kind


@st.composite
def mutated(draw, data: bytes, maxMutations: int = 3) -> bytes:
    """C{data} with up to C{maxMutations} smuggling-style mutations."""
    for _ in range(draw(st.integers(0, maxMutations))):
        kind = draw(
            st.sampled_from(
                ["case", "insert", "delete", "number", "lf", "dupe", "fold", "swapname"]
            )
        )
        if not data:
            break
        i = draw(st.integers(0, len(data)))
        if kind == "case":
            j = draw(st.integers(i, min(len(data), i + 20)))
            f = draw(st.sampled_from([bytes.upper, bytes.lower, bytes.swapcase]))
            data = data[:i] + f(data[i:j]) + data[j:]
        elif kind == "insert":
            data = data[:i] + draw(st.sampled_from(INSERTS)) + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + 1 :]
        elif kind == "number":
            m = list(re.finditer(rb"[0-9a-fA-F]+", data))
            if m:
                hit = draw(st.sampled_from(m))
                data = data[: hit.start()] + draw(st.sampled_from(ODD_NUMBERS)) + data[hit.end() :]
        elif kind == "lf":
            crlfs = [m.start() for m in re.finditer(rb"\r\n", data)]
            if crlfs:
                k = draw(st.sampled_from(crlfs))
                data = data[:k] + data[k + 1 :]
        elif kind == "dupe":
            lines = data.split(b"\r\n")
            framing = [
                x for x in lines if x.lower().startswith((b"content-length", b"transfer-encoding"))
            ]
            line = (
                draw(st.sampled_from(framing))
                if framing
                else draw(st.sampled_from([b"Content-Length: 5", b"Transfer-Encoding: chunked"]))
            )
            if draw(st.booleans()):
                name, _, _ = line.partition(b":")
                value = draw(st.sampled_from(FRAMING_VALUES))
                line = name + b": " + value
            at = draw(st.integers(1, max(1, len(lines) - 1)))
            data = b"\r\n".join([*lines[:at], line, *lines[at:]])
        elif kind == "fold":
            k = data.find(b": ", i)
            if k >= 0:
                data = data[: k + 2] + b"\r\n " + data[k + 2 :]
        elif kind == "swapname":
            data = data.replace(
                draw(st.sampled_from([b"Content-Length", b"Transfer-Encoding"])),
                draw(
                    st.sampled_from(
                        [
                            b"Content-Length",
                            b"Transfer-Encoding",
                            b"content-length",
                            b"Content-Length ",
                            b"Transfer-Encoding ",
                        ]
                    )
                ),
                1,
            )
    return data


@st.composite
def nearValidHead(draw) -> bytes:
    head, _, _ = draw(validRequest())
    return draw(mutated(head))[:4096]


@st.composite
def nearValidResponseHead(draw) -> bytes:
    status = draw(
        st.sampled_from(
            [
                b"100",
                b"101",
                b"103",
                b"200",
                b"204",
                b"206",
                b"304",
                b"404",
                b"500",
                b"099",
                b"2000",
            ]
        )
    )
    fields = draw(
        st.lists(
            st.sampled_from(
                [
                    b"Content-Length: 5",
                    b"Transfer-Encoding: chunked",
                    b"Connection: close",
                    b"X-Bad : v",
                    b"X-F: a\r\n b",
                    b"Date: Sun, 06 Nov 1994 08:49:37 GMT",
                    b"Via: 1.0 u",
                    b"Set-Cookie: a=1",
                    b"Content-Length: 5, 5",
                    b"Transfer-Encoding: gzip, chunked",
                ]
            ),
            max_size=5,
        )
    )
    head = b"HTTP/1.1 " + status + b" Reason phrase\r\n" + b"\r\n".join(fields)
    return draw(mutated(head.rstrip(b"\r\n")))[:4096]


@st.composite
def chunkedBody(draw) -> bytes:
    pieces = draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4))
    out = b""
    for p in pieces:
        ext = draw(st.sampled_from([b"", b";a=b", b';x="q s"', b" ;y"]))
        out += b"%x%b\r\n%b\r\n" % (len(p), ext, p)
    trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"Content-Length: 9\r\n"]))
    out += b"0\r\n" + trailer + b"\r\n" + draw(st.sampled_from([b"", b"GET /s/0 HTTP/1.1\r\n"]))
    return draw(mutated(out))[:2048]


def splits(data: bytes):
    return st.lists(st.integers(0, len(data)), max_size=6).map(
        lambda cuts: [
            data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
        ]
    )


# -- sans-IO: only a value or HTTPError, within the deadline --------------------------------------


@settings(BASE, max_examples=examples(600), deadline=FAST)
@given(nearValidHead())
def test_requestParsersOnlyReturnOrRaiseHTTPError(block: bytes) -> None:
    try:
        head = parseRequestHead(block)
        framing = requestFraming(head)
    except HTTPError as e:
        assert 400 <= e.status < 600 and e.reason
        return
    assert framing.kind in (NONE, LENGTH, CHUNKED)


@settings(BASE, max_examples=examples(300), deadline=FAST)
@given(nearValidResponseHead(), st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT"]))
def test_responseParsersOnlyReturnOrRaiseHTTPError(block: bytes, method: bytes) -> None:
    try:
        head = parseResponseHead(block)
        framing = responseFraming(head, method)
    except HTTPError as e:
        assert e.status == 502 and e.reason
        return
    assert framing.kind in (NONE, LENGTH, CHUNKED, UNTIL_CLOSE)
    for name, value in head.headers:
        assert re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name), name
        assert b"\r" not in value and b"\n" not in value and b"\x00" not in value


@settings(BASE, max_examples=examples(300), deadline=FAST)
@given(st.binary(max_size=600))
def test_parsersOnArbitraryBytes(block: bytes) -> None:
    for parse in (parseRequestHead, parseResponseHead):
        try:
            parse(block)
        except HTTPError:
            pass
    try:
        ChunkedReader().feed(block)
    except HTTPError:
        pass


def _decode(pieces: list[bytes]):
    """Feed the pieces; ('error',) or (body, done, rest)."""
    reader = ChunkedReader()
    out, rest, done = b"", b"", False
    try:
        for piece in pieces:
            if done:
                rest += piece
                continue
            body, done, extra = reader.feed(piece)
            out += body
            rest += extra
    except HTTPError:
        return ("error",)
    return (out, done, rest)


@settings(BASE, max_examples=examples(400), deadline=FAST)
@given(st.data())
def test_chunkedDecodingDoesNotDependOnReadBoundaries(data) -> None:
    body = data.draw(chunkedBody())
    whole = _decode([body])
    pieces = data.draw(splits(body))
    split = _decode(pieces)
    assert split == whole, (pieces, whole, split)


# -- reasonable peers: independent, lenient readings of the same bytes ----------------------


def _atoi(value: bytes) -> int | None:
    m = re.match(rb"[ \t]*([+-]?[0-9]+)", value)
    return int(m.group(1)) if m else None


def _pyint(value: bytes) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def peerReadings(block: bytes):
    """Every (name, framing) a reasonable peer could read from the raw head (peers that
    would refuse the message are left out: a refusal cannot desynchronise anything)."""
    for lineMode in ("crlf", "lf"):
        lines = (
            block.split(b"\r\n")
            if lineMode == "crlf"
            else [x[:-1] if x.endswith(b"\r") else x for x in block.split(b"\n")]
        )
        for nameMode in ("exact", "rstrip"):
            fields = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    break
                if nameMode == "rstrip":
                    name = name.rstrip(b" \t")
                fields.append((name.lower(), value.strip(b" \t")))
            else:
                yield from _framingReadings(f"{lineMode}/{nameMode}", fields)


def _framingReadings(prefix: str, fields):
    te = [v for n, v in fields if n == b"transfer-encoding"]
    cl = [v for n, v in fields if n == b"content-length"]
    tokens = [t.strip(b" \t").lower() for v in te for t in v.split(b",") if t.strip(b" \t")]
    for teMode in ("last", "any", "only"):
        if teMode == "last":
            chunked = bool(tokens) and tokens[-1] == b"chunked"
        elif teMode == "any":
            chunked = b"chunked" in tokens
        else:
            chunked = tokens == [b"chunked"]
        for clMode in ("first", "last", "atoi-first", "list-first"):
            length = None
            if cl:
                v = cl[-1] if clMode == "last" else cl[0]
                if clMode == "atoi-first":
                    length = _atoi(v)
                elif clMode == "list-first":
                    length = _pyint(v.split(b",")[0].strip())
                else:
                    length = _pyint(v)
                if length is None or length < 0:
                    continue  # this peer refuses the message
            for precedence in ("te", "cl"):
                name = f"{prefix}/{teMode}/{clMode}/{precedence}"
                if precedence == "te" or length is None:
                    if chunked:
                        yield name, ("chunked",)
                        continue
                    if te:
                        continue  # a coding it does not know: refused
                yield name, ("length", length) if length else ("none",)


def proxyReading(block: bytes):
    try:
        f = requestFraming(parseRequestHead(block))
    except HTTPError:
        return None
    return {NONE: ("none",), LENGTH: ("length", f.length), CHUNKED: ("chunked",)}[f.kind]


@settings(BASE, max_examples=examples(800), deadline=FAST)
@given(nearValidHead())
def test_acceptedFramingIsTheOnlyReasonableReading(block: bytes) -> None:
    accepted = proxyReading(block)
    if accepted is None:
        return
    for name, reading in peerReadings(block):
        assert reading == accepted, (name, reading, accepted, block)


def lenientChunked(body: bytes):
    """A tolerant decoder (LF line ends, int(x, 16) sizes): (data, rest) or None."""
    out, pos = b"", 0
    while True:
        nl = body.find(b"\n", pos)
        if nl < 0:
            return None
        line = body[pos:nl].rstrip(b"\r")
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            return None
        pos = nl + 1
        if size < 0:
            return None
        if size == 0:
            while True:
                nl = body.find(b"\n", pos)
                if nl < 0:
                    return None
                line = body[pos:nl].rstrip(b"\r")
                pos = nl + 1
                if not line:
                    return out, body[pos:]
        out += body[pos : pos + size]
        pos += size
        if body[pos : pos + 2] == b"\r\n":
            pos += 2
        elif body[pos : pos + 1] == b"\n":
            pos += 1
        else:
            return None


@settings(BASE, max_examples=examples(400), deadline=FAST)
@given(chunkedBody())
def test_acceptedChunkedBodyIsTheOnlyReasonableReading(body: bytes) -> None:
    got = _decode([body])
    if got == ("error",) or not got[1]:
        return
    assert lenientChunked(body) == (got[0], got[2]), body


@settings(BASE, max_examples=examples(150), deadline=FAST)
@given(validRequest())
def test_validMessagesAreAccepted(message) -> None:
    """The strategies' unmutated messages are valid, and read as built (the parser is not
    strict where RFC 9112 is not)."""
    head, body, kind = message
    framing = requestFraming(parseRequestHead(head))
    assert {NONE: "none", LENGTH: "length", CHUNKED: "chunked"}[framing.kind] == kind or (
        kind == "length" and framing.kind == NONE and not body
    )
    if kind == "chunked":
        _, done, rest = ChunkedReader().feed(body)
        assert done and rest == b""


# -- end to end: one proxy, a recording origin, a few hundred requests ----------------------------


@pytest.fixture(scope="module")
def rec():
    r = Recorder()
    yield r
    r.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    # ftp = off: the campaign is about HTTP framing; an ftp:// target would open an FTP
    # session to the recording origin (tests/test_ftp_proxy.py has the FTP gateway).
    ini = LOOPBACK_INI + "header_timeout = 3\nidle_timeout = 10\nftp = off\n"
    p = ProxyProcess(tmp_path_factory.mktemp("fuzz"), ini).start()
    yield p
    p.stop()


class Campaign:
    def __init__(self) -> None:
        self.n = 0
        self.firstLines: dict[int, bytes] = {}


_campaign = Campaign()
E2E_EXAMPLES = examples(300)


@st.composite
def wireRequest(draw, authority: bytes):
    head, body, _ = draw(validRequest(authority))
    return draw(mutated(head + b"\r\n\r\n" + body, maxMutations=2))[:8192]


def _originRequests(stream: bytes) -> tuple[list[bytes], bytes]:
    """
    The request lines an origin parses from what the proxy sent on one connection (the
    proxy always frames with one Content-Length or chunked), and any unparseable remainder
    that is not just a message cut short.
    """
    lines, pos = [], 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            return lines, b""  # a head cut short (aborted)
        head = stream[pos:end]
        first = head.split(b"\r\n", 1)[0]
        if not re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ \S+ HTTP/1\.1", first):
            return lines, stream[pos:]
        lines.append(first)
        pos = end + 4
        fields = head.lower()
        m = re.search(rb"\r\ncontent-length: ([0-9]+)\r?\n?", fields + b"\r\n")
        if b"\r\ntransfer-encoding: chunked" in fields:
            while True:
                nl = stream.find(b"\r\n", pos)
                if nl < 0:
                    return lines, b""
                size = int(stream[pos:nl], 16)
                pos = nl + 2
                if size == 0:
                    if stream[pos : pos + 2] == b"\r\n":
                        pos += 2
                    break
                pos += size + 2
        elif m:
            pos += int(m.group(1))
    return lines, b""


@settings(
    BASE,
    max_examples=E2E_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
@given(data=st.data())
def test_e2eFuzzNeverSmugglesAndAlwaysAnswersWell(proxy, rec, data) -> None:
    # The example's number goes in after generation (a strategy must not read outside state).
    _campaign.n += 1
    n = _campaign.n
    raw = data.draw(wireRequest(rec.authority.encode())).replace(b"NNNNNN", b"%06d" % n)
    # (empty lines before a request line are skipped, RFC 9112 §2.2)
    _campaign.firstLines[n] = raw.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy may close on a bad head before reading everything
        got = b""
        deadline = time.monotonic() + 4
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"no close within the deadline for {raw!r}; got {got!r}")
    method = raw.split(b" ", 1)[0]
    try:
        responses = parseResponses(got, method)
    except (Malformed, EOFError) as e:
        # A request the proxy could not parse is not known to be a HEAD: its 400 has a
        # body, and the connection closes after it.
        try:
            responses = parseResponses(got, b"GET")
        except (Malformed, EOFError):
            pytest.fail(f"malformed answer {got!r} to {raw!r}: {e}")
        first = responses[0]
        assert (
            method == b"HEAD"
            and len(responses) == 1
            and first.status in (400, 431)
            and first.get("via") is None
            and b"close" in first.tokens("connection")
        ), (got, raw)
    for r in responses:
        assert r.version == b"HTTP/1.1"


def test_e2eOriginNeverSawASmuggledRequest(proxy, rec) -> None:
    """After the campaign (runs after the test above): the origin's parse of every stream."""
    assert _campaign.firstLines, "the fuzz campaign did not run"
    rec.waitQuiet(0.2, 5)
    view = rec.since(0)
    seen = 0
    for conn in view.order:
        lines, junk = _originRequests(bytes(view.data[conn]))
        assert junk == b"", (conn, junk[:200], bytes(view.data[conn])[-1500:])
        for line in lines:
            seen += 1
            assert b"/s/" not in line.lower(), f"smuggled request reached the origin: {line!r}"
            method, target, _ = line.split(b" ")
            m = re.search(rb"/f/([0-9]{6})", target)
            candidates = (
                [_campaign.firstLines[int(m.group(1))]]
                if m
                else list(_campaign.firstLines.values())
            )
            # (the proxy sends the path and query of the target byte for byte: RFC 9110 §7.7)
            assert any(sent.startswith(method + b" ") and target in sent for sent in candidates), (
                line,
                candidates[:3],
            )
    assert seen > 20, f"only {seen} requests reached the origin: the generator is too broken"
    with Client(proxy.port) as c:
        c.send(b"GET http://%s/after HTTP/1.1\r\nHost: x\r\n\r\n" % rec.authority.encode())
        r = c.response()
        assert (r.status, r.body) == (200, b"ok")
    assert "Traceback" not in proxy.log()
