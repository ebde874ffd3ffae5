"""The in-memory DICOM header reader agrees with pydicom on the three UIDs."""

from __future__ import annotations

import io

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from nbia_sync.sim import SimArchive
from nbia_sync.transfer.dicomhead import HeaderUids, NotDicomError, read_uids


def _file(syntax: str, *, sequence: bool = False, undefined: bool = False) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    if sequence:
        item = Dataset()
        item.CodeValue = "X"
        item.CodeMeaning = "a nested item"
        ds.ProcedureCodeSequence = Sequence([item, item])
        # Undefined lengths (delimiters instead), as many modalities send them.
        ds["ProcedureCodeSequence"].is_undefined_length = undefined
        for it in ds.ProcedureCodeSequence:
            it.is_undefined_length_sequence_item = undefined
    ds.PatientID = "P1"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.InstanceNumber = 1
    ds.BitsAllocated = 8
    ds.PixelData = b"\x00" * 64
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    little = syntax != ExplicitVRBigEndian
    implicit = syntax == ImplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True, little_endian=little, implicit_vr=implicit)
    data = buf.getvalue()
    if undefined:
        assert b"\xfe\xff\xdd\xe0" in data  # a sequence delimiter is really there
    return data


EXPECTED = HeaderUids(sop="1.2.3.4.5", series="1.2.3.4", study="1.2.3")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_reads_the_uids_of_little_endian_files(syntax: str) -> None:
    assert read_uids(_file(syntax)) == EXPECTED


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined-length"])
def test_reads_past_a_sequence_before_the_uids(undefined: bool) -> None:
    assert read_uids(_file(ExplicitVRLittleEndian, sequence=True, undefined=undefined)) == EXPECTED


def test_big_endian_is_left_to_pydicom() -> None:
    assert read_uids(_file(ExplicitVRBigEndian)) is None


def test_a_prefix_that_ends_before_the_series_uid_says_so() -> None:
    data = _file(ExplicitVRLittleEndian)
    assert read_uids(data[: data.index(b"1.2.3.4\x00")]) is None


def test_bytes_without_the_dicom_marker_are_refused() -> None:
    with pytest.raises(NotDicomError):
        read_uids(b"\x00" * 128 + b"NOPE" + b"\x00" * 100)


def test_agrees_with_pydicom_on_every_simulated_file() -> None:
    archive = SimArchive.generate(
        collections=("C",), patients=2, studies=1, series=2, images=3, image_size=3000, seed=9
    )
    checked = 0
    for series in archive.series.values():
        for image in series.instances:
            data = image.read()
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            want = HeaderUids(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID)
            assert read_uids(data[: 64 << 10]) == want
            checked += 1
    assert checked == 12


# ---- property: any data set pydicom writes, and any prefix of it ---------------------------

# Elements that may sit before, between and after the UIDs, in tag order once written.
_FILLER = [
    ("StudyDate", "20200101"),
    ("Modality", "CT"),
    ("Manufacturer", "ACME"),
    ("PatientName", "A^B"),
    ("PatientID", "P7"),
    ("BodyPartExamined", "CHEST"),
    ("ImageComments", "x" * 300),  # a long LT: a 2-byte length in explicit VR
    ("StudyID", "S1"),
    ("SeriesNumber", 3),
    ("InstanceNumber", 9),
]


@st.composite
def _items(draw: st.DrawFn, depth: int) -> Dataset:
    item = Dataset()
    item.CodeValue = draw(st.text("ABC123", min_size=1, max_size=8))
    item.CodeMeaning = draw(st.text("abc ", max_size=40))
    if draw(st.booleans()):
        # Another series' UIDs inside an item (as in ReferencedSeriesSequence): not ours.
        item.SeriesInstanceUID = "9.9.9"
        item.SOPInstanceUID = "9.9.9.9"
    if depth < 2 and draw(st.booleans()):
        inner = draw(st.lists(_items(depth + 1), min_size=1, max_size=2))
        item.ConceptNameCodeSequence = Sequence(inner)
        item["ConceptNameCodeSequence"].is_undefined_length = draw(st.booleans())
    item.is_undefined_length_sequence_item = draw(st.booleans())
    return item


@st.composite
def _data_sets(draw: st.DrawFn) -> tuple[bytes, HeaderUids]:
    uid = st.from_regex(r"1\.2\.[1-9][0-9]{0,20}(\.[1-9][0-9]{0,8}){0,4}", fullmatch=True)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = draw(uid)
    ds.StudyInstanceUID = draw(uid)
    ds.SeriesInstanceUID = draw(uid)
    for keyword, value in draw(st.lists(st.sampled_from(_FILLER), unique=True)):
        setattr(ds, keyword, value)
    # Sequences before the UIDs ((0008,1032), (0008,1110), (0008,1115)) and one after
    # ((0040,0275)).
    for keyword in draw(
        st.lists(
            st.sampled_from(
                [
                    "ProcedureCodeSequence",
                    "ReferencedStudySequence",
                    "ReferencedSeriesSequence",
                    "RequestAttributesSequence",
                ]
            ),
            unique=True,
        )
    ):
        setattr(ds, keyword, Sequence(draw(st.lists(_items(0), min_size=0, max_size=3))))
        ds[keyword].is_undefined_length = draw(st.booleans())
    ds.PixelData = b"\x00" * 16
    ds.BitsAllocated = 8
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    implicit = syntax == ImplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True, little_endian=True, implicit_vr=implicit)
    read = pydicom.dcmread(io.BytesIO(buf.getvalue()), stop_before_pixels=True)
    truth = HeaderUids(read.SOPInstanceUID, read.SeriesInstanceUID, read.StudyInstanceUID)
    return buf.getvalue(), truth


@settings(max_examples=300, deadline=None)
@given(_data_sets(), st.integers(min_value=0, max_value=4000))
def test_any_prefix_gives_pydicoms_uids_or_says_it_cannot_tell(
    made: tuple[bytes, HeaderUids], cut: int
) -> None:
    data, truth = made
    assert read_uids(data) == truth
    prefix = data[: 132 + cut]
    assert read_uids(prefix) in (None, truth)
