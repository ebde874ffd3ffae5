"""Settings: the TOML file, validated once at start, with secrets from the environment.

Every section forbids unknown keys so a typo is a named error, not a silent default.
Secrets may be given in the environment instead of the file:
  NBIA_SYNC_CATALOG_URL                 the catalog URL (may embed a database password)
  NBIA_SYNC_SOURCE_<NAME>_USERNAME      per source, NAME upper-cased, '-' -> '_'
  NBIA_SYNC_SOURCE_<NAME>_PASSWORD
"""

# No `from __future__ import annotations`: settings_schema reads the annotations of the
# sections, and real objects spare it evaluating strings at start-up.
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from nbia_sync.constants import DEFAULT_TCIA_URL, GUEST_USER
from nbia_sync.errors import ConfigError
from nbia_sync.redaction import register_secret
from nbia_sync.secret import SecretStr
from nbia_sync.settings_schema import SchemaError, parse, rules

__all__ = ["DEFAULT_TCIA_URL", "GUEST_USER"]  # re-exported: callers import them from here

# Every section is a frozen dataclass checked by settings_schema when read from a file:
# a field's annotation is the type its key accepts, `rules(...)` its constraints.


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorSettings:
    root: Path
    # Refuse to start a series unless this much space stays free after it.
    min_free_bytes: int = field(default=1 << 30, metadata=rules(ge=0))
    # Parse every file as DICOM and compare its UIDs before placing it.
    check_dicom: bool = True
    # A series the archive withdrew: "keep" its files (flagged withdrawn in the catalog)
    # or "delete" them (moved out of the tree through the trash).
    on_withdrawn: Literal["keep", "delete"] = "keep"
    # A full listing that would withdraw more than this share of a collection's series
    # at once withdraws none of them (a warning) unless `sync --allow-mass-withdrawal`.
    max_withdrawn_share: float = field(default=0.5, metadata=rules(ge=0, le=1))


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogSettings:
    # None: SQLite at <root>/.nbia-sync/catalog.sqlite. A SecretStr: a PostgreSQL URL may
    # embed the database password, which no repr of the settings may show.
    url: SecretStr | None = None


