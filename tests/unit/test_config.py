"""Settings loading: typos and wrong types are named errors, env overrides, defaults."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from nbia_sync.config import (
    DEFAULT_TCIA_URL,
    GUEST_USER,
    Settings,
    load_settings,
    settings_from_dict,
)
from nbia_sync.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"mirror": {"root": "/tmp/m"}, "sources": [{"name": "tcia"}]}
    raw.update(extra)
    return raw


def test_minimal_config_gets_documented_defaults() -> None:
    s = settings_from_dict(minimal(), env={})
    src = s.sources[0]
    assert (src.url, src.api, src.username) == (DEFAULT_TCIA_URL, "v4", GUEST_USER)
    assert src.password.get_secret_value() == ""
    assert s.transfer.workers == 8
    assert s.daemon.listen_host == "127.0.0.1"
    assert s.logging.format == "auto"
    assert s.transfer.event_loop == "auto"
    assert s.catalog_url.startswith("sqlite+aiosqlite:///")
    assert s.catalog_url.endswith("/tmp/m/.nbia-sync/catalog.sqlite")


def test_misspelt_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.wokers: unknown key"):
        settings_from_dict(minimal(transfer={"wokers": 4}), env={})


def test_misspelt_key_in_a_source_names_its_index() -> None:
    raw = minimal(sources=[{"name": "a"}, {"name": "b", "colections": ["X"]}])
    with pytest.raises(ConfigError, match=r"sources\[1\]\.colections: unknown key"):
        settings_from_dict(raw, env={})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.workers: "):
        settings_from_dict(minimal(transfer={"workers": "many"}), env={})


def test_out_of_range_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.workers"):
        settings_from_dict(minimal(transfer={"workers": 0}), env={})


def test_an_unknown_event_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.event_loop: "):
        settings_from_dict(minimal(transfer={"event_loop": "trio"}), env={})


def test_missing_mirror_root_is_named() -> None:
    with pytest.raises(ConfigError, match=r"mirror: required key is missing"):
        settings_from_dict({"sources": [{"name": "tcia"}]}, env={})


def test_duplicate_source_names_are_refused() -> None:
    raw = minimal(sources=[{"name": "x"}, {"name": "x"}])
    with pytest.raises(ConfigError, match="repeated: x"):
        settings_from_dict(raw, env={})


def test_source_url_gets_a_trailing_slash() -> None:
    raw = minimal(sources=[{"name": "s", "url": "http://127.0.0.1:1/nbia-api"}])
    assert settings_from_dict(raw, env={}).sources[0].url == "http://127.0.0.1:1/nbia-api/"


def test_env_overrides_source_credentials() -> None:
    raw = minimal(sources=[{"name": "nlst-v4", "username": "file-user", "password": "file"}])
    env = {
        "NBIA_SYNC_SOURCE_NLST_V4_USERNAME": "env-user",
        "NBIA_SYNC_SOURCE_NLST_V4_PASSWORD": "s3cret",
    }
    src = settings_from_dict(raw, env=env).sources[0]
    assert src.username == "env-user"
    assert src.password.get_secret_value() == "s3cret"


def test_env_overrides_catalog_url() -> None:
    env = {"NBIA_SYNC_CATALOG_URL": "postgresql+asyncpg://u:p@127.0.0.1/test"}
    assert settings_from_dict(minimal(), env=env).catalog_url == env["NBIA_SYNC_CATALOG_URL"]


def test_password_does_not_show_in_repr() -> None:
    raw = minimal(sources=[{"name": "s", "password": "hunter2"}])
    assert "hunter2" not in repr(settings_from_dict(raw, env={}))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml", env={})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[mirror\nroot = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, env={})


def test_example_config_validates() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert settings.sources[0].api == "v4"  # TCIA's current API, what a newcomer gets
    assert settings.sources[0].username == GUEST_USER
    assert settings.sources[0].url == DEFAULT_TCIA_URL


def test_example_config_mentions_every_setting() -> None:
    """Each key of each section appears (set or commented out) in its section of the example."""
    text = EXAMPLE.read_text()
    sections = re.split(r"^\[+([a-z]+)\]+\s*$", text, flags=re.MULTILINE)
    # re.split gives [preamble, name1, body1, name2, body2, ...]; sources repeat.
    bodies: dict[str, str] = {}
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        bodies[name] = bodies.get(name, "") + body
    missing = []
    for section, annotation in typing.get_type_hints(Settings).items():
        model = getattr(annotation, "__args__", (annotation,))[0]
        assert isinstance(model, type) and dataclasses.is_dataclass(model)
        for key in (f.name for f in dataclasses.fields(model)):
            if not re.search(rf"^#?\s*{key}\s*=", bodies.get(section, ""), flags=re.MULTILINE):
                missing.append(f"{section}.{key}")
    assert missing == []


def test_example_config_defaults_match_the_code() -> None:
    """Values written (uncommented) in the example are the code's defaults."""
    raw = tomllib.loads(EXAMPLE.read_text())
    defaults = settings_from_dict({"mirror": {"root": "./mirror"}, "sources": [{"name": "tcia"}]})
    example = settings_from_dict(raw, env={})
    assert dataclasses.replace(example, sources=[]) == dataclasses.replace(defaults, sources=[])
    assert example.sources[0] == defaults.sources[0]


