"""Defaults shared by the configuration and the command line (kept free of imports, so
that `nbia-sync --help` does not load the settings machinery)."""

DEFAULT_TCIA_URL = "https://services.cancerimagingarchive.net/nbia-api/"
GUEST_USER = "nbia_guest"
