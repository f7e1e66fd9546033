"""A small two-tier scheduler on a virtual clock, for the scheduler tests."""

from __future__ import annotations

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.scheduler.scheduler import SessionScheduler, TurnPlan
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import SimulatedTransferEngine, TransferEngine


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(
    *,
    num_gpu: int = 32,
    num_host: int | None = 64,
    engine: TransferEngine | None = None,
    block_size: int = 4,
    **config: object,
) -> tuple[SessionScheduler, Clock]:
    clock = Clock()
    hasher = BlockHasher(block_size=block_size, secret=b"sched")
    host = BlockManager(BlockPool(num_host, name="host"), hasher) if num_host else None
    if host is not None and engine is None:
        # 1 ms per block: copies are visibly in flight until the clock moves
        engine = SimulatedTransferEngine(
            bytes_per_block=1000, bandwidth_bytes_per_s=1e6, latency_s=0.0, clock=clock
        )
    cache = TieredKVCache(BlockManager(BlockPool(num_gpu, name="gpu"), hasher), host, engine)
    return SessionScheduler(cache, SchedulerConfig(**config), clock=clock), clock  # type: ignore[arg-type]


def run_turn(
    sched: SessionScheduler, plan: TurnPlan | None, output: list[int] | None = None
) -> None:
    """Pretend the model ran: mark the prompt computed, decode `output`, end the turn."""
    assert plan is not None
    sid = plan.session_id
    sched.mark_computed(sid)
    if output:
        sched.append_tokens(sid, output)
        sched.mark_computed(sid)
    sched.end_turn(sid)
