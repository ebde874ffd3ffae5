"""Process-wide memory settings, applied once at start-up (`cli.run`)."""

from __future__ import annotations

import gc
import os
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter number
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas; True if the cap was set.

    glibc gives each thread that allocates an arena of its own (up to 8 per core), each
    keeping the memory freed in it: the download, catalog and DNS threads cost ~4 MiB of
    peak RSS that way on many small series (bench/README.md). The GIL serialises
    allocations anyway, so two arenas cost no speed. MALLOC_ARENA_MAX in the
    environment, if set, is left to rule; other C libraries are left alone.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def pause_gc() -> None:
    """No cyclic garbage collection while the command starts (`cli.run`).

    The imports make a few hundred thousand objects that live as long as the process;
    collecting them again and again as they appear cost ~10 % of start-up (`status`
    379 -> 346 ms, `sync` on a complete mirror 751 -> 684 ms: medians of 8 alternating
    runs, bench/README.md). `resume_gc` ends the pause."""
    gc.disable()


def resume_gc() -> None:
    """End `pause_gc` once the command's modules are loaded (its event loop starts):
    what exists by then is frozen out of every later collection, the rest is collected
    as usual. Harmless when nothing was paused (tests call main() directly)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
