"""Shared fixtures. Each area registers its fixture module in pytest_plugins below."""

import os

from hypothesis import settings

# CI explores the same examples every run (a red CI blocks a landing; a new counterexample
# belongs to a developer's run, which explores afresh and keeps what it found).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

pytest_plugins: list[str] = [
    "catalog_fixtures",  # tests/catalog_fixtures.py: `catalog` on SQLite and PostgreSQL
    "nbia_sync.sim.testing",  # `sim_archive`, `sim` (a running NBIA simulator)
    "cli_fixtures",  # tests/cli_fixtures.py: `sim_mirror`, config writing, CLI runners
]
