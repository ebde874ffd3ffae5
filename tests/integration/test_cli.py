"""The command line without an archive: help, config errors, exit codes, no tracebacks."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from cli_fixtures import REPO, free_port, run_subprocess, write_config

from nbia_sync.cli import build_parser, config_path, main, pick_source
from nbia_sync.config import settings_from_dict
from nbia_sync.errors import ConfigError

pytestmark = pytest.mark.usefixtures("restore_logging")

COMMANDS = (
    "sync",
    "daemon",
    "status",
    "verify",
    "add-manifest",
    "retry-failed",
    "simulate",
    "demo",
)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    assert lines[0].startswith("nbia-sync: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert "Exit codes" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_its_own_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: nbia-sync " + command)


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error() -> None:
    assert main(["frobnicate"]) == 2


def test_global_options_are_accepted_after_the_command(tmp_path: Path) -> None:
    args = build_parser().parse_args(["status", "-c", str(tmp_path / "x.toml"), "-vv", "--json"])
    assert (args.config, args.verbose, args.json) == (str(tmp_path / "x.toml"), 2, True)


def test_config_path_defaults_to_env_then_cwd_file() -> None:
    args = build_parser().parse_args(["status"])
    assert config_path(args, env={}) == Path("nbia-sync.toml")
    assert config_path(args, env={"NBIA_SYNC_CONFIG": "/etc/n.toml"}) == Path("/etc/n.toml")
    args = build_parser().parse_args(["-c", "mine.toml", "status"])
    assert config_path(args, env={"NBIA_SYNC_CONFIG": "/etc/n.toml"}) == Path("mine.toml")


def test_missing_config_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", str(tmp_path / "absent.toml"), "sync"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config file not found" in line


def test_unknown_key_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path / "c.toml", tmp_path / "m", "http://127.0.0.1:9/nbia-api/", transfer={"wrokers": 3}
    )
    assert main(["-c", str(config), "status"]) == 2
    assert "transfer.wrokers: unknown key" in one_error_line(capsys.readouterr().err)


def test_wrong_type_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path / "c.toml",
        tmp_path / "m",
        "http://127.0.0.1:9/nbia-api/",
        transfer={"workers": "lots"},
    )
    assert main(["-c", str(config), "verify"]) == 2
    assert "transfer.workers" in one_error_line(capsys.readouterr().err)


def test_unreachable_catalog_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql+asyncpg://nobody:sekrit@127.0.0.1:{free_port()}/none"
    config = write_config(
        tmp_path / "c.toml",
        tmp_path / "m",
        "http://127.0.0.1:9/nbia-api/",
        sections={"catalog": {"url": url}},
    )
    assert main(["-c", str(config), "status"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "catalog" in line and "sekrit" not in line


def test_pick_source_needs_a_choice_among_several() -> None:
    settings = settings_from_dict(
        {
            "mirror": {"root": "/m"},
            "sources": [
                {"name": "a", "url": "http://a.example/nbia-api/"},
                {"name": "b", "url": "http://b.example/nbia-api/"},
            ],
        },
        env={},
    )
    assert pick_source(settings, "b", None).name == "b"
    assert pick_source(settings, None, "http://a.example/nbia-api/services/").name == "a"
    with pytest.raises(ConfigError, match="choose one with --source"):
        pick_source(settings, None, None)
    with pytest.raises(ConfigError, match="no source named 'c'"):
        pick_source(settings, "c", None)


@pytest.mark.asyncio
async def test_bad_config_in_a_real_process_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mirror]\nroot = 5\nbogus = true\n[[sources]]\nname = 'x'\n")
    done = await run_subprocess("-c", str(bad), "sync")
    assert done.code == 2
    line = one_error_line(done.stderr)
    assert "mirror.bogus: unknown key" in line


@pytest.mark.asyncio
async def test_simulate_runs_without_a_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nbia_sync",
        "-c",
        str(tmp_path / "none.toml"),
        "simulate",
        "--port",
        "0",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )
    assert proc.stdout is not None
    url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/nbia-api/")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
