"""SimServer: an aiohttp server speaking the NBIA REST API over loopback.

Routes, under `<url>` = `http://host:port/nbia-api/`:
  POST oauth/token                    password / refresh_token grants
  POST logout                         ends the bearer token's session (GET: 405)
  GET  services/{v1,v2,v4}/<Endpoint>  queries and downloads (v2 needs a bearer token)

Two auth flavours (`keycloak=`):
  * Keycloak (default), as TCIA's server runs today: a dead or missing token on a v2
    query answers 200 with an empty body (the server swallows its own 401 and goes on
    with no collections), a download answers 401 with an empty body; logout is POST only;
    the password grant's client_id is rewritten by the server, the refresh grant's is
    passed to Keycloak, whose client is `nbia` (lower case), so `NBIA` is refused.
  * Spring (older deployments): 401 `invalid_token` on every v2 request with a dead
    token, logout by GET, client ids `NBIA` / `nbiaRestAPIClient` (+ secret) for both.
v1 is served as the guest whatever the token, in both.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import ssl
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from types import TracebackType

import structlog
from aiohttp import web

from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.sim.archive import SimArchive, SimSeries
from nbia_sync.sim.counters import SimCounters
from nbia_sync.sim.downloads import Pipe, SeriesZip, StreamCut, zip_date_time
from nbia_sync.sim.faults import SimFaults, SimReply, StreamFault
from nbia_sync.sim.hostile import gzip_padded, trickle
from nbia_sync.sim.queries import DOWNLOADS, SPECS, BadRequest, Row, check_params, run_query
from nbia_sync.sim.tokens import Grant, TokenStore
from nbia_sync.sim.zipstream import Compression, ZipStreamWriter

log = structlog.get_logger(__name__)

ROOT = "/nbia-api/"
DEFAULT_USERS: Mapping[str, str] = {"nbia_guest": ""}
_CLIENT_IDS = ("NBIA", "nbiaRestAPIClient")
KEYCLOAK_CLIENT_ID = "nbia"
_ERROR_PAGE = (
    "<html><head><title>Error</title></head><body>"
    "<h1>HTTP Status {status} - Internal Server Error</h1></body></html>"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, error: str, description: str) -> web.Response:
    body = json.dumps({"error": error, "error_description": description})
    return web.Response(status=status, text=body, content_type="application/json")


@dataclass(frozen=True)
class SimRequest:
    method: str
    endpoint: str  # as counted: "getSeries", "oauth/token", "logout"
    query: dict[str, str]
    headers: dict[str, str]
    form: dict[str, str]


async def _recorded(request: web.Request, name: str) -> SimRequest:
    form = {k: str(v) for k, v in (await request.post()).items()}  # cached for the handler
    return SimRequest(request.method, name, dict(request.query), dict(request.headers), form)


async def _scripted_response(reply: SimReply) -> web.Response:
    if reply.delay:
        await asyncio.sleep(reply.delay)
    body = reply.body.encode() if isinstance(reply.body, str) else reply.body
    return web.Response(
        status=reply.status,
        body=body,
        headers={"Content-Type": reply.content_type, **reply.headers},
    )


def _seconds(value: float) -> int | float:
    """Lifetimes as the JSON the archive sends (integers) unless a test asked for less."""
    return int(value) if float(value).is_integer() else value


def _render(rows: list[Row], fmt: str) -> web.Response:
    if not rows:
        # The archive sends an empty body, not "[]", when nothing matches.
        return web.Response(status=200, body=b"", content_type="application/json")
    if fmt == "csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return web.Response(text=out.getvalue(), content_type="text/csv")
    return web.Response(text=json.dumps(rows), content_type="application/json")


class SimServer:
    """`async with SimServer(archive) as sim:` serves until the block ends.

    users: username -> password allowed to log in (default: nbia_guest with no password).
    restricted: collection -> usernames who may read it; everyone else gets 400.
    compression: "stored" (sizes and CRC in local headers) or "deflate" (data descriptors).
    keycloak: the real server's auth behaviour (default); False: the older Spring one.
    tls: serve HTTPS with this server context (tests of certificate checking).
    """

    def __init__(
        self,
        archive: SimArchive,
        faults: SimFaults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        users: Mapping[str, str] | None = None,
        restricted: Mapping[str, Collection[str]] | None = None,
        compression: Compression = "stored",
        keycloak: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.archive = archive
        self.tls = tls
        self.keycloak = keycloak
        self.faults = faults or SimFaults()
        self.counters = SimCounters()
        self.host = host
        self.port = port
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.restricted = {k: frozenset(v) for k, v in (restricted or {}).items()}
        self.compression: Compression = compression
        self._tokens = TokenStore(clock)  # token lifetimes run on this clock
        # Set to a list to record every request (tests: what exactly the client sent).
        self.recorded: list[SimRequest] | None = None
        self._runner: web.AppRunner | None = None

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("SimServer is not running")
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}{ROOT}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post(ROOT + "oauth/token", self._token)
        app.router.add_route("*", ROOT + "logout", self._logout)
        app.router.add_get(ROOT + "services/{version}/{endpoint}", self._service)
        # handler_cancellation: a client that hangs up ends its stream's handler at once.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.tls)
        await site.start()
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        log.info("sim.started", url=self.url, series=len(self.archive.series))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def revoke_all_tokens(self) -> None:
        """Every access and refresh token dies now (a server restart, an admin action)."""
        self._tokens.revoke_all()

    def revoke_tokens_after(self, checks: int) -> None:
        """Let ``checks`` more token checks pass, then revoke every token (mid-run)."""
        self._tokens.revoke_after(checks)

    def portal_manifest(self, series_uids: list[str]) -> str:
        """A `.tcia` manifest as the TCIA portal writes it: it names this server's
        download servlet, not its API root."""
        lines = [
            f"downloadServerUrl=http://{self.host}:{self.port}"
            "/nbia-download/servlet/DownloadServlet",
            "includeAnnotation=true",
            "noOfrRetry=4",
            "databasketId=manifest-1700000000000.tcia",
            "manifestVersion=3.0",
            "ListOfSeriesToDownload=",
            *series_uids,
        ]
        return "\n".join(lines) + "\n"

    # ---- plumbing --------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        name = request.match_info.get("endpoint") or request.path.removeprefix(ROOT)
        self.counters.requests[name] += 1
        if self.recorded is not None:
            self.recorded.append(await _recorded(request, name))
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        response: web.StreamResponse
        scripted = self.faults.scripted_reply(name)
        # Downloads roll their own faults after the token check (see _download).
        rolled = None if name in DOWNLOADS or scripted else self.faults.roll_request()
        if scripted is not None:
            response = await _scripted_response(scripted)
        elif rolled is not None:
            response = self._fault_response(rolled)
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                # Returning the exception itself is deprecated in aiohttp.
                response = web.Response(status=exc.status, text=exc.text, headers=exc.headers)
        self.counters.statuses[response.status] += 1
        if response.status == 401:
            self.counters.unauthorized += 1
        if self.faults.trickle and isinstance(response, web.Response):
            return await trickle(request, response, self.faults.trickle)
        return response

    def _fault_response(self, fault: StreamFault) -> web.Response:
        if fault == "429":
            retry_after = self.faults.retry_after_header or f"{self.faults.retry_after:g}"
            return web.Response(
                status=429, text="Too Many Requests", headers={"Retry-After": retry_after}
            )
        status = int(self.faults.choice(("500", "502", "503")))
        return web.Response(
            status=status, text=_ERROR_PAGE.format(status=status), content_type="text/html"
        )

    def _bearer_user(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._tokens.user_of(token.strip())

    def _visible(self, user: str | None) -> Callable[[str], bool]:
        def visible(collection: str) -> bool:
            allowed = self.restricted.get(collection)
            return allowed is None or (user is not None and user in allowed)

        return visible

    # ---- OAuth -----------------------------------------------------------------------

    def _grant_response(self, grant: Grant) -> web.Response:
        body = {
            "access_token": self.faults.token_override or grant.access_token,
            "token_type": "bearer",
            "expires_in": _seconds(grant.expires_in),
            "refresh_token": grant.refresh_token,
            "refresh_expires_in": _seconds(grant.refresh_expires_in),
            "not-before-policy": 0,
            "session_state": grant.session,
            "scope": "email profile",
        }
        return web.json_response(body)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        if self.faults.token_redirect is not None:
            raise web.HTTPTemporaryRedirect(self.faults.token_redirect)
        form = await request.post()
        fields = {k: str(v) for k, v in form.items()}
        grant_type = fields.get("grant_type")
        if not self._client_accepted(fields):
            if grant_type == "refresh_token":
                self.counters.grants_refused["refresh_token"] += 1
            return _json_error(401, "invalid_client", "Invalid client credentials")
        ttl, refresh_ttl = self.faults.token_ttl, self.faults.refresh_ttl
        if grant_type == "password":
            user = fields.get("username", "")
            if user not in self.users or self.users[user] != fields.get("password", ""):
                return _json_error(401, "invalid_grant", "Invalid user credentials")
            grant = self._tokens.issue(user, ttl, refresh_ttl)
        elif grant_type == "refresh_token":
            refreshed = self._tokens.refresh(fields.get("refresh_token", ""), ttl, refresh_ttl)
            if refreshed is None:
                return _json_error(401, "invalid_grant", "Invalid refresh token")
            grant = refreshed
        elif not grant_type:
            return _json_error(400, "invalid_request", "Missing form parameter: grant_type")
        else:
            return _json_error(400, "unsupported_grant_type", "Unsupported grant_type")
        self.counters.grants[grant_type] += 1
        return self._grant_response(grant)

    def _client_accepted(self, fields: Mapping[str, str]) -> bool:
        client = fields.get("client_id", "")
        if self.keycloak:
            # The server puts its own client id into the password grant; the refresh
            # form reaches Keycloak as sent.
            return fields.get("grant_type") == "password" or client == KEYCLOAK_CLIENT_ID
        return client in _CLIENT_IDS and (
            client != "nbiaRestAPIClient" or bool(fields.get("client_secret"))
        )

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        if request.method != ("POST" if self.keycloak else "GET"):
            raise web.HTTPMethodNotAllowed(request.method, ["POST" if self.keycloak else "GET"])
        _, _, token = request.headers.get("Authorization", "").partition(" ")
        if not self._tokens.logout(token.strip()):
            return _json_error(401, "invalid_token", "Token is not active")
        self.counters.logouts += 1
        return web.Response(text="You Have Logged Out successfully.")

    # ---- services --------------------------------------------------------------------

    async def _service(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        endpoint = request.match_info["endpoint"]
        if version not in SPECS or endpoint not in SPECS[version]:
            raise web.HTTPNotFound(text="Not Found")
        user: str | None = None
        if version == "v2":
            # Checked when the request starts only: a stream outlives its token.
            user = self._bearer_user(request)
            if user is None:
                return self._dead_token(endpoint)
        echo = self.faults.echo_token_endpoints
        if self.faults.echo_token_status is not None and (not echo or endpoint in echo):
            # A server whose error page quotes the credentials it was given.
            echoed = request.headers.get("Authorization", "").partition(" ")[2]
            return web.Response(
                status=self.faults.echo_token_status, text=f"access denied for token {echoed}"
            )
        if self.faults.echo_token_header:
            quoted = request.headers.get("Authorization", "")
            return web.Response(headers={"X-Echo": quoted + "." * 9000}, text="")
        params = dict(request.query)
        try:
            check_params(version, endpoint, params)
            if endpoint in DOWNLOADS:
                return await self._download(request, endpoint, params, user)
            rows = run_query(self.archive, version, endpoint, params, self._visible(user))
            rows = self.faults.listing(endpoint, params, rows)
        except BadRequest as exc:
            return web.Response(status=400, text=str(exc))
        fmt = params.get("format", "json").lower()
        if fmt not in ("json", "csv"):
            return web.Response(status=400, text=f"Unsupported format: {fmt}")
        if self.faults.gzip_bomb is not None:
            body = gzip_padded(b"[", self.faults.gzip_bomb, json.dumps(rows)[1:].encode())
            return web.Response(
                body=body,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        return _render(rows, fmt)

    def _dead_token(self, endpoint: str) -> web.Response:
        """What the server answers a v2 request made with a dead or missing token."""
        if not self.keycloak:
            return _json_error(401, "invalid_token", "Token is not active")
        if endpoint in DOWNLOADS:
            return web.Response(status=401, body=b"")
        # Indistinguishable from "no results": the trap this mode exists to model.
        self.counters.dead_token_queries += 1
        return _render([], "json")

    def _series_for(self, params: dict[str, str], user: str | None) -> SimSeries | None:
        series = self.archive.series.get(params["SeriesInstanceUID"])
        if series is not None and not self._visible(user)(series.collection):
            raise BadRequest("Access to this series is not authorized")
        return series

    async def _download(
        self, request: web.Request, endpoint: str, params: dict[str, str], user: str | None
    ) -> web.StreamResponse:
        series = self._series_for(params, user)
        if endpoint == "getSingleImage":
            return await self._single_image(request, series, params)
        fault: StreamFault = "ok"
        if series is not None:
            scripted = self.faults.scripted(series.uid)
            if scripted is not None:
                fault = scripted
            else:
                fault = self.faults.roll_request() or self.faults.roll_stream()
        if fault in ("5xx", "429"):
            return self._fault_response(fault)
        uid = params["SeriesInstanceUID"]
        self.counters.downloads_started[uid] += 1
        if fault == "html":
            # A server error page where the ZIP should be, with 200 OK.
            return web.Response(text=_ERROR_PAGE.format(status=500), content_type="text/html")
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{uid}.zip"',
            },
        )
        encode = self.faults.gzip_downloads and series is not None
        if encode:
            response.headers["Content-Encoding"] = "gzip"
        response.enable_chunked_encoding()
        await response.prepare(request)
        self.counters.stream_opened()
        try:
            if series is None:
                # Unknown series: an archive with nothing in it (and an empty hash list).
                empty = Pipe(response, self.counters, self.faults, None)
                writer = ZipStreamWriter(empty.write)
                if endpoint == "getImageWithMD5Hash":
                    await writer.write_bytes("md5hashes.csv", b"Filename,MD5Hash\n")
                await writer.finish()
                await empty.close()
                return response
            job = SeriesZip(series, endpoint, params, fault, self.compression, self.faults)
            pipe = Pipe(response, self.counters, self.faults, job.cut_at(), gzip=encode)
            writer = ZipStreamWriter(
                pipe.write, compression=self.compression, date_time=zip_date_time(series)
            )
            await job.write(writer)
            await pipe.close()
            await response.write_eof()
            if fault == "ok":
                self.counters.downloads_completed[uid] += 1
            log.debug("sim.download.sent", series=uid, fault=fault, bytes=pipe.sent)
        except StreamCut:
            if fault == "stall":
                await asyncio.sleep(self.faults.stall_seconds)
            log.debug("sim.download.cut", series=uid, fault=fault)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            log.debug("sim.download.client_gone", series=uid)
        finally:
            self.counters.stream_closed()
        return response

    async def _single_image(
        self, request: web.Request, series: SimSeries | None, params: dict[str, str]
    ) -> web.StreamResponse:
        instance = None if series is None else series.instance(params["SOPInstanceUID"])
        if instance is None:
            return web.Response(status=200, body=b"", content_type="application/dicom")
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "application/dicom",
                "Content-Disposition": f'attachment; filename="{instance.sop_uid}.dcm"',
            },
        )
        response.content_length = instance.size
        await response.prepare(request)
        pipe = Pipe(response, self.counters, self.faults, None)
        try:
            for chunk in instance.iter_bytes():
                await pipe.write(chunk)
            await pipe.close()
            await response.write_eof()
        except ConnectionError:
            log.debug("sim.single_image.client_gone", sop=instance.sop_uid)
        return response
