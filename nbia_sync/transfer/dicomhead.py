"""Read the three UIDs a download checks from the first bytes of a DICOM file, in memory.

The download keeps each file's first bytes while it streams them to disk; this walks the
file meta group and the data set's elements in tag order and stops at the first tag past
(0020,000E), long before pixel data. Handles the little-endian transfer syntaxes (explicit
and implicit VR; every compressed syntax encodes its data set as explicit VR little
endian), with defined- and undefined-length sequences in between. Anything else (big
endian, a deflated data set, a header longer than the prefix kept) is reported as
``None`` and the caller falls back to pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Tags as (group << 16) | element: their order is the order of the data set.
_SOP = 0x00080018
_STUDY = 0x0020000D
_SERIES = 0x0020000E
_LAST = _SERIES
_WANTED = frozenset((_SOP, _STUDY, _SERIES))
_SYNTAX = 0x00020010
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
# VRs whose explicit-VR length field is 4 bytes (after two reserved bytes).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF
_DELIMITERS = 0xFFFE  # the group of items and of item and sequence delimiters
_ITEM = 0xE000
# An element's first 8 bytes, read as explicit VR: group, element, VR, short length. In
# implicit VR (and for items and delimiters) bytes 4-8 are the 4-byte length instead.
_HEAD = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")


class NotDicomError(ValueError):
    """The bytes are not a DICOM file (no preamble and 'DICM' marker, or garbage)."""


@dataclass(frozen=True, slots=True)
class HeaderUids:
    sop: str
    series: str
    study: str


class _Short(Exception):
    """The prefix ended before the elements sought."""


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace").strip()


def _walk(data: bytes, pos: int, *, explicit: bool, meta: bool) -> tuple[dict[int, str], int]:
    """The wanted values of the elements from ``pos`` on, and where the walk stopped.

    The file meta group (``meta``): every (0002,xxxx) element, stopping at the first of
    another group; else the data set's top level up to (0020,000E), stepping over nested
    sequences and items (``depth`` counts the undefined-length ones open; defined-length
    ones are skipped whole). One flat loop: this runs for every file downloaded."""
    wanted = (_SYNTAX,) if meta else _WANTED
    found: dict[int, str] = {}
    end = len(data)
    depth = 0
    while True:
        if pos + 8 > end:
            raise _Short
        group, element, vr, length = _HEAD.unpack_from(data, pos)
        if meta and group != 0x0002:
            return found, pos
        if group == _DELIMITERS:
            (length,) = _U32.unpack_from(data, pos + 4)
            pos += 8
            if element == _ITEM:
                if length == _UNDEFINED:
                    depth += 1
                else:
                    pos += length
            elif depth == 0:  # a delimiter with nothing open: past the data set's end
                return found, pos - 8
            else:
                depth -= 1
            continue
        tag = group << 16 | element
        if depth == 0 and tag > _LAST:
            return found, pos
        if not explicit:
            (length,) = _U32.unpack_from(data, pos + 4)
            pos += 8
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                raise _Short
            (length,) = _U32.unpack_from(data, pos + 8)
            pos += 12
        else:
            pos += 8
        if length == _UNDEFINED:
            if meta:
                raise NotDicomError("undefined length in the file meta group")
            depth += 1  # a sequence (or UN) closed by a delimiter: walked through
            continue
        if depth == 0 and tag in wanted:
            if pos + length > end:
                raise _Short
            found[tag] = _text(data[pos : pos + length])
            if tag == _LAST:
                return found, pos + length
        pos += length


def read_uids(prefix: bytes) -> HeaderUids | None:
    """The SOP, series and study instance UIDs ("" when absent) from a file's first bytes.

    None when this reader cannot tell (an unsupported transfer syntax, or the prefix
    ends before (0020,000E)); raises NotDicomError for bytes that are not DICOM.
    """
    if len(prefix) < 132 or prefix[128:132] != b"DICM":
        raise NotDicomError("no DICOM preamble")
    try:
        meta, pos = _walk(prefix, 132, explicit=True, meta=True)
        syntax = meta.get(_SYNTAX, "")
        if syntax == _BIG_ENDIAN or syntax in _DEFLATED or not syntax:
            return None
        found, _ = _walk(prefix, pos, explicit=syntax != _IMPLICIT, meta=False)
    except _Short:
        return None
    except struct.error:
        raise NotDicomError("malformed element") from None
    return HeaderUids(found.get(_SOP, ""), found.get(_SERIES, ""), found.get(_STUDY, ""))
