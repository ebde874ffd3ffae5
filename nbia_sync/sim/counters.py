"""What the simulator served, for tests and benchmarks to assert on."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class SimCounters:
    requests: Counter[str] = field(default_factory=Counter)  # per endpoint name
    statuses: Counter[int] = field(default_factory=Counter)  # per HTTP status served
    downloads_started: Counter[str] = field(default_factory=Counter)  # per series UID
    # Whole archive sent without any fault, per series UID.
    downloads_completed: Counter[str] = field(default_factory=Counter)
    unauthorized: int = 0  # 401s served
    grants: Counter[str] = field(default_factory=Counter)  # "password" / "refresh_token"
    grants_refused: Counter[str] = field(default_factory=Counter)  # for the wrong client id
    # v2 queries answered 200 empty because the token was dead (Keycloak mode).
    dead_token_queries: int = 0
    logouts: int = 0
    streams_current: int = 0
    streams_max: int = 0
    bytes_sent: int = 0  # download body bytes

    def stream_opened(self) -> None:
        self.streams_current += 1
        self.streams_max = max(self.streams_max, self.streams_current)

    def stream_closed(self) -> None:
        self.streams_current -= 1

    def reset(self) -> None:
        """Zero everything except the streams still open."""
        fresh = SimCounters(streams_current=self.streams_current)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))
