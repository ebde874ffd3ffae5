"""Engines and transactions for the catalog, the same code on SQLite and PostgreSQL.

SQLite rules (see docs/architecture.md): WAL so readers never block the writer,
busy_timeout so a writer in another process is waited for, and write transactions
opened with BEGIN IMMEDIATE — a deferred BEGIN that reads then writes fails with
SQLITE_BUSY at once instead of waiting. The sqlite3 driver's own BEGIN is disabled
(SQLAlchemy's documented recipe for pysqlite/aiosqlite) so that ours is the only one.
Within one process, writes are funnelled through one asyncio lock, so concurrent tasks
queue on the lock rather than on the file lock.

The queue's hot transactions (claims, placements) are plain functions of a sync
`Connection` (`Database.transaction`). On a SQLite file they run in a worker thread on a
twin engine with the stdlib driver: one thread hop per step of a transaction, where the
async driver takes three or four per statement (cursor, execute, fetch, close) plus the
BEGIN and the COMMIT; for a transaction of a few small statements that is ~4x less CPU
(bench/README.md), and it is what sets the pace of small series. On PostgreSQL (and an
in-memory SQLite, which a second engine could not share) the same functions run on the
async connection through `AsyncConnection.run_sync`.

PostgreSQL: plain READ COMMITTED transactions; row locks and SKIP LOCKED do the rest,
and serialization failures / deadlocks are retried.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio
import anyio.to_thread
import structlog
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from nbia_sync.api.retry import RetryPolicy
from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.errors import CatalogError

log = structlog.get_logger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

# Execution option marking a connection whose next BEGIN must take the write lock.
_WRITE_OPTION = "nbia_sync_write"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# PostgreSQL: serialization_failure, deadlock_detected, lock_not_available.
_PG_TRANSIENT = frozenset({"40001", "40P01", "55P03"})
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "database table is locked")
RETRY_ATTEMPTS = 8
# The one backoff (full jitter, so colliding writers in several processes spread out).
_BACKOFF = RetryPolicy(base_delay=0.02, max_delay=2.0, attempts=RETRY_ATTEMPTS)


def describe_url(url: URL) -> str:
    """Where the catalog is, for messages: never the password."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database or ':memory:'}"
    host = url.host or "localhost"
    port = url.port or 5432
    return f"{url.get_backend_name()} database {url.database or ''!r} at {host}:{port}"


def is_transient(exc: BaseException) -> bool:
    """A failure that the same transaction, run again, can get past."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in _PG_TRANSIENT:
        return True
    message = str(orig).lower()
    return any(text in message for text in _SQLITE_TRANSIENT)


def _configure_sqlite(engine: Engine, *, always_write: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Disable the driver's implicit BEGIN: we emit our own in _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: durable against process crashes; a power loss may drop the
            # last commits, which only means re-fetching a series. Avoids an fsync per commit.
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = always_write or conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _sqlite_twin(engine: AsyncEngine) -> Engine | None:
    """The same SQLite file through the stdlib driver, for `Database.transaction`; None
    for an in-memory database (a second engine would open a different one)."""
    url = engine.url
    if not url.database or url.database == ":memory:" or "mode=memory" in str(url):
        return None
    # One connection, used by one thread at a time (the write lock), not always the same one.
    twin = create_sync_engine(
        url.set(drivername="sqlite"),
        connect_args={"check_same_thread": False},
        pool_size=1,
        max_overflow=0,
    )
    _configure_sqlite(twin, always_write=True)
    return twin


def create_engine(url: str) -> AsyncEngine:
    """An engine for a catalog URL; creates a SQLite file's parent directory."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CatalogError(
            "invalid catalog URL (expected sqlite+aiosqlite:// or postgresql+asyncpg://)"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.get_driver_name() != "aiosqlite":
            raise CatalogError("SQLite catalogs need the async driver: sqlite+aiosqlite:///PATH")
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed)
        _configure_sqlite(engine.sync_engine)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "asyncpg":
            raise CatalogError("PostgreSQL catalogs need the async driver: postgresql+asyncpg://")
        # pre_ping: a fleet's long-lived pools survive server restarts.
        return create_async_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)
    raise CatalogError(f"unsupported catalog database {backend!r}: use SQLite or PostgreSQL")


