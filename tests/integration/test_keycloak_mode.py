"""The real server's Keycloak behaviour, and what nbia-sync does about each trap.

Against the simulator's Keycloak mode (its default) and against small hostile servers
written here, so the guarantees are not only checked against our own simulator.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from cli_fixtures import FAST_TRANSFER, expected_files, mirror_files
from served_apps import serving

from nbia_sync.api.auth import GRANT_TOTALS
from nbia_sync.api.client import NbiaClient
from nbia_sync.api.retry import RetryPolicy
from nbia_sync.catalog import Catalog, SeriesState
from nbia_sync.config import ScheduleSettings, SourceSettings, TransferSettings, settings_from_dict
from nbia_sync.discovery import add_manifest, discover
from nbia_sync.engine import run_pass
from nbia_sync.errors import RetryableError
from nbia_sync.metrics import Metrics
from nbia_sync.outcome import Outcome
from nbia_sync.progress import NullProgress
from nbia_sync.sim import SimArchive, SimServer
from nbia_sync.sim.testing import guest_token
from nbia_sync.witness import TokenDoubted, Watched

pytestmark = pytest.mark.asyncio

INCREMENTS = ScheduleSettings(overlap_days=2, full_listing_days=0)


def _source(url: str, api: str = "v2", **kw: Any) -> SourceSettings:
    return SourceSettings(name="sim", url=url, api=api, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def _client(url: str, api: str = "v2", **kw: Any) -> AsyncIterator[NbiaClient]:
    policy = RetryPolicy(0.01, 0.05, 3)
    async with NbiaClient(_source(url, api, **kw), TransferSettings(), policy=policy) as c:
        yield c


async def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.request(method, url, headers=headers) as r:
        return r.status, await r.read()


# ---- the simulator models the server ------------------------------------------------------


async def test_dead_token_query_is_an_empty_200_and_download_a_bare_401(sim: SimServer) -> None:
    uid = next(iter(sim.archive.series))
    v2 = sim.url + "services/v2/"
    assert await _get(v2 + "getSeries?Collection=SIM-CT", "dead") == (200, b"")
    assert await _get(v2 + f"getImageWithMD5Hash?SeriesInstanceUID={uid}", "dead") == (401, b"")
    assert sim.counters.dead_token_queries == 1


async def test_logout_is_post_only(sim: SimServer) -> None:
    async with aiohttp.ClientSession() as http:
        token = await guest_token(http, sim.url)
    assert (await _get(sim.url + "logout", token))[0] == 405
    assert (await _get(sim.url + "logout", token, "POST"))[0] == 200
    assert sim.counters.logouts == 1


async def test_refresh_needs_the_lower_case_client_id(sim: SimServer) -> None:
    async with aiohttp.ClientSession() as http:
        form = {"username": "nbia_guest", "password": "", "client_id": "NBIA"}
        async with http.post(sim.url + "oauth/token", data=form | {"grant_type": "password"}) as r:
            refresh = (await r.json())["refresh_token"]
        answers = []
        for client_id in ("NBIA", "nbia"):
            data = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": client_id}
            async with http.post(sim.url + "oauth/token", data=data) as r:
                answers.append((r.status, (await r.json()).get("error")))
    assert answers == [(401, "invalid_client"), (200, None)]
    assert sim.counters.grants_refused["refresh_token"] == 1


async def test_v1_is_served_as_the_guest_whatever_the_token() -> None:
    archive = SimArchive.generate(collections=("OPEN", "CLOSED"))
    async with SimServer(archive, users={"nbia_guest": "", "alice": "pw"}) as sim:
        sim.restricted = {"CLOSED": frozenset({"alice"})}
        async with aiohttp.ClientSession() as http:
            alice = await guest_token(http, sim.url, "alice", "pw")
        for token in (None, "made-up", alice):
            status, body = await _get(sim.url + "services/v1/getCollectionValues", token)
            assert (status, json.loads(body)) == (200, [{"Collection": "OPEN"}])


async def test_revoke_tokens_after_lets_that_many_checks_pass(sim: SimServer) -> None:
    async with aiohttp.ClientSession() as http:
        token = await guest_token(http, sim.url)
        sim.revoke_tokens_after(2)
        seen = [await _get(sim.url + "services/v2/getCollectionValues", token) for _ in range(3)]
        fresh = await guest_token(http, sim.url)
    assert [bool(body) for _, body in seen] == [True, True, False]
    assert (await _get(sim.url + "services/v2/getCollectionValues", fresh))[1]


async def test_portal_manifest_names_the_download_servlet(sim: SimServer) -> None:
    text = sim.portal_manifest(["1.2.3"])
    assert text.startswith(
        f"downloadServerUrl=http://127.0.0.1:{sim.port}/nbia-download/servlet/DownloadServlet\n"
    )
    assert text.endswith("ListOfSeriesToDownload=\n1.2.3\n")


# ---- the client speaks to it --------------------------------------------------------------


async def test_every_run_ends_with_a_successful_post_logout(
    sim: SimServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with _client(sim.url) as client:
        assert await client.collections()
    assert sim.counters.logouts == 1
    assert sim.counters.statuses[405] == 0
    assert "logout_failed" not in capsys.readouterr().out


async def test_logout_falls_back_to_get_when_post_is_405(sim: SimServer) -> None:
    sim.keycloak = False  # the older Spring deployments took GET
    async with _client(sim.url) as client:
        assert await client.collections()
    assert (sim.counters.logouts, sim.counters.statuses[405]) == (1, 1)


async def test_refreshes_succeed_with_the_refresh_grant(sim: SimServer) -> None:
    sim.faults.token_ttl = 1.0  # renewed ahead once less than half of it is left
    before = GRANT_TOTALS[("sim", "refresh_token", "granted")]
    async with _client(sim.url, refresh_margin=0.5) as client:
        assert await client.collections()
        await anyio.sleep(0.6)
        assert await client.collections()
        assert client.auth is not None
        assert client.auth.grants == Counter(password=1, refresh_token=1)
    assert sim.counters.grants == Counter(password=1, refresh_token=1)
    assert sim.counters.grants_refused["refresh_token"] == 0
    assert GRANT_TOTALS[("sim", "refresh_token", "granted")] == before + 1
    exposed = Metrics().render().decode()
    assert 'nbia_sync_token_grants_total{grant="refresh_token",outcome="granted",source="sim"}' in (
        exposed
    )


async def test_a_refused_refresh_falls_back_to_a_password_login_and_is_counted(
    sim: SimServer,
) -> None:
    sim.keycloak = False  # a Spring server knows no "nbia" client
    sim.faults.token_ttl = 1.0
    refused = GRANT_TOTALS[("sim", "refresh_token", "refused")]
    async with _client(sim.url, refresh_margin=0.5) as client:
        assert await client.collections()
        await anyio.sleep(0.6)
        assert await client.collections()
    assert sim.counters.grants == Counter(password=2)
    assert GRANT_TOTALS[("sim", "refresh_token", "refused")] == refused + 1


async def test_download_with_a_revoked_token_renews_on_its_401(sim: SimServer) -> None:
    uid = next(iter(sim.archive.series))
    async with _client(sim.url) as client:
        assert await client.collections()
        sim.revoke_all_tokens()
        async with client.stream_series(uid) as chunks:
            body = b"".join([chunk async for chunk in chunks])
    assert body.startswith(b"PK") and sim.counters.downloads_completed[uid] == 1
    assert sim.counters.requests["getImageWithMD5Hash"] == 2  # the 401, then the replay
    assert sim.counters.grants["password"] == 2  # the refresh died with the session


@pytest.mark.parametrize("api", ["v1", "v4"])
async def test_v1_and_v4_sources_never_log_in(sim: SimServer, api: str) -> None:
    async with _client(sim.url, api) as client:
        assert client.auth is None
        assert await client.collections() == ["SIM-CT", "SIM-MR"]
    assert sim.counters.requests["oauth/token"] == 0
    assert sim.counters.requests["logout"] == 0


# ---- discovery never trusts a dead token's empty answer -------------------------------------


async def test_increment_with_a_token_revoked_mid_pass_still_finds_new_series(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive
) -> None:
    source = _source(sim.url)
    sid = await catalog.sources.ensure_source(source)
    async with _client(sim.url) as client:
        await discover(catalog, client, source, sid, INCREMENTS)
    fresh = sim_archive.add_patient("SIM-CT")
    sim.revoke_tokens_after(1)  # getCollectionValues works, everything after is empty
    async with _client(sim.url) as client:
        report = await discover(catalog, client, source, sid, INCREMENTS)
    assert report.new == len(fresh)
    assert sim.counters.dead_token_queries > 0
    assert sim.counters.grants["password"] == 3  # first pass, second pass, relogin
    newest = max(s.date_released for s in fresh)
    watermark = await catalog.sources.get_watermark(sid)
    assert watermark is not None and watermark.replace(tzinfo=None) == newest.replace(
        tzinfo=None, microsecond=0
    )


async def test_manifest_lookup_with_a_dead_token_does_not_call_series_unknown(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive
) -> None:
    source = _source(sim.url)
    sid = await catalog.sources.ensure_source(source)
    uids = sorted(sim_archive.series)[:3]
    async with _client(sim.url) as client:
        assert await client.collections()
        sim.revoke_all_tokens()
        report = await add_manifest(catalog, client, sid, uids)
    assert (report.new, report.unknown) == (3, ())


class EmptyAfter:
    """A hostile v2 server: real-shaped answers for `budget` queries, then 200 with an
    empty body to every query whatever the token, fresh logins included."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.grants: Counter[str] = Counter()
        self.queries = 0
        self.released = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/nbia-api/oauth/token", self.token)
        app.router.add_post("/nbia-api/logout", self.logout)
        app.router.add_get("/nbia-api/services/v2/{endpoint}", self.query)
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.grants[str(form["grant_type"])] += 1
        n = sum(self.grants.values())
        return web.json_response(
            {"access_token": f"a{n}", "expires_in": 7200, "refresh_token": f"r{n}"}
        )

    async def logout(self, request: web.Request) -> web.Response:
        return web.Response(text="You Have Logged Out successfully.")

    async def query(self, request: web.Request) -> web.Response:
        self.queries += 1
        if self.queries > self.budget:
            return web.Response(status=200, body=b"", content_type="application/json")
        endpoint = request.match_info["endpoint"]
        rows: list[dict[str, Any]] = []
        if endpoint == "getCollectionValues":
            rows = [{"Collection": "H"}]
        elif endpoint in ("getSeries", "getUpdatedSeries"):
            rows = [
                {
                    "SeriesInstanceUID": f"1.2.{i}",
                    "StudyInstanceUID": "1.2",
                    "Collection": "H",
                    "PatientID": "P",
                    "ImageCount": 1,
                    "DateReleased": self.released.strftime("%Y-%m-%d %H:%M:%S.0"),
                }
                for i in (1, 2)
            ]
        return web.Response(text=json.dumps(rows) if rows else "", content_type="application/json")


