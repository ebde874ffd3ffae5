"""nbia-sync: a verified, resumable mirror of The Cancer Imaging Archive (NBIA REST API)."""

__version__ = "0.1.0"
