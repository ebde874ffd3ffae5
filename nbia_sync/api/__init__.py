"""The archive: the only package that speaks HTTP to NBIA."""
