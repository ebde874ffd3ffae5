"""tls: aiohttp imported without its two unused trust stores, and the one verified context
the client connects with. Each case runs in a fresh interpreter, trusting exactly one CA
(a throwaway one, through SSL_CERT_FILE), so trust-store sizes are exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme


@pytest.fixture
def one_ca(tmp_path: Path) -> dict[str, str]:
    bundle = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    # No directory of certificates either: SSL_CERT_FILE is the whole trust store.
    return {**os.environ, "SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(tmp_path / "none")}


def _run(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_engine_imports_aiohttp_without_loading_its_verified_trust_store(
    one_ca: dict[str, str],
) -> None:
    code = (
        "import nbia_sync.cli, nbia_sync.engine, aiohttp.connector as c; "
        "print(c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca'])"
    )
    # Without trust anchors: a certificate checked against it is refused, never accepted.
    assert _run(code, one_ca) == "0"


def test_contexts_made_after_the_import_load_the_trust_store_again(
    one_ca: dict[str, str],
) -> None:
    code = (
        "import ssl, nbia_sync.api.client; "
        "print(ssl.create_default_context().cert_store_stats()['x509_ca'])"
    )
    assert _run(code, one_ca) == "1"


def test_a_context_another_thread_makes_during_the_import_gets_its_trust_store(
    one_ca: dict[str, str],
) -> None:
    code = (
        "import ssl, threading\n"
        "seen, importing = [], threading.Event()\n"
        "def make():\n"
        "    importing.wait()\n"
        "    while 'aiohttp.connector' not in sys.modules or len(seen) < 3:\n"
        "        seen.append(ssl.create_default_context().cert_store_stats()['x509_ca'])\n"
        "import sys\n"
        "t = threading.Thread(target=make); t.start(); importing.set()\n"
        "from nbia_sync.tls import install\n"
        "print(install())\n"
        "t.join(); print(set(seen))"
    )
    assert _run(code, one_ca).splitlines() == ["True", "{1}"]


def test_the_verified_context_trusts_the_system_store_and_checks_host_names(
    one_ca: dict[str, str],
) -> None:
    code = (
        "import ssl; from nbia_sync.tls import verified_context; c = verified_context(); "
        "print(c.cert_store_stats()['x509_ca'], c.check_hostname, "
        "c.verify_mode == ssl.CERT_REQUIRED)"
    )
    assert _run(code, one_ca) == "1 True True"


def test_prepare_loads_one_context_for_the_whole_process(one_ca: dict[str, str]) -> None:
    code = (
        "from nbia_sync.tls import prepare, verified_context; "
        "prepare(); prepare(); print(verified_context() is verified_context())"
    )
    assert _run(code, one_ca) == "True"


def test_aiohttp_imported_before_the_api_is_left_alone(one_ca: dict[str, str]) -> None:
    code = (
        "import aiohttp.connector as c; from nbia_sync.tls import install; "
        "print(install(), c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca'])"
    )
    assert _run(code, one_ca) == "False 1"
