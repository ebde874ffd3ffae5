"""The mirror on disk: layout, safe path parts, staging, and atomic placement of a series.

Layout::

    <root>/<Collection>/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <root>/.nbia-sync/staging/<owner>/<SeriesInstanceUID>/   files being downloaded
    <root>/.nbia-sync/trash/                                 old copies being deleted

Staging lives under the root so that placing a series is a rename on one file system:
a file under the mirror tree is either absent or complete, never half-written.
Every blocking file-system call runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

import anyio
import structlog

from nbia_sync.clock import SYSTEM_CLOCK, Clock
from nbia_sync.errors import DiskSpaceError, MirrorRootError, SeriesTooLargeError
from nbia_sync.filesystems import is_local

log = structlog.get_logger(__name__)

STATE_DIR = ".nbia-sync"
# From this many touched directories on, one syncfs(2) replaces their fsyncs.
_SYNCFS_FROM = 3
_MAX_PART_BYTES = 255  # NAME_MAX on every common file system
# rename(2) onto a series directory that holds files (or a file where it should be).
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
# One statvfs (a thread hop) serves the space checks of this many seconds of claims: on
# many small series it was one hop per series. Other processes writing to the same disk
# in that window go unseen, as they would between any two readings.
SPACE_READ_INTERVAL = 0.5
# DICOM caps UIDs (and LO values such as PatientID) at 64 characters: anything longer in
# a path is hostile or broken, and five such parts could pass PATH_MAX. Hashed beyond.
MAX_PART_CHARS = 64
_HASHED_PREFIX_CHARS = 30  # + "%h" + 32 hex digits = at most 64 characters


def _escape(ch: str) -> str:
    if 0xD800 <= ord(ch) <= 0xDFFF:  # a lone surrogate has no UTF-8 form
        return f"%u{ord(ch):04X}"
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


# ASCII that safe_part leaves as it is: no '/', '\\', '%' or control character, no leading '.'.
_PLAIN_PART = re.compile(r"[^./\\%\x00-\x1f\x7f][^/\\%\x00-\x1f\x7f]*")


def safe_part(text: str) -> str:
    """Turn any string into one path component, deterministically and without collisions.

    Percent-escapes what a file system or a path join could misread ('/', '\\', NUL and
    other control characters, '%' itself, a leading '.'), so different inputs never share
    a directory; UIDs and ordinary names pass unchanged. Over MAX_PART_CHARS (64, DICOM's
    UID limit) or 255 bytes, a readable prefix plus a hash of the whole (the '%h' marker
    cannot come out of the escaping), at most 64 characters. Use it for every name that
    comes from the archive, SOP Instance UIDs from inside the files included.
    """
    if len(text) <= MAX_PART_CHARS and text.isascii() and _PLAIN_PART.fullmatch(text):
        return text  # the common case (a UID), without the per-character walk below
    if not text:
        return "%"  # cannot come out of escaping either: every '%' there is followed by hex
    out = []
    for i, ch in enumerate(text):
        code = ord(ch)
        if (
            ch in "/\\%"
            or code < 0x20
            or 0x7F <= code < 0xA0
            or 0xD800 <= code <= 0xDFFF
            or (i == 0 and ch == ".")
        ):
            out.append(_escape(ch))
        else:
            out.append(ch)
    part = "".join(out)
    if len(part) <= MAX_PART_CHARS and len(part.encode("utf-8")) <= _MAX_PART_BYTES:
        return part
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    prefix = part[:_HASHED_PREFIX_CHARS]
    # Do not cut an escape in half: '%4' + '%h…' would read as a different escape.
    cut = prefix.rfind("%")
    if cut >= len(prefix) - 2:
        prefix = prefix[:cut]
    return f"{prefix}%h{digest}"


def check_writable(root: Path) -> None:
    """For the commands that write: the root and its state directory exist (made when
    missing) and can be written, else MirrorRootError naming the path (exit 2)."""
    state = root / STATE_DIR
    directory = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        # No probe file in the mirror tree itself (a kill could leave it there for
        # `verify` to find): access(2) tells a read-only file system (EROFS) and missing
        # permissions; the state directory gets a real probe.
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        directory = state
        state.mkdir(exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=state)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MirrorRootError(
            f"cannot write to {directory} ({reason}); check mirror.root"
        ) from None


def require_mirror(root: Path) -> None:
    """For the commands that only read (status, verify): a root without the state
    directory holds no mirror; say so rather than start an empty one there."""
    if not (root / STATE_DIR).is_dir():
        raise MirrorRootError(
            f"no mirror at {root} (no {STATE_DIR} directory): check mirror.root, or run sync first"
        )


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# A series' files kept in memory: (path in its staging directory, bytes).
StagedFiles = Sequence[tuple[Path, bytes | bytearray]]


def create_file(path: Path) -> int:
    """A new file's descriptor, for writing; never opens one that is there already."""
    return os.open(path, _CREATE, 0o644)


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fresh_dir(path: Path) -> None:
    """A series' staging directory, empty: one left by a crashed attempt of ours goes."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)


def write_file(path: Path, data: bytes | bytearray) -> None:
    """A new file holding ``data``, not synced (the caller syncs)."""
    fd = create_file(path)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_staged(directory: Path, files: StagedFiles) -> None:
    """Write a series verified in memory (a tiny one, see transfer/download.py) into a
    fresh staging ``directory``: each file once, not synced (the caller syncs)."""
    fresh_dir(directory)
    for path, data in files:
        write_file(path, data)


def disk_space_error(exc: OSError, where: Path) -> DiskSpaceError | None:
    """The DiskSpaceError a failed write to ``where`` means, or None if not a full disk."""
    if not disk_full(exc):
        return None
    return DiskSpaceError(
        f"disk full while writing to {where} ({exc.strerror}); free space (or inodes: "
        "df -i) on the mirror's file system or raise mirror.min_free_bytes"
    )


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2) (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only here: a few ms off every start-up

    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


def _sync_fs(path: Path) -> bool:
    """One syncfs(2) of the file system holding ``path``: every dirty page and pending
    metadata change there becomes durable. False where syncfs is not available."""
    syncfs = _syncfs()
    if syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)
    return True


def sync_files(directory: Path) -> None:
    """fsync every file in ``directory`` and then the directory (no syncfs)."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            _fsync_path(Path(entry.path))
    _fsync_path(directory, directory=True)


