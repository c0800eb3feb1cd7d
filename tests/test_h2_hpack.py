"""
Tests for gateway.h2.hpack and gateway.h2.huffman: HPACK (RFC 7541) both ways.

The examples of RFC 7541 Appendix C byte for byte (with and without Huffman, table evictions
included), round trips against python-hyper's hpack library (an independent implementation)
in both directions with hypothesis, and malformed input.
"""

from __future__ import annotations

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.h2 import huffman
from gateway.h2.hpack import (
    Decoder,
    Encoder,
    HPACKError,
    NeverIndexed,
    OversizedHeaderList,
    _encodeInteger,
)

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode


def literal(data: bytes) -> bytes:
    """A string literal without Huffman (RFC 7541 §5.2), lengths under 127."""
    return bytes((len(data),)) + data


def huffmanLiteral(data: bytes) -> bytes:
    """A Huffman-coded string literal, coded by the hpack library."""
    coded = _huffman(data)
    return bytes((0x80 | len(coded),)) + coded


def table(decoder: Decoder) -> list[tuple[bytes, bytes]]:
    """The dynamic table, newest first (the RFC's order)."""
    return list(reversed(decoder.table))


# -- C.1: integers ------------------------------------------------------------------------------


def test_integerExamples():
    """C.1.1-C.1.3: 10 and 1337 on a 5-bit prefix, 42 at an octet boundary."""
    assert _encodeInteger(10, 0x1F, 0) == b"\x0a"
    assert _encodeInteger(1337, 0x1F, 0) == b"\x1f\x9a\x0a"
    assert _encodeInteger(42, 0xFF, 0) == b"\x2a"
    # Read back as a dynamic table size update (a 5-bit prefix): 1337 fits the limit.
    decoder = Decoder(maxAllowed=4096)
    assert decoder.decode(b"\x3f\x9a\x0a\x82") == ([(b":method", b"GET")], 42)
    assert decoder.maxSize == 1337


def test_largeIndices():
    """Indices past 127 take continuation bytes both ways."""
    encoder, decoder = Encoder(), Decoder()
    fields = [(b"x-%d" % i, b"v") for i in range(100)]
    decoder.decode(encoder.encode(fields))
    block = encoder.encode(fields)
    assert block[0] == 0xFF  # the oldest entry: index 161
    assert decoder.decode(block)[0] == fields


# -- C.2: one representation each ----------------------------------------------------------------


def test_literalWithIndexing():
    """C.2.1: a literal name and value, added to the table (55 bytes)."""
    block = bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572")
    decoder = Decoder()
    assert decoder.decode(block) == ([(b"custom-key", b"custom-header")], 55)
    assert table(decoder) == [(b"custom-key", b"custom-header")] and decoder.size == 55
    assert Encoder().encode([(b"custom-key", b"custom-header")]) == block


def test_literalWithoutIndexing():
    """C.2.2: an indexed name, a literal value, the table untouched."""
    decoder = Decoder()
    headers, _ = decoder.decode(bytes.fromhex("040c2f73616d706c652f70617468"))
    assert headers == [(b":path", b"/sample/path")] and decoder.table == []


def test_literalNeverIndexed():
    """C.2.3: never indexed: decoded as such, and encoded so."""
    block = bytes.fromhex("100870617373776f726406736563726574")
    decoder = Decoder()
    ((field), *_), _ = decoder.decode(block)
    assert field == (b"password", b"secret") and isinstance(field, NeverIndexed)
    assert decoder.table == []
    assert Encoder().encode([NeverIndexed((b"password", b"secret"))]) == block


def test_indexedField():
    """C.2.4: a field of the static table."""
    assert Decoder().decode(b"\x82") == ([(b":method", b"GET")], 42)
    assert Encoder().encode([(b":method", b"GET")]) == b"\x82"


# -- C.3, C.4: requests ----------------------------------------------------------------------------

REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]  # fmt: skip

