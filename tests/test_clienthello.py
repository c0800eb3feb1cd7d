"""
Tests for gateway.tls.clienthello: real ClientHellos captured from curl, openssl s_client,
Python's ssl and grpcio (tests/data/clienthello/, re-made by capture.py there), fed whole,
byte by byte and in random pieces; hellos built from random fields (hypothesis); and
malformed input, which must give a ClientHelloError and nothing else.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tls.clienthello import (
    MAX_HELLO,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    NotTLS,
    parseClientHello,
)

FIXTURES = Path(__file__).parent / "data" / "clienthello"

#: What each captured hello offers: (SNI, ALPN).
CAPTURED = {
    "curl-h2": ("example.test", (b"h2", b"http/1.1")),
    "grpcio": ("grpc.example.test", (b"h2",)),  # 1.85: h2 alone, a 1,471-byte hello
    "curl-http11": ("example.test", (b"http/1.1",)),
    "openssl-alpn": ("example.test", (b"h2", b"http/1.1")),
    "openssl-bare": (None, None),
    "openssl-split": (
        "split.example.test",
        (b"h2", b"http/1.1", *tuple(f"x-filler-{i:03d}".encode() for i in range(40))),
    ),
    "python-h2": ("example.test", (b"h2", b"http/1.1")),
    "python-noalpn": ("example.test", None),
}


def _fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.bin").read_bytes()


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_capturedWhole(name):
    """Each real client's hello gives the SNI and ALPN list it was told to send."""
    data = _fixture(name)
    assert parseClientHello(data) == ClientHello(*CAPTURED[name], size=len(data))


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_capturedByteByByte(name):
    """Fed one byte at a time, the answer is 'need more' until the last byte."""
    data = _fixture(name)
    reader = ClientHelloReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None
    assert reader.feed(data[-1:]) == ClientHello(*CAPTURED[name], size=len(data))
    assert reader.feed(b"more") == ClientHello(*CAPTURED[name], size=len(data))


def test_capturedAcrossRecords():
    """openssl with max_send_frag 512 splits its hello across two records."""
    data = _fixture("openssl-split")
    first = struct.unpack("!H", data[3:5])[0]
    assert data[0] == 0x16 and first == 512 and len(data) > 5 + first
    assert parseClientHello(data[: 5 + first]) is None
    assert parseClientHello(data).alpn[:2] == (b"h2", b"http/1.1")


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_capturedWithTrailingBytes(name):
    """Bytes behind the hello (early data) are not the parser's: the hello still parses."""
    data = _fixture(name)
    assert parseClientHello(data + b"\x17\x03\x03\x00\x01x").size == len(data)


