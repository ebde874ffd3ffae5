"""The token witness: may discovery trust the empty answers it got?

TCIA's server answers a v2 *query* made with a token it no longer honours (expired early
by clock skew, revoked by an admin, lost in a Keycloak restart) with 200 and an empty
body: the same answer as "no results" (it swallows its own 401 while looking up the
user's collections and goes on with none). Believed, that answer moves a watermark past
changes never seen, records a collection as listed, or withdraws what it holds.

What can be proven: a non-empty answer came from a working token. An empty one proves
nothing until a query that cannot be empty for a working token — getCollectionValues,
every account sees the public collections — answers non-empty under the *same* token,
*afterwards*: a dead token never comes back to life, so it was alive for every earlier
answer too. Discovery therefore wraps its client in a `Watched` client that notes which
token generation gave each empty answer, and calls `confirm()` before anything that
trusts them (withdrawals, the watermark). When the witness fails, the caller logs in
afresh (password grant) and asks everything again; when it fails again, the discovery of
that source fails (RetryableError: the next pass tries again) and nothing has moved.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from typing import TYPE_CHECKING, TypeVar

import structlog

from nbia_sync.api.auth import TokenSession
from nbia_sync.api.models import PatientInfo, SeriesInfo, StudyInfo
from nbia_sync.errors import RetryableError

if TYPE_CHECKING:
    from nbia_sync.discovery import DiscoveryClient

log = structlog.get_logger(__name__)

T = TypeVar("T")
A = TypeVar("A", bound=Sequence[object] | int)  # an answer, or how many records it had


class TokenDoubted(Exception):
    """Some empty answer may have come from a token the server no longer honoured."""


class Watched:
    """A DiscoveryClient that notes the token generation behind every empty answer."""

    def __init__(self, client: DiscoveryClient) -> None:
        self.client = client
        self.auth: TokenSession | None = token_session(client)
        # Token generations that may have given an empty answer (see _watch).
        self.empty_under: set[int] = set()
        self.empty_answers = 0

    async def _watch(self, pending: Callable[[], Awaitable[A]]) -> A:
        if self.auth is None:
            return await pending()
        # The token used is the one current when the request was sent: generation
        # `before`, or a later one if a renewal happened meanwhile (the first request
        # of a session logs in, so at least 1).
        before = max(self.auth.generation, 1)
        answer = await pending()
        if not answer:
            self.empty_answers += 1
            self.empty_under.update(range(before, max(self.auth.generation, before) + 1))
        return answer

    async def collections(self) -> list[str]:
        return await self._watch(self.client.collections)

    async def series(
        self,
        collection: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        modality: str | None = None,
        series_uid: str | None = None,
        body_part: str | None = None,
    ) -> list[SeriesInfo]:
        return await self._watch(
            lambda: self.client.series(
                collection=collection,
                patient_id=patient_id,
                study_uid=study_uid,
                modality=modality,
                series_uid=series_uid,
                body_part=body_part,
            )
        )

    async def series_batches(
        self,
        each: Callable[[list[SeriesInfo]], Awaitable[None]],
        collection: str,
        patient_id: str | None = None,
    ) -> int:
        return await self._watch(
            lambda: self.client.series_batches(each, collection, patient_id=patient_id)
        )

    async def updated_series(self, since: date) -> list[SeriesInfo]:
        return await self._watch(lambda: self.client.updated_series(since))

    async def new_patients(self, collection: str, since: date) -> list[PatientInfo]:
        return await self._watch(lambda: self.client.new_patients(collection, since))

    async def new_studies(
        self, collection: str, since: date, patient_id: str | None = None
    ) -> list[StudyInfo]:
        return await self._watch(lambda: self.client.new_studies(collection, since, patient_id))

    async def confirm(self) -> None:
        """Return when every empty answer is vouched for; raise TokenDoubted otherwise."""
        if self.auth is None or not self.empty_under:
            return
        before = max(self.auth.generation, 1)
        listed = await self.client.collections()
        after = self.auth.generation
        if listed and before == after and self.empty_under == {after}:
            return
        reason = (
            "getCollectionValues came back empty too"
            if not listed
            else "the token was renewed while they came in"
        )
        log.warning("discovery.token_doubted", empty_answers=self.empty_answers, reason=reason)
        raise TokenDoubted(reason)


def token_session(client: object) -> TokenSession | None:
    """The client's token session (NbiaClient.auth); None for v1/v4 and for fakes."""
    auth = getattr(client, "auth", None)
    return auth if isinstance(auth, TokenSession) else None


async def trusting(
    client: DiscoveryClient, what: str, run: Callable[[Watched, bool], Awaitable[T]]
) -> T:
    """``run(watched, again)``, which must call ``watched.confirm()`` before it trusts an
    answer; on doubt, once more after a fresh password login (``again=True``)."""
    try:
        return await run(Watched(client), False)
    except TokenDoubted:
        pass
    auth = token_session(client)
    if auth is None:  # pragma: no cover - a Watched without auth never doubts
        raise RetryableError(f"{what}: the archive's answers could not be trusted")
    await auth.relogin()
    try:
        return await run(Watched(client), True)
    except TokenDoubted as doubt:
        raise RetryableError(
            f"{what}: empty answers could not be trusted even with a freshly issued "
            f"token ({doubt}; the server may be refusing the account's tokens without "
            "saying so); nothing was changed, the next pass asks again"
        ) from None
