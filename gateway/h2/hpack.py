# -*- test-case-name: tests.test_h2_hpack -*-
"""
HPACK, HTTP/2's header compression (RFC 7541): a L{Decoder} for what a peer sends, an
L{Encoder} for what this side sends. Pure, no I/O.

Written for CPython's speed on the shapes HTTP/2 traffic has: most fields of a request are
one byte that indexes a table, so that path is a few operations and hands out the table's own
tuple; literal strings are sliced, and Huffman-coded ones decoded by L{huffman} (which
remembers repeated strings).

Secrets stay out of the dynamic table, which all the requests one connection carries share
(a compression oracle could guess them from the sizes of other requests, RFC 7541 §7.1):
the encoder sends never-indexed literals for fields in L{NeverIndexed} (a decoder returns a
field received that way as one: an intermediary must keep it so, §7.1.3), for the names in
its C{sensitive} set (authorization, proxy-authorization) and for cookies shorter than 20
bytes (after Firefox and nghttp2, as python-hyper's h2 does).
"""

from __future__ import annotations

from collections import deque

from .huffman import HuffmanError, huffmanDecode, huffmanEncode

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "STATIC_TABLE",
    "Decoder",
    "Encoder",
    "HPACKError",
    "NeverIndexed",
    "OversizedHeaderList",
]

#: SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 §6.5.2).
DEFAULT_TABLE_SIZE = 4096


class HPACKError(ValueError):
    """A header block that cannot be decoded (HTTP/2: a COMPRESSION_ERROR)."""


class OversizedHeaderList(HPACKError):
    """A header block decoding to more than the decoder's hard limit: decoding stopped."""


class NeverIndexed(tuple):
    """A (name, value) field that must never enter a dynamic table (RFC 7541 §6.2.3)."""

    __slots__ = ()


STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b"", b""),  # indices start at 1
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)

_STATIC_LENGTH = len(STATIC_TABLE)  # 62: the first dynamic index
#: Exact matches of the static table, as the encoder's table holds them (negative: static).
_STATIC_FIELDS = {field: -index for index, field in enumerate(STATIC_TABLE) if index}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(STATIC_TABLE):
    if _index:
        _STATIC_NAMES.setdefault(_name, _index)
del _index, _name

#: Most bits an integer may take: every size and index fits in far fewer.
_INTEGER_BITS = 28


def _integer(data: bytes, i: int, value: int) -> tuple[int, int]:
    """
    The rest of an integer whose prefix (at C{i - 1}) was all ones (C{value}): its value
    and the index after it (§5.1).
    """
    shift = 0
    while True:
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > _INTEGER_BITS:
            raise HPACKError("an integer too large")


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    """The string literal at C{i} (§5.2), and the index after it."""
    byte = data[i]
    length = byte & 0x7F
    i += 1
    if length == 0x7F:
        length, i = _integer(data, i, 0x7F)
    end = i + length
    if end > len(data):
        raise HPACKError("a string literal longer than its header block")
    if byte & 0x80:
        return huffmanDecode(data[i:end]), end
    return data[i:end], end