@pytest.mark.parametrize("schedule", [INCREMENTS, ScheduleSettings(full_listing_days=1e-9)])
async def test_discovery_fails_and_changes_nothing_when_even_a_fresh_login_gets_nothing(
    catalog: Catalog, schedule: ScheduleSettings
) -> None:
    hostile = EmptyAfter(budget=2)  # the first pass: getCollectionValues, getSeries
    async with serving(hostile.app()) as url:
        source = _source(url)
        sid = await catalog.sources.ensure_source(source)
        async with _client(url) as client:
            first = await discover(catalog, client, source, sid, schedule)
        watermark = await catalog.sources.get_watermark(sid)
        listed_at = await catalog.sources.last_full_listing_at(sid)
        assert first.new == 2 and watermark == hostile.released
        hostile.grants.clear()
        async with _client(url) as client:
            with pytest.raises(
                RetryableError,
                match=r"freshly issued token \(getCollectionValues came back empty too",
            ):
                await discover(catalog, client, source, sid, schedule)
    assert hostile.grants == Counter(password=2)  # the pass's login, then a fresh one
    assert await catalog.sources.get_watermark(sid) == watermark
    assert await catalog.sources.last_full_listing_at(sid) == listed_at
    counts = await catalog.state_counts()
    assert counts[SeriesState.WANTED][0] == 2
    assert await catalog.sources.known_collections(sid) == ["H"]


