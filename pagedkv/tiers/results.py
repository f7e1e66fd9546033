"""The values `TieredKVCache` hands back: where a sequence is, how its prefix will be made
resident (`PrefixPlan`, `PrefixProbe`), and how a copy between tiers ended
(`TransferResult`, reported under `Backup(seq_id)` for backups)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from pagedkv.cache.block_manager import SeqId
from pagedkv.tiers.transfer import Direction

Location = Literal["gpu", "host", "offloading", "restoring"]


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    """How a sequence's tokens will be made resident on the GPU.

    Attributes:
        num_gpu_cached_tokens: leading tokens already in GPU blocks (no work).
        num_host_cached_tokens: tokens after those being copied from the host tier.
        compute_start: first position the model must compute, valid once the restore
            copy (if any) completed successfully; see `TransferResult.valid_tokens`.
        slot_mapping: int64 slots of positions `[compute_start, num_tokens)`.
        pending: whether a host-to-GPU copy is in flight (wait for it before computing).
    """

    num_gpu_cached_tokens: int
    num_host_cached_tokens: int
    compute_start: int
    slot_mapping: np.ndarray
    pending: bool


class PrefixProbe(NamedTuple):
    """A read-only look at a token sequence: its full-block hash chain, the blocks'
    content bytes, and the GPU block ids of its longest cached prefix."""

    hashes: list[bytes]
    contents: list[bytes]
    gpu_hits: list[int]


@dataclass(frozen=True, slots=True)
class TransferResult:
    """The outcome of one sequence's offload or restore.

    Attributes:
        ok: every block moved.
        num_blocks_copied: blocks moved and kept (the copied prefix before the first
            failure).
        failed_blocks: table positions (block indices) of the copy that did not land:
            the first block that failed and every later one of the copy (those may have
            moved, but a table is only valid up to its first gap, so they are discarded
            and must be recomputed).
        valid_tokens: restore: leading GPU tokens whose K/V is valid (compute the rest);
            offload: tokens now held on the host (0 when the offload was rolled back);
            backup: leading tokens whose blocks are now findable on the host.
        backup: this was a `backup` (`seq_id` is then `Backup(the sequence id)`).
    """

    seq_id: SeqId
    direction: Direction
    ok: bool
    num_blocks_copied: int
    failed_blocks: list[int]
    valid_tokens: int
    backup: bool = False


@dataclass(frozen=True, slots=True)
class Backup:
    """The id under which a `TieredKVCache.backup` copy of `seq_id` is in flight (and
    under which its `TransferResult` is reported): `is_pending(Backup(seq_id))`."""

    seq_id: SeqId


__all__ = ["Backup", "Location", "PrefixPlan", "PrefixProbe", "TransferResult"]
