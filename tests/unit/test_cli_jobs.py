"""cli.run_job / run_quick_job: a command's coroutine on a fresh loop with SIGINT/SIGTERM
wired. Each case runs in a fresh interpreter (its main thread owns the signals)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(body: str) -> str:
    code = "import asyncio, os, signal, sys\nfrom nbia_sync import cli\n" + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]  # after the "stopping" log line, if any


def test_a_quick_job_returns_its_code_without_loading_the_anyio_backend() -> None:
    out = _run("""
        async def job() -> int:
            return 3
        print(cli.run_quick_job(job), "anyio._backends._asyncio" in sys.modules)
    """)
    assert out == "(3, None) False"


def test_a_signalled_quick_job_is_cancelled_after_the_grace() -> None:
    out = _run("""
        async def job() -> int:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
            return 0
        print(cli.run_quick_job(job, grace=0.05) == (None, signal.SIGTERM))
    """)
    assert out == "True"


def test_a_signal_sets_the_stop_event_of_a_job() -> None:
    out = _run("""
        async def job(stop) -> int:
            os.kill(os.getpid(), signal.SIGINT)
            await stop.wait()
            return 5
        print(cli.run_job(job, grace=30) == (5, signal.SIGINT))
    """)
    assert out == "True"


def test_a_job_runs_with_the_garbage_collector_on_after_the_start_up_pause() -> None:
    out = _run("""
        import gc
        from nbia_sync.memory import pause_gc
        pause_gc()  # as cli.run does before the command loads
        async def job() -> int:
            return 0 if gc.isenabled() else 1
        print(cli.run_quick_job(job), gc.isenabled(), gc.get_freeze_count() > 0)
    """)
    assert out == "(0, None) True True"


def test_the_simulator_serves_with_the_garbage_collector_on() -> None:
    out = _run("""
        import argparse, gc
        from nbia_sync.memory import pause_gc
        from nbia_sync.sim import cli as sim_cli
        async def serve(args: argparse.Namespace) -> int:
            return 0 if gc.isenabled() else 1
        sim_cli.serve = serve
        pause_gc()
        args = argparse.Namespace(verbose=0, quiet=0, log_format="json")
        print(cli.cmd_simulate(args))
    """)
    assert out == "0"


def test_a_command_runs_with_the_shorter_gil_switch_interval() -> None:
    out = _run("""
        def main() -> int:
            print(sys.getswitchinterval() == cli.GIL_SWITCH_INTERVAL < 0.005, flush=True)
            return 0
        cli.main = main
        cli.run()
    """)
    assert out == "True"


def _loop_of_a_job(choice: str, *, without_uvloop: bool = False) -> str:
    """The module of the loop a quick job ran on, in a fresh interpreter."""
    code = "import asyncio, sys\nfrom nbia_sync import cli\n"
    if without_uvloop:
        code += "sys.modules['uvloop'] = None  # import uvloop now raises ImportError\n"
    code += (
        "async def job() -> int:\n"
        "    print(type(asyncio.get_running_loop()).__module__)\n"
        "    return 0\n"
        f"cli.run_quick_job(job, loop={choice!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1].split(".")[0]  # after the debug log line


def test_auto_runs_a_job_on_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop", reason="uvloop is not built for this platform")
    assert _loop_of_a_job("auto") == "uvloop"


def test_asyncio_runs_a_job_on_the_standard_library_loop() -> None:
    assert _loop_of_a_job("asyncio") == "asyncio"


def test_auto_falls_back_to_asyncio_without_uvloop() -> None:
    assert _loop_of_a_job("auto", without_uvloop=True) == "asyncio"
