"""`nbia-sync --help` / `--version` stay fast: the CLI module imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pydantic", "sqlalchemy", "structlog", "aiohttp", "rich", "prometheus_client")


def test_importing_the_cli_loads_no_heavy_library() -> None:
    code = (
        "import sys, nbia_sync.cli as c; c.build_parser(); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