class Database:
    """One engine plus the transaction discipline every catalog operation goes through."""

    def __init__(self, engine: AsyncEngine, clock: Clock = SYSTEM_CLOCK) -> None:
        self.engine = engine
        # Every timestamp the catalog writes or compares (leases, locks, heartbeats).
        self.clock = clock
        self.url = engine.url
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._twin = _sqlite_twin(engine) if self.is_sqlite else None
        # Source id -> name, as read by claims: a source row is never renamed or deleted
        # (sources are found by name; see catalog.sources.ensure_source), so this never goes stale.
        self.source_names: dict[int, str] = {}

    @classmethod
    async def connect(cls, url: str, clock: Clock = SYSTEM_CLOCK) -> Database:
        """Create the engine and prove the database answers (CatalogError if not)."""
        engine = create_engine(url)
        db = cls(engine, clock)
        try:
            for attempt in range(RETRY_ATTEMPTS):
                try:
                    async with engine.connect() as conn:
                        await conn.exec_driver_sql("SELECT 1")
                    break
                except DBAPIError as exc:
                    # A new SQLite file switched to WAL by several openers at once: the
                    # losers see "database is locked" without the busy handler.
                    if not is_transient(exc) or attempt == RETRY_ATTEMPTS - 1:
                        raise
                    await clock.sleep(_BACKOFF.delay(attempt))
        except (OSError, DBAPIError, TimeoutError) as exc:
            await engine.dispose()
            raise CatalogError(
                f"cannot open the catalog ({describe_url(engine.url)}): {_reason(exc, engine.url)}"
            ) from None
        return db

    async def dispose(self) -> None:
        if self._twin is not None:
            self._twin.dispose()
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction, committed when the block ends without an exception."""
        lock = self._write_lock or contextlib.nullcontext()
        async with lock, self.engine.connect() as conn:
            conn = await conn.execution_options(**{_WRITE_OPTION: True})
            async with conn.begin():
                yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One write transaction whose steps are sync functions of a `Connection` (see the
        module doc): committed when the block ends without an exception, else rolled back.
        Not retried: see `run_write_sync`."""
        if self._twin is None:
            async with self.write() as conn:
                yield _AsyncTransaction(conn)
            return
        assert self._write_lock is not None
        async with self._write_lock:
            txn = _ThreadTransaction(self._twin)
            try:
                yield txn
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await txn.end(commit=False)
                raise
            with anyio.CancelScope(shield=True):  # a commit cut half way is not ours to leave
                await txn.end(commit=True)

    async def run_write_sync(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run_write` for a sync function: one step, committed in the same thread hop,
        run again from the start after a transient failure."""

        async def once() -> T:
            async with self.transaction() as txn:
                return await txn.last(fn, *args, **kwargs)

        return await self._retrying(once)

    async def run_write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run fn in a write transaction, again from the start after a transient failure.

        fn must do database work only (no network I/O to the archive): it may run twice.
        """
        return await self._retrying(lambda: _in(self.write, fn))

    async def run_read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        return await self._retrying(lambda: _in(self.read, fn))

    async def _retrying(self, once: Callable[[], Awaitable[T]]) -> T:
        """``once()`` (one whole transaction), again after a transient failure."""
        for attempt in range(RETRY_ATTEMPTS):
            try:
                return await once()
            except DBAPIError as exc:
                if not is_transient(exc) or attempt == RETRY_ATTEMPTS - 1:
                    raise self.error(exc) from exc
                log.debug("catalog.retry", attempt=attempt + 1, error=type(exc.orig).__name__)
                await self.clock.sleep(_BACKOFF.delay(attempt))
        raise AssertionError("unreachable")

    def error(self, exc: DBAPIError) -> CatalogError:
        """``exc`` as the CatalogError callers handle: where the catalog is, and why."""
        return CatalogError(f"catalog error ({describe_url(self.url)}): {_reason(exc, self.url)}")

    @contextlib.asynccontextmanager
    async def catalog_errors(self) -> AsyncIterator[None]:
        """Raise a database error of the block as a CatalogError (for transactions that
        are not run through run_write/run_read, such as the placements)."""
        try:
            yield
        except DBAPIError as exc:
            raise self.error(exc) from exc


async def _in(
    transaction: Callable[[], AbstractAsyncContextManager[AsyncConnection]],
    fn: Callable[[AsyncConnection], Awaitable[T]],
) -> T:
    async with transaction() as conn:
        return await fn(conn)


class Transaction(abc.ABC):
    """A write transaction of `Database.transaction`: ``await txn.step(fn, ...)`` runs
    ``fn(connection, ...)`` inside it; ``await txn.last(fn, ...)`` runs the last step and
    commits with it (one thread hop less). Steps run one at a time, in order."""

    @abc.abstractmethod
    async def step(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    async def last(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self.step(fn, *args, **kwargs)


class _AsyncTransaction(Transaction):
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def step(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self._conn.run_sync(fn, *args, **kwargs)


class _ThreadTransaction(Transaction):
    """Steps in a worker thread on the SQLite twin; BEGIN IMMEDIATE with the first step,
    COMMIT with the last (`_configure_sqlite(always_write=True)`)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None
        self._done = False

    def _begun(self) -> Connection:
        if self._done:
            raise CatalogError("step after the end of a catalog transaction")
        if self._conn is None:
            self._conn = self._engine.connect()
            self._conn.begin()
        return self._conn

    def _end(self, commit: bool) -> None:
        conn, self._conn, self._done = self._conn, None, True
        if conn is None:
            return
        try:
            if commit:
                conn.commit()
            else:
                conn.rollback()
        finally:
            conn.close()

    async def step(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        def run() -> T:
            return fn(self._begun(), *args, **kwargs)

        return await anyio.to_thread.run_sync(run)

    async def last(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        def run() -> T:
            try:
                result = fn(self._begun(), *args, **kwargs)
            except BaseException:
                self._end(commit=False)
                raise
            self._end(commit=True)
            return result

        return await anyio.to_thread.run_sync(run)

    async def end(self, *, commit: bool) -> None:
        if self._conn is not None:
            await anyio.to_thread.run_sync(self._end, commit)
        self._done = True


def _reason(exc: BaseException, url: URL) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = f"{type(cause).__name__}: {cause}".splitlines()[0]
    # Drivers do not echo passwords, but be certain: the message may reach a log.
    if url.password:
        text = text.replace(str(url.password), "***")
    return text[:300]