REQUEST_TABLES = [
    ([(b":authority", b"www.example.com")], 57),
    ([(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 110),
    (
        [(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"),
         (b":authority", b"www.example.com")],
        164,
    ),
]  # fmt: skip


def requestBlocks(string) -> list[bytes]:
    """C.3 (C{string} = literal) or C.4 (huffmanLiteral), as the RFC lays them out."""
    return [
        b"\x82\x86\x84\x41" + string(b"www.example.com"),
        b"\x82\x86\x84\xbe\x58" + string(b"no-cache"),
        b"\x82\x87\x85\xbf\x40" + string(b"custom-key") + string(b"custom-value"),
    ]


def test_requestBlocksAreTheRFCs():
    """The C.3 and C.4 blocks built here are the RFC's bytes (as hpack's tests have them)."""
    assert requestBlocks(literal)[0] == bytes.fromhex("828684410f7777772e6578616d706c652e636f6d")
    assert requestBlocks(huffmanLiteral)[0] == bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")
    assert requestBlocks(huffmanLiteral)[2] == bytes.fromhex(
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"
    )


@pytest.mark.parametrize(("huffmanOn", "string"), [(False, literal), (True, huffmanLiteral)])
def test_requestExamples(huffmanOn, string):
    """C.3 and C.4: three requests on one connection, both ways, with the table after each."""
    encoder, decoder = Encoder(huffman=huffmanOn), Decoder()
    for headers, block, (entries, size) in zip(
        REQUESTS, requestBlocks(string), REQUEST_TABLES, strict=True
    ):
        assert encoder.encode(headers) == block
        assert decoder.decode(block)[0] == headers
        assert (table(decoder), decoder.size) == (entries, size)
        assert encoder.size == size


# -- C.5, C.6: responses, a 256-byte table, evictions ---------------------------------------------

DATE1 = b"Mon, 21 Oct 2013 20:13:21 GMT"
DATE2 = b"Mon, 21 Oct 2013 20:13:22 GMT"
LOCATION = b"https://www.example.com"
COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"

RESPONSES = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", DATE1),
     (b"location", LOCATION)],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", DATE1),
     (b"location", LOCATION)],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", DATE2),
     (b"location", LOCATION), (b"content-encoding", b"gzip"), (b"set-cookie", COOKIE)],
]  # fmt: skip

RESPONSE_TABLES = [
    ([(b"location", LOCATION), (b"date", DATE1), (b"cache-control", b"private"),
      (b":status", b"302")], 222),
    ([(b":status", b"307"), (b"location", LOCATION), (b"date", DATE1),
      (b"cache-control", b"private")], 222),
    ([(b"set-cookie", COOKIE), (b"content-encoding", b"gzip"), (b"date", DATE2)], 215),
]  # fmt: skip


def responseBlocks(string) -> list[bytes]:
    return [
        b"\x48" + string(b"302") + b"\x58" + string(b"private") + b"\x61" + string(DATE1)
        + b"\x6e" + string(LOCATION),
        b"\x48" + string(b"307") + b"\xc1\xc0\xbf",
        b"\x88\xc1\x61" + string(DATE2) + b"\xc0\x5a" + string(b"gzip") + b"\x77"
        + string(COOKIE),
    ]  # fmt: skip


def test_responseBlocksAreTheRFCs():
    """C.5.1's first bytes and C.6.2, as the RFC prints them."""
    assert responseBlocks(literal)[0][:16] == bytes.fromhex("4803333032580770726976617465611d")
    assert responseBlocks(huffmanLiteral)[1] == bytes.fromhex("4883640effc1c0bf")


@pytest.mark.parametrize(("huffmanOn", "string"), [(False, literal), (True, huffmanLiteral)])
def test_responseExamples(huffmanOn, string):
    """C.5 and C.6: three responses with a 256-byte table, entries evicted as the RFC says."""
    encoder = Encoder(huffman=huffmanOn, peerLimit=256)
    decoder = Decoder(maxAllowed=256)
    for headers, block, (entries, size) in zip(
        RESPONSES, responseBlocks(string), RESPONSE_TABLES, strict=True
    ):
        assert encoder.encode(headers) == block
        assert decoder.decode(block)[0] == headers
        assert (table(decoder), decoder.size) == (entries, size)
        assert encoder.size == size


# -- table sizes -------------------------------------------------------------------------------


