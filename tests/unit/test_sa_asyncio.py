"""catalog._sa_asyncio: sqlalchemy.ext.asyncio without the ORM, and nothing lost for
whoever wants the rest of the package. Each case runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_catalog_gets_the_real_engine_classes_without_the_orm() -> None:
    code = (
        "import sys, nbia_sync.catalog.db as db, sqlalchemy.ext.asyncio.engine as e; "
        "print(db.AsyncEngine is e.AsyncEngine, db.create_async_engine is e.create_async_engine, "
        "'sqlalchemy.orm' in sys.modules)"
    )
    assert _run(code) == "True True False"


def test_asking_the_package_for_a_session_runs_its_real_init() -> None:
    code = (
        "import sys, nbia_sync.catalog; "
        "from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker; "
        "import sqlalchemy.ext.asyncio as pkg; "
        "print(AsyncSession.__module__, 'sqlalchemy.orm' in sys.modules, "
        "hasattr(pkg, 'async_scoped_session'))"
    )
    assert _run(code) == "sqlalchemy.ext.asyncio.session True True"


def test_unknown_names_still_raise_attribute_error() -> None:
    code = (
        "import nbia_sync.catalog, sqlalchemy.ext.asyncio as pkg\n"
        "try:\n    pkg.no_such_name\nexcept AttributeError:\n    print('AttributeError')"
    )
    assert _run(code) == "AttributeError"


def test_a_package_imported_before_the_catalog_is_left_alone() -> None:
    code = (
        "import sqlalchemy.ext.asyncio as pkg, sys; before = pkg; "
        "from nbia_sync.catalog import _sa_asyncio; "
        "print(_sa_asyncio.install(), sys.modules['sqlalchemy.ext.asyncio'] is before, "
        "hasattr(pkg, 'AsyncSession'))"
    )
    assert _run(code) == "False True True"
