"""Fault knobs for the simulator: random rates from a seeded RNG, plus exact scripts.

Every field may be changed while the server runs (`server.faults.reset = 0.2`) or the
whole object replaced (`server.faults = SimFaults(...)`); each request reads them afresh.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# What a download can suffer. "ok" in a script means one normal download.
StreamFault = Literal[
    "ok", "5xx", "429", "reset", "truncate", "corrupt", "stall", "hostile", "html", "bomb"
]
STREAM_FAULTS: tuple[StreamFault, ...] = get_args(StreamFault)
# Rolled in this order; the first hit wins, so at most one stream fault per download.
_ROLLED: tuple[tuple[StreamFault, str], ...] = (
    ("reset", "reset"),
    ("truncate", "truncate"),
    ("corrupt", "corrupt"),
    ("stall", "stall"),
    ("hostile", "hostile"),
    ("html", "html_instead_of_zip"),
    ("bomb", "bomb"),
)


@dataclass(frozen=True)
class SimReply:
    """One scripted answer (see SimFaults.script_endpoint): what a misbehaving or odd
    archive sends instead of the simulator's own answer."""

    status: int = 200
    body: bytes | str = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering


_LISTINGS = ("getSeries", "getUpdatedSeries")
_LISTING_FILTERS = ("Collection", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


@dataclass
class SimFaults:
    """Rates are probabilities per request in [0, 1]."""

    error_5xx: float = 0.0  # any endpoint: 500/502/503 with an HTML body
    rate_429: float = 0.0  # any endpoint: 429 with Retry-After
    retry_after: float = 1.0  # seconds, sent in the Retry-After header
    reset: float = 0.0  # download: connection aborted half way
    truncate: float = 0.0  # download: ZIP closed early without md5hashes.csv
    corrupt: float = 0.0  # download: one file's bytes altered, md5hashes.csv true
    stall: float = 0.0  # download: nothing sent for stall_seconds, then reset
    stall_seconds: float = 30.0
    hostile: float = 0.0  # download: an entry named ../../evil.dcm or /etc/evil.dcm
    html_instead_of_zip: float = 0.0  # download: 200 text/html instead of the ZIP
    # download: the first file is a deflate bomb: ~bomb_bytes / 1000 of deflate data that
    # inflates to bomb_bytes of zeros while its local header claims 1 KB.
    bomb: float = 0.0
    bomb_bytes: int = 1 << 30
    # md5hashes.csv as one real ingest path writes it: hashes without their leading
    # zeros (BigInteger.toString(16)); and a share of files whose hash is blank (" ").
    md5_unpadded: bool = False
    md5_blank: float = 0.0  # per file, decided by its SOP UID (stable across downloads)
    latency: float = 0.0  # seconds added before every response
    bandwidth: int | None = None  # bytes/s cap per download stream
    # download: after its first bytes the body waits until this event is set, so a test
    # holds downloads in flight (on its own, fake, clock) for as long as it needs.
    hold: asyncio.Event | None = field(default=None, compare=False)
    # Hostile-server knobs (see sim/hostile.py):
    # every response body (queries, downloads, the token endpoint) sent at this many bytes/s
    trickle: int | None = None
    # the Retry-After header verbatim instead of `retry_after` ("inf", an HTTP date, ...)
    retry_after_header: str | None = None
    # every services request answered with this status, the body echoing the bearer token
    echo_token_status: int | None = None
    echo_token_endpoints: tuple[str, ...] = ()  # only these endpoints; empty: every one
    # every services request answered with a 9000-byte header quoting the bearer token
    # (aiohttp refuses lines over 8190 bytes and quotes the start of the line)
    echo_token_header: bool = False
    # the token endpoint answers 307 to this URL (a redirect to another origin)
    token_redirect: str | None = None
    # the access token issued, verbatim (e.g. with CR/LF in it)
    token_override: str | None = None
    # queries: gzip-encoded answers padded with this many bytes of whitespace when inflated
    gzip_bomb: int | None = None
    # downloads: the ZIP sent with Content-Encoding: gzip
    gzip_downloads: bool = False
    token_ttl: float = 7200.0  # access token life, seconds
    refresh_ttl: float = 7200.0  # refresh token life, seconds
    seed: int = 0
    # Malformed listings: per series UID, fields of its getSeries/getUpdatedSeries row
    # replaced (a None value drops the field); extra rows join every listing they match.
    record_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_rows: list[dict[str, Any]] = field(default_factory=list)
    _scripts: dict[str, deque[StreamFault]] = field(default_factory=dict, init=False, repr=False)
    _replies: dict[str, deque[SimReply | None]] = field(
        default_factory=dict, init=False, repr=False
    )
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def script_series(self, uid: str, faults: Iterable[StreamFault]) -> None:
        """The next downloads of `uid` suffer these faults in order, then are normal.
        While a script lasts, the random download rates do not apply to that series."""
        steps = list(faults)
        unknown = [f for f in steps if f not in STREAM_FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; choose from {STREAM_FAULTS}")
        self._scripts.setdefault(uid, deque()).extend(steps)

    def scripted(self, uid: str) -> StreamFault | None:
        """Pop the next scripted fault for a download of `uid`, if any."""
        script = self._scripts.get(uid)
        if not script:
            return None
        step = script.popleft()
        if not script:
            del self._scripts[uid]
        return step

    def script_endpoint(self, name: str, replies: Iterable[SimReply | None]) -> None:
        """The next requests to endpoint ``name`` ("getSeries", "oauth/token", "logout")
        get these replies in order (None: the simulator's own answer), then normal ones."""
        self._replies.setdefault(name, deque()).extend(replies)

    def scripted_reply(self, name: str) -> SimReply | None:
        """Pop the next scripted reply for a request to ``name``, if any."""
        script = self._replies.get(name)
        if not script:
            return None
        reply = script.popleft()
        if not script:
            del self._replies[name]
        return reply

    def roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def choice(self, options: tuple[str, ...]) -> str:
        return self._rng.choice(options)

    def listing(
        self, endpoint: str, params: dict[str, str], rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """A series listing as the record knobs above make it."""
        if endpoint not in _LISTINGS or not (self.record_overrides or self.extra_rows):
            return rows
        out = []
        for row in rows:
            changes = self.record_overrides.get(row.get("SeriesInstanceUID", ""), {})
            row = {**row, **changes}
            out.append({k: v for k, v in row.items() if v is not None})
        filters = [k for k in _LISTING_FILTERS if params.get(k)]
        out += [r for r in self.extra_rows if all(r.get(k) == params[k] for k in filters)]
        return out

    def roll_request(self) -> Literal["5xx", "429"] | None:
        """The per-request faults every endpoint can suffer."""
        if self.roll(self.error_5xx):
            return "5xx"
        if self.roll(self.rate_429):
            return "429"
        return None

    def roll_stream(self) -> StreamFault:
        """The fault of one download (when no script applies)."""
        for fault, knob in _ROLLED:
            if self.roll(float(getattr(self, knob))):
                return fault
        return "ok"
