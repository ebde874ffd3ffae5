"""Hand-built ZIP archives for the transfer tests: every layout real writers produce,
and the hostile ones no well-behaved library will write for us."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

STORED = 0
DEFLATED = 8


@dataclass
class Entry:
    name: str | bytes
    data: bytes
    method: int = STORED
    # Data descriptor after the data (bit 3) and zeros in the local header.
    descriptor: bool = False
    descriptor_sig: bool = True
    zip64: bool = False  # ZIP64 extra field and 64-bit descriptor sizes
    sizes_in_header: bool = True  # only meaningful with descriptor=True
    external_attr: int = 0o100644 << 16
    create_system: int = 3
    bad_crc: bool = False
    utf8: bool = True
    declared_size: int | None = None  # a lie in the local header's uncompressed size


def _raw_name(e: Entry) -> bytes:
    return e.name if isinstance(e.name, bytes) else e.name.encode("utf-8")


def build_zip(entries: list[Entry], *, central: bool = True) -> bytes:
    out = bytearray()
    cd = bytearray()
    for e in entries:
        name = _raw_name(e)
        payload = zlib.compress(e.data, 6)[2:-4] if e.method == DEFLATED else e.data
        crc = zlib.crc32(e.data) ^ (1 if e.bad_crc else 0)
        flags = (0x800 if e.utf8 else 0) | (0x8 if e.descriptor else 0)
        hdr_crc, hdr_c, hdr_u = crc, len(payload), len(e.data)
        if e.declared_size is not None:
            hdr_u = e.declared_size
        extra = b""
        if e.zip64:
            extra = struct.pack("<HHQQ", 1, 16, len(e.data), len(payload))
            hdr_c = hdr_u = 0xFFFFFFFF
        if e.descriptor and not e.sizes_in_header:
            hdr_crc = 0
            hdr_c = 0xFFFFFFFF if e.zip64 else 0
            hdr_u = 0xFFFFFFFF if e.zip64 else 0
            if e.zip64:
                extra = struct.pack("<HHQQ", 1, 16, 0, 0)
        offset = len(out)
        out += struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            45 if e.zip64 else 20,
            flags,
            e.method,
            0,
            0x21,
            hdr_crc,
            hdr_c,
            hdr_u,
            len(name),
            len(extra),
        )
        out += name + extra + payload
        if e.descriptor:
            if e.descriptor_sig:
                out += b"PK\x07\x08"
            fmt = "<IQQ" if e.zip64 else "<III"
            out += struct.pack(fmt, crc, len(payload), len(e.data))
        cd += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            (e.create_system << 8) | 20,
            20,
            flags,
            e.method,
            0,
            0x21,
            crc,
            len(payload),
            len(e.data),
            len(name),
            0,
            0,
            0,
            0,
            e.external_attr,
            offset,
        )
        cd += name
    if central:
        start = len(out)
        out += cd
        out += struct.pack(
            "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(cd), start, 0
        )
    return bytes(out)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]