def fsync_dir(directory: Path) -> None:
    """fsync a directory's entries (blocking: call it from a worker thread).

    The download fsyncs each staged file as it completes and then its staging directory
    with this; Mirror.place_many then fsyncs every directory a placement touched. Data
    first, then the names: after a power loss no placed name points at unwritten blocks.
    """
    _fsync_path(directory, directory=True)


def _makedirs_unsynced(path: Path, created: set[Path]) -> None:
    """mkdir -p; adds to ``created`` each directory made here (its parent then needs an
    fsync before the new name can be relied on: see Mirror.place_many). Tries the
    deepest first: one call when it exists, three for a new patient's study."""
    try:
        os.mkdir(path)
    except FileExistsError:  # there already (or made by another worker meanwhile)
        return
    except FileNotFoundError:
        if path.parent == path:
            raise
        _makedirs_unsynced(path.parent, created)
        try:
            os.mkdir(path)
        except FileExistsError:
            return
    created.add(path)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Mirror:
    """The mirror tree under ``root`` and its bookkeeping area ``root/.nbia-sync``."""

    def __init__(self, root: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.root = root
        self._root_prefix = str(root).rstrip(os.sep) + os.sep
        self._clock = clock  # times the statvfs readings (see free_bytes)
        self.state_dir = root / STATE_DIR
        self.staging_root = self.state_dir / "staging"
        self.trash_root = self.state_dir / "trash"
        self._staging_of: dict[str, Path] = {}  # owner -> its staging directory
        # Bytes promised to downloads in progress in this process (see reserve()).
        self._reserved = 0
        self._space_lock = anyio.Lock()
        # (monotonic time of the last statvfs, bytes free then less reservations ended).
        self._free_read: tuple[float, int] | None = None

    @functools.cached_property
    def on_local_disk(self) -> bool:
        """The root is on a local file system (filesystems.is_local): file work of a few
        KB may run on the event loop (transfer/download.py)."""
        return is_local(self.root)

    # -- layout -------------------------------------------------------------------

    def series_dir(self, collection: str, patient_id: str, study_uid: str, series_uid: str) -> Path:
        parts = (collection, patient_id, study_uid, series_uid)
        return self.root.joinpath(*(safe_part(p) for p in parts))

    def relative(self, path: Path) -> str:
        """A path under the root as stored in the catalog: relative, '/'-separated."""
        text = str(path)
        if text.startswith(self._root_prefix):  # a string cut: relative_to is ~10 us a call
            return text[len(self._root_prefix) :].replace(os.sep, "/")
        return path.relative_to(self.root).as_posix()  # elsewhere: its ValueError

    def staging_dir(self, owner: str, series_uid: str) -> Path:
        # Asked for every series: the owner's part is made once (a Path join is ~5 us).
        of_owner = self._staging_of.get(owner)
        if of_owner is None:
            of_owner = self._staging_of[owner] = self.staging_root / safe_part(owner)
        return of_owner / safe_part(series_uid)

    # -- placement ----------------------------------------------------------------

    async def place_many(
        self,
        moves: Sequence[tuple[Path, Path] | tuple[Path, Path, Path | None]],
        *,
        unsynced: Collection[Path] = (),
        unwritten: Mapping[Path, StagedFiles] | None = None,
    ) -> list[Exception | None]:
        """Move fully staged series (files and directory fsynced by the download) into
        the mirror in one worker-thread call; per move, None or the error that
        stopped it. The only way a series enters the tree.

        A move is ``(staged_dir, final_dir)`` or ``(staged_dir, final_dir, moved_from)``:
        ``moved_from`` is where the series was placed before when the archive has since
        filed it elsewhere (another collection, patient or study). That old copy leaves
        the tree here, before the caller commits the new path, so a crash at any point
        leaves no copy in the tree that the catalog does not record: before the commit
        the series is still leased (fetched again later), after it the old copy is at
        most in the trash, which :meth:`clean_staging` empties.

        Each directory is fsynced once per call, however many series it received. Every
        move is a rename of a whole directory (a series is absent, old or new, never
        mixed); the files' data was fsynced before (the download), so no name can point
        at unwritten blocks;
        and every directory that got a new entry here (the parents of new directories and
        of the placed series, the trash and the old parent when an old copy was moved
        aside) is fsynced
        before this returns, i.e. before the caller commits "done" for any of the moves.
        ``unsynced``: staged directories whose files the download did not fsync (small
        series): their data is synced here first, once for all (syncfs(2) on Linux,
        else file by file), still before any rename. On Linux one syncfs after the
        renames also replaces the directory fsyncs when a batch touched several.
        ``unwritten``: staged directories not on disk yet, with their files (series
        verified in memory by the download): written here first, unsynced, so the
        event loop never waits on their creates; a move whose files could not be
        written fails alone (a full disk: DiskSpaceError).
        A crash before those fsyncs may lose renames, but none is recorded as done yet:
        the catalog still has the series leased and it is fetched again. Old copies are
        deleted only after the fsyncs: an updated series is never absent from the tree.
        """
        return await anyio.to_thread.run_sync(
            self._place_many_sync, list(moves), set(unsynced), unwritten or {}
        )

    def _place_many_sync(
        self,
        moves: list[tuple[Path, Path] | tuple[Path, Path, Path | None]],
        unsynced: Collection[Path] = (),
        unwritten: Mapping[Path, StagedFiles] | None = None,
    ) -> list[Exception | None]:
        refused: dict[Path, Exception] = {}
        unsynced = set(unsynced)
        for staged, files in (unwritten or {}).items():
            try:
                write_staged(staged, files)
            except OSError as exc:
                _rmtree(staged)
                refused[staged] = disk_space_error(exc, staged) or exc
            else:
                unsynced.add(staged)
        # Small series skip the download's fsyncs: their data is made durable here,
        # once for the whole batch, before any of them is renamed into the tree.
        if unsynced and not _sync_fs(self.root):
            for staged in unsynced:
                sync_files(staged)
        errors: list[Exception | None] = []
        created: set[Path] = set()
        dirty: set[Path] = set()
        olds: list[Path] = []

        def move_aside(series_dir: Path) -> None:
            # The old copy leaves the tree whole (one rename) and is deleted only once the
            # new one is in, so no stale file survives and no mixture is ever visible.
            self.trash_root.mkdir(parents=True, exist_ok=True)
            old = self.trash_root / f"{series_dir.name}.{uuid.uuid4().hex}"
            os.rename(series_dir, old)
            olds.append(old)
            dirty.update((self.trash_root, series_dir.parent))

        for move in moves:
            staged_dir, final_dir = move[0], move[1]
            moved_from = move[2] if len(move) > 2 else None
            if staged_dir in refused:
                errors.append(refused[staged_dir])
                continue
            try:
                _makedirs_unsynced(final_dir.parent, created)
                dirty.add(final_dir.parent)
                try:
                    os.rename(staged_dir, final_dir)
                except OSError as exc:
                    # A copy is there already (an update): aside first, then ours.
                    if exc.errno not in _TAKEN:
                        raise
                    move_aside(final_dir)
                    os.rename(staged_dir, final_dir)
                if moved_from is not None and moved_from != final_dir and moved_from.is_dir():
                    move_aside(moved_from)
                errors.append(None)
            except OSError as exc:
                # Out of space or inodes making the series' directories: a DiskSpaceError
                # (the pass stops, the series is given back), not a failed attempt.
                errors.append(disk_space_error(exc, final_dir) or exc)
        dirty.update(d.parent for d in created)
        # Any order will do: all of them are durable before the caller's commit. With
        # syncfs, one call for all the new names (one journal commit), else one fsync
        # per touched directory.
        if len(dirty) < _SYNCFS_FROM or not _sync_fs(self.root):
            for d in sorted(dirty):
                _fsync_path(d, directory=True)
        for old in olds:
            _rmtree(old)
        return errors

    async def discard_series(self, series_dir: Path) -> bool:
        """Take a placed series out of the tree (a withdrawn one): one rename into the
        trash, as a replaced copy leaves; False when it was not there."""
        return await anyio.to_thread.run_sync(self._discard_sync, series_dir)

    def _discard_sync(self, series_dir: Path) -> bool:
        if not series_dir.is_dir():
            return False
        self.trash_root.mkdir(parents=True, exist_ok=True)
        old = self.trash_root / f"{series_dir.name}.{uuid.uuid4().hex}"
        os.rename(series_dir, old)
        _fsync_path(series_dir.parent, directory=True)
        _fsync_path(self.trash_root, directory=True)
        _rmtree(old)
        return True

    async def remove_staging(self, staged_dir: Path) -> None:
        """Delete one series' staging; safe to call under cancellation."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_rmtree, staged_dir)

    async def clean_staging(self, keep_owners: Iterable[str]) -> list[str]:
        """Remove the staging of owners not in ``keep_owners`` (dead processes) and the
        trash; returns the owner directories removed."""
        keep = {safe_part(o) for o in keep_owners}
        return await anyio.to_thread.run_sync(self._clean_sync, keep)

    def _clean_sync(self, keep: set[str]) -> list[str]:
        removed: list[str] = []
        if self.staging_root.is_dir():
            for entry in os.scandir(self.staging_root):
                if entry.name not in keep:
                    _rmtree(Path(entry.path))
                    removed.append(entry.name)
        _rmtree(self.trash_root)
        if removed:
            log.info("stale_staging_removed", owners=len(removed))
        return removed

    # -- space --------------------------------------------------------------------

    async def free_bytes(self) -> int:
        """Bytes free under the root: statvfs in a thread (it may block on a network
        file system), read again at most every SPACE_READ_INTERVAL seconds. Between
        readings, each reservation given back counts as written (see reserve), so a
        reading is never more generous than the disk was."""
        now = self._clock.monotonic()
        if self._free_read is not None and now - self._free_read[0] < SPACE_READ_INTERVAL:
            return self._free_read[1]

        def stat() -> int:
            probe = self.root if self.root.exists() else self.root.parent
            st = os.statvfs(probe)
            return st.f_bavail * st.f_frsize

        free = await anyio.to_thread.run_sync(stat)
        self._free_read = (now, free)
        return free

    async def ensure_space(self, expected_bytes: int | None, min_free_bytes: int) -> None:
        """Raise DiskSpaceError unless ``expected_bytes`` fit with ``min_free_bytes`` to
        spare, counting what downloads already running in this process will still write."""
        free = await self.free_bytes()
        alone = (expected_bytes or 0) + min_free_bytes
        if free > min_free_bytes + self._reserved and free < alone:
            # There is room, but not for this one even with nothing else running: fail
            # this series only, smaller ones may still fit (a FileSize of 10^15 must not
            # end every pass). No room at all stays a DiskSpaceError: the disk is full.
            raise SeriesTooLargeError(
                f"the archive lists {expected_bytes} bytes for this series, more than the "
                f"{free} bytes free under {self.root} less mirror.min_free_bytes "
                f"({min_free_bytes}); free some space, then run retry-failed"
            )
        need = alone + self._reserved
        if free < need:
            raise DiskSpaceError(
                f"not enough free space under {self.root}: {free} bytes free, need "
                f"{expected_bytes or 0} for the series + {self._reserved} for downloads "
                f"in progress + {min_free_bytes} (mirror.min_free_bytes)"
            )

    @contextlib.asynccontextmanager
    async def reserve(self, expected_bytes: int | None, min_free_bytes: int) -> AsyncIterator[None]:
        """ensure_space, then hold ``expected_bytes`` as promised until the block exits."""
        amount = expected_bytes or 0
        async with self._space_lock:
            await self.ensure_space(amount, min_free_bytes)
            self._reserved += amount
        try:
            yield
        finally:
            self._reserved -= amount
            if self._free_read is not None:  # its bytes may be on the disk now
                self._free_read = (self._free_read[0], self._free_read[1] - amount)


def disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
