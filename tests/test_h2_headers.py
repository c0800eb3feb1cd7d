"""
Tests for gateway.h2.headers: h2 header blocks to and from the wire-neutral heads (pure).
"""

from __future__ import annotations

import pytest

from gateway.h2.headers import (
    H2HeaderError,
    requestFromHeaders,
    requestHeaders,
    responseFromHeaders,
    responseHeaders,
    trailerFields,
    trailerHeaders,
)
from gateway.message import NO_BODY, UNKNOWN, Request, Response

TARGET = ("https", "api.example.test", 443, b"api.example.test")


def fromClient(headers, endStream=False):
    return requestFromHeaders(headers, *TARGET, endStream)


BASE = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"api.example.test"),
    (b":path", b"/pkg.Service/Method?x=1"),
]


def test_requestFromClient():
    """Pseudo-header fields become the head; content-length the length; the rest fields."""
    r = fromClient([*BASE, (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                    (b"content-length", b"5"), (b"cookie", b"a=1; b=2")])  # fmt: skip
    assert (r.method, r.scheme, r.host, r.port, r.authority, r.path, r.version) == (
        b"POST", "https", "api.example.test", 443, b"api.example.test",
        b"/pkg.Service/Method?x=1", b"HTTP/2",
    )  # fmt: skip
    assert r.fields == [
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"cookie", b"a=1; b=2"),
    ]
    assert r.length == 5


def test_requestLengths():
    """No content-length: unknown; END_STREAM on the headers: no body (0 for a POST)."""
    assert fromClient(BASE).length is UNKNOWN
    assert fromClient(BASE, endStream=True).length == 0  # a POST states its length
    get = [(b":method", b"GET"), *BASE[1:]]
    assert fromClient(get, endStream=True).length == NO_BODY  # a GET states none
    with pytest.raises(H2HeaderError, match="no body"):
        fromClient([*BASE, (b"content-length", b"3")], endStream=True)


def test_requestRoutesToTheTunnel():
    """:authority and host are checked, never routed on: the tunnel's authority goes on."""
    other = b"other.test:8443"
    r = fromClient([*BASE[:2], (b":authority", other), BASE[3], (b"host", other)])
    assert r.authority == b"api.example.test" and r.host == "api.example.test"
    assert all(name != b"host" for name, _ in r.fields)
    r = fromClient([BASE[0], BASE[1], BASE[3], (b"host", other)])  # Host alone
    assert r.authority == b"api.example.test" and r.fields == []
    with pytest.raises(H2HeaderError, match="host"):  # RFC 9113 §8.3.1
        fromClient([*BASE[:2], (b":authority", other), BASE[3], (b"host", b"x")])
    with pytest.raises(H2HeaderError, match=":authority or host"):
        fromClient([BASE[0], BASE[1], BASE[3], (b"host", b"a b")])


@pytest.mark.parametrize(
    ("headers", "status", "match"),
    [
        ([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], 501, "CONNECT"),
        (BASE[:3], 400, ":path"),
        ([BASE[0], (b":scheme", b"http"), *BASE[2:]], 400, "inside an https tunnel"),
        ([*BASE[:3], (b":path", b"relative")], 400, "invalid :path"),
        ([*BASE[:2], (b":authority", b"a b"), BASE[3]], 400, ":authority"),
        ([*BASE, (b"content-length", b"1"), (b"content-length", b"2")], 400, "content-length"),
        ([*BASE, (b"content-length", b"-1")], 400, "content-length"),
    ],
)
def test_requestRefused(headers, status, match):
    with pytest.raises(H2HeaderError, match=match) as e:
        fromClient(headers)
    assert e.value.status == status


def test_optionsStar():
    r = fromClient([(b":method", b"OPTIONS"), BASE[1], BASE[2], (b":path", b"*")])
    assert r.path == b"*"


def test_requestToOrigin():
    """Lower-case names; connection-specific fields and Host gone; te: trailers kept."""
    request = Request(
        b"POST", "https", "o.test", 443, b"o.test", b"/p", b"HTTP/1.1",
        [(b"Host", b"o.test"), (b"Content-Type", b"a/b"), (b"Connection", b"x"),
         (b"Keep-Alive", b"1"), (b"Transfer-Encoding", b"chunked"), (b"TE", b"trailers"),
         (b"Upgrade", b"h2c"), (b"X-A", b"1"), (b"Content-Length", b"9")],
        length=9,
    )  # fmt: skip
    assert requestHeaders(request) == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"o.test"),
        (b":path", b"/p"),
        (b"content-type", b"a/b"),
        (b"te", b"trailers"),
        (b"x-a", b"1"),
        (b"content-length", b"9"),
    ]


def test_requestToOriginLengths():
    """
    A TE other than trailers goes (from HTTP/1.1: an HTTP/2 request cannot carry one); a
    GET without body states no length, a POST does.
    """
    get = Request(b"GET", "https", "o", 443, b"o", b"/", b"HTTP/1.1", [(b"TE", b"gzip")], 0)
    assert requestHeaders(get)[4:] == []
    with pytest.raises(H2HeaderError, match="TE"):
        fromClient([*BASE, (b"te", b"gzip")])
    grpc = fromClient([*BASE, (b"te", b"Trailers")], endStream=True)
    assert requestHeaders(grpc)[4:] == [(b"te", b"Trailers"), (b"content-length", b"0")]
    post = Request(b"POST", "https", "o", 443, b"o", b"/", b"HTTP/2", [], 0)
    assert requestHeaders(post)[4:] == [(b"content-length", b"0")]
    chunked = Request(b"POST", "https", "o", 443, b"o", b"/", b"HTTP/1.1", [], UNKNOWN)
    assert requestHeaders(chunked)[4:] == []


