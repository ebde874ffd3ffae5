"""NbiaClient: the endpoints of one archive source, as typed records and byte streams.

One aiohttp session per source, its connector sized for the transfer workers plus a few
queries. ``sock_read`` bounds the silence of a stream (a stall is cut and retried) and
the progress floor (transfer.low_speed_limit/low_speed_time) bounds a trickle, while a
download's total time stays unbounded, because a multi-GB series legitimately takes hours;
a query attempt has a total deadline (transfer.query_timeout). Bodies are read through
api/bodies.py: bounded inflation, a size cap on queries, JSON parsed record by record.
Queries are retried by the RetryPolicy; a download is retried only while opening, since a
broken stream can only restart from the first byte and that is the caller's decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import date
from ssl import SSLContext
from types import TracebackType
from typing import Self, TypeVar

import structlog

from nbia_sync.api import _records as records
from nbia_sync.api import bodies
from nbia_sync.api._aiohttp import aiohttp
from nbia_sync.api.auth import TokenSession
from nbia_sync.api.dates import new_since_param, updated_series_param
from nbia_sync.api.models import PatientInfo, SeriesInfo, SeriesSize, StudyInfo
from nbia_sync.api.retry import RetryPolicy, error_for_exception, error_for_status
from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.config import SourceSettings, TransferSettings
from nbia_sync.errors import RetryableError
from nbia_sync.redaction import redact_text
from nbia_sync.tls import verified_context

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Connections beyond the download workers, so discovery queries never queue behind streams.
QUERY_CONNECTIONS = 4
ZIP_MAGIC = b"PK\x03\x04"
# Content types that are certainly not an archive: an error page or an error object.
_NOT_ZIP_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")
_SNIPPET = 160
_warned_insecure: set[str] = set()


# Series a listing hands on at a time (NbiaClient.series_batches): the catalog's batch.
LISTING_BATCH = 500


class _CallerError(Exception):
    """What a batch's receiver raised, carried past the retry policy untouched."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class NbiaClient:
    """The archive at ``source``; use as ``async with NbiaClient(...) as client``."""

    def __init__(
        self,
        source: SourceSettings,
        transfer: TransferSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        policy: RetryPolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.source = source
        self._clock = clock  # token lifetimes (the policy has its own for backoff)
        self.transfer = transfer
        self.policy = policy or RetryPolicy.from_settings(transfer)
        self._api_root = f"{source.url}services/{source.api}/"
        self._given_session = session
        self._http: aiohttp.ClientSession | None = session
        self._auth: TokenSession | None = None
        self._floor = bodies.Floor.from_settings(transfer)

    def __repr__(self) -> str:
        return f"NbiaClient(source={self.source.name!r}, url={self.source.url!r})"

    @property
    def auth(self) -> TokenSession | None:
        """The source's token session (None for v4, or before the client is opened)."""
        return self._auth

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if self._http is None:
            self._http = self._new_session()
        if self.source.needs_token and self._auth is None:
            self._auth = TokenSession(
                self.source, self._http, clock=self._clock.monotonic, transfer=self.transfer
            )

    async def close(self) -> None:
        """Log out (v1/v2), then close the HTTP session if this client made it."""
        try:
            if self._auth is not None:
                await self._auth.close()
        finally:
            self._auth = None
            if self._http is not None and self._http is not self._given_session:
                await self._http.close()
            self._http = None

    def _new_session(self) -> aiohttp.ClientSession:
        limit = self.source.max_connections or self.transfer.workers + QUERY_CONNECTIONS
        # Never ssl=True: aiohttp's own verified context has no trust store (see tls).
        ssl: SSLContext | bool = False
        if self.source.verify_tls:
            ssl = verified_context()
        elif self.source.name not in _warned_insecure:
            _warned_insecure.add(self.source.name)
            log.warning("client.tls_verification_off", source=self.source.name)
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ssl=ssl)
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.transfer.connect_timeout,
            sock_read=self.transfer.read_timeout,
        )
        # auto_decompress off: aiohttp inflates a whole chunk at once (see api/bodies.py).
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, raise_for_status=False, auto_decompress=False
        )

    # ---- queries ---------------------------------------------------------------------

    async def collections(self) -> list[str]:
        what = "getCollectionValues"
        return await self._query(
            "getCollectionValues", {}, what, lambda r, i: records.collection_name(r, what, i)
        )

    async def patients(self, collection: str) -> list[PatientInfo]:
        what = f"getPatient Collection={collection}"
        return await self._query(
            "getPatient",
            {"Collection": collection},
            what,
            lambda r, i: records.patient_info(r, what, i, collection),
        )

    async def patient_studies(
        self, collection: str, patient_id: str | None = None, study_uid: str | None = None
    ) -> list[StudyInfo]:
        params = {"Collection": collection, "PatientID": patient_id, "StudyInstanceUID": study_uid}
        what = _describe("getPatientStudy", params)
        return await self._query(
            "getPatientStudy", params, what, lambda r, i: records.study_info(r, what, i, collection)
        )

    async def series(
        self,
        collection: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        modality: str | None = None,
        series_uid: str | None = None,
        body_part: str | None = None,
    ) -> list[SeriesInfo]:
        params = {
            "Collection": collection,
            "PatientID": patient_id,
            "StudyInstanceUID": study_uid,
            "Modality": modality,
            "SeriesInstanceUID": series_uid,
            "BodyPartExamined": body_part,
        }
        what = _describe("getSeries", params)
        return await self._query(
            "getSeries", params, what, lambda r, i: records.series_info(r, what, i, collection)
        )

    async def series_batches(
        self,
        each: Callable[[list[SeriesInfo]], Awaitable[None]],
        collection: str,
        patient_id: str | None = None,
        size: int = LISTING_BATCH,
    ) -> int:
        """getSeries of a collection (of one patient), handed to ``each`` ``size`` series at
        a time as they arrive: a whole collection's listing is never held at once. A retry
        hands the series again from the first one. Returns how many were listed."""
        params = {"Collection": collection, "PatientID": patient_id}
        what = _describe("getSeries", params)
        return await self._batches(
            "getSeries",
            params,
            what,
            lambda r, i: records.series_info(r, what, i, collection),
            each,
            size,
        )

    async def updated_series(self, since: date) -> list[SeriesInfo]:
        """Series released strictly after ``since`` (the archive's rule)."""
        name, value = updated_series_param(since, self.source.api)
        what = f"getUpdatedSeries {name}={value}"
        return await self._query(
            "getUpdatedSeries",
            {name: value},
            what,
            lambda r, i: records.series_info(r, what, i, None),
        )

    async def new_patients(self, collection: str, since: date) -> list[PatientInfo]:
        name, value = new_since_param(since, self.source.api)
        params = {"Collection": collection, name: value}
        what = _describe("NewPatientsInCollection", params)
        return await self._query(
            "NewPatientsInCollection",
            params,
            what,
            lambda r, i: records.patient_info(r, what, i, collection),
        )

    async def new_studies(
        self, collection: str, since: date, patient_id: str | None = None
    ) -> list[StudyInfo]:
        name, value = new_since_param(since, self.source.api)
        params = {"Collection": collection, name: value, "PatientID": patient_id}
        what = _describe("NewStudiesInPatientCollection", params)
        return await self._query(
            "NewStudiesInPatientCollection",
            params,
            what,
            lambda r, i: records.study_info(r, what, i, collection),
        )

    async def series_size(self, uid: str) -> SeriesSize:
        what = f"getSeriesSize SeriesInstanceUID={uid}"
        rows = await self._rows("getSeriesSize", {"SeriesInstanceUID": uid}, what)
        return records.series_size(rows, what)

    async def sop_instance_uids(self, uid: str) -> list[str]:
        what = f"getSOPInstanceUIDs SeriesInstanceUID={uid}"
        return await self._query(
            "getSOPInstanceUIDs",
            {"SeriesInstanceUID": uid},
            what,
            lambda r, i: records.required(r, ("SOPInstanceUID",), what, i),
        )

    async def series_metadata(self, uid: str) -> dict[str, str]:
        what = f"getSeriesMetaData SeriesInstanceUID={uid}"
        rows = await self._rows("getSeriesMetaData", {"SeriesInstanceUID": uid}, what)
        return records.flat_strings(rows[0]) if rows else {}

    async def single_image(self, series_uid: str, sop_uid: str) -> bytes:
        params = {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
        what = _describe("getSingleImage", params)

        async def fetch() -> bytes:
            async with self._open("getSingleImage", params, what) as resp:
                _refuse_error_page(resp, what)
                body = await bodies.read_all(resp, what, self._floor)
            if not body:
                raise RetryableError(f"{what}: the archive sent an empty file")
            return body

        return await self.policy.call(fetch, what=what)

    # ---- download --------------------------------------------------------------------

    @asynccontextmanager
    async def stream_series(self, uid: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The series' ZIP as chunks, as they arrive; nothing is buffered.

        Opening (up to the ZIP signature) is retried by the policy. Any failure after
        that raises RetryableError: a ZIP stream can only restart from the beginning.
        """
        if self.source.api == "v4":
            endpoint = "getImage"
            params: Mapping[str, str | None] = {"SeriesInstanceUID": uid, "IncludeMD5": "Yes"}
        else:
            endpoint, params = "getImageWithMD5Hash", {"SeriesInstanceUID": uid}
        what = f"{endpoint} SeriesInstanceUID={uid}"

        async def open_zip() -> tuple[aiohttp.ClientResponse, AsyncIterator[bytes], bytes]:
            # No Content-Encoding is asked for; one sent anyway is inflated in bounded steps.
            resp = await self._send(endpoint, params, what, accept_encoding="identity")
            body = bodies.body_chunks(resp, what, self._floor, size=self.transfer.chunk_size)
            try:
                head = await _zip_head(resp, body, what)
            except BaseException:
                resp.close()
                raise
            return resp, body, head

        resp, body, head = await self.policy.call(open_zip, what=what)
        log.debug("client.stream_opened", series_uid=uid, source=self.source.name)
        stream = _ZipStream(resp, body, head, what)
        chunks = stream.chunks()
        try:
            yield chunks
        finally:
            await chunks.aclose()
            stream.finish()

    # ---- HTTP plumbing ---------------------------------------------------------------

    async def _query(
        self,
        endpoint: str,
        params: Mapping[str, str | None],
        what: str,
        convert: Callable[[records.Record, int], T],
    ) -> list[T]:
        """Each record of the answer converted as soon as it is parsed: the raw body and
        its dicts never exist all at once. One attempt has transfer.query_timeout."""

        async def fetch() -> list[T]:
            out: list[T] = []
            async with (
                self._answer_within_timeout(what),
                self._open(endpoint, params, what) as resp,
            ):
                async for record in self._records_in(resp, what):
                    out.append(convert(record, len(out)))
            return out

        return await self.policy.call(fetch, what=what)

    async def _batches(
        self,
        endpoint: str,
        params: Mapping[str, str | None],
        what: str,
        convert: Callable[[records.Record, int], T],
        each: Callable[[list[T]], Awaitable[None]],
        size: int,
    ) -> int:
        """As _query, but the records go to ``each`` ``size`` at a time as they are parsed.

        The time spent in ``each`` does not count towards transfer.query_timeout (it is the
        caller's work, not the archive's), and what ``each`` raises is raised as it is,
        never retried as if the archive had failed."""

        async def fetch() -> int:
            count = 0
            batch: list[T] = []
            loop = asyncio.get_running_loop()
            async with self._answer_within_timeout(what) as deadline:

                async def hand() -> None:
                    started, when = loop.time(), deadline.when()
                    deadline.reschedule(None)
                    try:
                        await each(batch)
                    except Exception as exc:
                        raise _CallerError(exc) from None
                    if when is not None:
                        deadline.reschedule(when + loop.time() - started)

                async with self._open(endpoint, params, what) as resp:
                    async for record in self._records_in(resp, what):
                        batch.append(convert(record, count))
                        count += 1
                        if len(batch) >= size:
                            await hand()
                            batch = []
                    if batch:
                        await hand()
            return count

        try:
            return await self.policy.call(fetch, what=what)
        except _CallerError as failed:
            raise failed.error from failed.error.__cause__

    @asynccontextmanager
    async def _answer_within_timeout(self, what: str) -> AsyncIterator[asyncio.Timeout]:
        """One attempt's deadline (transfer.query_timeout), missed as a RetryableError."""
        try:
            async with asyncio.timeout(self.transfer.query_timeout) as deadline:
                yield deadline
        except TimeoutError:
            raise RetryableError(
                f"{what}: no complete answer within transfer.query_timeout = "
                f"{self.transfer.query_timeout:g} s"
            ) from None

    async def _rows(
        self, endpoint: str, params: Mapping[str, str | None], what: str
    ) -> list[records.Record]:
        return await self._query(endpoint, params, what, lambda r, _i: r)

    @asynccontextmanager
    async def _open(
        self, endpoint: str, params: Mapping[str, str | None], what: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        resp = await self._send(endpoint, params, what)
        try:
            yield resp
        finally:
            resp.release()

    async def _send(
        self,
        endpoint: str,
        params: Mapping[str, str | None],
        what: str,
        *,
        accept_encoding: str = bodies.QUERY_ACCEPT_ENCODING,
    ) -> aiohttp.ClientResponse:
        """GET with the bearer token; a 401 renews the token once and replays.

        Returns a response with a 2xx status, which the caller must release.
        """
        http = self._require_session()
        url = self._api_root + endpoint
        query = {k: v for k, v in params.items() if v is not None}
        replayed = False
        while True:
            headers: dict[str, str] = {"Accept-Encoding": accept_encoding}
            token: str | None = None
            if self._auth is not None:
                token = await self._auth.token()
                headers["Authorization"] = f"Bearer {token}"
            try:
                # Never aiohttp's inflation: it inflates a whole chunk at once, unbounded.
                resp = await http.get(url, params=query, headers=headers, auto_decompress=False)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise error_for_exception(exc, what) from exc
            if 200 <= resp.status < 300:
                return resp
            snippet = await _snippet(resp)
            resp.release()
            if resp.status == 401 and self._auth is not None and token is not None:
                if not replayed:
                    replayed = True
                    await self._auth.rejected(token)
                    continue
                # A token issued a moment ago was refused: a revocation race or a server
                # hiccup. Worth another try; the policy bounds how many.
                raise RetryableError(f"{what}: HTTP 401 for a freshly issued token")
            raise error_for_status(resp.status, resp.headers, what, snippet)

    def _records_in(self, resp: aiohttp.ClientResponse, what: str) -> AsyncIterator[records.Record]:
        """A query answer's JSON records as they are parsed, within transfer.max_query_bytes."""
        chunks = bodies.body_chunks(
            resp,
            what,
            self._floor,
            max_bytes=self.transfer.max_query_bytes,
            limit_name="transfer.max_query_bytes",
        )
        return bodies.json_records(chunks, what)

    def _require_session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("NbiaClient is not open: use 'async with NbiaClient(...)'")
        return self._http


class _ZipStream:
    """Iterates a ZIP response; maps every mid-stream failure to RetryableError."""

    def __init__(
        self, resp: aiohttp.ClientResponse, body: AsyncIterator[bytes], head: bytes, what: str
    ) -> None:
        self._resp = resp
        self._body = body
        self._head = head
        self._what = what
        self._received = 0
        self._complete = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        self._received = len(self._head)
        yield self._head
        try:
            async for chunk in self._body:
                self._received += len(chunk)
                yield chunk
        except RetryableError as exc:
            cause = exc.__cause__
            reason = "stalled" if isinstance(cause, TimeoutError) else "cut"
            raise RetryableError(
                f"{self._what}: the stream broke after {self._received} bytes ({reason}: {exc})"
            ) from exc
        self._complete = True

    def finish(self) -> None:
        # A fully read response returns its connection to the pool; an abandoned one
        # must be closed, or the pool would have to drain gigabytes first.
        if self._complete:
            self._resp.release()
        else:
            self._resp.close()


async def _zip_head(resp: aiohttp.ClientResponse, body: AsyncIterator[bytes], what: str) -> bytes:
    """The first bytes of the body, checked to be a ZIP (servers send errors with 200)."""
    _refuse_error_page(resp, what)
    head = b""
    async for chunk in body:
        head += chunk
        if len(head) >= len(ZIP_MAGIC):
            break
    if not head.startswith(ZIP_MAGIC):
        shown = _printable(head[:_SNIPPET]) if head else "an empty body"
        raise RetryableError(f"{what}: expected a ZIP archive, got {shown}")
    return head


def _refuse_error_page(resp: aiohttp.ClientResponse, what: str) -> None:
    content_type = resp.headers.get("Content-Type", "").lower()
    if content_type.startswith(_NOT_ZIP_TYPES):
        raise RetryableError(
            f"{what}: expected data, the archive sent {content_type.split(';')[0]} instead"
        )


async def _snippet(resp: aiohttp.ClientResponse) -> str:
    """The start of an error body for the message (e.g. 'Invalid query parameter').

    Redacted before it is cut short, so no secret survives as a fragment."""
    try:
        raw = await resp.content.read(4096)
        inflater = bodies.Inflater(resp.headers.get("Content-Encoding", ""), "error body")
        body = next(iter(inflater.feed(raw, 4096)), b"")
    except (aiohttp.ClientError, TimeoutError, OSError, RetryableError):
        return ""
    return _printable(body, redact=True)[:_SNIPPET]


def _printable(data: bytes, *, redact: bool = False) -> str:
    text = data.decode("utf-8", errors="replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return redact_text(text) if redact else text


def _describe(endpoint: str, params: Mapping[str, str | None]) -> str:
    shown = " ".join(f"{k}={v}" for k, v in params.items() if v is not None)
    return f"{endpoint} {shown}" if shown else endpoint