class Decoder:
    """
    The decoding side of one connection's HPACK context.

    @ivar maxAllowed: the largest table the peer may ask for (this side's
        SETTINGS_HEADER_TABLE_SIZE).
    @ivar maxListSize: decoding stops with L{OversizedHeaderList} past this many bytes of
        header list (RFC 9113 §6.5.2: names, values and 32 per field).
    """

    def __init__(self, maxAllowed: int = DEFAULT_TABLE_SIZE, maxListSize: int = 2**31) -> None:
        self.maxAllowed = maxAllowed
        self.maxListSize = maxListSize
        self.maxSize = maxAllowed  # the table's size, until the peer signals another
        self.size = 0
        self.table: list[tuple[bytes, bytes]] = []  # newest last
        #: Bumped whenever the table changes: a block that did not change it decodes the
        #: same way again while this stays the same.
        self.version = 0

    def decode(self, data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        """
        The fields of one complete header block, and the size of that header list.

        @raise HPACKError: a malformed block (the connection's context is then unusable).
        @raise OversizedHeaderList: past L{maxListSize}.
        """
        try:
            return self._decode(data)
        except IndexError:
            raise HPACKError("a header block that ends inside a field") from None
        except HuffmanError as e:
            raise HPACKError(str(e)) from None

    def _decode(self, data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        table = self.table
        limit = self.maxListSize
        static = STATIC_TABLE
        length = len(data)
        size = 0
        i = 0
        # Dynamic table size updates come first, or not at all (§4.2).
        while i < length and data[i] & 0xE0 == 0x20:
            value = data[i] & 0x1F
            i += 1
            if value == 0x1F:
                value, i = _integer(data, i, 0x1F)
            if value > self.maxAllowed:
                raise HPACKError(
                    f"a table size update to {value}, above the limit of {self.maxAllowed}"
                )
            self.maxSize = value
            self.version += 1
            self._evict(0)
        while i < length:
            byte = data[i]
            i += 1
            if byte & 0x80:  # indexed (§6.1)
                index = byte & 0x7F
                if index == 0x7F:
                    index, i = _integer(data, i, 0x7F)
                if index < _STATIC_LENGTH:
                    if not index:
                        raise HPACKError("index 0")
                    field = static[index]
                else:
                    index -= _STATIC_LENGTH
                    if index >= len(table):
                        raise HPACKError("an index beyond the dynamic table")
                    field = table[-1 - index]
            else:
                if byte & 0x40:  # literal with incremental indexing (§6.2.1)
                    index = byte & 0x3F
                    if index == 0x3F:
                        index, i = _integer(data, i, 0x3F)
                elif byte & 0x20:
                    raise HPACKError("a table size update after the first field")
                else:  # without indexing, never indexed (§6.2.2, §6.2.3)
                    index = byte & 0x0F
                    if index == 0x0F:
                        index, i = _integer(data, i, 0x0F)
                if index:
                    if index < _STATIC_LENGTH:
                        name = static[index][0]
                    elif index - _STATIC_LENGTH < len(table):
                        name = table[_STATIC_LENGTH - 1 - index][0]
                    else:
                        raise HPACKError("a name index beyond the dynamic table")
                else:
                    name, i = _string(data, i)
                value, i = _string(data, i)
                if byte & 0x40:
                    field = (name, value)
                    self._add(field)
                elif byte & 0x10:
                    field = NeverIndexed((name, value))
                else:
                    field = (name, value)
            size += len(field[0]) + len(field[1]) + 32
            if size > limit:
                raise OversizedHeaderList(f"a header list larger than {limit} bytes")
            append(field)
        return headers, size

    def _add(self, field: tuple[bytes, bytes]) -> None:
        self.version += 1
        entry = len(field[0]) + len(field[1]) + 32
        if entry > self.maxSize:
            self.table.clear()  # §4.4: an entry larger than the table empties it
            self.size = 0
            return
        self._evict(entry)
        self.table.append(field)
        self.size += entry

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until C{room} more bytes fit (§4.3, §4.4)."""
        table = self.table
        while table and self.size + room > self.maxSize:
            name, value = table.pop(0)
            self.size -= len(name) + len(value) + 32


def _encodeInteger(value: int, prefix: int, flags: int) -> bytes:
    """C{value} with a C{prefix}-all-ones prefix (0x7F: 7 bits...), C{flags} in the first byte."""
    if value < prefix:
        return bytes((flags | value,))
    out = bytearray((flags | prefix,))
    value -= prefix
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Encoder:
    """
    The encoding side of one connection's HPACK context.

    Exact matches in either table are sent indexed; anything else is a literal added to the
    dynamic table, but for secrets (never indexed) and fields larger than the table (sent
    without indexing: they would only empty it).

    @param maxTableSize: the largest table this side keeps, whatever the peer allows.
    @param peerLimit: the peer's SETTINGS_HEADER_TABLE_SIZE (its decoder starts with a table
        that size); L{setPeerLimit} when it changes.
    @ivar huffman: Huffman-code literal strings unless that makes them longer.
    @ivar sensitive: names always sent never-indexed.
    """

    def __init__(
        self,
        maxTableSize: int = DEFAULT_TABLE_SIZE,
        huffman: bool = False,
        sensitive: frozenset[bytes] = frozenset((b"authorization", b"proxy-authorization")),
        peerLimit: int = DEFAULT_TABLE_SIZE,
    ) -> None:
        self.huffman = huffman
        self.sensitive = sensitive
        self._cap = maxTableSize
        self.maxSize = min(maxTableSize, peerLimit)
        self._updates: list[int] = []
        if self.maxSize != peerLimit:
            self._updates.append(self.maxSize)
        self.size = 0
        self._entries: deque[tuple[tuple[bytes, bytes], int, int]] = deque()
        self._inserted = 0  # entries ever added: an entry's number is its absolute index
        # field -> its absolute index, or minus its static index (one lookup for both tables)
        self._fields: dict[tuple[bytes, bytes], int] = dict(_STATIC_FIELDS)
        self._names: dict[bytes, int] = {}

    def setPeerLimit(self, limit: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: the next block signals the table's new size."""
        size = min(limit, self._cap)
        if size != self.maxSize:
            self._updates.append(size)
            self.maxSize = size
            self._evict(0)

    def encode(self, headers) -> bytes:
        """One header block for C{headers}, (name, value) pairs (bytes, names lower case)."""
        out = bytearray()
        if self._updates:
            # The smallest size since the last block, then the current one (§4.2).
            smallest = min(self._updates)
            out += _encodeInteger(smallest, 0x1F, 0x20)
            if smallest != self.maxSize:
                out += _encodeInteger(self.maxSize, 0x1F, 0x20)
            self._updates.clear()
        known = self._fields
        for field in headers:
            absolute = known.get(field)
            if absolute is not None:
                if absolute < 0:
                    out.append(0x80 - absolute)
                    continue
                if field.__class__ is not NeverIndexed:
                    index = self._inserted + 61 - absolute
                    if index < 0x7F:
                        out.append(0x80 | index)
                    else:
                        out += _encodeInteger(index, 0x7F, 0x80)
                    continue
            name, value = field
            index = _STATIC_NAMES.get(name)
            if index is None:
                absolute = self._names.get(name)
                if absolute is not None:
                    index = self._inserted + 61 - absolute
            size = len(name) + len(value) + 32
            if (
                field.__class__ is NeverIndexed
                or name in self.sensitive
                or (name == b"cookie" and len(value) < 20)
            ):
                prefix, flags = 0x0F, 0x10
            elif size > self.maxSize:
                prefix, flags = 0x0F, 0x00
            else:
                prefix, flags = 0x3F, 0x40
                self._add((name, value), size)
            if index is None:
                out.append(flags)
                self._string(out, name)
            elif index < prefix:
                out.append(flags | index)
            else:
                out += _encodeInteger(index, prefix, flags)
            self._string(out, value)
        return bytes(out)

    def _string(self, out: bytearray, data: bytes) -> None:
        if self.huffman and data:
            coded = huffmanEncode(data)
            if len(coded) <= len(data):
                if len(coded) < 0x7F:
                    out.append(0x80 | len(coded))
                else:
                    out += _encodeInteger(len(coded), 0x7F, 0x80)
                out += coded
                return
        if len(data) < 0x7F:
            out.append(len(data))
        else:
            out += _encodeInteger(len(data), 0x7F, 0)
        out += data

    def _add(self, field: tuple[bytes, bytes], size: int) -> None:
        self._evict(size)
        absolute = self._inserted
        self._inserted += 1
        self._entries.append((field, size, absolute))
        self._fields[field] = absolute
        self._names[field[0]] = absolute
        self.size += size

    def _evict(self, room: int) -> None:
        entries = self._entries
        while entries and self.size + room > self.maxSize:
            field, size, absolute = entries.popleft()
            self.size -= size
            if self._fields.get(field) == absolute:
                del self._fields[field]
            if self._names.get(field[0]) == absolute:
                del self._names[field[0]]
