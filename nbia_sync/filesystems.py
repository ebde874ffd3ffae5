"""Which kind of file system holds a path: local disk, or something slower.

The download processes a tiny series' few KB on the event loop instead of a worker
thread when the mirror is on a local file system (transfer/download.py): there a create,
a write and a rename take microseconds, less than the thread hop. On a network or FUSE
file system each can take a round trip, which must not stall the loop, so anything not
known to be local keeps the worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# Block-device and memory file systems of Linux. Anything else (nfs, cifs/smb3, fuse.*,
# ceph, glusterfs, lustre, gpfs, 9p, virtiofs, ...) or unknown counts as not local.
LOCAL_TYPES = frozenset(
    {
        "bcachefs",
        "btrfs",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "jfs",
        "overlay",
        "ramfs",
        "reiserfs",
        "tmpfs",
        "xfs",
        "zfs",
    }
)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in mount points as octal escapes.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mount_type(path: Path, mountinfo: str) -> str | None:
    """The type of the file system mounted deepest above ``path`` (resolved), per the
    text of a mountinfo file; None when no line covers it."""
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            point, fstype = _unescape(fields[4]), fields[sep + 1]
        except (ValueError, IndexError):
            continue  # not a mountinfo line
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # The last of several mounts on one point is the one visible.
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fstype)
    return best[1] if best else None


def is_local(path: Path) -> bool:
    """True when ``path`` (or its nearest existing parent) is on a local file system;
    False for any other, and wherever mountinfo cannot be read (not Linux)."""
    try:
        text = MOUNTINFO.read_text(errors="replace")
    except OSError:
        return False
    return mount_type(path, text) in LOCAL_TYPES
