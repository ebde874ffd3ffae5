"""How a sync pass ended: written to the run row, exported as a metric label, mapped to
the CLI's exit code and /healthz. A StrEnum, so the catalog stores and shows its value."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"  # every wanted series is in the mirror
    FAILURES = "failures"  # some series failed permanently (or ran out of attempts)
    INCOMPLETE = "incomplete"  # some series still wait for a retry later
    ERROR = "error"  # the pass could not run: source unreachable, bad credentials
    INTERRUPTED = "interrupted"  # stopped by a signal; placed work is kept