@pytest.mark.parametrize(
    "first",
    [b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH\r\n", b"\x80\x2e\x01\x03\x01", b"\x00", b"P"],
)
def test_notTLS(first):
    """A first byte that is not a handshake record: NotTLS, from the first byte on."""
    with pytest.raises(NotTLS):
        parseClientHello(first)
    with pytest.raises(NotTLS):
        ClientHelloReader().feed(first[:1])


# -- a builder for hellos with chosen fields -----------------------------------------------


def _vector(size: int, data: bytes) -> bytes:
    return len(data).to_bytes(size, "big") + data


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!H", kind) + _vector(2, data)


def sniExtension(name: bytes) -> bytes:
    return _extension(0, _vector(2, b"\x00" + _vector(2, name)))


def alpnExtension(names) -> bytes:
    return _extension(16, _vector(2, b"".join(_vector(1, n) for n in names)))


def helloBody(extensions: list[bytes] | None, sessionId: bytes = b"\x01" * 32) -> bytes:
    body = b"\x03\x03" + b"\x42" * 32 + _vector(1, sessionId)
    body += _vector(2, b"\x13\x01\x13\x02\xc0\x2f") + _vector(1, b"\x00")
    if extensions is not None:
        body += _vector(2, b"".join(extensions))
    return body


def records(message: bytes, fragment: int = 16384) -> bytes:
    out = b""
    for i in range(0, len(message), fragment):
        part = message[i : i + fragment]
        out += b"\x16\x03\x01" + struct.pack("!H", len(part)) + part
    return out


def hello(extensions: list[bytes] | None, fragment: int = 16384, **kw) -> bytes:
    body = helloBody(extensions, **kw)
    return records(b"\x01" + len(body).to_bytes(3, "big") + body, fragment)


_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
_hostName = st.lists(_label, min_size=1, max_size=5).map(".".join)
_protocol = st.binary(min_size=1, max_size=30)


@given(
    host=st.none() | _hostName,
    alpn=st.none() | st.lists(_protocol, min_size=1, max_size=12),
    padding=st.integers(0, 3000),
    fragment=st.integers(1, 16384),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_builtHellosAnySplit(host, alpn, padding, fragment, cuts):
    """Any hello, in records of any size, fed in any pieces, gives back its fields."""
    extensions = [_extension(21, b"\x00" * padding)]  # padding (RFC 7685) first
    if host is not None:
        extensions.append(sniExtension(host.encode()))
    if alpn is not None:
        extensions.append(alpnExtension(alpn))
    data = hello(extensions, fragment)
    expected = ClientHello(host, tuple(alpn) if alpn is not None else None, len(data))
    reader = ClientHelloReader()
    points = sorted({c % (len(data) + 1) for c in cuts} | {len(data)})
    start = 0
    result = None
    for point in points:
        result = reader.feed(data[start:point])
        if point < len(data):
            assert result is None
        start = point
    assert result == expected


@given(st.binary(max_size=2000))
@settings(max_examples=500, deadline=None)
def test_garbageOnlyClientHelloError(data):
    """Any bytes: a hello, 'need more', or ClientHelloError; never another exception."""
    try:
        parseClientHello(data)
    except ClientHelloError:
        pass


@given(
    name=st.sampled_from(sorted(CAPTURED)),
    position=st.integers(0, 10_000),
    value=st.integers(0, 255),
)
@settings(max_examples=500, deadline=None)
def test_mutatedCapturesOnlyClientHelloError(name, position, value):
    """A real hello with one byte changed: parsed, 'need more' or a ClientHelloError."""
    data = bytearray(_fixture(name))
    data[position % len(data)] = value
    try:
        parseClientHello(bytes(data))
    except ClientHelloError:
        pass


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (hello([sniExtension(b"a.test"), sniExtension(b"b.test")]), "twice"),
        (hello([alpnExtension([])]), "empty ALPN"),
        (hello([alpnExtension([b"h2", b""])]), "empty ALPN protocol name"),
        (hello([sniExtension(b"")]), "host_name"),
        (hello([sniExtension(b"bad\x00name")]), "ASCII"),
        (hello([sniExtension("é.test".encode())]), "ASCII"),
        (hello(None, sessionId=b"\x00" * 33), "session id"),
        (b"\x16\x03\x03\x00\x00", "empty handshake record"),
        (b"\x16\x03\x03\x40\x01" + b"\x00" * 16385, "more than 2"),
        (b"\x16\x02\x00\x00\x05\x01\x00\x00\x01\x00", "not TLS"),
        (records(b"\x02\x00\x00\x00"), "not a ClientHello"),
        (hello([]) + b"\x15\x03\x03\x00\x02\x02\x28", None),  # an alert after it: its own
    ],
)
def test_malformed(data, message):
    """Each defect gives a ClientHelloError naming it (or, last row, is not the hello's)."""
    if message is None:
        assert parseClientHello(data) is not None
        return
    with pytest.raises(ClientHelloError, match=message):
        parseClientHello(data)


def test_alertInsideHello():
    """A record of another type between the hello's records is an error."""
    data = hello([alpnExtension([b"h2"])], fragment=20)
    with pytest.raises(ClientHelloError, match="type 21"):
        parseClientHello(data[:25] + b"\x15\x03\x03\x00\x02\x02\x28" + data[25:])


def test_lengthMismatch():
    """An extension list longer than its hello, or bytes after the hello in its record."""
    body = helloBody([alpnExtension([b"h2"])])
    broken = body[:-7] + b"\x00\xff" + body[-5:]  # the ALPN extension claims 255 bytes
    with pytest.raises(ClientHelloError, match="truncated"):
        parseClientHello(records(b"\x01" + len(broken).to_bytes(3, "big") + broken))
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    with pytest.raises(ClientHelloError, match="after the ClientHello"):
        parseClientHello(records(message + b"\x14\x00\x00\x00"))


def test_bounded():
    """A hello claiming more than MAX_HELLO is refused as soon as its length is read."""
    header = b"\x01" + (MAX_HELLO).to_bytes(3, "big")
    with pytest.raises(ClientHelloError, match="more than"):
        parseClientHello(records(header + b"\x03\x03"))


def test_noExtensions():
    """A TLS 1.2 hello without extensions: no SNI, no ALPN."""
    data = hello(None)
    assert parseClientHello(data) == ClientHello(None, None, len(data))
