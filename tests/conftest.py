"""Shared fixtures. Each area registers its fixture module in pytest_plugins below."""

pytest_plugins: list[str] = []
