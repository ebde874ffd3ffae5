"""The series state machine. The schema itself is Core `Table`s in tables.py.

Series state machine:

    wanted ──claim──► downloading ──place+commit──► done
       ▲                  │                            │ remote changed
       │            fail (retryable)                   ▼
       └──── pending ◄────┘ (next_try_at)            wanted
                          │ attempts exhausted / permanent
                          ▼
                        failed ──retry-failed──► wanted
"""

from __future__ import annotations

import enum


class SeriesState(enum.StrEnum):
    WANTED = "wanted"  # to fetch, ready now
    PENDING = "pending"  # to fetch, after next_try_at (backing off)
    DOWNLOADING = "downloading"  # claimed by lease_owner until lease_expires_at
    DONE = "done"  # placed in the mirror and verified
    FAILED = "failed"  # gave up: permanent error or attempts exhausted
    WITHDRAWN = "withdrawn"  # a full listing of its collection no longer returns it
    CONFLICT = "conflict"  # its UID is also listed under another path or source (see conflict)