def test_peerLimitSignalsTheSmallestThenTheLast():
    """Several changes between two blocks: the smallest size, then the current one (§4.2)."""
    encoder = Encoder()
    encoder.encode([(b"x-aaaaaaaa", b"1")])
    encoder.setPeerLimit(40)
    encoder.setPeerLimit(100)
    assert encoder.size == 0, "the entry (43 bytes) did not fit in 40"
    block = encoder.encode([(b":method", b"GET")])
    assert block == b"\x3f\x09\x3f\x45\x82"
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 100
    assert decoder.decode(block, raw=True) == [(b":method", b"GET")]
    assert encoder.encode([(b":method", b"GET")]) == b"\x82", "signalled once"


def test_peerLimitAboveOurCap():
    """A peer allowing more than this side keeps: nothing to signal, the cap holds."""
    encoder = Encoder(maxTableSize=4096)
    encoder.setPeerLimit(65536)
    assert encoder.encode([(b":method", b"GET")]) == b"\x82"
    encoder.setPeerLimit(0)
    assert encoder.encode([(b"x-a", b"1")])[:1] == b"\x20"  # size 0
    assert encoder.size == 0


def test_entryLargerThanTheTable():
    """An entry larger than the whole table empties it (§4.4); the encoder does not index it."""
    decoder = Decoder()
    decoder.decode(b"\x40" + literal(b"x-a") + literal(b"1"))
    big = b"v" * 5000
    block = b"\x40" + literal(b"x-big") + b"\x7f" + _encodeInteger(5000, 0x7F, 0)[1:] + big
    assert decoder.decode(block)[0] == [(b"x-big", big)]
    assert decoder.table == [] and decoder.size == 0
    encoder = Encoder()
    assert encoder.encode([(b"x-big", big)])[:1] == b"\x00"  # without indexing
    assert encoder.size == 0


# -- against the hpack library -----------------------------------------------------------------

names = st.one_of(
    st.sampled_from([b":path", b"content-type", b"cookie", b"authorization", b"x-a", b"x-b"]),
    st.binary(min_size=1, max_size=12),
)
values = st.one_of(
    st.sampled_from([b"", b"/", b"text/html", b"a=1", b"secret"]), st.binary(max_size=80)
)
fieldLists = st.lists(st.tuples(names, values), max_size=12)
blocks = st.lists(
    st.tuples(fieldLists, st.one_of(st.none(), st.integers(0, 4096))), min_size=1, max_size=8
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=blocks, huffmanOn=st.booleans())
def test_ourEncoderTheirDecoder(blocks, huffmanOn):
    """What this encoder sends, the hpack library decodes, table size changes included."""
    encoder = Encoder(huffman=huffmanOn)
    decoder = hpack.Decoder(max_header_list_size=2**31)
    for fields, limit in blocks:
        if limit is not None:
            encoder.setPeerLimit(limit)
            decoder.max_allowed_table_size = limit
        decoded = decoder.decode(encoder.encode(fields), raw=True)
        assert [tuple(field) for field in decoded] == fields
        for field, back in zip(fields, decoded, strict=True):
            # (an empty one is the static table's: it says nothing)
            secret = field[0] in (b"authorization", b"proxy-authorization") or (
                field[0] == b"cookie" and len(field[1]) < 20
            )
            if secret and field[1]:
                assert isinstance(back, hpack.NeverIndexedHeaderTuple), field


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=blocks, huffmanOn=st.booleans(), never=st.booleans())
def test_theirEncoderOurDecoder(blocks, huffmanOn, never):
    """
    What the hpack library sends, this decoder decodes, as the library's own decoder does;
    a field sent never-indexed comes out so.
    """
    encoder = hpack.Encoder()
    decoder = Decoder()
    reference = hpack.Decoder(max_header_list_size=2**31)
    for fields, limit in blocks:
        if limit is not None:
            encoder.header_table_size = limit
        sent = [(n, v, never and i % 2 == 0) for i, (n, v) in enumerate(fields)]
        block = encoder.encode(sent, huffman=huffmanOn)
        decoded, size = decoder.decode(block)
        assert decoded == fields
        assert size == sum(len(n) + len(v) + 32 for n, v in fields)
        expected = reference.decode(block, raw=True)
        assert [isinstance(field, NeverIndexed) for field in decoded] == [
            isinstance(field, hpack.NeverIndexedHeaderTuple) for field in expected
        ]