def test_dockerfile_rewrites_lines_that_exist_in_the_example() -> None:
    """The image derives its config from the example with sed: the lines must be there."""
    dockerfile = (EXAMPLE.parent / "Dockerfile").read_text()
    text = EXAMPLE.read_text()
    rewritten = text
    for old, new in re.findall(r"-e 's\|\^([^|]+)\|([^|]+)\|'", dockerfile):
        assert re.search(f"^{re.escape(old)}", text, flags=re.MULTILINE), old
        rewritten = re.sub(f"^{re.escape(old)}", new, rewritten, flags=re.MULTILINE)
    settings = settings_from_dict(tomllib.loads(rewritten), env={})
    assert str(settings.mirror.root) == "/data"
    assert settings.daemon.listen_host == "0.0.0.0"


def test_credentials_in_a_source_url_are_refused_without_echoing_them() -> None:
    """user:password@ in a source URL would be echoed in errors, logs and the catalog."""
    raw = minimal(
        sources=[{"name": "tcia", "url": "https://bob:hunter2@archive.example/nbia-api/"}]
    )
    with pytest.raises(ConfigError, match=r"sources\[0\]\.url: .*credentials") as info:
        settings_from_dict(raw, env={})
    assert "hunter2" not in str(info.value)


def test_catalog_url_password_is_not_in_the_settings_repr() -> None:
    env = {"NBIA_SYNC_CATALOG_URL": "postgresql+asyncpg://nbia:s3cretdb@db.example/nbia"}
    settings = settings_from_dict(minimal(), env=env)
    assert settings.catalog_url == env["NBIA_SYNC_CATALOG_URL"]
    assert "s3cretdb" not in repr(settings)
    assert "s3cretdb" not in str(settings)


def test_a_source_with_an_account_and_no_api_logs_in_with_v2() -> None:
    raw = minimal(sources=[{"name": "a", "username": "alice"}, {"name": "b", "password": "pw"}])
    assert [s.api for s in settings_from_dict(raw, env={}).sources] == ["v2", "v2"]


def test_an_account_from_the_environment_also_means_v2() -> None:
    env = {"NBIA_SYNC_SOURCE_TCIA_PASSWORD": "pw"}
    assert settings_from_dict(minimal(), env=env).sources[0].api == "v2"


def test_an_explicit_api_wins_over_credentials() -> None:
    raw = minimal(sources=[{"name": "a", "username": "alice", "api": "v4"}])
    assert settings_from_dict(raw, env={}).sources[0].api == "v4"
