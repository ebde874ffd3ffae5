"""The simulator's synthetic archive: deterministic, real DICOM, cheap, mutable."""

from __future__ import annotations

import hashlib
import io
import time
from datetime import datetime

import pydicom

from nbia_sync.sim import SimArchive


def test_same_seed_gives_same_uids_and_bytes() -> None:
    a, b = SimArchive.generate(seed=7), SimArchive.generate(seed=7)
    assert list(a.series) == list(b.series)
    assert a.truth() == b.truth()


def test_different_seeds_give_different_uids() -> None:
    assert set(SimArchive.generate(seed=1).series).isdisjoint(SimArchive.generate(seed=2).series)


def test_generate_shapes_the_archive() -> None:
    archive = SimArchive.generate(
        collections=("A", "B", "C"), patients=2, studies=2, series=3, images=4
    )
    assert archive.collections == ["A", "B", "C"]
    assert len(archive.series) == 3 * 2 * 2 * 3
    assert all(s.image_count == 4 for s in archive.series.values())


def test_files_are_dicom_with_the_series_identity() -> None:
    archive = SimArchive.generate()
    for s in archive.series.values():
        for inst in s.instances:
            ds = pydicom.dcmread(io.BytesIO(inst.read()))
            assert ds.SOPInstanceUID == inst.sop_uid
            assert ds.SeriesInstanceUID == s.uid
            assert ds.StudyInstanceUID == s.study_uid
            assert ds.PatientID == s.patient_id
            assert ds.Modality == s.modality
            assert ds.SOPClassUID == s.sop_class_uid
            # The pixel data fills the declared matrix exactly (checked without NumPy,
            # which pydicom's pixel_array would need and the package does not).
            frame = ds.Rows * ds.Columns * ds.SamplesPerPixel * (ds.BitsAllocated // 8)
            assert len(ds.PixelData) == frame + frame % 2


def test_image_size_is_close_to_the_target() -> None:
    archive = SimArchive.generate(image_size=50_000)
    for s in archive.series.values():
        for inst in s.instances:
            assert 49_000 <= inst.size <= 50_000
            assert len(inst.read()) == inst.size


def test_md5_matches_the_bytes() -> None:
    inst = next(iter(SimArchive.generate().series.values())).instances[0]
    assert inst.md5 == hashlib.md5(inst.read()).hexdigest()


def test_big_images_stream_without_building_them_in_memory() -> None:
    archive = SimArchive.generate(patients=1, series=1, images=1, image_size=300_000_000)
    inst = next(iter(archive.series.values())).instances[0]
    start = time.perf_counter()
    largest = total = 0
    for chunk in inst.iter_bytes():
        largest = max(largest, len(chunk))
        total += len(chunk)
    assert total == inst.size
    assert largest <= 1 << 20
    assert time.perf_counter() - start < 2.0  # >= 150 MB/s even on a slow CI core


def test_pixel_units_differ_between_images() -> None:
    s = next(iter(SimArchive.generate(image_size=3 << 20).series.values()))
    first = [list(i.iter_bytes())[1] for i in s.instances]
    assert len({c[:64] for c in first}) == len(first)


def test_some_series_omit_optional_attributes() -> None:
    archive = SimArchive.generate(patients=10)
    assert any(s.body_part is None for s in archive.series.values())
    assert any(s.body_part is not None for s in archive.series.values())


def test_initial_releases_are_in_the_past() -> None:
    archive = SimArchive.generate(patients=10)
    years = {s.date_released.year for s in archive.series.values()}
    assert years <= set(range(2019, 2025))
    assert len(years) > 1


def test_thousands_of_tiny_series_are_cheap() -> None:
    start = time.perf_counter()
    archive = SimArchive.generate(collections=("TINY",), patients=1000, series=5, images=1)
    assert sum(s.file_size for s in archive.series.values()) > 0
    assert len(archive.series) == 5000
    assert time.perf_counter() - start < 3.0


def test_add_patient_adds_fresh_series_released_now() -> None:
    archive = SimArchive.generate()
    before = set(archive.series)
    added = archive.add_patient("SIM-NEW", studies=2, series=1, images=2)
    assert len(added) == 2
    assert before.isdisjoint(s.uid for s in added)
    assert "SIM-NEW" in archive.collections
    assert all((datetime.now() - s.date_released).total_seconds() < 60 for s in added)
    assert all(s.uid in archive.truth() for s in added)


def test_update_series_replaces_files_and_release_date() -> None:
    archive = SimArchive.generate()
    uid = next(iter(archive.series))
    old = archive.truth()[uid]
    when = datetime(2025, 3, 1, 12, 0, 0)
    s = archive.update_series(uid, images=5, released=when)
    assert s.image_count == 5
    assert s.date_released == when
    assert set(archive.truth()[uid]).isdisjoint(old)
    assert set(archive.truth()[uid].values()).isdisjoint(old.values())
