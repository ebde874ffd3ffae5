"""Start-up stays fast: the CLI module imports nothing heavy (`--help`, `--version`), and
what `sync` and `status` import leaves out the libraries they do not use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("pydantic", "sqlalchemy", "structlog", "aiohttp", "rich", "prometheus_client")
# Every module cli.cmd_sync imports (cmd_status imports a subset of them).
SYNC_MODULES = (
    "nbia_sync.catalog.repository",
    "nbia_sync.config",
    "nbia_sync.display",
    "nbia_sync.engine",
    "nbia_sync.log",
    "nbia_sync.outcome",
    "nbia_sync.status",
    "nbia_sync.storage",
)


def _modules_loaded_by(code: str) -> list[str]:
    script = f"import sys; {code}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_the_cli_loads_no_heavy_library() -> None:
    loaded = _modules_loaded_by("import nbia_sync.cli as c; c.build_parser()")
    assert [m for m in HEAVY if m in loaded] == []


def test_building_the_parser_leaves_the_simulator_unloaded() -> None:
    # `nbia-sync simulate`'s flags are made on every start; the simulator is not.
    loaded = _modules_loaded_by("import nbia_sync.cli as c; c.build_parser()")
    assert [m for m in loaded if m.startswith("nbia_sync.sim.") and m != "nbia_sync.sim.cli"] == []


def test_the_sync_and_status_modules_do_not_load_the_sqlalchemy_orm() -> None:
    # The schema is Core, and sqlalchemy.ext.asyncio is imported without its sessions.
    loaded = _modules_loaded_by(
        f"import importlib; [importlib.import_module(m) for m in {SYNC_MODULES!r}]"
    )
    assert "nbia_sync.engine" in loaded
    assert [m for m in loaded if m.split(".")[:2] == ["sqlalchemy", "orm"]] == []


def test_loading_the_settings_imports_nothing_beyond_the_standard_library() -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    before = set(_modules_loaded_by("pass"))  # what site-packages' start-up hooks load
    loaded = _modules_loaded_by(
        "from pathlib import Path; from nbia_sync.config import load_settings; "
        f"load_settings(Path({str(example)!r}), env={{}})"
    )
    assert "nbia_sync.config" in loaded
    outside = {"nbia_sync", *sys.stdlib_module_names}
    assert [m for m in set(loaded) - before if m.split(".")[0] not in outside] == []
