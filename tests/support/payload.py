"""
Deterministic payloads: the same bytes for a given length in every process, so that an
origin, a client and a test can each produce or check a body without sending it around.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator

_BLOCK = random.Random(1234).randbytes(65536)


def payload(n: int) -> bytes:
    """Deterministic bytes of length n (small sizes only; stream large ones)."""
    reps, rest = divmod(n, len(_BLOCK))
    return _BLOCK * reps + _BLOCK[:rest]


def payloadChunks(n: int, size: int = 65536) -> Iterator[bytes]:
    """The first C{n} bytes of the payload, in chunks of C{size}: for bodies of any size."""
    sent = 0
    block = len(_BLOCK)
    while sent < n:
        take = min(size, n - sent)
        offset = sent % block
        if offset + take <= block:
            yield _BLOCK[offset : offset + take]
        else:
            yield (_BLOCK[offset:] + _BLOCK * (take // block + 1))[:take]
        sent += take


@functools.lru_cache
def payloadDigest(n: int) -> str:
    """sha256 (hex) of the first C{n} bytes of the payload (cached: 1 GiB costs seconds)."""
    h = hashlib.sha256()
    for chunk in payloadChunks(n, 1 << 20):
        h.update(chunk)
    return h.hexdigest()