EventLoopChoice = Literal["auto", "asyncio"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferSettings:
    workers: int = field(default=8, metadata=rules(ge=1, le=256))
    max_attempts: int = field(default=6, metadata=rules(ge=1))
    retry_base_delay: float = field(default=0.2, metadata=rules(ge=0))  # seconds
    retry_max_delay: float = field(default=600.0, metadata=rules(gt=0))  # seconds
    # Attempts of a single HTTP query before it gives up for this pass.
    request_attempts: int = field(default=5, metadata=rules(ge=1))
    connect_timeout: float = field(default=30.0, metadata=rules(gt=0))
    # A stream that sends nothing for this long is cut and retried.
    read_timeout: float = field(default=120.0, metadata=rules(gt=0))
    # curl's floor on progress: a download, query or token request slower than
    # low_speed_limit bytes/s for low_speed_time seconds is cut and retried. 0 disables.
    low_speed_limit: int = field(default=1024, metadata=rules(ge=0))
    low_speed_time: float = field(default=120.0, metadata=rules(gt=0))
    # Total deadline of one query attempt / one token request, headers and body (seconds).
    query_timeout: float = field(default=900.0, metadata=rules(gt=0))
    token_timeout: float = field(default=60.0, metadata=rules(gt=0))
    # A query answer larger than this after decompression is refused (bytes; the largest
    # real listing, NLST getSeries, is a few hundred MB).
    max_query_bytes: int = field(default=1 << 29, metadata=rules(ge=1 << 16))
    lease_seconds: float = field(default=300.0, metadata=rules(gt=0))
    heartbeat_interval: float = field(default=30.0, metadata=rules(gt=0))
    # Bytes per second over all downloads of this process; None = unlimited.
    bandwidth_limit: int | None = field(default=None, metadata=rules(gt=0))
    chunk_size: int = field(default=256 << 10, metadata=rules(ge=4096))
    # The event loop every command runs on: "auto" = uvloop where it is installed (a
    # dependency on Linux and macOS on x86-64 and ARM64), else Python's asyncio;
    # "asyncio" = always asyncio.
    event_loop: EventLoopChoice = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSettings:
    poll_interval: float = field(default=3600.0, metadata=rules(gt=0))  # seconds
    # getUpdatedSeries is asked from (watermark - overlap): release dates are days,
    # and the archive's clock is not ours.
    overlap_days: int = field(default=2, metadata=rules(ge=0))
    # Safety net for what increments miss (e.g. a series re-released with an old date):
    # re-list every configured collection in full when the last full listing is older.
    # 0 disables the periodic re-listing (the first pass is always a full listing).
    full_listing_days: float = field(default=7.0, metadata=rules(ge=0))


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON when stdout is not a terminal, readable otherwise.
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = field(default=9469, metadata=rules(ge=0, le=65535))


NO_PASSWORD: Final = SecretStr("")


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/]+", value):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in re.sub(r"^https?://", "", value).split("/", 1)[0]:
        # user:password@host would reach error messages, logs and the catalog's
        # sources table with the URL; NBIA logs in with username/password anyway.
        raise ValueError(
            "must not contain credentials (user:password@): use the source's "
            "username and password keys"
        )
    return value if value.endswith("/") else value + "/"


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceSettings:
    name: str = field(metadata=rules(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"))
    url: str = field(default=DEFAULT_TCIA_URL, metadata=rules(after=_http_url))
    # v4, TCIA's current API, needs no login; unset with credentials given: v2 (see
    # _credentials_mean_v2).
    api: Literal["v1", "v2", "v4"] = "v4"
    username: str = GUEST_USER
    password: SecretStr = NO_PASSWORD
    collections: list[str] = field(default_factory=list)  # empty: every collection
    modalities: list[str] = field(default_factory=list)  # empty: every modality
    body_parts: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    # Portal manifests (.tcia) or lists of series UIDs (one a line, or the first column
    # of a .csv): when set, the source wants exactly these series (kept up to date),
    # nothing else. Relative paths are relative to the configuration file.
    manifests: list[Path] = field(default_factory=list)
    verify_tls: bool = True
    # Concurrent connections to this source; None: the transfer worker count.
    max_connections: int | None = field(default=None, metadata=rules(ge=1))
    # Refresh the access token when less than this fraction of its life is left.
    refresh_margin: float = field(default=0.2, metadata=rules(gt=0, lt=1))

    @property
    def needs_token(self) -> bool:
        # v1 is served as the guest whatever the token, v4 needs none: only v2 logs in.
        return self.api == "v2"


def _unique_names(sources: list[SourceSettings]) -> list[SourceSettings]:
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
    return sources


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    mirror: MirrorSettings
    catalog: CatalogSettings = CatalogSettings()
    transfer: TransferSettings = TransferSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    logging: LoggingSettings = LoggingSettings()
    daemon: DaemonSettings = DaemonSettings()
    sources: list[SourceSettings] = field(metadata=rules(min_length=1, after=_unique_names))

    @property
    def state_dir(self) -> Path:
        """Bookkeeping (catalog, staging, lock) lives under the mirror root."""
        return self.mirror.root / ".nbia-sync"

    @property
    def catalog_url(self) -> str:
        if self.catalog.url is not None and self.catalog.url.get_secret_value():
            return self.catalog.url.get_secret_value()
        return f"sqlite+aiosqlite:///{(self.state_dir / 'catalog.sqlite').resolve()}"

    def source(self, name: str) -> SourceSettings:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"no source named {name!r} in the configuration")


def _env_key(source_name: str, field: str) -> str:
    return f"NBIA_SYNC_SOURCE_{re.sub(r'[^A-Za-z0-9]', '_', source_name).upper()}_{field}"


def _each_source(
    raw: dict[str, Any], patch: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """``raw`` with ``patch`` applied to every table of its `sources` array (anything
    else there is left for the validator to name)."""
    sources = raw.get("sources")
    if not isinstance(sources, list):
        return raw
    return {**raw, "sources": [patch(s) if isinstance(s, dict) else s for s in sources]}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    raw = dict(raw)
    if "NBIA_SYNC_CATALOG_URL" in env:
        catalog = raw.get("catalog", {})
        if isinstance(catalog, dict):  # else left for the validator to name
            raw["catalog"] = {**catalog, "url": env["NBIA_SYNC_CATALOG_URL"]}

    def credentials(src: dict[str, Any]) -> dict[str, Any]:
        name = src.get("name")
        if not isinstance(name, str):
            return src
        keys = {field: _env_key(name, field.upper()) for field in ("username", "password")}
        return {**src, **{field: env[key] for field, key in keys.items() if key in env}}

    return _each_source(raw, credentials)


def _credentials_mean_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """A source with an account but no `api` logs in (v2), as it did when v2 was the
    default: its restricted collections must not vanish behind v4's guest view."""

    def v2_if_logged_in(src: dict[str, Any]) -> dict[str, Any]:
        if "api" in src:
            return src
        password = src.get("password")
        if isinstance(password, SecretStr):
            password = password.get_secret_value()
        if src.get("username", GUEST_USER) != GUEST_USER or password:
            return {**src, "api": "v2"}
        return src

    return _each_source(raw, v2_if_logged_in)


def settings_from_dict(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    merged = _credentials_mean_v2(_apply_env(dict(raw), os.environ if env is None else env))
    try:
        settings = parse(Settings, merged)
    except SchemaError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    for source in settings.sources:
        # Redacted literally from every log line and error message from now on.
        register_secret(source.password.get_secret_value())
    return settings


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a TOML config; every problem is a ConfigError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return settings_from_dict(_manifests_beside(raw, path.parent), env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _manifests_beside(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative `sources[].manifests` paths are relative to the configuration file."""

    def beside(src: dict[str, Any]) -> dict[str, Any]:
        files = src.get("manifests")
        if not isinstance(files, list):
            return src
        return {**src, "manifests": [base / f if isinstance(f, str) else f for f in files]}

    return _each_source(raw, beside)


def stale_after(settings: Settings) -> float:
    """Seconds without a heartbeat after which a worker counts as dead: by then its
    leases have run out too, so its series are back in the queue. (Here, not in the
    engine: `status` needs it without importing the HTTP client and the pool.)"""
    return max(settings.transfer.lease_seconds, 3 * settings.transfer.heartbeat_interval)


def forget_workers_after(settings: Settings) -> float:
    """Seconds without a heartbeat after which a worker's row is deleted (see
    `prune_workers`): a process killed outright (kill -9, power loss) never removes its
    own. A day keeps a dead process listed STALE in `status` long enough for an operator
    to notice it, and is far past `stale_after` (minutes by default), so only rows that
    every other check already treats as dead go; with very long leases it is 7 *
    `stale_after` instead, for the same margin."""
    return max(24 * 3600.0, 7 * stale_after(settings))
