"""
Tests for gateway.h2.fields: what RFC 9113 §8.2-§8.3 requires of a received header block,
checked and taken apart in one pass (pure).
"""

from __future__ import annotations

import pytest

from gateway.h2 import fields
from gateway.h2.fields import Malformed, requestHead, responseHead, trailerFields
from gateway.h2.hpack import NeverIndexed

GET = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"a.test"),
    (b":path", b"/x?y"),
]


def test_requestTakenApart():
    """The pseudo-header fields, content-length and Host out; the rest in order."""
    head = requestHead(
        [*GET, (b"user-agent", b"t"), (b"content-length", b"12"), (b"host", b"a.test"),
         (b"te", b"trailers"), (b"content-type", b"a/b")]
    )  # fmt: skip
    method, scheme, authority, path, rest, length, host = head
    assert (method, scheme, authority, path, length, host) == (
        b"GET", b"https", b"a.test", b"/x?y", 12, b"a.test",
    )  # fmt: skip
    assert rest == [(b"user-agent", b"t"), (b"te", b"trailers"), (b"content-type", b"a/b")]
    assert requestHead(GET)[5] == -1 and requestHead(GET)[6] is None


def test_connect():
    """CONNECT: :authority only; extended CONNECT (:protocol) is a request with a path."""
    head = requestHead([(b":method", b"CONNECT"), (b":authority", b"a.test:443")])
    assert head[:4] == (b"CONNECT", None, b"a.test:443", None)
    extended = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *GET[1:]]
    assert requestHead(extended)[3] == b"/x?y"


def test_responseTakenApart():
    status, rest, length, contentType = responseHead(
        [(b":status", b"204"), (b"content-type", b"text/plain"), (b"content-length", b"0"),
         (b"te", b"trailers"), (b"set-cookie", b"a"), (b"set-cookie", b"b")]
    )  # fmt: skip
    assert (status, length, contentType) == (204, 0, b"text/plain")
    assert rest == [(b"content-type", b"text/plain"), (b"set-cookie", b"a"), (b"set-cookie", b"b")]


def test_cookiesJoined():
    """§8.2.3: cookie fields become one, where the first was; never-indexed if any was."""
    head = requestHead([*GET, (b"cookie", b"a=1"), (b"x", b"1"), (b"cookie", b"b=2")])
    assert head[4] == [(b"cookie", b"a=1; b=2"), (b"x", b"1")]
    assert not isinstance(head[4][0], NeverIndexed)
    secret = requestHead([*GET, NeverIndexed((b"cookie", b"s=1")), (b"cookie", b"b=2")])
    assert secret[4] == [(b"cookie", b"s=1; b=2")] and isinstance(secret[4][0], NeverIndexed)
    single = requestHead([*GET, NeverIndexed((b"cookie", b"s=1")), (b"x", b"1")])
    assert single[4] == [(b"cookie", b"s=1"), (b"x", b"1")]
    assert isinstance(single[4][0], NeverIndexed), "kept as it came"


def test_trailers():
    assert trailerFields([(b"grpc-status", b"0"), (b"content-length", b"3")]) == [
        (b"grpc-status", b"0")
    ]
    with pytest.raises(Malformed, match="pseudo-header field in trailers"):
        trailerFields([(b":status", b"200")])


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ([*GET, (b"User-Agent", b"t")], "upper-case field name"),
        ([*GET, (b"", b"t")], "empty field name"),
        ([*GET, (b"x y", b"t")], "invalid field name"),
        ([*GET, (b"x:y", b"t")], "invalid field name"),
        ([*GET, (b"x\x00", b"t")], "invalid field name"),
        ([*GET, (b"x", b"a\r\nb: c")], "NUL, CR or LF"),
        ([*GET, (b"x", b"a\x00")], "NUL, CR or LF"),
        ([*GET, (b"x", b" a")], "whitespace"),
        ([*GET, (b"x", b"a\t")], "whitespace"),
        ([*GET, (b"connection", b"close")], "connection-specific field connection"),
        ([*GET, (b"keep-alive", b"1")], "connection-specific"),
        ([*GET, (b"proxy-connection", b"1")], "connection-specific"),
        ([*GET, (b"transfer-encoding", b"chunked")], "connection-specific"),
        ([*GET, (b"upgrade", b"h2c")], "connection-specific"),
        ([*GET, (b"te", b"gzip")], "TE other than trailers"),
        ([(b"x", b"1"), *GET], "after a regular one"),
        ([*GET, (b":foo", b"1")], "unknown pseudo-header field"),
        ([*GET, (b":path", b"/again")], "repeated :path"),
        ([*GET, (b":status", b"200")], "request with :status"),
        (GET[1:], "without :method"),
        ([GET[0], GET[2], GET[3]], "without :scheme or :path"),
        ([*GET[:3], (b":path", b"")], "empty :path"),
        ([(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")], "CONNECT with"),
        ([(b":method", b"CONNECT")], "CONNECT without :authority"),
        ([*GET, (b":protocol", b"websocket")], ":protocol in a request other than CONNECT"),
        ([*GET, (b"host", b"b.test")], "host that is not the :authority"),
        ([*GET, (b"host", b"a.test"), (b"host", b"a.test")], "repeated host"),
        ([*GET, (b"content-length", b"1"), (b"content-length", b"2")], "disagree"),
        ([*GET, (b"content-length", b"-1")], "invalid content-length"),
        ([*GET, (b"content-length", b"1 ")], "whitespace"),
        ([*GET, (b"content-length", b"")], "invalid content-length"),
    ],
)
def test_malformedRequests(block, match):
    with pytest.raises(Malformed, match=match):
        requestHead(block)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ([], "without a valid :status"),
        ([(b":status", b"20")], "without a valid :status"),
        ([(b":status", b"2000")], "without a valid :status"),
        ([(b":status", b"abc")], "without a valid :status"),
        ([(b":status", b"099")], "without a valid :status"),
        ([(b":status", b"200"), (b":path", b"/")], "request's pseudo-header field"),
        ([(b":status", b"200"), (b":status", b"200")], "repeated :status"),
        ([(b":status", b"200"), (b"connection", b"close")], "connection-specific"),
    ],
)
def test_malformedResponses(block, match):
    with pytest.raises(Malformed, match=match):
        responseHead(block)


def test_contentLengthRepeatedAndEqual():
    """The same content-length twice is one length (RFC 9110 §8.6)."""
    block = [*GET, (b"content-length", b"5"), (b"content-length", b"5")]
    assert requestHead(block)[5] == 5


def test_validNamesAndValuesAreRemembered():
    """A checked name or short value is looked up next time; an invalid one never is."""
    requestHead([*GET, (b"x-remembered", b"value-remembered")])
    assert fields._names[b"x-remembered"] == fields._REGULAR
    assert b"value-remembered" in fields._values
    with pytest.raises(Malformed):
        requestHead([*GET, (b"X-Bad", b"v")])
    assert b"X-Bad" not in fields._names
    with pytest.raises(Malformed):
        requestHead([*GET, (b"x", b"bad\n")])
    assert b"bad\n" not in fields._values
    long = b"v" * (fields._VALUE_LONGEST + 1)
    requestHead([*GET, (b"x", long)])
    assert long not in fields._values
