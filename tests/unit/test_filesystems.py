"""Which file system holds a path (filesystems.py): the choice between the event loop and
a worker thread for a tiny series' file work rests on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbia_sync import filesystems
from nbia_sync.filesystems import is_local, mount_type
from nbia_sync.storage import Mirror

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 27 0:40 / /data rw,relatime shared:12 - nfs4 server:/export rw,vers=4.2
32 31 254:1 / /data/local rw,relatime - xfs /dev/vdb rw
33 27 0:41 / /mnt/with\\040space rw - cifs //nas/share rw
34 27 0:42 / /mnt/fuse rw - fuse.sshfs host: rw
35 27 0:43 / /stacked rw - nfs server:/a rw
36 27 0:44 / /stacked rw - tmpfs tmpfs rw
not a mountinfo line
"""


def test_the_deepest_mount_above_a_path_gives_its_type() -> None:
    assert mount_type(Path("/home/user/mirror"), MOUNTINFO) == "ext4"
    assert mount_type(Path("/data/mirror"), MOUNTINFO) == "nfs4"
    assert mount_type(Path("/data/local/mirror"), MOUNTINFO) == "xfs"
    assert mount_type(Path("/data"), MOUNTINFO) == "nfs4"


def test_a_mount_point_is_not_a_prefix_of_a_sibling_name() -> None:
    assert mount_type(Path("/database/m"), MOUNTINFO) == "ext4"


def test_escaped_spaces_in_mount_points_are_read() -> None:
    assert mount_type(Path("/mnt/with space/m"), MOUNTINFO) == "cifs"


def test_the_last_of_two_mounts_on_one_point_is_the_visible_one() -> None:
    assert mount_type(Path("/stacked/m"), MOUNTINFO) == "tmpfs"


def test_no_covering_line_is_none() -> None:
    assert mount_type(Path("/x"), "22 27 0:21 / /proc rw - proc proc rw\n") is None


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("/home/m", True),
        ("/data/local/m", True),
        ("/stacked/m", True),
        ("/data/m", False),
        ("/mnt/with space/m", False),
        ("/mnt/fuse/m", False),
    ],
)
def test_only_known_local_file_systems_count_as_local(
    path: str, local: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    monkeypatch.setattr(filesystems, "MOUNTINFO", info)
    assert is_local(Path(path)) is local


def test_without_mountinfo_nothing_counts_as_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filesystems, "MOUNTINFO", tmp_path / "absent")
    assert is_local(Path("/home/m")) is False


def test_a_mirror_on_a_network_file_system_is_not_on_a_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "mountinfo"
    root_line = "27 1 254:0 / / rw - ext4 /dev/vda rw\n"
    info.write_text(f"{root_line}40 27 0:40 / {tmp_path.resolve()} rw - nfs s:/e rw\n")
    monkeypatch.setattr(filesystems, "MOUNTINFO", info)
    assert Mirror(tmp_path / "root").on_local_disk is False
    info.write_text(root_line)
    assert Mirror(tmp_path / "root").on_local_disk is True
