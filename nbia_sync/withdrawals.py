"""`mirror.on_withdrawn = "delete"`: files of withdrawn series leave the mirror.

Each series leaves whole, by one rename into the trash (see `Mirror.discard_series`),
and only then does the catalog forget its files. A crash in between leaves the catalog
saying the files are there when they are not; the next pass finds the directory gone
and records it then, so the step is safe to repeat.
"""

from __future__ import annotations

import structlog

from nbia_sync.catalog.repository import Catalog
from nbia_sync.storage import Mirror

log = structlog.get_logger(__name__)


async def remove_withdrawn(catalog: Catalog, mirror: Mirror) -> int:
    """Delete the files of every withdrawn series still in the mirror; returns how many."""
    removed = 0
    for series in await catalog.sources.placed_withdrawn():
        path = mirror.root / series.placed_path
        if not path.resolve().is_relative_to(mirror.root.resolve()):
            # The catalog names a path outside the tree: touch nothing, say so.
            log.error("withdrawn_path_outside_mirror", series_uid=series.series_uid)
            continue
        await mirror.discard_series(path)
        if await catalog.sources.forget_placement(series.series_id):
            removed += 1
            log.warning("withdrawn_files_deleted", series_uid=series.series_uid, path=str(path))
    return removed
