"""Shared fixtures. Each area registers its fixture module in pytest_plugins below."""

pytest_plugins: list[str] = [
    "catalog_fixtures",  # tests/catalog_fixtures.py: `catalog` on SQLite and PostgreSQL
    "nbia_sync.sim.testing",  # `sim_archive`, `sim` (a running NBIA simulator)
    "cli_fixtures",  # tests/cli_fixtures.py: `sim_mirror`, config writing, CLI runners
]
