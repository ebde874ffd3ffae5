"""OAuth tokens for one v2 source, shared by every request to it (v1 and v4 need none).

Other clients die when the 2-hour token expires mid-run (nbiatoolkit captures it once).
Here the token is renewed *ahead* of expiry: when less than ``refresh_margin`` of its
life is left, the next request refreshes it first. Renewal is single flight: a lock with a
re-check inside, so 32 requests arriving together cause one grant. A 401 still happens
(server restart, revocation): the caller hands back the rejected token, we renew once, the
caller replays. When the refresh token is dead too, we log in again with the password.
Expiry uses a monotonic clock: wall-clock jumps must not expire or immortalise a token.

TCIA's server (Keycloak) in particular: the refresh form reaches Keycloak as sent and its
client there is ``nbia`` (the password grant's ``NBIA`` is rewritten by the server, the
refresh's is not); logout is POST (GET is answered 405; older Spring deployments took
GET). A dead token on a v2 *query* is not a 401 but an empty 200, which only the caller
can judge (see nbia_sync.discovery's token witness): hence ``generation`` and ``relogin``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import yarl

from nbia_sync.api import bodies
from nbia_sync.api._aiohttp import aiohttp
from nbia_sync.api.retry import error_for_exception, error_for_status
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import AuthError, RetryableError
from nbia_sync.redaction import register_secret
from nbia_sync.secret import SecretStr

log = structlog.get_logger(__name__)

# The password grant's client id (the server replaces it with its own anyway) and the
# refresh grant's, which Keycloak checks as sent.
CLIENT_ID = "NBIA"
REFRESH_CLIENT_ID = "nbia"
# A token whose server says nothing about its life is renewed after this long.
_DEFAULT_LIFETIME = 300.0
_LOGOUT_TIMEOUT = aiohttp.ClientTimeout(total=10)
# A grant answer is a few KB; anything near this is not one.
_MAX_GRANT_BYTES = 1 << 20
# What may stand in an Authorization header after "Bearer " (RFC 6750 b64token is
# narrower; any visible ASCII is accepted so odd but harmless tokens still work).
_HEADER_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F))

# Grant requests of this process by (source, grant, outcome "granted" | "refused"), for
# the daemon's nbia_sync_token_grants_total (read by nbia_sync.metrics on each scrape).
GRANT_TOTALS: Counter[tuple[str, str, str]] = Counter()


@dataclass(frozen=True, slots=True)
class _Grant:
    """One token pair; secrets are SecretStr so no repr or log line can show them."""

    access: SecretStr
    refresh: SecretStr | None
    obtained_at: float  # monotonic, taken *before* the request: errs towards early renewal
    lifetime: float
    refresh_lifetime: float | None  # None: unknown, try it and fall back on failure

    def remaining(self, now: float) -> float:
        return self.obtained_at + self.lifetime - now

    def refresh_alive(self, now: float) -> bool:
        if self.refresh is None:
            return False
        if self.refresh_lifetime is None:
            return True
        return now < self.obtained_at + self.refresh_lifetime


class TokenSession:
    """Access tokens for one source. Not for v4 sources, which need none."""

    def __init__(
        self,
        source: SourceSettings,
        http: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
        transfer: TransferSettings | None = None,
    ) -> None:
        self._source = source
        self._http = http
        self._clock = clock
        self._transfer = transfer or TransferSettings()
        self._token_url = f"{source.url}oauth/token"
        self._logout_url = f"{source.url}logout"
        self._grant: _Grant | None = None
        self._lock = asyncio.Lock()
        # Grants made, by type ("password", "refresh_token"): for logs, metrics and tests.
        self.grants: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    @property
    def generation(self) -> int:
        """How many tokens this session has obtained: an answer given under generation g
        was given to the g-th token (or an earlier one, if it was read before a renewal)."""
        return self.grants.total()

    def __repr__(self) -> str:
        return f"TokenSession(source={self._source.name!r}, user={self._source.username!r})"

    async def token(self) -> str:
        """A bearer token with enough life left; renews it first if it is due."""
        grant = self._grant
        if grant is not None and not self._due(grant):
            return grant.access.get_secret_value()
        async with self._lock:
            # Re-check: whoever held the lock before us may have renewed already.
            grant = self._grant
            if grant is None or self._due(grant):
                grant = await self._renew(grant)
            return grant.access.get_secret_value()

    async def rejected(self, token: str) -> None:
        """The archive answered 401 to ``token``: renew it, unless another task already did."""
        async with self._lock:
            grant = self._grant
            if grant is not None and grant.access.get_secret_value() != token:
                return
            log.info("auth.token_rejected", source=self._source.name)
            await self._renew(grant)

    async def relogin(self) -> None:
        """A fresh password grant now, whatever the current token's state: the caller has
        reason to think the server no longer honours it although it never said 401."""
        async with self._lock:
            log.info("auth.relogin", source=self._source.name)
            await self._password_grant()

    async def close(self) -> None:
        """Log out (invalidates the token on the server); failures are only logged.

        POST, as the Keycloak deployment wants; GET only when POST is answered 405 (the
        older Spring deployments)."""
        async with self._lock:
            grant, self._grant = self._grant, None
        if grant is None:
            return
        headers = {"Authorization": f"Bearer {grant.access.get_secret_value()}"}
        try:
            status = await self._logout("POST", headers)
            if status == 405:
                status = await self._logout("GET", headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("auth.logout_failed", source=self._source.name, error=type(exc).__name__)
            return
        if status < 300:
            log.info("auth.logout", source=self._source.name, grants=dict(self.grants))
        else:
            # Best effort: the session dies with its tokens anyway.
            log.warning("auth.logout_failed", source=self._source.name, status=status)

    async def _logout(self, method: str, headers: dict[str, str]) -> int:
        async with self._http.request(
            method, self._logout_url, headers=headers, timeout=_LOGOUT_TIMEOUT
        ) as resp:
            await resp.read()
            return resp.status

    def _due(self, grant: _Grant) -> bool:
        return grant.remaining(self._clock()) < self._source.refresh_margin * grant.lifetime

    async def _renew(self, old: _Grant | None) -> _Grant:
        """Refresh grant when the refresh token lives, else (or if refused) password grant."""
        if old is not None and old.refresh is not None and old.refresh_alive(self._clock()):
            form = {
                "grant_type": "refresh_token",
                "refresh_token": old.refresh.get_secret_value(),
                "client_id": REFRESH_CLIENT_ID,
            }
            grant = await self._request_grant(form, "refresh_token")
            if grant is not None:
                return grant
            log.info("auth.refresh_refused", source=self._source.name)
        return await self._password_grant()

    async def _password_grant(self) -> _Grant:
        form = {
            "username": self._source.username,
            "password": self._source.password.get_secret_value(),
            "client_id": CLIENT_ID,
            "grant_type": "password",
        }
        grant = await self._request_grant(form, "password")
        if grant is None:
            raise AuthError(
                f"source {self._source.name!r}: the archive refused the credentials "
                f"of user {self._source.username!r}"
            )
        return grant

    async def _request_grant(self, form: dict[str, str], kind: str) -> _Grant | None:
        """POST the grant; None when the server refuses it (400/401), errors otherwise."""
        what = f"token {kind} grant for source {self._source.name!r}"
        started = self._clock()
        deadline = self._transfer.token_timeout
        try:
            async with asyncio.timeout(deadline):
                # Never follow a redirect: it would re-send the credentials elsewhere.
                async with self._http.post(
                    self._token_url, data=form, allow_redirects=False, auto_decompress=False
                ) as resp:
                    status = resp.status
                    headers = dict(resp.headers)
                    body = b""
                    if status < 300:
                        body = await bodies.read_all(
                            resp,
                            what,
                            bodies.Floor.from_settings(self._transfer),
                            max_bytes=_MAX_GRANT_BYTES,
                        )
        except TimeoutError:
            raise RetryableError(
                f"{what}: no answer within transfer.token_timeout = {deadline:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise error_for_exception(exc, what) from exc
        if 300 <= status < 400:
            raise AuthError(
                f"{what}: the token endpoint answered HTTP {status}, a redirect to "
                f"{_origin(headers.get('Location', ''))}; credentials are only sent to "
                f"{self._token_url} (fix the source's url)"
            )
        if status in (400, 401):
            self.refused[kind] += 1
            GRANT_TOTALS[(self._source.name, kind, "refused")] += 1
            return None
        if status >= 300:
            # The body of a failed grant may echo the form; it is left out of the message.
            raise error_for_status(status, headers, what)
        grant = _parse_grant(body, started, what)
        self._grant = grant
        self.grants[kind] += 1
        GRANT_TOTALS[(self._source.name, kind, "granted")] += 1
        log.info(
            "auth.granted",
            source=self._source.name,
            grant=kind,
            expires_in=grant.lifetime,
            refresh_expires_in=grant.refresh_lifetime,
        )
        return grant


def _origin(location: str) -> str:
    """scheme://host[:port] of a redirect target, for the message (never its path/query)."""
    try:
        url = yarl.URL(location)
    except (ValueError, TypeError):
        return "an unreadable location"
    if not url.is_absolute():
        return "a path on the same server"
    return str(url.origin())


def _parse_grant(body: bytes, obtained_at: float, what: str) -> _Grant:
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RetryableError(f"{what}: the answer is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
        raise RetryableError(f"{what}: the answer has no access_token")
    refresh = data.get("refresh_token")
    register_secret(data["access_token"])
    register_secret(refresh if isinstance(refresh, str) else None)
    if not data["access_token"] or not set(data["access_token"]) <= _HEADER_SAFE:
        # Sent as a header it would be refused (CR/LF) or split into two headers.
        raise AuthError(
            f"{what}: the archive sent a malformed access token (empty, or characters that "
            "cannot stand in an HTTP header)"
        )
    return _Grant(
        access=SecretStr(data["access_token"]),
        refresh=SecretStr(refresh) if isinstance(refresh, str) and refresh else None,
        obtained_at=obtained_at,
        lifetime=_seconds(data.get("expires_in")) or _DEFAULT_LIFETIME,
        refresh_lifetime=_seconds(data.get("refresh_expires_in")),
    )


def _seconds(value: object) -> float | None:
    """A positive lifetime in seconds, or None (absent, zero = "no limit" in Keycloak, bad)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None