def test_responseFromOrigin():
    r = responseFromHeaders(
        [(b":status", b"200"), (b"content-type", b"application/grpc"),
         (b"content-length", b"7"), (b"set-cookie", b"a"), (b"set-cookie", b"b")],
        b"POST", False,
    )  # fmt: skip
    assert (r.status, r.reason, r.version, r.length) == (200, b"", b"HTTP/2", 7)
    assert r.fields == [
        (b"content-type", b"application/grpc"),
        (b"set-cookie", b"a"),
        (b"set-cookie", b"b"),
    ]


def test_responseFromOriginLengths():
    """Unknown without content-length; 0 with END_STREAM (gRPC trailers-only); none: HEAD/304."""
    assert responseFromHeaders([(b":status", b"200")], b"GET", False).length is UNKNOWN
    only = responseFromHeaders([(b":status", b"200"), (b"grpc-status", b"5")], b"POST", True)
    assert only.length == 0 and only.fields == [(b"grpc-status", b"5")]
    head = responseFromHeaders([(b":status", b"200"), (b"content-length", b"9")], b"HEAD", True)
    assert (head.length, head.statedLength) == (NO_BODY, b"9")
    info = responseFromHeaders([(b":status", b"103"), (b"link", b"</a>")], b"GET", False)
    assert (info.status, info.length) == (103, NO_BODY)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b":status", b"20")],
        [(b":status", b"abc")],
        [(b":status", b"099")],
        [(b":status", b"200"), (b"content-length", b"x")],
    ],
)
def test_responseFromOriginRefused(headers):
    with pytest.raises(H2HeaderError) as e:
        responseFromHeaders(headers, b"GET", False)
    assert e.value.status == 502


def test_responseToClient():
    """:status first; hop-by-hop gone; content-length from the length, by method/status."""
    fields = [(b"Content-Type", b"text/plain"), (b"Connection", b"close"), (b"X-B", b"2")]
    assert responseHeaders(Response(200, b"OK", b"HTTP/1.1", fields, 12), b"GET") == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"x-b", b"2"),
        (b"content-length", b"12"),
    ]
    chunked = Response(200, b"OK", b"HTTP/1.1", [], UNKNOWN)
    assert responseHeaders(chunked, b"GET") == [(b":status", b"200")]
    head = Response(200, b"OK", b"HTTP/1.1", [], 0, statedLength=b"99")
    assert responseHeaders(head, b"HEAD") == [(b":status", b"200"), (b"content-length", b"99")]
    assert responseHeaders(Response(204, b"", b"HTTP/1.1", [], 0), b"GET") == [(b":status", b"204")]


def test_trailers():
    """Trailers pass through (grpc-status), minus what HTTP/2 forbids."""
    assert trailerFields([(b"grpc-status", b"0"), (b"grpc-message", b"")]) == [
        (b"grpc-status", b"0"),
        (b"grpc-message", b""),
    ]
    assert trailerHeaders(
        [(b"Grpc-Status", b"13"), (b"Connection", b"x"), (b"Content-Length", b"1")]
    ) == [(b"grpc-status", b"13")]


def test_proxyFieldsGoOutBothWays():
    """Via and X-Forwarded-For (the proxy's own fields) follow the end-to-end ones, lower case."""
    request = Request(b"GET", "https", "o", 443, b"o", b"/", b"HTTP/1.1", [(b"X-A", b"1")], -1)
    request.proxyFields = [(b"Via", b"1.1 proxygate"), (b"X-Forwarded-For", b"10.0.0.1")]
    assert requestHeaders(request)[4:] == [
        (b"x-a", b"1"),
        (b"via", b"1.1 proxygate"),
        (b"x-forwarded-for", b"10.0.0.1"),
    ]
    response = Response(200, b"OK", b"HTTP/1.1", [(b"X-B", b"2")], 0)
    response.proxyFields = [(b"Via", b"1.1 proxygate")]
    assert responseHeaders(response, b"GET") == [
        (b":status", b"200"),
        (b"x-b", b"2"),
        (b"via", b"1.1 proxygate"),
        (b"content-length", b"0"),
    ]


def test_secretsAreNeverIndexed() -> None:
    """
    Authorization and short cookies go out never-indexed (h2's rule, after Firefox and
    nghttp2), and so does a field that came in never-indexed (RFC 7541 §7.1.3): decoded by
    the hpack library, they are out of the shared HPACK table.
    """
    from hpack import Decoder, NeverIndexedHeaderTuple

    from gateway.h2.hpack import Encoder, NeverIndexed

    request = Request(
        b"GET", "https", "o", 443, b"o", b"/", b"HTTP/1.1",
        [(b"Authorization", b"Bearer x"), (b"Cookie", b"s=1"), (b"Cookie", b"a" * 30),
         NeverIndexed((b"x-token", b"t")), (b"x-plain", b"p")], -1,
    )  # fmt: skip
    headers = requestHeaders(request)
    assert headers[4:] == [
        (b"authorization", b"Bearer x"),
        (b"cookie", b"s=1"),
        (b"cookie", b"a" * 30),
        (b"x-token", b"t"),
        (b"x-plain", b"p"),
    ]
    decoded = Decoder().decode(Encoder().encode(headers), raw=True)[4:]
    assert [isinstance(h, NeverIndexedHeaderTuple) for h in decoded] == [
        True, True, False, True, False,
    ]  # fmt: skip
