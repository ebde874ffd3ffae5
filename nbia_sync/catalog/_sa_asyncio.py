"""SQLAlchemy's asyncio engine without the ORM that its package `__init__` imports.

`sqlalchemy/ext/asyncio/__init__.py` also re-exports `AsyncSession`, and importing that
loads all of `sqlalchemy.orm` (~60-80 ms of every start-up), while the catalog uses only
engines, connections and results. Importing this module (the catalog package does it
first) calls `install()`, which registers the package without running its
`__init__`, imports the two submodules the catalog needs and copies the names the
`__init__` re-exports from them onto it. The first time anything else is asked of the
package (a session, say), the real `__init__` runs in place, so every name is still
there for whoever wants it. If the package is already imported, or SQLAlchemy's layout
is not the one expected, nothing is changed and the package imports as usual.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

_PACKAGE = "sqlalchemy.ext.asyncio"
# What the package's __init__ re-exports from .engine and .result (SQLAlchemy 2.x).
_ENGINE_NAMES = (
    "AsyncConnection",
    "AsyncEngine",
    "AsyncTransaction",
    "async_engine_from_config",
    "create_async_engine",
    "create_async_pool_from_url",
)
_RESULT_NAMES = ("AsyncMappingResult", "AsyncResult", "AsyncScalarResult", "AsyncTupleResult")


def install() -> bool:
    """Make `import sqlalchemy.ext.asyncio` skip the ORM; True if this call did."""
    if _PACKAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(_PACKAGE)  # imports the parent, sqlalchemy.ext
    loader = spec.loader if spec is not None else None
    if spec is None or loader is None or spec.submodule_search_locations is None:
        return False
    parent = sys.modules["sqlalchemy.ext"]
    package = importlib.util.module_from_spec(spec)
    # What an import of the package does before its submodules are imported.
    sys.modules[_PACKAGE] = package
    parent.asyncio = package  # type: ignore[attr-defined]
    try:
        # Import statements (not importlib.import_module): -X importtime reports them.
        import sqlalchemy.ext.asyncio.engine as engine
        import sqlalchemy.ext.asyncio.result as result

        for module, names in ((engine, _ENGINE_NAMES), (result, _RESULT_NAMES)):
            for name in names:
                setattr(package, name, getattr(module, name))
        # The real __init__ also sets up greenlet at import, failing early without it.
        from sqlalchemy.util import concurrency

        concurrency._concurrency_shim._initialize()
    except Exception:
        # Leave nothing half-made behind: the next import runs the real package.
        for name in [m for m in sys.modules if m == _PACKAGE or m.startswith(_PACKAGE + ".")]:
            del sys.modules[name]
        del parent.asyncio
        return False

    def finish(name: str) -> Any:
        # Once: run the real __init__ in the package's own namespace, then answer.
        del package.__getattr__
        loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = finish  # type: ignore[method-assign]
    return True


install()
