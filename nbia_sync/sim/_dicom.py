"""A minimal DICOM Part 10 writer for the simulator's synthetic images.

Only the header (preamble, file meta, dataset up to the PixelData element header) is built
here; the pixel bytes are streamed separately so a 100 MB image never sits in memory.
Hand-encoded rather than through pydicom's writer because thousands of tiny series must be
cheap to generate; the tests read every kind of file back with pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# pydicom's registered prefix; fine for synthetic data that never leaves a test.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_CLASS_UID = UID_PREFIX + "1"

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

_LONG_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UN", "UR", "UT"})
_MAX_US = 0xFFFF


@dataclass(frozen=True, slots=True)
class ImageAttributes:
    """What one synthetic instance says about itself."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    patient_sex: str
    modality: str
    study_date: str  # YYYYMMDD
    series_description: str
    series_number: int
    instance_number: int
    manufacturer: str | None
    body_part: str | None


def _element(group: int, elem: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        # UIDs pad with NUL, text with a space (PS3.5 6.2).
        value += b"\x00" if vr in ("UI", "OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def _text(group: int, elem: int, vr: str, value: str) -> bytes:
    return _element(group, elem, vr, value.encode("ascii"))


def _us(group: int, elem: int, value: int) -> bytes:
    return _element(group, elem, "US", struct.pack("<H", value))


def pixel_geometry(target_pixel_bytes: int) -> tuple[int, int]:
    """(rows, columns) of 8-bit pixels filling about target bytes; both fit in a US."""
    if target_pixel_bytes < 256:
        return 1, max(2, target_pixel_bytes - target_pixel_bytes % 2)
    columns = max(256, -(-target_pixel_bytes // _MAX_US))
    columns += columns % 2  # even, so PixelData needs no padding
    rows = max(1, min(_MAX_US, target_pixel_bytes // columns))
    return rows, columns


def _header(attrs: ImageAttributes, rows: int, columns: int) -> bytes:
    meta_body = b"".join(
        (
            _element(0x0002, 0x0001, "OB", b"\x00\x01"),
            _text(0x0002, 0x0002, "UI", attrs.sop_class_uid),
            _text(0x0002, 0x0003, "UI", attrs.sop_uid),
            _text(0x0002, 0x0010, "UI", EXPLICIT_VR_LITTLE_ENDIAN),
            _text(0x0002, 0x0012, "UI", IMPLEMENTATION_CLASS_UID),
        )
    )
    meta = _element(0x0002, 0x0000, "UL", struct.pack("<I", len(meta_body))) + meta_body
    parts = [
        _text(0x0008, 0x0016, "UI", attrs.sop_class_uid),
        _text(0x0008, 0x0018, "UI", attrs.sop_uid),
        _text(0x0008, 0x0020, "DA", attrs.study_date),
        _text(0x0008, 0x0060, "CS", attrs.modality),
    ]
    if attrs.manufacturer is not None:
        parts.append(_text(0x0008, 0x0070, "LO", attrs.manufacturer))
    parts += [
        _text(0x0008, 0x103E, "LO", attrs.series_description),
        _text(0x0010, 0x0010, "PN", attrs.patient_name),
        _text(0x0010, 0x0020, "LO", attrs.patient_id),
        _text(0x0010, 0x0040, "CS", attrs.patient_sex),
    ]
    if attrs.body_part is not None:
        parts.append(_text(0x0018, 0x0015, "CS", attrs.body_part))
    parts += [
        _text(0x0020, 0x000D, "UI", attrs.study_uid),
        _text(0x0020, 0x000E, "UI", attrs.series_uid),
        _text(0x0020, 0x0011, "IS", str(attrs.series_number)),
        _text(0x0020, 0x0013, "IS", str(attrs.instance_number)),
        _us(0x0028, 0x0002, 1),
        _text(0x0028, 0x0004, "CS", "MONOCHROME2"),
        _us(0x0028, 0x0010, rows),
        _us(0x0028, 0x0011, columns),
        _us(0x0028, 0x0100, 8),
        _us(0x0028, 0x0101, 8),
        _us(0x0028, 0x0102, 7),
        _us(0x0028, 0x0103, 0),
    ]
    return b"\x00" * 128 + b"DICM" + meta + b"".join(parts)


def build_header(attrs: ImageAttributes, target_size: int) -> tuple[bytes, int]:
    """The file's bytes before the pixels (ending with the PixelData element header), and
    the pixel byte count, chosen so the whole file is close to target_size."""
    # First pass only measures: the header length barely depends on Rows/Columns.
    probe = _header(attrs, 1, 2)
    rows, columns = pixel_geometry(max(0, target_size - len(probe) - 12))
    pixel_bytes = rows * columns
    header = _header(attrs, rows, columns) + struct.pack(
        "<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes
    )
    return header, pixel_bytes
