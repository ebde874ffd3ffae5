"""The NBIA simulator: a loopback server speaking the archive's REST API over synthetic data.

Used by the integration tests, the benchmarks and `nbia-sync simulate`.

The names below are imported on first use (PEP 562): `nbia-sync` imports
`nbia_sync.sim.cli` for its parser on every start, and the archive generator and the
server (pydicom, aiohttp.web) are needed only by `simulate` and `demo`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbia_sync.sim.archive import SimArchive, SimInstance, SimPatient, SimSeries, SimStudy
    from nbia_sync.sim.counters import SimCounters
    from nbia_sync.sim.faults import STREAM_FAULTS, SimFaults, SimReply, StreamFault
    from nbia_sync.sim.server import SimRequest, SimServer

_MODULES = {
    "SimArchive": "archive",
    "SimInstance": "archive",
    "SimPatient": "archive",
    "SimSeries": "archive",
    "SimStudy": "archive",
    "SimCounters": "counters",
    "STREAM_FAULTS": "faults",
    "SimFaults": "faults",
    "SimReply": "faults",
    "StreamFault": "faults",
    "SimServer": "server",
    "SimRequest": "server",
}

__all__ = [
    "STREAM_FAULTS",
    "SimArchive",
    "SimCounters",
    "SimFaults",
    "SimInstance",
    "SimPatient",
    "SimReply",
    "SimRequest",
    "SimSeries",
    "SimServer",
    "SimStudy",
    "StreamFault",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nbia_sync.sim.{module}"), name)
    globals()[name] = value
    return value
