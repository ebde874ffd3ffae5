"""Fault knobs for the simulator: random rates from a seeded RNG, plus exact scripts.

Every field may be changed while the server runs (`server.faults.reset = 0.2`) or the
whole object replaced (`server.faults = SimFaults(...)`); each request reads them afresh.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

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
    token_ttl: float = 7200.0  # access token life, seconds
    refresh_ttl: float = 7200.0  # refresh token life, seconds
    seed: int = 0
    _scripts: dict[str, deque[StreamFault]] = field(default_factory=dict, init=False, repr=False)
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

    def roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def choice(self, options: tuple[str, ...]) -> str:
        return self._rng.choice(options)

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
