# -*- test-case-name: tests.test_h2_hpack -*-
"""
HPACK's Huffman code (RFC 7541 §5.2 and Appendix B), both ways, fast enough in CPython.

The code is canonical (codes of one length are consecutive, in symbol order), so the table
here is only the 257 code lengths; the codes follow from them.

Decoding walks a byte at a time: a transition from (tree node, input byte) to (tree node,
bytes emitted), computed bit by bit the first time it is needed and remembered (the 65,536
possible ones, built at once, would cost megabytes; the text of real headers needs a few
thousand). Clients repeat their strings (user-agent, paths, cookies) on every connection,
so whole decoded strings are remembered too, in a small bounded table.
"""

from __future__ import annotations

__all__ = ["HuffmanError", "huffmanDecode", "huffmanEncode"]


class HuffmanError(ValueError):
    """Not a valid Huffman-coded string: EOS inside, or padding that is not EOS's prefix."""


#: Code lengths in bits of symbols 0-255 and EOS (256), from RFC 7541 Appendix B.
LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7,
    7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21,
    23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24,
    21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
)  # fmt: skip

EOS = 256


def _canonicalCodes(lengths: tuple[int, ...]) -> list[int]:
    codes = [0] * len(lengths)
    code = -1
    previous = 0
    for symbol in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[symbol] - previous)
        previous = lengths[symbol]
        codes[symbol] = code
    return codes


CODES = _canonicalCodes(LENGTHS)


def _tree() -> list[list[int]]:
    """The decoding tree: node -> [child for bit 0, child for bit 1]; a leaf is ~symbol."""
    children: list[list[int]] = [[0, 0]]
    for symbol, (code, bits) in enumerate(zip(CODES, LENGTHS, strict=True)):
        node = 0
        for shift in range(bits - 1, 0, -1):
            bit = (code >> shift) & 1
            child = children[node][bit]
            if child <= 0:  # 0 is the root: never a child, so "none yet"
                child = len(children)
                children.append([0, 0])
                children[node][bit] = child
            node = child
        children[node][code & 1] = ~symbol
    return children


_CHILDREN = _tree()


def _accepting() -> frozenset[int]:
    """Where a string may end: the root, or up to 7 one-bits into EOS (§5.2 padding)."""
    nodes = [0]
    node = 0
    for _ in range(7):
        node = _CHILDREN[node][1]
        nodes.append(node)
    return frozenset(nodes)


_ACCEPT = _accepting()

#: (node << 8 | byte) -> (next node, bytes emitted); False for a byte that decodes EOS.
_STEPS: dict[int, tuple[int, bytes] | bool] = {}

#: Decoded strings by their encoding, bounded (cleared when full).
_MEMO: dict[bytes, bytes] = {}
_MEMO_ENTRIES = 2048
_MEMO_LONGEST = 256


def _step(node: int, byte: int) -> tuple[int, bytes] | bool:
    out = bytearray()
    for shift in range(7, -1, -1):
        child = _CHILDREN[node][(byte >> shift) & 1]
        if child < 0:
            symbol = ~child
            if symbol == EOS:
                return False
            out.append(symbol)
            node = 0
        else:
            node = child
    return (node, bytes(out))


def huffmanDecode(data: bytes) -> bytes:
    """The string C{data} encodes. @raise HuffmanError: invalid."""
    decoded = _MEMO.get(data)
    if decoded is not None:
        return decoded
    steps = _STEPS
    out = bytearray()
    node = 0
    for byte in data:
        key = node << 8 | byte
        step = steps.get(key)
        if step is None:
            step = steps[key] = _step(node, byte)
        if step is False:
            raise HuffmanError("EOS in a Huffman-coded string")
        node, emitted = step
        out += emitted
    if node not in _ACCEPT:
        raise HuffmanError("invalid padding at the end of a Huffman-coded string")
    decoded = bytes(out)
    if len(data) <= _MEMO_LONGEST:
        if len(_MEMO) >= _MEMO_ENTRIES:
            _MEMO.clear()
        _MEMO[data] = decoded
    return decoded


def huffmanEncode(data: bytes) -> bytes:
    """C{data} Huffman-coded, padded with EOS's first bits."""
    codes, lengths = CODES, LENGTHS
    value = 0
    bits = 0
    for byte in data:
        size = lengths[byte]
        value = (value << size) | codes[byte]
        bits += size
    pad = -bits % 8
    return ((value << pad) | ((1 << pad) - 1)).to_bytes((bits + pad) >> 3, "big")


def huffmanLength(data: bytes) -> int:
    """Bytes C{huffmanEncode(data)} takes."""
    lengths = LENGTHS
    return (sum([lengths[byte] for byte in data]) + 7) >> 3
