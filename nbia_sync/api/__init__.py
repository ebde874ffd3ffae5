"""The archive: the only package that speaks HTTP to NBIA."""

# First, before any module here imports aiohttp: without its unused trust stores (tls).
from nbia_sync.tls import install

install()
