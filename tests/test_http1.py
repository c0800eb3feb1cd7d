"""
Sans-IO unit tests of gateway.http1: head parsing, body framing, chunked and length
readers, hop-by-hop stripping and request-target parsing.

Every table row is one message shape with a one-line id; the smuggling shapes of known
proxy CVEs are rows like any other.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.http1.framing import (
    CHUNKED,
    LENGTH,
    NONE,
    UNTIL_CLOSE,
    ChunkedReader,
    LengthReader,
    UntilCloseReader,
    encodeChunk,
    requestFraming,
    responseFraming,
)
from gateway.http1.headers import (
    parseAbsoluteTarget,
    parseAuthority,
    stripHopByHop,
)
from gateway.http1.parse import (
    HTTPError,
    RequestHead,
    ResponseHead,
    _parseRequestLines,
    _parseResponseLines,
    parseRequestHead,
    parseResponseHead,
    splitRequestHead,
)


def rows(table):
    """pytest.param per row, the last element of each row being its id."""
    return [pytest.param(*row[:-1], id=row[-1]) for row in table]


def request(*headerLines: bytes, line: bytes = b"GET http://a.example/ HTTP/1.1") -> bytes:
    return b"\r\n".join((line, *headerLines))


# -- parseRequestHead ----------------------------------------------------------------------

GOOD_REQUESTS = [
    (
        request(b"Host: a.example"),
        (b"GET", b"http://a.example/", b"HTTP/1.1", [(b"Host", b"a.example")]),
        "simple-get",
    ),
    (
        request(line=b"GET http://a.example/ HTTP/1.0"),
        (b"GET", b"http://a.example/", b"HTTP/1.0", []),
        "http10-no-headers",
    ),
    (
        request(b"X-Empty:", b"X-Sp:    "),
        (b"GET", b"http://a.example/", b"HTTP/1.1", [(b"X-Empty", b""), (b"X-Sp", b"")]),
        "empty-values",
    ),
    (
        request(b"X-Ows: \t value with  spaces \t "),
        (b"GET", b"http://a.example/", b"HTTP/1.1", [(b"X-Ows", b"value with  spaces")]),
        "ows-trimmed-inner-kept",
    ),
    (
        request(b"X-Latin: caf\xe9"),
        (b"GET", b"http://a.example/", b"HTTP/1.1", [(b"X-Latin", b"caf\xe9")]),
        "obs-text-value",
    ),
    (
        request(b"x-MiXeD: 1", b"X-Rep: a", b"X-Rep: b"),
        (
            b"GET",
            b"http://a.example/",
            b"HTTP/1.1",
            [(b"x-MiXeD", b"1"), (b"X-Rep", b"a"), (b"X-Rep", b"b")],
        ),
        "name-spelling-and-order-kept",
    ),
    (
        request(line=b"M-SEARCH http://a.example/?q=%20&x=~ HTTP/1.1"),
        (b"M-SEARCH", b"http://a.example/?q=%20&x=~", b"HTTP/1.1", []),
        "extension-method-and-query",
    ),
    (
        request(line=b"CONNECT a.example:443 HTTP/1.1"),
        (b"CONNECT", b"a.example:443", b"HTTP/1.1", []),
        "connect-authority-form",
    ),
]


@pytest.mark.parametrize(("block", "expected"), rows(GOOD_REQUESTS))
def test_parseRequestHeadAccepts(block: bytes, expected: tuple) -> None:
    head = parseRequestHead(block)
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version, head.headers) == expected


BAD_REQUESTS = [
    (b"GET http://a.example/ HTTP/1.1\nHost: a", 400, "bare-lf-line-end"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: a\nX: y", 400, "bare-lf-between-fields"),
    (b"GET http://a.example/ HTTP/1.1\r\nX: a\rb", 400, "bare-cr-in-value"),
    (b"GET http://a.example/ HTTP/1.1\r\nX: a\x00b", 400, "nul-in-value"),
    (b"GET http://a.example/ HTTP/1.1\r\nX: a\x7fb", 400, "del-in-value"),
    (b"GET http://a.example/ HTTP/1.1\r\nX: a\x01", 400, "ctl-in-value"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost : a", 400, "space-before-colon"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost\t: a", 400, "tab-before-colon"),
    (b"GET http://a.example/ HTTP/1.1\r\nX: a\r\n b", 400, "obs-fold-space"),
    (b"GET http://a.example/ HTTP/1.1\r\nX: a\r\n\tb", 400, "obs-fold-tab"),
    (b"GET http://a.example/ HTTP/1.1\r\n Host: a", 400, "leading-space-first-field"),
    (b"GET http://a.example/ HTTP/1.1\r\nX Y: a", 400, "space-in-name"),
    (b"GET http://a.example/ HTTP/1.1\r\n: a", 400, "empty-name"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost", 400, "no-colon"),
    (b"GET http://a.example/ HTTP/1.1\r\nX(y): a", 400, "separator-in-name"),
    (b"GET http://a.example/ HTTP/1.1\r\nX\x00: a", 400, "nul-in-name"),
    (b"GET  http://a.example/ HTTP/1.1", 400, "double-space-request-line"),
    (b"GET http://a.example/ HTTP/1.1 ", 400, "trailing-space-request-line"),
    (b" GET http://a.example/ HTTP/1.1", 400, "leading-space-request-line"),
    (b"GET\thttp://a.example/\tHTTP/1.1", 400, "tabs-in-request-line"),
    (b"GET http://a.example/", 400, "http09-no-version"),
    (b"GET http://a.example/ a b HTTP/1.1", 400, "space-in-target"),
    (b"GET http://a.example/#frag HTTP/1.1", 400, "fragment-in-target"),
    (b"GET http://a.example/\x00 HTTP/1.1", 400, "nul-in-target"),
    (b"GET http://a.example/\xff HTTP/1.1", 400, "obs-text-in-target"),
    (b"G(T http://a.example/ HTTP/1.1", 400, "separator-in-method"),
    (b"G\xc9T http://a.example/ HTTP/1.1", 400, "non-ascii-method"),
    (b"GET http://a.example/ http/1.1", 400, "lowercase-version"),
    (b"GET http://a.example/ HTTP/1.1.1", 400, "malformed-version"),
    (b"GET http://a.example/ HTTP/11", 400, "version-without-dot"),
    (b"GET http://a.example/ HTTP/2.0", 505, "http2-version"),
    (b"GET http://a.example/ HTTP/0.9", 505, "http09-version"),
    (b"", 400, "empty-head"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "tls-client-hello"),
]


@pytest.mark.parametrize(("block", "status"), rows(BAD_REQUESTS))
def test_parseRequestHeadRefuses(block: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as info:
        parseRequestHead(block)
    assert info.value.status == status
    assert info.value.reason and "\n" not in info.value.reason


def test_parseRequestHeadFieldCountLimit() -> None:
    fields = [b"X-%d: v" % i for i in range(101)]
    with pytest.raises(HTTPError) as info:
        parseRequestHead(request(*fields), maxHeaders=100)
    assert info.value.status == 431
    assert len(parseRequestHead(request(*fields[:100]), maxHeaders=100).headers) == 100


# -- parseResponseHead ---------------------------------------------------------------------

GOOD_RESPONSES = [
    (b"HTTP/1.1 200 OK", (b"HTTP/1.1", 200, b"OK", []), "simple"),
    (b"HTTP/1.0 404 Not Found", (b"HTTP/1.0", 404, b"Not Found", []), "http10"),
    (b"HTTP/1.1 204", (b"HTTP/1.1", 204, b"", []), "no-reason"),
    (b"HTTP/1.1 204 ", (b"HTTP/1.1", 204, b"", []), "empty-reason"),
    (
        b"HTTP/1.1 200 Fine \xe9 \t ok",
        (b"HTTP/1.1", 200, b"Fine \xe9 \t ok", []),
        "reason-with-obs-text-and-tab",
    ),
    (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>",
        (b"HTTP/1.1", 103, b"Early Hints", [(b"Link", b"</a>")]),
        "informational",
    ),
    (
        b"HTTP/1.1 200 OK\r\nServer : x",
        (b"HTTP/1.1", 200, b"OK", [(b"Server", b"x")]),
        "space-before-colon-removed",
    ),
    (
        b"HTTP/1.1 200 OK\r\nServer\t\t: x",
        (b"HTTP/1.1", 200, b"OK", [(b"Server", b"x")]),
        "tabs-before-colon-removed",
    ),
    (
        b"HTTP/1.1 200 OK\r\nX: a\r\n  b\r\n\tc",
        (b"HTTP/1.1", 200, b"OK", [(b"X", b"a b c")]),
        "obs-fold-unfolded",
    ),
    (
        b"HTTP/1.1 200 OK\r\nX:\r\n b",
        (b"HTTP/1.1", 200, b"OK", [(b"X", b"b")]),
        "obs-fold-onto-empty-value",
    ),
    (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2",
        (b"HTTP/1.1", 200, b"OK", [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]),
        "repeated-fields-in-order",
    ),
]


@pytest.mark.parametrize(("block", "expected"), rows(GOOD_RESPONSES))
def test_parseResponseHeadAccepts(block: bytes, expected: tuple) -> None:
    head = parseResponseHead(block)
    assert isinstance(head, ResponseHead)
    assert (head.version, head.status, head.reason, head.headers) == expected
    # The lookup index built while parsing agrees with the fields (folds included).
    for name, _ in head.headers:
        assert head.values(name.lower()) == [
            v for n, v in head.headers if n.lower() == name.lower()
        ]


BAD_RESPONSES = [
    (b"HTTP/1.1 200 OK\nServer: x", "bare-lf"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b", "nul-in-value"),
    (b"HTTP/1.1 200 OK\r\nX: a\rb", "bare-cr-in-value"),
    (b"HTTP/1.1 200 OK\r\nX Y: a", "space-in-name"),
    (b"HTTP/1.1 200 OK\r\n: a", "empty-name"),
    (b"HTTP/1.1 200 OK\r\nnocolon", "no-colon"),
    (b"HTTP/1.1 200 OK\r\n folded-first", "fold-without-previous-field"),
    (b"HTTP/2 200 OK", "http2"),
    (b"HTTP/1.1 20 OK", "two-digit-status"),
    (b"HTTP/1.1 2000 OK", "four-digit-status"),
    (b"HTTP/1.1 099 Low", "status-below-100"),
    (b"HTTP/1.1 abc OK", "non-numeric-status"),
    (b"HTTP/1.1  200 OK", "double-space"),
    (b"http/1.1 200 OK", "lowercase-version"),
    (b"ICY 200 OK", "not-http"),
    (b"", "empty"),
]


@pytest.mark.parametrize("block", rows(BAD_RESPONSES))
def test_parseResponseHeadRefusesWith502(block: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parseResponseHead(block)
    assert info.value.status == 502


# -- requestFraming ------------------------------------------------------------------------


def framingOf(*headerLines: bytes, version: bytes = b"HTTP/1.1", method: bytes = b"POST"):
    line = method + b" http://a.example/ " + version
    return requestFraming(parseRequestHead(request(*headerLines, line=line)))


REQUEST_FRAMING = [
    ((), b"HTTP/1.1", NONE, 0, "no-body-headers"),
    ((b"Content-Length: 0",), b"HTTP/1.1", NONE, 0, "cl-zero"),
    ((b"Content-Length: 5",), b"HTTP/1.1", LENGTH, 5, "cl-five"),
    ((b"Content-Length: 007",), b"HTTP/1.1", LENGTH, 7, "cl-leading-zeros"),
    ((b"Content-Length: 5, 5",), b"HTTP/1.1", LENGTH, 5, "cl-same-list"),
    ((b"Content-Length: 5", b"Content-Length: 5"), b"HTTP/1.1", LENGTH, 5, "cl-same-twice"),
    ((b"Content-Length: 1073741824",), b"HTTP/1.1", LENGTH, 1 << 30, "cl-one-gib"),
    ((b"Content-Length: 5",), b"HTTP/1.0", LENGTH, 5, "cl-http10"),
    ((b"Transfer-Encoding: chunked",), b"HTTP/1.1", CHUNKED, 0, "te-chunked"),
    ((b"Transfer-Encoding: Chunked",), b"HTTP/1.1", CHUNKED, 0, "te-chunked-capitalised"),
    ((b"transfer-encoding: CHUNKED",), b"HTTP/1.1", CHUNKED, 0, "te-upper-lower-name"),
    ((b"Transfer-Encoding: , chunked",), b"HTTP/1.1", CHUNKED, 0, "te-empty-member"),
]


@pytest.mark.parametrize(("headers", "version", "kind", "length"), rows(REQUEST_FRAMING))
def test_requestFraming(headers, version, kind, length) -> None:
    framing = framingOf(*headers, version=version)
    assert (framing.kind, framing.length) == (kind, length)


BAD_REQUEST_FRAMING = [
    ((b"Content-Length: 5", b"Transfer-Encoding: chunked"), b"HTTP/1.1", 400, "cl-and-te"),
    ((b"Transfer-Encoding: chunked", b"Content-Length: 0"), b"HTTP/1.1", 400, "te-and-cl-zero"),
    ((b"Content-Length: +5",), b"HTTP/1.1", 400, "cl-plus-sign"),
    ((b"Content-Length: -1",), b"HTTP/1.1", 400, "cl-negative"),
    ((b"Content-Length: 0x5",), b"HTTP/1.1", 400, "cl-hex"),
    ((b"Content-Length: 5 5",), b"HTTP/1.1", 400, "cl-space-inside"),
    ((b"Content-Length: 5.0",), b"HTTP/1.1", 400, "cl-decimal"),
    ((b"Content-Length:",), b"HTTP/1.1", 400, "cl-empty"),
    ((b"Content-Length: 5,",), b"HTTP/1.1", 400, "cl-trailing-comma"),
    ((b"Content-Length: 5, 6",), b"HTTP/1.1", 400, "cl-different-list"),
    ((b"Content-Length: 5", b"Content-Length: 6"), b"HTTP/1.1", 400, "cl-two-different"),
    ((b"Content-Length: 99999999999999999999",), b"HTTP/1.1", 400, "cl-huge"),
    ((b"Content-Length: \xd9\xa5",), b"HTTP/1.1", 400, "cl-unicode-digit"),
    ((b"Transfer-Encoding: chunked",), b"HTTP/1.0", 400, "te-in-http10"),
    ((b"Transfer-Encoding: chunked, gzip",), b"HTTP/1.1", 400, "te-chunked-not-last"),
    ((b"Transfer-Encoding: chunked, chunked",), b"HTTP/1.1", 400, "te-chunked-twice"),
    (
        (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        b"HTTP/1.1",
        400,
        "te-chunked-two-fields",
    ),
    ((b"Transfer-Encoding: xchunked",), b"HTTP/1.1", 400, "te-xchunked"),
    ((b"Transfer-Encoding: chunked-false",), b"HTTP/1.1", 400, "te-chunked-suffix"),
    ((b'Transfer-Encoding: "chunked"',), b"HTTP/1.1", 400, "te-quoted"),
    ((b"Transfer-Encoding:",), b"HTTP/1.1", 400, "te-empty"),
    ((b"Transfer-Encoding: identity",), b"HTTP/1.1", 400, "te-identity"),
    ((b"Transfer-Encoding: gzip, chunked",), b"HTTP/1.1", 501, "te-gzip-chunked"),
]


@pytest.mark.parametrize(("headers", "version", "status"), rows(BAD_REQUEST_FRAMING))
def test_requestFramingRefuses(headers, version, status) -> None:
    with pytest.raises(HTTPError) as info:
        framingOf(*headers, version=version)
    assert info.value.status == status


# -- responseFraming -----------------------------------------------------------------------


def responseHead(status: int, *headerLines: bytes, version: bytes = b"HTTP/1.1"):
    return parseResponseHead(b"\r\n".join((version + b" %d X" % status, *headerLines)))


RESPONSE_FRAMING = [
    (200, (b"Content-Length: 10",), b"GET", LENGTH, 10, "cl"),
    (200, (b"Content-Length: 0",), b"GET", NONE, 0, "cl-zero"),
    (200, (b"Content-Length: 3, 3",), b"GET", LENGTH, 3, "cl-same-list"),
    (200, (b"Transfer-Encoding: chunked",), b"GET", CHUNKED, 0, "chunked"),
    (200, (b"Transfer-Encoding: Chunked",), b"GET", CHUNKED, 0, "chunked-capitalised"),
    (
        200,
        (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
        b"GET",
        CHUNKED,
        0,
        "te-overrides-cl",
    ),
    (200, (), b"GET", UNTIL_CLOSE, 0, "no-length-until-close"),
    (200, (), b"POST", UNTIL_CLOSE, 0, "post-until-close"),
    (200, (b"Content-Length: 10",), b"HEAD", NONE, 0, "head-with-cl"),
    (200, (b"Transfer-Encoding: chunked",), b"HEAD", NONE, 0, "head-with-te"),
    (200, (), b"HEAD", NONE, 0, "head-no-length"),
    (204, (), b"GET", NONE, 0, "204"),
    (204, (b"Content-Length: 10",), b"GET", NONE, 0, "204-with-cl"),
    (304, (b"Content-Length: 10",), b"GET", NONE, 0, "304-with-cl"),
    (304, (), b"GET", NONE, 0, "304"),
    (100, (), b"POST", NONE, 0, "100"),
    (103, (), b"GET", NONE, 0, "103"),
    (404, (b"Content-Length: 4",), b"GET", LENGTH, 4, "404-cl"),
]


@pytest.mark.parametrize(("status", "headers", "method", "kind", "length"), rows(RESPONSE_FRAMING))
def test_responseFraming(status, headers, method, kind, length) -> None:
    framing = responseFraming(responseHead(status, *headers), method)
    assert (framing.kind, framing.length) == (kind, length)


BAD_RESPONSE_FRAMING = [
    (200, (b"Content-Length: +5",), b"GET", "cl-plus"),
    (200, (b"Content-Length: 5", b"Content-Length: 6"), b"GET", "cl-two-different"),
    (200, (b"Content-Length: x",), b"GET", "cl-garbage"),
    (200, (b"Transfer-Encoding: gzip",), b"GET", "te-gzip-only"),
    (200, (b"Transfer-Encoding: gzip, chunked",), b"GET", "te-gzip-chunked"),
    (200, (b"Transfer-Encoding: chunked, chunked",), b"GET", "te-chunked-twice"),
    (304, (b"Content-Length: -1",), b"GET", "304-bad-cl"),
    (200, (b"Content-Length: 0x10",), b"HEAD", "head-bad-cl"),
]


@pytest.mark.parametrize(("status", "headers", "method"), rows(BAD_RESPONSE_FRAMING))
def test_responseFramingRefusesWith502(status, headers, method) -> None:
    with pytest.raises(HTTPError) as info:
        responseFraming(responseHead(status, *headers), method)
    assert info.value.status == 502


def test_framingReaders() -> None:
    assert isinstance(framingOf(b"Content-Length: 3").reader(), LengthReader)
    assert isinstance(framingOf(b"Transfer-Encoding: chunked").reader(), ChunkedReader)
    assert isinstance(responseFraming(responseHead(200), b"GET").reader(), UntilCloseReader)
    assert framingOf().reader() is None


# -- ChunkedReader -------------------------------------------------------------------------

GOOD_CHUNKED = [
    (b"0\r\n\r\n", b"", b"", "empty-body"),
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello", b"", "one-chunk"),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", b"", "two-chunks"),
    (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", b"", "upper-hex"),
    (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789", b"", "lower-hex"),
    (b"005\r\nhello\r\n000\r\n\r\n", b"hello", b"", "leading-zeros"),
    (b"5;ext\r\nhello\r\n0\r\n\r\n", b"hello", b"", "extension-name"),
    (b'5;a=b;c="q d"\r\nhello\r\n0;z\r\n\r\n', b"hello", b"", "extensions-with-values"),
    (b"5 ; a = b\r\nhello\r\n0\r\n\r\n", b"hello", b"", "extension-with-bws"),
    (b"5\r\nhello\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n", b"hello", b"", "trailers-dropped"),
    (b"5\r\nhello\r\n0\r\n\r\nGET next", b"hello", b"GET next", "bytes-after-body"),
    (b"2\r\n\r\n\r\n0\r\n\r\n", b"\r\n", b"", "crlf-as-data"),
]


@pytest.mark.parametrize(("wire", "body", "rest"), rows(GOOD_CHUNKED))
def test_chunkedReaderWhole(wire: bytes, body: bytes, rest: bytes) -> None:
    reader = ChunkedReader()
    got, done, after = reader.feed(wire)
    assert (got, done, after) == (body, True, rest)
    assert reader.eof()


@pytest.mark.parametrize(("wire", "body", "rest"), rows(GOOD_CHUNKED))
def test_chunkedReaderByteByByte(wire: bytes, body: bytes, rest: bytes) -> None:
    reader = ChunkedReader()
    out = bytearray()
    for i in range(len(wire)):
        got, done, after = reader.feed(wire[i : i + 1])
        out += got
        if done:
            assert after == b""
            assert wire[i + 1 :] == rest
            break
    else:
        pytest.fail("the reader never finished")
    assert bytes(out) == body
    assert reader.eof()


BAD_CHUNKED = [
    (b"0x5\r\nhello\r\n0\r\n\r\n", "size-0x-prefix"),
    (b"+5\r\nhello\r\n0\r\n\r\n", "size-plus"),
    (b"-5\r\nhello\r\n0\r\n\r\n", "size-negative"),
    (b" 5\r\nhello\r\n0\r\n\r\n", "size-leading-space"),
    (b"5 \r\nhello\r\n0\r\n\r\n", "size-trailing-space"),
    (b"\r\nhello\r\n0\r\n\r\n", "size-empty"),
    (b"g\r\nhello\r\n0\r\n\r\n", "size-not-hex"),
    (b"1" + b"0" * 15 + b"\r\n", "size-sixteen-digits"),
    (b"f" * 40 + b"\r\n", "size-oversized"),
    (b"5\nhello\r\n0\r\n\r\n", "size-bare-lf"),
    (b"5\rhello\r\n0\r\n\r\n", "size-bare-cr"),
    (b"5\r\nhelloXX0\r\n\r\n", "data-not-followed-by-crlf"),
    (b"5\r\nhello\n0\r\n\r\n", "data-followed-by-bare-lf"),
    (b"5\r\nhellox\r\n0\r\n\r\n", "chunk-longer-than-size"),
    (b"5;\r\nhello\r\n0\r\n\r\n", "extension-empty"),
    (b"5;a=\r\nhello\r\n0\r\n\r\n", "extension-empty-value"),
    (b"5;a\x00b\r\nhello\r\n0\r\n\r\n", "extension-nul"),
    (b"5\r\nhello\r\n0\r\nX: a\nY: b\r\n\r\n", "trailer-bare-lf"),
    (b"5" * 5000, "size-line-unbounded"),
]


@pytest.mark.parametrize("wire", rows(BAD_CHUNKED))
def test_chunkedReaderRefuses(wire: bytes) -> None:
    reader = ChunkedReader()
    with pytest.raises(HTTPError) as info:
        reader.feed(wire)
    assert info.value.status == 400


@pytest.mark.parametrize("wire", rows(BAD_CHUNKED))
def test_chunkedReaderRefusesByteByByte(wire: bytes) -> None:
    reader = ChunkedReader(HTTPError(502, "bad chunked from the origin"))
    with pytest.raises(HTTPError) as info:
        for i in range(len(wire)):
            reader.feed(wire[i : i + 1])
    assert info.value.status == 502


def test_chunkedReaderTrailersAreBounded() -> None:
    reader = ChunkedReader()
    reader.feed(b"0\r\n")
    with pytest.raises(HTTPError):
        for _ in range(1000):
            reader.feed(b"X-Trailer: " + b"a" * 100 + b"\r\n")


def test_chunkedReaderIncompleteIsNotEof() -> None:
    reader = ChunkedReader()
    assert reader.feed(b"5\r\nhel") == (b"hel", False, b"")
    assert not reader.eof()
    assert reader.feed(b"lo\r\n0\r\n") == (b"lo", False, b"")
    assert not reader.eof()
    assert reader.feed(b"\r\n") == (b"", True, b"")
    assert reader.eof()


def test_chunkedReaderLargeChunkStreams() -> None:
    """A big chunk is handed on as it arrives, never collected first."""
    reader = ChunkedReader()
    size = 10 << 20
    got, done, _ = reader.feed(b"%x\r\n" % size + b"x" * 1000)
    assert (len(got), done) == (1000, False)
    piece = b"y" * 65536
    total = 1000
    while total + len(piece) <= size:
        got, done, _ = reader.feed(piece)
        assert got == piece and not done
        total += len(piece)
    got, done, rest = reader.feed(b"z" * (size - total) + b"\r\n0\r\n\r\n")
    assert (len(got), done, rest) == (size - total, True, b"")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"a", id="one"),
        pytest.param(b"x" * 65537, id="64k+1"),
    ],
)
def test_encodeChunkRoundTrips(data: bytes) -> None:
    reader = ChunkedReader()
    wire = (encodeChunk(data) if data else b"") + b"0\r\n\r\n"
    assert reader.feed(wire) == (data, True, b"")


# -- LengthReader / UntilCloseReader -------------------------------------------------------

LENGTH_FEEDS = [
    (5, [b"hello"], [(b"hello", True, b"")], "exact"),
    (5, [b"he", b"llo"], [(b"he", False, b""), (b"llo", True, b"")], "split"),
    (5, [b"helloGET /"], [(b"hello", True, b"GET /")], "overflow-returned"),
    (5, [b"hel", b"loXY"], [(b"hel", False, b""), (b"lo", True, b"XY")], "split-overflow"),
    (1, [b"a"], [(b"a", True, b"")], "one-byte"),
    (3, [b"", b"abc"], [(b"", False, b""), (b"abc", True, b"")], "empty-feed"),
]


@pytest.mark.parametrize(("length", "feeds", "results"), rows(LENGTH_FEEDS))
def test_lengthReader(length: int, feeds: list, results: list) -> None:
    reader = LengthReader(length)
    assert not reader.eof()
    assert [reader.feed(f) for f in feeds] == results
    assert reader.eof()


def test_lengthReaderEofOnlyWhenComplete() -> None:
    reader = LengthReader(10)
    reader.feed(b"123456789")
    assert not reader.eof()


def test_untilCloseReader() -> None:
    reader = UntilCloseReader()
    assert reader.feed(b"abc") == (b"abc", False, b"")
    assert reader.eof()


# -- stripHopByHop -------------------------------------------------------------------------

H = list[tuple[bytes, bytes]]

STRIP = [
    ([(b"Connection", b"keep-alive"), (b"X", b"1")], [(b"X", b"1")], "connection"),
    ([(b"Keep-Alive", b"timeout=5"), (b"X", b"1")], [(b"X", b"1")], "keep-alive"),
    ([(b"Proxy-Connection", b"keep-alive"), (b"X", b"1")], [(b"X", b"1")], "proxy-connection"),
    ([(b"TE", b"trailers"), (b"X", b"1")], [(b"X", b"1")], "te"),
    ([(b"Trailer", b"X-T"), (b"X", b"1")], [(b"X", b"1")], "trailer"),
    ([(b"Upgrade", b"h2c"), (b"X", b"1")], [(b"X", b"1")], "upgrade"),
    (
        [(b"Proxy-Authorization", b"Basic dTpw"), (b"X", b"1")],
        [(b"X", b"1")],
        "proxy-authorization",
    ),
    ([(b"Proxy-Authenticate", b"Basic"), (b"X", b"1")], [(b"X", b"1")], "proxy-authenticate"),
    ([(b"Transfer-Encoding", b"chunked"), (b"X", b"1")], [(b"X", b"1")], "transfer-encoding"),
    ([(b"Content-Length", b"5"), (b"X", b"1")], [(b"X", b"1")], "content-length-reframed"),
    (
        [(b"cOnNeCtIoN", b"close"), (b"KEEP-ALIVE", b"x"), (b"X", b"1")],
        [(b"X", b"1")],
        "names-any-case",
    ),
    (
        [(b"Connection", b"X-A, x-b"), (b"x-a", b"1"), (b"X-B", b"2"), (b"X-C", b"3")],
        [(b"X-C", b"3")],
        "named-by-connection",
    ),
    (
        [(b"Connection", b", X-A"), (b"X-A", b"1"), (b"X-C", b"3")],
        [(b"X-C", b"3")],
        "connection-leading-empty-member",
    ),
    (
        [(b"Connection", b"X-A,,, ,X-B ,"), (b"X-A", b"1"), (b"X-B", b"2"), (b"X-C", b"3")],
        [(b"X-C", b"3")],
        "connection-empty-members",
    ),
    ([(b"Connection", b"Connection"), (b"X-C", b"3")], [(b"X-C", b"3")], "connection-names-itself"),
    (
        [(b"Connection", b"close, close"), (b"X-C", b"3")],
        [(b"X-C", b"3")],
        "connection-close-twice",
    ),
    (
        [(b"Connection", b"x-a"), (b"Connection", b"x-b"), (b"X-A", b"1"), (b"X-B", b"2")],
        [],
        "two-connection-fields",
    ),
    (
        [(b"Connection", b"\tX-A\t"), (b"X-A", b"1"), (b"Y", b"2")],
        [(b"Y", b"2")],
        "connection-tab-ows",
    ),
    (
        [(b"Connection", b"Host"), (b"Host", b"a"), (b"X", b"1")],
        [(b"Host", b"a"), (b"X", b"1")],
        "host-protected",
    ),
    (
        [(b"Connection", b"Content-Length, X-A"), (b"Content-Length", b"5"), (b"X-A", b"1")],
        [],
        "content-length-named",
    ),
    (
        [
            (b"Connection", b"Keep-Alive, Upgrade, X-A"),
            (b"Keep-Alive", b"1"),
            (b"Upgrade", b"ws"),
            (b"X-A", b"1"),
            (b"X-B", b"2"),
        ],
        [(b"X-B", b"2")],
        "named-hop-by-hop",
    ),
    (
        [(b"X-Rep", b"1"), (b"Y", b"a"), (b"X-Rep", b"2"), (b"Y", b"b"), (b"X-Rep", b"3")],
        [(b"X-Rep", b"1"), (b"Y", b"a"), (b"X-Rep", b"2"), (b"Y", b"b"), (b"X-Rep", b"3")],
        "repeated-order-kept",
    ),
    (
        [
            (b"Via", b"1.1 a"),
            (b"Authorization", b"Bearer t"),
            (b"Cookie", b"c=1"),
            (b"Expect", b"100-continue"),
        ],
        [
            (b"Via", b"1.1 a"),
            (b"Authorization", b"Bearer t"),
            (b"Cookie", b"c=1"),
            (b"Expect", b"100-continue"),
        ],
        "end-to-end-kept",
    ),
    (
        [(b"X-Connection", b"1"), (b"Connections", b"2"), (b"TE-X", b"3")],
        [(b"X-Connection", b"1"), (b"Connections", b"2"), (b"TE-X", b"3")],
        "similar-names-kept",
    ),
    ([], [], "empty"),
]


@pytest.mark.parametrize(("headers", "expected"), rows(STRIP))
def test_stripHopByHop(headers: H, expected: H) -> None:
    before = list(headers)
    assert stripHopByHop(headers) == expected
    assert headers == before  # the input is left alone


def test_stripHopByHopKeep() -> None:
    headers = [
        (b"Connection", b"Upgrade, X-A"),
        (b"Upgrade", b"websocket"),
        (b"X-A", b"1"),
        (b"Keep-Alive", b"1"),
    ]
    assert stripHopByHop(headers, frozenset({b"upgrade", b"connection"})) == [
        (b"Connection", b"Upgrade, X-A"),
        (b"Upgrade", b"websocket"),
    ]


# -- parseAuthority ------------------------------------------------------------------------

GOOD_AUTHORITIES = [
    (b"example.com", 80, ("example.com", 80), "name-default-port"),
    (b"example.com:8080", 80, ("example.com", 8080), "name-port"),
    (b"EXAMPLE.Com:443", None, ("example.com", 443), "lower-cased"),
    (b"127.0.0.1:1", None, ("127.0.0.1", 1), "ipv4-port-1"),
    (b"127.0.0.1:65535", None, ("127.0.0.1", 65535), "ipv4-port-max"),
    (b"[::1]", 80, ("::1", 80), "ipv6-default-port"),
    (b"[::1]:8443", None, ("::1", 8443), "ipv6-port"),
    (b"[FE80::1]:80", None, ("fe80::1", 80), "ipv6-upper"),
    (b"[::ffff:127.0.0.1]:80", None, ("::ffff:127.0.0.1", 80), "ipv4-mapped"),
    (b"under_score.internal", 80, ("under_score.internal", 80), "underscore"),
    (b"a-b.example.:80", None, ("a-b.example.", 80), "trailing-dot"),
]


@pytest.mark.parametrize(("authority", "default", "expected"), rows(GOOD_AUTHORITIES))
def test_parseAuthority(authority: bytes, default, expected) -> None:
    assert parseAuthority(authority, default) == expected


BAD_AUTHORITIES = [
    (b"", 80, "empty"),
    (b":80", 80, "empty-host"),
    (b"user@example.com", 80, "userinfo"),
    (b"user:pw@example.com:80", 80, "userinfo-password"),
    (b"@example.com", 80, "empty-userinfo"),
    (b"example.com", None, "no-port-where-required"),
    (b"example.com:", None, "empty-port-where-required"),
    (b"example.com:abc", 80, "port-not-digits"),
    (b"example.com:+80", 80, "port-plus"),
    (b"example.com:-1", 80, "port-negative"),
    (b"example.com:0", 80, "port-zero"),
    (b"example.com:65536", 80, "port-too-big"),
    (b"example.com:000080", 80, "port-too-long"),
    (b"example.com:80:80", 80, "two-ports"),
    (b"exa mple.com", 80, "space"),
    (b"example.com\x00.evil", 80, "nul"),
    (b"example.com%2f", 80, "percent"),
    (b"exam\xc3\xa9ple.com", 80, "non-ascii"),
    (b"example.com/", 80, "slash"),
    (b"[::1", 80, "unterminated-ipv6"),
    (b"[]:80", 80, "empty-ipv6"),
    (b"[::g]:80", 80, "bad-ipv6-char"),
    (b"[::1]x", 80, "junk-after-ipv6"),
    (b"[::1]:", None, "ipv6-empty-port-required"),
    (b"::1", 80, "unbracketed-ipv6"),
]


@pytest.mark.parametrize(("authority", "default"), rows(BAD_AUTHORITIES))
def test_parseAuthorityRefuses(authority: bytes, default) -> None:
    with pytest.raises(HTTPError) as info:
        parseAuthority(authority, default)
    assert info.value.status == 400


# -- parseAbsoluteTarget -------------------------------------------------------------------

GOOD_TARGETS = [
    (b"http://example.com/", ("example.com", 80, b"/", b"example.com"), "root"),
    (b"http://example.com", ("example.com", 80, b"/", b"example.com"), "empty-path"),
    (b"http://example.com?q=1", ("example.com", 80, b"/?q=1", b"example.com"), "query-only"),
    (
        b"http://example.com:8080/a/b?c=d&e",
        ("example.com", 8080, b"/a/b?c=d&e", b"example.com:8080"),
        "port-path-query",
    ),
    (
        b"http://example.com:80/x",
        ("example.com", 80, b"/x", b"example.com"),
        "default-port-dropped",
    ),
    (b"http://example.com:/x", ("example.com", 80, b"/x", b"example.com"), "empty-port"),
    (
        b"HTTP://Example.COM/Path",
        ("example.com", 80, b"/Path", b"example.com"),
        "scheme-and-host-case-folded-path-kept",
    ),
    (b"http://127.0.0.1:3128/", ("127.0.0.1", 3128, b"/", b"127.0.0.1:3128"), "ipv4"),
    (b"http://[::1]:8080/", ("::1", 8080, b"/", b"[::1]:8080"), "ipv6"),
    (b"http://[::1]/", ("::1", 80, b"/", b"[::1]"), "ipv6-default-port"),
    (b"http://[::1]:80/", ("::1", 80, b"/", b"[::1]"), "ipv6-port-80-dropped"),
    (
        b"http://a.example/%2e%2e/%2F?x=%00",
        ("a.example", 80, b"/%2e%2e/%2F?x=%00", b"a.example"),
        "escapes-byte-for-byte",
    ),
    (
        b"http://a.example/p@th?u=a@b",
        ("a.example", 80, b"/p@th?u=a@b", b"a.example"),
        "at-in-path-and-query",
    ),
    (
        b"http://a.example//double",
        ("a.example", 80, b"//double", b"a.example"),
        "double-slash-path",
    ),
]


@pytest.mark.parametrize(("target", "expected"), rows(GOOD_TARGETS))
def test_parseAbsoluteTarget(target: bytes, expected: tuple) -> None:
    t = parseAbsoluteTarget(target)
    assert (t.host, t.port, t.path, t.hostHeader) == expected
    assert t.scheme == "http"


BAD_TARGETS = [
    (b"/path", "origin-form"),
    (b"*", "asterisk-form"),
    (b"example.com:80", "authority-form"),
    (b"https://example.com/", "https-scheme"),
    (b"ftp://example.com/file", "ftp-scheme"),
    (b"gopher://example.com/", "gopher-scheme"),
    (b"file:///etc/passwd", "file-scheme"),
    (b"ws://example.com/", "ws-scheme"),
    (b"httpx://example.com/", "scheme-prefix-http"),
    (b"xhttp://example.com/", "scheme-suffix-http"),
    (b"urn://x", "urn-scheme"),
    (b"http:/example.com/", "single-slash"),
    (b"http:example.com", "no-slashes"),
    (b"http:///path", "empty-host"),
    (b"http://:80/", "empty-host-with-port"),
    (b"http://user@example.com/", "userinfo"),
    (b"http://user:pass@example.com/", "userinfo-password"),
    (b"http://example.com@evil.example/", "userinfo-confusion"),
    (b"http://example.com:99999/", "port-out-of-range"),
    (b"http://example.com:8o/", "port-letter"),
    (b"http://exa%6dple.com/", "percent-in-host"),
    (b"http://example.com#frag", "fragment-in-authority"),
    (b"http://[::1/", "broken-ipv6"),
]


@pytest.mark.parametrize("target", rows(BAD_TARGETS))
def test_parseAbsoluteTargetRefuses(target: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        parseAbsoluteTarget(target)
    assert info.value.status == 400


def test_targetUrlForLogsDropsQuery() -> None:
    assert parseAbsoluteTarget(b"http://a.example:81/p?token=secret").url() == (
        "http://a.example:81/p"
    )


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    tail=st.binary(max_size=20),
)
def test_chunkedRoundTripAnySplit(pieces: list[bytes], cuts: list[int], tail: bytes) -> None:
    """Whatever the chunk sizes and wherever reads split the wire, the body comes back."""
    wire = b"".join(encodeChunk(p) for p in pieces) + b"0\r\n\r\n" + tail
    bounds = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
    reader = ChunkedReader()
    out = bytearray()
    rest = b""
    for a, b in itertools.pairwise(bounds):
        got, done, after = reader.feed(wire[a:b])
        out += got
        if done:
            rest = after + wire[b:]
            break
    assert bytes(out) == b"".join(pieces)
    assert rest == tail
    assert reader.eof()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parsersOnlyRaiseHTTPError(block: bytes) -> None:
    """Arbitrary bytes: a parsed head or an HTTPError, never another exception."""
    for parse in (parseRequestHead, parseResponseHead, lambda b: parseAbsoluteTarget(b)):
        try:
            parse(block)
        except HTTPError:
            pass
    try:
        ChunkedReader().feed(block)
    except HTTPError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    b"Connection",
                    b"X-A",
                    b"x-b",
                    b"Keep-Alive",
                    b"TE",
                    b"Host",
                    b"Via",
                    b"Content-Length",
                ]
            ),
            st.sampled_from([b"x-a", b"X-B, close", b"", b", ,", b"connection", b"host", b"1"]),
        ),
        max_size=10,
    )
)
def test_stripHopByHopNeverLeavesANamedField(headers) -> None:
    kept = stripHopByHop(headers)
    named = {
        t.strip().lower()
        for n, v in headers
        if n.lower() == b"connection"
        for t in v.split(b",")
        if t.strip()
    }
    for name, _ in kept:
        lower = name.lower()
        assert lower not in (b"connection", b"keep-alive", b"te", b"content-length")
        assert lower == b"host" or lower not in named
    assert [h for h in headers if h[0].lower() in (b"host", b"via")] == [
        h for h in kept if h[0].lower() in (b"host", b"via")
    ]


def test_underscoreLookalikesOfFramingFieldsAreDropped():
    """
    `Transfer_Encoding` and friends are read as framing by back ends that map `_` to `-`
    (CGI, WSGI): the proxy, which framed by the real fields, never forwards them.
    """
    kept = stripHopByHop(
        [
            (b"Transfer_Encoding", b"chunked"),
            (b"content_length", b"5"),
            (b"HOST_", b"x"),
            (b"X_Trace_Id", b"1"),
            (b"Accept", b"*/*"),
        ]
    )
    assert kept == [(b"HOST_", b"x"), (b"X_Trace_Id", b"1"), (b"Accept", b"*/*")]


# -- the fast path of the head parsers agrees with the line-by-line parser -----------------

_HEAD_PIECES = st.sampled_from(
    [
        *(b"Host", b"X-A", b"content-length", b"Content_Length", b"B C", b"N\x00", b"\xe9"),
        *(b": ", b":", b" :", b"\t", b" ", b"\r\n", b"\r", b"\n", b"\x7f", b"\x01", b"\x80"),
        *(b"v", b"a b", b"1", b"\xff", b"\r\n ", b"\r\n\t", b"", b"xxx"),
    ]
)


def _outcome(parse, block: bytes):
    try:
        head = parse(block)
    except HTTPError as e:
        return ("error", e.status, str(e))
    return ("head", *(getattr(head, a) for a in type(head).__slots__ if a != "__weakref__"))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.sampled_from(
        [
            *(b"GET /x HTTP/1.1", b"GET http://h/ HTTP/1.0", b"GET /x HTTP/1.2", b"G@T / HTTP/1.1"),
            *(b"HTTP/1.1 200 OK", b"HTTP/1.0 404", b"HTTP/1.1 099 x", b"HTTP/1.1 200 \xff\t"),
        ]
    ),
    pieces=st.lists(_HEAD_PIECES, max_size=14),
)
def test_fastHeadParsersAgreeWithLineParsers(first, pieces) -> None:
    """Same head, same fields and index, or the same error, whichever path parses it."""
    block = first + b"\r\n" + b"".join(pieces)
    assert _outcome(parseRequestHead, block) == _outcome(
        lambda b: _parseRequestLines(b, 100), block
    )
    assert _outcome(parseResponseHead, block) == _outcome(
        lambda b: _parseResponseLines(b, 200), block
    )


# --- splitRequestHead: finding the head in a receive buffer --------------------------------


def test_splitRequestHeadTakesOneHeadAndKeepsTheRest():
    buffer = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next"
    assert splitRequestHead(buffer, 100, "big") == (b"GET / HTTP/1.1\r\nHost: a", b"GET /next")


def test_splitRequestHeadWaitsForTheRestAndDropsLeadingEmptyLines():
    assert splitRequestHead(b"\r\n\r\nGET / HTTP/1.1\r\n", 100, "big") == (
        None,
        b"GET / HTTP/1.1\r\n",
    )
    assert splitRequestHead(b"\r\n", 100, "big") == (None, b"")


def test_splitRequestHeadLimitCountsTheFinalCRLF():
    head = b"GET / HTTP/1.1\r\nHost: a"
    assert splitRequestHead(head + b"\r\n\r\n", len(head) + 4, "big")[0] == head
    with pytest.raises(HTTPError) as info:
        splitRequestHead(head + b"\r\n\r\n", len(head) + 3, "too big")
    assert (info.value.status, info.value.reason) == (431, "too big")


def test_splitRequestHeadRefusesAnIncompleteHeadAlreadyOverTheLimit():
    with pytest.raises(HTTPError) as info:
        splitRequestHead(b"GET / HTTP/1.1\r\nX: " + b"a" * 100, 64, "too big")
    assert info.value.status == 431


def test_splitRequestHeadRefusesBareLFAtOnce():
    with pytest.raises(HTTPError) as info:
        splitRequestHead(b"GET / HTTP/1.1\nHost: a\n", 100, "big")
    assert (info.value.status, info.value.reason) == (400, "bare LF in the request head")


# -- the memo of field blocks -----------------------------------------------------------------


def test_aKnownFieldBlockParsesLikeANewOne() -> None:
    from gateway.http1 import parse

    block = b"GET http://a/one HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Y:  z "
    parse._blocks.clear()
    first = parseRequestHead(block)
    assert parse._blocks, "remembered"
    second = parseRequestHead(block.replace(b"/one", b"/two"))
    assert second.target == b"http://a/two"
    assert (second.headers, second.values(b"x-y")) == (first.headers, [b"z"])
    second.headers.append((b"Mine", b"1"))  # a copy: the next head is not affected
    assert parseRequestHead(block).headers == first.headers


def test_aKnownFieldBlockStillHasItsStartLineChecked() -> None:
    from gateway.http1 import parse

    fields = b"\r\nHost: a\r\nAccept: */*"
    parse._blocks.clear()
    parseRequestHead(b"GET http://a/ HTTP/1.1" + fields)
    for line in (b"GET http://a/ HTTP/1.2", b"GET http://a/\x00 HTTP/1.1", b"G(T / HTTP/1.1"):
        with pytest.raises(HTTPError):
            parseRequestHead(line + fields)
    parseResponseHead(b"HTTP/1.1 200 OK" + fields)
    with pytest.raises(HTTPError):
        parseResponseHead(b"HTTP/1.1 200 O\x01K" + fields)


def test_aKnownFieldBlockStillCountsAgainstTheLimit() -> None:
    from gateway.http1 import parse

    block = b"GET http://a/ HTTP/1.1\r\n" + b"\r\n".join(b"X-%d: v" % i for i in range(10))
    parse._blocks.clear()
    parseRequestHead(block, maxHeaders=10)
    with pytest.raises(HTTPError) as caught:
        parseRequestHead(block, maxHeaders=5)
    assert caught.value.status == 431


def test_foldedOrRepairedBlocksAreNotRemembered() -> None:
    from gateway.http1 import parse

    parse._blocks.clear()
    parseResponseHead(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  2\r\nServer : o")
    assert parse._blocks == {}
