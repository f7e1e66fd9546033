"""Counters a server exports: cheap integer increments, always on."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class SchedulerMetrics:
    """Monotonic counters (sessions by state are computed on demand by the scheduler)."""

    turns_started: int = 0
    turns_completed: int = 0
    tokens_prompt: int = 0  # new prompt tokens presented by turns (incl. resumed history)
    tokens_hit_pinned: int = 0  # served by the session's own pinned blocks
    tokens_hit_gpu: int = 0  # served by the GPU hash cache
    tokens_hit_host: int = 0  # served by the host tier (restored; ahead of time by a prefetch too)
    tokens_computed: int = 0  # prefilled
    blocks_offloaded: int = 0  # copied GPU -> host (backups included)
    blocks_backed_up: int = 0  # of which by backups of pinned sessions
    blocks_restored: int = 0
    blocks_dropped: int = 0
    bytes_offloaded: int = 0  # backups included
    bytes_restored: int = 0
    sessions_offloaded: int = 0
    sessions_dropped: int = 0
    # released under pressure with every full block already on the host (backup_idle):
    # nothing copied; the session is DROPPED and its next turn restores by hash
    sessions_released_backed_up: int = 0
    transfer_failures: int = 0
    admission_waits: int = 0
    admission_refusals: int = 0
    restores_layerwise: int = 0  # plans handed out while their restore copied per layer
    restores_layerwise_failed: int = 0  # of those, copies that failed: their step redone
    restores_split: int = 0  # restores planned as load-and-compute (`restore_split`)
    tokens_split_recomputed: int = 0  # host-resident tokens those computed instead
    blocks_prefetched: int = 0  # copied host -> GPU ahead of a return (`prefetch`)
    bytes_prefetched: int = 0
    blocks_prefetch_used: int = 0  # of those, found on the GPU when their session returned
    # of those, released, offloaded, refused at landing, failed or closed before their
    # session returned
    blocks_prefetch_wasted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