# -- Huffman -------------------------------------------------------------------------------------


def test_huffmanCodesAreTheRFCs():
    """The codes derived from the lengths (the code is canonical) are Appendix B's."""
    assert list(REQUEST_CODES) == huffman.CODES
    assert list(huffman.LENGTHS) == list(REQUEST_CODES_LENGTH)


@given(st.binary(max_size=300))
def test_huffmanRoundTrip(data):
    coded = huffman.huffmanEncode(data)
    assert coded == _huffman(data)
    assert len(coded) == huffman.huffmanLength(data)
    assert huffman.huffmanDecode(coded) == data


def test_huffmanEveryByte():
    data = bytes(range(256)) * 2
    assert huffman.huffmanDecode(_huffman(data)) == data


@pytest.mark.parametrize(
    "coded",
    [
        b"\xff\xff\xff\xff",  # 30 ones: EOS itself, inside the string
        b"\x18",  # "a" (00011) then 000: padding that is not EOS's prefix
        b"\x1f\xff",  # "a" then 11 one-bits: padding longer than 7 bits
        b"\xfe",  # 11111110: the start of a longer code, unfinished
    ],
)
def test_huffmanInvalid(coded):
    with pytest.raises(huffman.HuffmanError):
        huffman.huffmanDecode(coded)


# -- malformed blocks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (b"\x80", "index 0"),
        (b"\xbe", "beyond the dynamic table"),  # 62: the table is empty
        (b"\xff\x80\x80\x80\x80\x80\x01", "too large"),  # an integer past 28 bits
        (b"\xff", "ends inside"),  # an integer cut short
        (b"\x7f\x0a\x0fwww.example.com", "beyond the dynamic table"),  # a name index
        (b"\x00\x85\xf2\xb2J", "longer than its header block"),  # a name cut short
        (b"\x40\x03abc", "ends inside"),  # a value missing
        (b"\x40\x81\xff\x01a", "Huffman"),  # EOS padding beyond 7 bits in the name
        (b"\x82\x3f\xe1\x1f", "after the first field"),  # a size update after a field
        (b"\x3f\xe2\x1f\x82", "above the limit"),  # 4097 > 4096
    ],
)
def test_malformedBlocks(block, match):
    with pytest.raises(HPACKError, match=match):
        Decoder().decode(block)


def test_sizeUpdateAboveOurSetting():
    """A size update above this side's SETTINGS_HEADER_TABLE_SIZE is an error (§6.3)."""
    decoder = Decoder(maxAllowed=100)
    with pytest.raises(HPACKError):
        decoder.decode(b"\x3f\x46\x82")  # 101
    assert Decoder(maxAllowed=100).decode(b"\x3f\x45\x82")[0] == [(b":method", b"GET")]


def test_headerListBound():
    """Decoding stops past the list size bound (names, values, 32 per field)."""
    block = bytes.fromhex("040c2f73616d706c652f70617468")  # 49 bytes of list
    assert Decoder(maxListSize=49).decode(block)[1] == 49
    with pytest.raises(OversizedHeaderList):
        Decoder(maxListSize=48).decode(block)
    many = b"\x82" * 10000  # a small block decoding to a large list: stopped early
    with pytest.raises(OversizedHeaderList):
        Decoder(maxListSize=4096).decode(many)


def test_versionMovesWithTheTable():
    """The decoder's version changes exactly when its table does (what blocks are kept by)."""
    decoder = Decoder()
    version = decoder.version
    decoder.decode(b"\x82\x84")
    assert decoder.version == version
    decoder.decode(b"\x40" + literal(b"x-a") + literal(b"1"))
    assert decoder.version != version
    version = decoder.version
    decoder.decode(b"\xbe")
    assert decoder.version == version
    decoder.decode(b"\x20\x82")
    assert decoder.version != version and decoder.table == []
