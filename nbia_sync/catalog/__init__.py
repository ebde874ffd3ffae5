"""The catalog: the single source of truth for what the mirror holds and must fetch."""

# First, before any catalog module imports sqlalchemy.ext.asyncio (see _sa_asyncio).
from nbia_sync.catalog import _sa_asyncio  # noqa: F401
from nbia_sync.catalog.models import SeriesState
from nbia_sync.catalog.queue import BatchPlacement, LeaseLostError, PlacementGuard
from nbia_sync.catalog.records import (
    Claim,
    FailureInfo,
    InstanceRecord,
    RunCounts,
    RunInfo,
    UpsertResult,
    WorkerInfo,
)
from nbia_sync.catalog.repository import Catalog
from nbia_sync.catalog.sources import Listing

__all__ = [
    "BatchPlacement",
    "Catalog",
    "Claim",
    "FailureInfo",
    "InstanceRecord",
    "LeaseLostError",
    "Listing",
    "PlacementGuard",
    "RunCounts",
    "RunInfo",
    "SeriesState",
    "UpsertResult",
    "WorkerInfo",
]