async def test_truly_empty_answers_under_a_live_token_are_trusted(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive
) -> None:
    source = _source(sim.url)
    sid = await catalog.sources.ensure_source(source)
    async with _client(sim.url) as client:
        await discover(catalog, client, source, sid, INCREMENTS)
        await catalog.sources.set_watermark(sid, datetime.now(UTC) - timedelta(days=1))
        report = await discover(catalog, client, source, sid, INCREMENTS)
    assert report.queued == 0
    assert sim.counters.grants["password"] == 1  # no doubt, no relogin
    assert sim.counters.dead_token_queries == 0


# ---- two daemon passes with revocation between them ----------------------------------------


async def test_passes_survive_server_side_revocation_with_no_change_missed(
    catalog: Catalog, sim: SimServer, sim_archive: SimArchive, tmp_path: Path
) -> None:
    settings = settings_from_dict(
        {
            "mirror": {"root": str(tmp_path / "m"), "min_free_bytes": 0},
            "transfer": FAST_TRANSFER,
            "schedule": {"full_listing_days": 0},
            "sources": [{"name": "sim", "url": sim.url, "api": "v2"}],
        },
        env={},
    )
    first = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert first.outcome == Outcome.OK
    sim_archive.add_patient("SIM-MR")
    sim_archive.update_series(sorted(sim_archive.series)[0])
    sim.revoke_all_tokens()  # between the passes: Keycloak restarted, an admin's action
    sim.revoke_tokens_after(1)  # and again once the next pass has made its first query
    second = await run_pass(settings, catalog, progress=NullProgress(), stop=anyio.Event())
    assert second.outcome == Outcome.OK
    assert second.discovered == 3  # two new series, one changed
    assert sim.counters.dead_token_queries > 0
    expected = expected_files(sim_archive, settings.mirror.root)
    assert mirror_files(settings.mirror.root) == set(expected)
    assert sim.counters.logouts == 2  # both passes ended with a successful logout


async def test_an_empty_answer_from_a_token_since_replaced_is_not_vouched_for(
    sim: SimServer,
) -> None:
    async with _client(sim.url) as client:
        watched = Watched(client)
        assert await watched.series(collection="NO-SUCH") == []
        await watched.confirm()  # same token, alive afterwards: trusted
        assert await watched.series(collection="NO-SUCH") == []
        assert client.auth is not None
        await client.auth.relogin()  # the token that answered is gone, unproven
        with pytest.raises(TokenDoubted, match="renewed"):
            await watched.confirm()
