"""The streaming ZIP writer: what it writes opens with zipfile, in every mode."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import pytest

from nbia_sync.sim.zipstream import Compression, ZipStreamWriter

pytestmark = pytest.mark.asyncio

_DATA = {"a.dcm": b"alpha" * 5000, "empty.dcm": b"", "b.dcm": bytes(range(256)) * 40}


async def _build(compression: Compression, force_zip64: bool = False) -> bytes:
    out = io.BytesIO()

    async def sink(data: bytes) -> None:
        out.write(data)

    writer = ZipStreamWriter(sink, compression=compression, force_zip64=force_zip64)
    for name, data in _DATA.items():
        await writer.write_entry(
            name, [data[:100], data[100:]], size=len(data), crc=zlib.crc32(data)
        )
    await writer.finish()
    return out.getvalue()


@pytest.mark.parametrize("compression", ["stored", "deflate"])
@pytest.mark.parametrize("force_zip64", [False, True])
async def test_zip_opens_with_every_entry_intact(
    compression: Compression, force_zip64: bool
) -> None:
    archive = zipfile.ZipFile(io.BytesIO(await _build(compression, force_zip64)))
    assert archive.testzip() is None
    assert archive.namelist() == list(_DATA)
    assert {n: archive.read(n) for n in _DATA} == _DATA


async def test_stored_entries_carry_crc_and_size_in_the_local_header() -> None:
    raw = await _build("stored")
    sig, _, flags, method, _, _, crc, csize, usize = struct.unpack_from("<IHHHHHIII", raw)
    assert (sig, flags, method) == (0x04034B50, 0, 0)
    assert (crc, csize, usize) == (
        zlib.crc32(_DATA["a.dcm"]),
        len(_DATA["a.dcm"]),
        len(_DATA["a.dcm"]),
    )


async def test_deflate_entries_use_data_descriptors() -> None:
    raw = await _build("deflate")
    _, _, flags, method, _, _, crc, csize, usize = struct.unpack_from("<IHHHHHIII", raw)
    assert flags & 0x08
    assert (method, crc, csize, usize) == (8, 0, 0, 0)
    assert raw.count(struct.pack("<I", 0x08074B50)) == len(_DATA)
    info = zipfile.ZipFile(io.BytesIO(raw)).getinfo("a.dcm")
    assert info.compress_type == zipfile.ZIP_DEFLATED
    assert info.compress_size < info.file_size


async def test_forced_zip64_writes_the_zip64_end_records() -> None:
    raw = await _build("stored", force_zip64=True)
    assert struct.pack("<I", 0x06064B50) in raw
    assert struct.pack("<I", 0x07064B50) in raw


async def test_stored_entry_without_crc_is_refused() -> None:
    async def sink(data: bytes) -> None:
        pass

    with pytest.raises(ValueError, match="CRC"):
        await ZipStreamWriter(sink).write_entry("x", [b"1"], size=1)


async def test_the_deflate_bomb_inflates_to_its_size() -> None:
    import zlib

    from nbia_sync.sim.downloads import _bomb

    payload = _bomb((3 << 20) + 5)
    assert len(payload) < 8 << 10
    inflater = zlib.decompressobj(-15)
    assert len(inflater.decompress(payload)) == (3 << 20) + 5 and inflater.eof
