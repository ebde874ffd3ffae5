"""Shared fixtures. The simulator fixtures live in tests/sim_fixtures.py (imported below)."""
