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

_SOP = (0x0008, 0x0018)
_STUDY = (0x0020, 0x000D)
_SERIES = (0x0020, 0x000E)
_LAST = _SERIES
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
# VRs whose explicit-VR length field is 4 bytes (after two reserved bytes).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)


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


class _Walker:
    def __init__(self, data: bytes, pos: int, *, explicit: bool) -> None:
        self.data = data
        self.pos = pos
        self.explicit = explicit

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise _Short

    def element(self) -> tuple[tuple[int, int], bytes | None, int, bool]:
        """(tag, vr, length, is_sequence) and the position after the header."""
        self._need(8)
        group, elem = struct.unpack_from("<HH", self.data, self.pos)
        tag = (group, elem)
        if group == 0xFFFE:  # item and delimiters: always implicit-style
            (length,) = struct.unpack_from("<I", self.data, self.pos + 4)
            self.pos += 8
            return tag, None, length, False
        if self.explicit:
            vr = self.data[self.pos + 4 : self.pos + 6]
            if vr in _LONG_VRS:
                self._need(12)
                (length,) = struct.unpack_from("<I", self.data, self.pos + 8)
                self.pos += 12
            else:
                (length,) = struct.unpack_from("<H", self.data, self.pos + 6)
                self.pos += 8
            return tag, vr, length, vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
        (length,) = struct.unpack_from("<I", self.data, self.pos + 4)
        self.pos += 8
        return tag, None, length, length == _UNDEFINED

    def value(self, length: int) -> bytes:
        self._need(length)
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw

    def skip_undefined(self, *, until: tuple[int, int]) -> None:
        """Skip to past the delimiter ``until``, through nested items and sequences."""
        while True:
            tag, _, length, _ = self.element()
            if tag == until:
                return
            if tag == _ITEM:
                if length == _UNDEFINED:
                    self.skip_undefined(until=_ITEM_END)
                else:
                    self.value(length)
            elif length == _UNDEFINED:
                self.skip_undefined(until=_SEQ_END)
            else:
                self.value(length)


def read_uids(prefix: bytes) -> HeaderUids | None:
    """The SOP, series and study instance UIDs ("" when absent) from a file's first bytes.

    None when this reader cannot tell (an unsupported transfer syntax, or the prefix
    ends before (0020,000E)); raises NotDicomError for bytes that are not DICOM.
    """
    if len(prefix) < 132 or prefix[128:132] != b"DICM":
        raise NotDicomError("no DICOM preamble")
    meta = _Walker(prefix, 132, explicit=True)
    syntax = ""
    try:
        while True:
            start = meta.pos
            meta._need(4)
            (group,) = struct.unpack_from("<H", prefix, start)
            if group != 0x0002:
                break
            tag, _, length, _ = meta.element()
            if length == _UNDEFINED:
                raise NotDicomError("undefined length in the file meta group")
            raw = meta.value(length)
            if tag == (0x0002, 0x0010):
                syntax = _text(raw)
        if syntax == _BIG_ENDIAN or syntax in _DEFLATED or not syntax:
            return None
        walker = _Walker(prefix, meta.pos, explicit=syntax != _IMPLICIT)
        found: dict[tuple[int, int], str] = {}
        while True:
            tag, _, length, is_seq = walker.element()
            if tag > _LAST:
                break
            if length == _UNDEFINED:
                walker.skip_undefined(until=_SEQ_END if is_seq else _ITEM_END)
                continue
            raw = walker.value(length)
            if tag in (_SOP, _STUDY, _SERIES):
                found[tag] = _text(raw)
            if tag == _LAST:
                break
    except _Short:
        return None
    except struct.error:
        raise NotDicomError("malformed element") from None
    return HeaderUids(found.get(_SOP, ""), found.get(_SERIES, ""), found.get(_STUDY, ""))
