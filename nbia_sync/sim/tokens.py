"""OAuth-like token bookkeeping: opaque random tokens with lifetimes, per session.

A session is one password grant; refreshing keeps the session, logout ends it (both its
access and refresh tokens die), like the archive's Keycloak. `revoke_after(n)` lets n more
token checks pass, then kills every token alive at that moment (a Keycloak restart or an
admin revocation in the middle of a client's run); tokens issued later work.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from nbia_sync.clock import SYSTEM_CLOCK, Clock


@dataclass(slots=True)
class _Token:
    username: str
    session: str
    expires_at: float  # on the store's clock.monotonic()


@dataclass(frozen=True, slots=True)
class Grant:
    access_token: str
    refresh_token: str
    expires_in: float
    refresh_expires_in: float
    session: str


class TokenStore:
    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._access: dict[str, _Token] = {}
        self._refresh: dict[str, _Token] = {}
        self._sessions: set[str] = set()
        self._revoke_in: int | None = None

    def issue(
        self, username: str, token_ttl: float, refresh_ttl: float, session: str | None = None
    ) -> Grant:
        session = session or secrets.token_hex(16)
        self._sessions.add(session)
        now = self._clock.monotonic()
        access = secrets.token_urlsafe(32)
        refresh = secrets.token_urlsafe(32)
        self._access[access] = _Token(username, session, now + token_ttl)
        self._refresh[refresh] = _Token(username, session, now + refresh_ttl)
        self._prune(now)
        return Grant(access, refresh, token_ttl, refresh_ttl, session)

    def user_of(self, access_token: str) -> str | None:
        """The user an access token belongs to, or None when unknown/expired/revoked."""
        if self._revoke_in is not None:
            if self._revoke_in <= 0:
                self._revoke_in = None
                self.revoke_all()
            else:
                self._revoke_in -= 1
        return self._live(self._access, access_token)

    def revoke_after(self, checks: int) -> None:
        """Let ``checks`` more token checks pass, then revoke every token there is."""
        self._revoke_in = max(0, checks)

    def refresh(self, refresh_token: str, token_ttl: float, refresh_ttl: float) -> Grant | None:
        user = self._live(self._refresh, refresh_token)
        if user is None:
            return None
        return self.issue(user, token_ttl, refresh_ttl, self._refresh[refresh_token].session)

    def logout(self, access_token: str) -> bool:
        token = self._access.get(access_token)
        if token is None or self._live(self._access, access_token) is None:
            return False
        self._sessions.discard(token.session)
        return True

    def revoke_all(self) -> None:
        self._sessions.clear()
        self._access.clear()
        self._refresh.clear()

    def _live(self, table: dict[str, _Token], value: str) -> str | None:
        token = table.get(value)
        if token is None or token.session not in self._sessions:
            return None
        if token.expires_at <= self._clock.monotonic():
            return None
        return token.username

    def _prune(self, now: float) -> None:
        # Bounded memory over long benchmark runs: drop tokens dead for a while.
        if len(self._access) < 10_000:
            return
        for table in (self._access, self._refresh):
            for key in [
                k for k, t in table.items() if t.expires_at < now or t.session not in self._sessions
            ]:
                del table[key]
