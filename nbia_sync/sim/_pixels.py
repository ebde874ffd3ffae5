"""Deterministic pseudo-random pixel bytes, fast enough to serve gigabytes.

A random block is made once per process; each unit of an image is a window of that block
chosen by (image seed, unit index) behind an 8-byte salt, so units differ from each other
and from other images, and any unit can be rebuilt alone at memcpy speed (GB/s).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

UNIT = 1 << 20  # bytes per generated unit; callers may re-slice
_BLOCK_SIZE = 2 * UNIT
_BLOCK = memoryview(random.Random(0x5EED).randbytes(_BLOCK_SIZE))
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _unit(seed: int, index: int, length: int) -> bytes:
    mixed = (seed ^ (index * _GOLDEN)) & _MASK64
    salt = struct.pack("<Q", mixed)
    if length <= len(salt):
        return salt[:length]
    start = (mixed >> 11) % (_BLOCK_SIZE - length + len(salt) + 1)
    return b"".join((salt, _BLOCK[start : start + length - len(salt)]))


def iter_pixels(seed: int, total: int) -> Iterator[bytes]:
    """The pixel bytes of one image, in units of at most UNIT bytes."""
    index = 0
    remaining = total
    while remaining > 0:
        length = min(UNIT, remaining)
        yield _unit(seed, index, length)
        remaining -= length
        index += 1
