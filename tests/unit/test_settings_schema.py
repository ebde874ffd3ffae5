"""The settings validator: every problem is reported, each naming its TOML key and what is
wrong, with TOML's own coercions only, and no message or repr showing a secret."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_sync.config import settings_from_dict
from nbia_sync.errors import ConfigError
from nbia_sync.secret import SecretStr
from nbia_sync.settings_schema import SchemaError, parse, rules

SECTIONS = ("mirror", "catalog", "transfer", "schedule", "logging", "daemon")


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"mirror": {"root": "/tmp/m"}, "sources": [{"name": "tcia"}]}
    raw.update(extra)
    return raw


def problems_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw, env=env or {})
    text = str(info.value)
    assert text.startswith("invalid configuration: ")
    return text.removeprefix("invalid configuration: ").split("; ")


def with_source(**keys: Any) -> dict[str, Any]:
    return minimal(sources=[{"name": "s", **keys}])


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (minimal(transfer={"workers": 0}), "transfer.workers: must be >= 1"),
        (minimal(transfer={"workers": 257}), "transfer.workers: must be <= 256"),
        (minimal(transfer={"read_timeout": 0}), "transfer.read_timeout: must be > 0"),
        (with_source(refresh_margin=1), "sources[0].refresh_margin: must be < 1"),
        (minimal(transfer={"workers": "8"}), "transfer.workers: must be an integer, not a string"),
        (minimal(schedule={"poll_interval": "1h"}), "schedule.poll_interval: must be a number"),
        (minimal(mirror={"root": 3}), "mirror.root: must be a string, not an integer"),
        (minimal(mirror={"root": "/m", "check_dicom": "yes"}), "mirror.check_dicom: must be true"),
        (with_source(collections="LIDC"), "sources[0].collections: must be an array, not a string"),
        (with_source(collections=["A", 2]), "sources[0].collections[1]: must be a string"),
        (minimal(transfer=[1]), "transfer: must be a table, not an array"),
        (minimal(sources=[]), "sources: must have at least 1 entry"),
        (minimal(sources=["tcia"]), "sources[0]: must be a table, not a string"),
        (minimal(daemon={"listen_port": 1.5}), "daemon.listen_port: must be an integer, not a"),
        (
            minimal(mirror={"root": "/m", "max_withdrawn_share": float("nan")}),
            "mirror.max_withdrawn_share: must be a finite number",
        ),
    ],
)
def test_each_constraint_names_the_key_and_what_is_wrong(raw: dict[str, Any], problem: str) -> None:
    assert any(p.startswith(problem) for p in problems_of(raw)), problems_of(raw)


def test_a_literal_lists_the_allowed_values() -> None:
    problems = problems_of(minimal(logging={"level": "verbose"}))
    assert problems == ['logging.level: must be one of "debug", "info", "warning", "error"']


def test_a_pattern_is_shown_when_a_value_breaks_it() -> None:
    problems = problems_of(minimal(sources=[{"name": "-bad name"}]))
    assert problems == ["sources[0].name: must match the pattern ^[A-Za-z0-9][A-Za-z0-9_.-]*$"]


def test_a_source_url_must_be_http() -> None:
    assert problems_of(with_source(url="ftp://x/")) == [
        "sources[0].url: must be an http:// or https:// URL"
    ]


def test_every_problem_is_reported_not_just_the_first() -> None:
    raw = minimal(
        transfer={"workers": 0, "chunk_size": "big"},
        mirror={"root": "/m", "foo": 1},
        sources=[{"name": "a", "url": "ftp://x"}, {"api": "v9"}],
    )
    assert problems_of(raw) == [
        "mirror.foo: unknown key",
        "transfer.workers: must be >= 1",
        "transfer.chunk_size: must be an integer, not a string",
        "sources[0].url: must be an http:// or https:// URL",
        "sources[1].name: required key is missing",
        'sources[1].api: must be one of "v1", "v2", "v4"',
    ]


@pytest.mark.parametrize("section", SECTIONS)
def test_an_unknown_key_is_named_in_every_section(section: str) -> None:
    raw = minimal()
    raw[section] = {**raw.get(section, {}), "typo": 1}
    assert problems_of(raw) == [f"{section}.typo: unknown key"]


def test_an_unknown_key_in_a_source_names_its_index() -> None:
    raw = minimal(sources=[{"name": "a"}, {"name": "b", "typo": 1}])
    assert problems_of(raw) == ["sources[1].typo: unknown key"]


def test_an_unknown_top_level_table_is_named() -> None:
    assert problems_of(minimal(mirorr={})) == ["mirorr: unknown key"]


def test_missing_sources_are_named() -> None:
    assert problems_of({"mirror": {"root": "/m"}}) == ["sources: required key is missing"]


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_not_an_integer(value: bool) -> None:
    assert problems_of(minimal(transfer={"workers": value})) == [
        "transfer.workers: must be an integer, not a boolean"
    ]


def test_a_bool_is_not_a_number() -> None:
    assert problems_of(minimal(transfer={"read_timeout": True})) == [
        "transfer.read_timeout: must be a number, not a boolean"
    ]


def test_an_integer_is_accepted_as_a_float() -> None:
    timeout = settings_from_dict(minimal(transfer={"read_timeout": 5}), env={}).transfer
    assert timeout.read_timeout == 5.0 and isinstance(timeout.read_timeout, float)


def test_a_float_is_not_accepted_as_an_integer() -> None:
    assert problems_of(minimal(transfer={"workers": 4.0})) == [
        "transfer.workers: must be an integer, not a float"
    ]


def test_strings_become_paths() -> None:
    s = settings_from_dict(minimal(sources=[{"name": "s", "manifests": ["/a.tcia"]}]), env={})
    assert s.mirror.root == Path("/tmp/m") and s.sources[0].manifests == [Path("/a.tcia")]


def test_a_wrong_typed_password_is_not_echoed() -> None:
    problems = problems_of(with_source(password=123456789))
    assert problems == ["sources[0].password: must be a string, not an integer"]


def test_a_refused_value_is_never_echoed() -> None:
    secret = "hunter2-value"
    raw = minimal(
        mirror={"root": "/m", "on_withdrawn": secret},
        sources=[{"name": secret + " x", "url": secret, "api": secret}],
    )
    assert secret not in "; ".join(problems_of(raw))


def test_secrets_are_not_in_the_repr_or_str_of_the_settings() -> None:
    env = {"NBIA_SYNC_CATALOG_URL": "postgresql+asyncpg://u:dbpass-77@h/db"}
    s = settings_from_dict(with_source(password="pw-hunter2"), env=env)
    for text in (repr(s), str(s), repr(s.sources[0]), f"{s.sources[0].password}"):
        assert "pw-hunter2" not in text and "dbpass-77" not in text
    assert s.sources[0].password.get_secret_value() == "pw-hunter2"


def test_a_secret_shows_a_mask_and_compares_by_value() -> None:
    assert (repr(SecretStr("x")), str(SecretStr("x"))) == ("SecretStr('**********')", "**********")
    assert SecretStr("x") == SecretStr("x") != SecretStr("y")
    assert hash(SecretStr("x")) == hash(SecretStr("x"))


@pytest.mark.parametrize(
    ("source", "api"),
    [
        ({"username": "alice"}, "v2"),
        ({"password": "pw"}, "v2"),
        ({"username": "nbia_guest", "password": ""}, "v4"),
        ({"username": "alice", "api": "v1"}, "v1"),
    ],
)
def test_credentials_mean_v2_unless_api_is_given(source: dict[str, str], api: str) -> None:
    assert settings_from_dict(with_source(**source), env={}).sources[0].api == api


def test_settings_replace_like_frozen_values() -> None:
    s = settings_from_dict(minimal(), env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.transfer.workers = 2  # type: ignore[misc]
    changed = dataclasses.replace(s, transfer=dataclasses.replace(s.transfer, workers=2))
    assert (changed.transfer.workers, s.transfer.workers) == (2, 8)


def test_parse_raises_schema_error_with_the_problem_list() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Toy:
        n: int = dataclasses.field(default=1, metadata=rules(ge=0))
        tags: list[str] = dataclasses.field(default_factory=list, metadata=rules(min_length=1))

    assert parse(Toy, {"tags": ["a"]}) == Toy(n=1, tags=["a"])
    with pytest.raises(SchemaError) as info:
        parse(Toy, {"n": -1, "tags": []})
    assert info.value.problems == ["n: must be >= 0", "tags: must have at least 1 entry"]


def _toml_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True),
        st.text(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=6,
    )


@settings(max_examples=300, deadline=None)
@given(
    section=st.sampled_from([*SECTIONS, "sources", "sources[0]"]),
    key=st.text(max_size=20) | st.sampled_from(["root", "workers", "url", "api", "password"]),
    value=_toml_values(),
)
def test_any_junk_value_is_accepted_or_a_config_error(section: str, key: str, value: Any) -> None:
    raw = minimal()
    if section == "sources":
        raw["sources"] = value
    elif section == "sources[0]":
        raw["sources"] = [{"name": "s", key: value}]
    else:
        raw[section] = {**raw.get(section, {}), key: value}
    env = {"NBIA_SYNC_CATALOG_URL": "sqlite+aiosqlite:///x", "NBIA_SYNC_SOURCE_S_PASSWORD": "p"}
    try:
        settings_from_dict(raw, env=env)
    except ConfigError as exc:
        assert re.match(r"invalid configuration: \S", str(exc))


@settings(max_examples=100, deadline=None)
@given(
    workers=st.integers(1, 256),
    read_timeout=st.integers(1, 10**6) | st.floats(1e-6, 1e9),
    share=st.floats(0, 1),
    collections=st.lists(st.text(max_size=10), max_size=3),
)
def test_valid_values_are_kept_as_given(
    workers: int, read_timeout: float, share: float, collections: list[str]
) -> None:
    raw = minimal(
        transfer={"workers": workers, "read_timeout": read_timeout},
        mirror={"root": "/m", "max_withdrawn_share": share},
        sources=[{"name": "s", "collections": collections}],
    )
    s = settings_from_dict(raw, env={})
    assert (s.transfer.workers, s.transfer.read_timeout) == (workers, read_timeout)
    assert (s.mirror.max_withdrawn_share, s.sources[0].collections) == (share, collections)
