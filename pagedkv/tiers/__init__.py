"""pagedkv.tiers: where a block's bytes live and how they move.

`TieredKVCache` coordinates a GPU and a host `BlockManager` and the copies between them
(offload, restore, backup); a `TransferEngine` moves the bytes: `CopyTransferEngine`
with real tensors (`KVStore`, pinned host memory), `SimulatedTransferEngine` on a
virtual clock for the simulator.

The torch-backed names (`KVStore`, `can_pin_memory`, `pinned_empty`) load torch on first
use, so the scheduler and the simulator import this package without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedkv.tiers.results import Backup, Location, PrefixPlan, PrefixProbe, TransferResult
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import (
    CopyTransferEngine,
    Direction,
    FaultInjectingEngine,
    SimulatedTransferEngine,
    TransferEngine,
    TransferHandle,
)

if TYPE_CHECKING:
    from pagedkv.tiers.kv_store import KVStore, can_pin_memory, pinned_empty

_TORCH_NAMES = frozenset({"KVStore", "can_pin_memory", "pinned_empty"})


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from pagedkv.tiers import kv_store

        return getattr(kv_store, name)
    raise AttributeError(f"module 'pagedkv.tiers' has no attribute {name!r}")


__all__ = [
    "Backup",
    "CopyTransferEngine",
    "Direction",
    "FaultInjectingEngine",
    "KVStore",
    "Location",
    "PrefixPlan",
    "PrefixProbe",
    "SimulatedTransferEngine",
    "TieredKVCache",
    "TransferEngine",
    "TransferHandle",
    "TransferResult",
    "can_pin_memory",
    "pinned_empty",
]
