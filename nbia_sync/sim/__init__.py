"""The NBIA simulator: a loopback server speaking the archive's REST API over synthetic data.

Used by the integration tests, the benchmarks and `nbia-sync simulate`.
"""

from nbia_sync.sim.archive import SimArchive, SimInstance, SimPatient, SimSeries, SimStudy
from nbia_sync.sim.counters import SimCounters
from nbia_sync.sim.faults import STREAM_FAULTS, SimFaults, StreamFault
from nbia_sync.sim.server import SimServer

__all__ = [
    "STREAM_FAULTS",
    "SimArchive",
    "SimCounters",
    "SimFaults",
    "SimInstance",
    "SimPatient",
    "SimSeries",
    "SimServer",
    "SimStudy",
    "StreamFault",
]
