"""Transfer: from the archive's ZIP stream to verified files in the mirror.

- ``archive``: streaming ZIP reader (no seeking, safe names, CRC checks, spool fallback).
- ``download``: ``fetch_series`` — one series into staging, hashed while written, checked.
- ``pool``: ``drain`` — the worker pool over the catalog's queue.

Nothing is re-exported here: importing ``transfer.archive`` must not pull in the HTTP
client and the catalog (the pool's dependencies).
"""
