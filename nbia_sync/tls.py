"""The TLS context every verified source connects with, and aiohttp imported without the
two trust stores it would load for nothing.

At import, `aiohttp.connector` builds two SSL contexts and loads the system trust store
(~140 CA certificates) into each: ~18 ms apiece, ~36 ms of every start-up. nbia-sync uses
neither: a verified source connects with `verified_context()`, built once per process, and
an unverified one with aiohttp's unverified context, which needs no trust store. The CLI
calls `prepare()` as soon as the config is read, so the one trust store loads in a thread
while the rest of the program imports (OpenSSL releases the GIL meanwhile).

`install()` (run by api/_aiohttp.py, through which the api modules import aiohttp)
imports it with `set_default_verify_paths` made a no-op in the importing thread only.
aiohttp's verified context is then left without trust anchors: anything that used it by
mistake would have every certificate refused, never accepted. If aiohttp is already
imported, nothing is changed.
"""

from __future__ import annotations

import ssl
import sys
import threading
from concurrent.futures import Future

_loaded: Future[ssl.SSLContext] | None = None
_guard = threading.Lock()


def install() -> bool:
    """Import aiohttp without its import-time trust stores; True if this call did."""
    if "aiohttp" in sys.modules:
        return False
    importer = threading.get_ident()
    load = ssl.SSLContext.set_default_verify_paths

    def skipped_while_importing(self: ssl.SSLContext) -> None:
        if threading.get_ident() != importer:  # another thread's context: the real thing
            load(self)

    ssl.SSLContext.set_default_verify_paths = skipped_while_importing  # type: ignore[method-assign]
    try:
        import aiohttp  # noqa: F401
    finally:
        del ssl.SSLContext.set_default_verify_paths  # the C method again
    return True


def _make_verified() -> ssl.SSLContext:
    # What aiohttp's own verified context is: the system's trust store (SSL_CERT_FILE and
    # SSL_CERT_DIR respected, as OpenSSL reads them), host names checked, HTTP/1.1.
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


def prepare() -> None:
    """Start loading the verified context in a thread, if not started yet."""
    global _loaded
    with _guard:
        if _loaded is not None:
            return
        _loaded = Future()
    loaded = _loaded

    def load() -> None:
        try:
            loaded.set_result(_make_verified())
        except BaseException as exc:  # handed to whoever asks for the context
            loaded.set_exception(exc)

    threading.Thread(target=load, name="nbia-sync trust store", daemon=True).start()


def verified_context() -> ssl.SSLContext:
    """The one verified client context of this process (loaded now if `prepare()` was
    not called; waits for the thread if it was)."""
    prepare()
    assert _loaded is not None
    return _loaded.result()
