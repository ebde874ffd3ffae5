"""Property tests: the metadata record parser (api/_records.py) fed random JSON.

Documented outcomes only: json_records raises RetryableError for a body that is not a
JSON list of objects; series_info never raises, and what it returns without a
``problem`` is storable by either catalog (no NUL, valid UTF-8, numbers in range,
identities present and within their columns, release dates sane).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nbia_sync.api import _records as records
from nbia_sync.api.models import SeriesInfo
from nbia_sync.errors import PermanentError, RetryableError

# Every code point, lone surrogates and NUL included.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=80)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | ANY_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    [
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "Collection",
        "PatientID",
        "PatientId",
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "SeriesNumber",
        "ImageCount",
        "FileSize",
        "DateReleased",
        "LicenseName",
    ]
)
NUMBERS = st.integers(min_value=-(10**25), max_value=10**25) | st.floats()
DATES = st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S.0")) | ANY_TEXT
RECORDS = st.dictionaries(KEYS | ANY_TEXT, JSON | NUMBERS | DATES, max_size=14)


def _storable_text(value: str | None) -> bool:
    if value is None:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def _assert_storable(info: SeriesInfo) -> None:
    for value in (
        info.series_uid,
        info.study_uid,
        info.collection,
        info.patient_id,
        info.modality,
        info.body_part,
        info.series_description,
        info.manufacturer,
        info.license_name,
        info.license_uri,
        *info.extra,
        *info.extra.values(),
    ):
        assert _storable_text(value), repr(value)
    if info.problem is not None:
        return
    assert info.series_uid and info.study_uid and info.collection and info.patient_id
    assert len(info.series_uid) <= records.MAX_UID_CHARS
    assert len(info.study_uid) <= records.MAX_UID_CHARS
    assert len(info.patient_id) <= records.MAX_NAME_CHARS
    assert len(info.collection) <= records.MAX_NAME_CHARS
    assert info.modality is None or len(info.modality) <= 32
    if info.file_size is not None:
        assert 0 <= info.file_size <= records.MAX_FILE_SIZE
    if info.image_count is not None:
        assert 0 <= info.image_count <= records.MAX_IMAGE_COUNT
    if info.date_released is not None:
        assert records.EARLIEST_RELEASE <= info.date_released < records.LATEST_RELEASE
    json.dumps(info.extra)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(record=RECORDS, collection=st.none() | ANY_TEXT)
# Found by this property: no Collection in the record and an empty one from the caller.
@example(
    record={"SeriesInstanceUID": 0, "StudyInstanceUID": 0, "PatientID": 0, "Collection": None},
    collection="",
)
def test_series_info_never_raises_and_returns_storable_records(
    record: dict[str, Any], collection: str | None
) -> None:
    _assert_storable(records.series_info(record, "getSeries", 0, collection))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON)
def test_json_body_parses_or_is_a_retryable_error(value: Any) -> None:
    body = json.dumps(value).encode()
    try:
        rows = records.json_records(body, "getSeries")
    except RetryableError:
        return
    for i, row in enumerate(rows):
        _assert_storable(records.series_info(row, "getSeries", i, None))


@settings(max_examples=200)
@given(body=st.binary(max_size=200))
def test_random_bytes_parse_or_are_a_retryable_error(body: bytes) -> None:
    with contextlib.suppress(RetryableError):
        records.json_records(body, "getSeries")


def test_body_nested_past_the_recursion_limit_is_a_retryable_error() -> None:
    try:
        records.json_records(b"[" * 100_000 + b"]" * 100_000, "getSeries")
    except RetryableError as exc:
        assert "not valid JSON" in str(exc)
    else:
        raise AssertionError("a 100,000-deep body parsed")


def test_number_past_the_digit_limit_is_a_retryable_error() -> None:
    body = b'[{"FileSize": ' + b"9" * 5000 + b"}]"
    try:
        records.json_records(body, "getSeries")
    except RetryableError:
        return
    raise AssertionError("a 5000-digit number parsed")


@settings(max_examples=200)
@given(record=st.dictionaries(KEYS | ANY_TEXT, JSON, max_size=8))
def test_other_record_parsers_raise_only_documented_errors(record: dict[str, Any]) -> None:
    for parse in (
        lambda: records.patient_info(record, "getPatient", 0, "C"),
        lambda: records.study_info(record, "getPatientStudy", 0, None),
        lambda: records.collection_name(record, "getCollectionValues", 0),
        lambda: records.series_size([record], "getSeriesSize"),
        lambda: records.flat_strings(record),
    ):
        with contextlib.suppress(PermanentError):
            parse()
