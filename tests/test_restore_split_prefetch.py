"""Restores that hide behind compute: the load-and-compute split (cost model, cache,
engine) and the scheduler's prefetch of offloaded sessions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from engine_helpers import run_conversations
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import Clock, make_scheduler, run_turn
from tier_helpers import (
    SPEC,
    DeferredCopyEngine,
    expected_tokens,
    make_cache,
    read_tokens,
    token_values,
    write_kv,
)

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.model.llama import LlamaModel
from pagedkv.scheduler.config import PrefetchConfig, SchedulerConfig
from pagedkv.scheduler.cost import CostModel
from pagedkv.scheduler.errors import SessionError
from pagedkv.scheduler.eviction import IdleGapModel
from pagedkv.scheduler.scheduler import SessionScheduler, TurnReady
from pagedkv.scheduler.session import SessionState as S
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.tiered import TieredKVCache

BS = SPEC.block_size

# -- the cost model's plan --------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    num_blocks=st.integers(0, 300),
    context=st.integers(0, 5000),
    new=st.integers(0, 2000),
    link=st.floats(1e8, 1e11),
    flops=st.floats(1e12, 1e16),
    layerwise=st.booleans(),
    weight=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_a_split_is_never_worse_than_restoring_or_recomputing(
    num_blocks: int,
    context: int,
    new: int,
    link: float,
    flops: float,
    layerwise: bool,
    weight: float,
) -> None:
    cost = CostModel(block_size=16, host_link_bytes_per_s=link, gpu_flops=flops)
    j, end = cost.split_restore(
        num_blocks, context, new, layerwise=layerwise, compute_weight=weight
    )
    assert 0 <= j <= num_blocks

    def timed(k: int) -> tuple[float, float]:
        copy = k * cost.bytes_per_block / link
        prefill = cost.prefill_s((num_blocks - k) * 16 + new, context + k * 16)
        if layerwise:
            t = max(prefill, copy / cost.num_layers + prefill, copy + prefill / cost.num_layers)
        else:
            t = copy + prefill
        return t, prefill

    t_best, p_best = timed(j)
    assert end == pytest.approx(t_best, rel=1e-9, abs=1e-12)
    base_prefill = timed(num_blocks)[1]
    for k in (0, num_blocks):  # the two plain choices
        t_k, p_k = timed(k)
        score_best = t_best + weight * (p_best - base_prefill)
        assert score_best <= t_k + weight * (p_k - base_prefill) + 1e-12
    # the prefill never starts before the copy that feeds it would allow
    assert end >= timed(num_blocks)[1] - 1e-12


def test_splits_follow_the_link() -> None:
    fast = CostModel(block_size=16, host_link_bytes_per_s=1e12)
    slow = CostModel(block_size=16, host_link_bytes_per_s=1e8)
    assert fast.split_restore(500, 1000, 100, layerwise=True)[0] == 500  # just restore
    assert slow.split_restore(500, 1000, 100, layerwise=False, compute_weight=0.0)[0] == 0
    j, _ = slow.split_restore(500, 1000, 100, layerwise=True, compute_weight=0.0)
    assert 0 < j < 500  # copy the front while computing the back
    with pytest.raises(ValueError, match="counts must be >= 0"):
        fast.split_restore(-1, 0, 0, layerwise=True)


def test_layerwise_end_is_bounded_by_either_alone_and_their_sum() -> None:
    cost = CostModel()
    for copy, prefill in ((0.1, 0.01), (0.01, 0.1), (0.05, 0.05)):
        end = cost.layerwise_end_s(
            gpu_start_s=0.0, copy_start_s=0.0, copy_end_s=copy, prefill_s=prefill
        )
        assert max(copy, prefill) <= end <= copy + prefill
        assert end == pytest.approx(
            max(copy / cost.num_layers + prefill, copy + prefill / cost.num_layers)
        )


# -- the cache executes a split ------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, 2, None])
def test_a_split_restore_copies_the_front_and_leaves_the_back_to_compute(
    keep: int | None,
) -> None:
    cache, gpu, _host = make_cache(12, 12)
    hist = list(range(3 * BS + 2))
    values = token_values(0, hist)
    cache.begin_sequence("s", hist)
    t = cache.gpu.table("s")
    write_kv(gpu, cache.gpu.slot_mapping("s", 0, len(hist)).tolist(), values)
    cache.gpu.mark_computed("s")
    cache.offload("s")
    cache.wait_all()
    cache.gpu.pool.evict(cache.gpu.pool.num_cached)  # nothing left on the GPU
    extra = [7, 7, 7]
    plan = cache.restore("s", extra_tokens=extra, max_restore_blocks=keep)
    cache.wait_all()
    full = hist + extra
    restored = len(hist) if keep is None or keep >= 4 else keep * BS
    assert plan.compute_start == restored
    assert plan.num_host_cached_tokens == restored
    t = cache.gpu.table("s")
    assert t.num_computed_tokens == restored
    if restored:
        assert torch.equal(
            read_tokens(gpu, t.block_ids, restored), expected_tokens(values[:restored])
        )
    # the runner computes the rest: then the sequence equals a full restore's
    all_values = token_values(0, full)
    write_kv(gpu, cache.gpu.slot_mapping("s", restored, len(full)).tolist(), all_values[restored:])
    cache.gpu.mark_computed("s")
    assert torch.equal(read_tokens(gpu, t.block_ids, len(full)), expected_tokens(all_values))
    assert "s" not in cache.host  # the host copy is released whatever was copied
    cache.free("s")
    cache.check_invariants()
    cache.begin_sequence("t", hist)
    cache.gpu.mark_computed("t")
    cache.offload("t")
    cache.wait_all()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_restore_blocks"):
            cache.restore("t", max_restore_blocks=bad)  # type: ignore[arg-type]
    assert cache.location("t") == "host"  # refused before anything changed
    cache.check_invariants()


# -- the engine: splits never change an output -----------------------------------------------


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return build_model("tiny", seed=3)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_split_restores_give_the_same_outputs(model: LlamaModel, fraction: float) -> None:
    """Sessions pushed off the GPU come back through splits (half of the host run
    copied, or none: a full recompute), and every output equals a recompute's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = build_engine(
            model,
            num_gpu_blocks=24,
            num_host_blocks=96,
            scheduler=SchedulerConfig(max_pinned_sessions=2, restore_split=True, backup_idle=True),
        )
        splits: list[int] = []

        def plan(cached: int, num_blocks: int, after: int, *, count: bool = True) -> int:
            j = int(num_blocks * fraction)
            if count and j < num_blocks:
                engine.scheduler._count_split((num_blocks - j) * engine.cache.block_size)
            splits.append(num_blocks - j)
            return j

        engine.scheduler._split_plan = plan  # type: ignore[method-assign]
        run_conversations(engine, model)  # every output equals a recompute's
        m = engine.scheduler.metrics
        assert m.restores_split > 0 and m.tokens_split_recomputed > 0, splits
    finally:
        torch.set_num_threads(threads)


# -- prefetch --------------------------------------------------------------------------


class RefusingEngine(DeferredCopyEngine):
    """A `DeferredCopyEngine` whose submit raises for restores while `refuse` is set (a
    device error at submit time)."""

    refuse = False

    def submit(self, direction, src_ids, dst_ids, **kw):  # type: ignore[no-untyped-def]
        if self.refuse and direction == "restore":
            raise RuntimeError("CUDA error: out of memory (injected)")
        return super().submit(direction, src_ids, dst_ids, **kw)  # type: ignore[no-untyped-call]


def _prefetching_scheduler(
    num_gpu: int = 12,
    *,
    cap: int = 2,
    config: dict[str, Any] | None = None,
    engine_type: type[DeferredCopyEngine] = DeferredCopyEngine,
    **prefetch: Any,
) -> tuple[SessionScheduler, Clock, KVStore]:
    clock = Clock()
    gpu = KVStore(SPEC, num_gpu, fill=float("nan"))
    host = KVStore(SPEC, 32, fill=float("nan"))
    engine = engine_type(gpu, host, clock, delay=0.5)
    hasher = BlockHasher(block_size=BS, secret=b"pf")
    cache = TieredKVCache(
        BlockManager(BlockPool(num_gpu, name="gpu"), hasher),
        BlockManager(BlockPool(32, name="host"), hasher),
        engine,
    )
    cfg = PrefetchConfig(
        **{"headroom": 0.0, "max_inflight_blocks": 8, "horizon_s": 5.0, **prefetch}
    )
    sched = SessionScheduler(
        cache,
        SchedulerConfig(
            max_pinned_sessions=cap, high_watermark=1.0, prefetch=cfg, **(config or {})
        ),
        clock=clock,
    )
    sched.idle_gaps = IdleGapModel(min_samples=2)
    for gap in (3.0, 3.0, 3.5, 4.0):  # sessions come back after 3-4 s
        sched.idle_gaps.observe(gap)
    return sched, clock, gpu


def _turn(sched: SessionScheduler, clock: Clock, gpu: KVStore, sid: str, hist: list[int]) -> Any:
    """Run one turn of `sid` whose full prompt is `hist` (waiting for any copy)."""
    s = sched.session(sid)
    have = sched.num_tokens(sid)
    plan = sched.begin_turn(sid, hist[have:])
    for _ in range(40):
        if plan is not None:
            break
        clock.now += 0.25
        for ev in sched.poll():
            if isinstance(ev, TurnReady) and ev.session_id == sid:
                plan = ev.plan
    assert plan is not None, s
    got = read_tokens(gpu, plan.block_ids, plan.compute_start)
    assert torch.equal(got, expected_tokens(token_values(0, hist)[: plan.compute_start]))
    write_kv(
        gpu,
        sched.cache.gpu.slot_mapping(sid, plan.compute_start, plan.num_tokens).tolist(),
        token_values(0, hist)[plan.compute_start :],
    )
    sched.mark_computed(sid)
    sched.end_turn(sid)
    return plan


def _offload_a(
    sched: SessionScheduler,
    clock: Clock,
    gpu: KVStore,
    *,
    tenant: str = "default",
    b_tenant: str = "default",
    rests: S = S.OFFLOADED,
) -> list[int]:
    """Session a runs, goes idle and is offloaded (or, backed up, released: `rests`) to
    make room for b; b ends."""
    hist_a = list(range(3 * BS))
    sched.open_session("a", tenant=tenant)
    _turn(sched, clock, gpu, "a", hist_a)
    sched.open_session("b", tenant=b_tenant)
    sched.set_max_pinned_sessions(1)  # b's turn pushes a out
    _turn(sched, clock, gpu, "b", [9] * (2 * BS))
    for _ in range(8):
        clock.now += 0.25
        sched.poll()
    where = "host" if rests == S.OFFLOADED else None
    assert sched.session("a").state == rests and sched.cache.location("a") == where
    sched.set_max_pinned_sessions(2)
    sched.cache.gpu.pool.evict(sched.cache.gpu.pool.num_cached)  # a's GPU copy is gone
    return hist_a


def test_an_offloaded_session_likely_to_return_is_brought_back_before_it_does() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    hist_a = _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()  # likely back within the horizon: the prefetch starts
    assert sched.cache.location("a") == "restoring"
    assert sum(s.prefetched_blocks for s in sched._prefetching.values()) <= 8
    for _ in range(4):
        clock.now += 0.25
        sched.poll()
    s = sched.session("a")
    assert s.state == S.IDLE and sched.cache.location("a") == "gpu"
    sched.check_invariants()
    restored_before = sched.metrics.blocks_restored
    plan = _turn(sched, clock, gpu, "a", [*hist_a, 5, 5])
    # no copy on the way back: it was already there; its tokens came from the host
    # (ahead of time), so they are reported as host hits, not as its own pinned blocks
    assert (plan.hit_pinned, plan.hit_gpu, plan.hit_host) == (0, 0, len(hist_a))
    assert sched.metrics.blocks_restored == restored_before
    m = sched.metrics
    assert m.blocks_prefetched == 3 and m.blocks_prefetch_used == 3
    sched.check_invariants()


@pytest.mark.parametrize("protect", [False, True])
def test_a_prefetched_session_evicted_before_it_returns_costs_only_the_copy(
    protect: bool,
) -> None:
    sched, clock, gpu = _prefetching_scheduler(protect=protect)
    hist_a = _offload_a(sched, clock, gpu)
    clock.now += 1.0
    for _ in range(5):
        sched.poll()
        clock.now += 0.25
    assert sched.session("a").state == S.IDLE
    if protect:  # protected for its predicted window (5 s): past it, the first victim
        clock.now += 5.0
    offloaded = sched.metrics.blocks_offloaded
    sched.set_max_pinned_sessions(1)
    # b comes back first: a, prefetched and not back yet, is the victim, released
    _turn(sched, clock, gpu, "b", [9] * (2 * BS) + [1])
    s = sched.session("a")
    assert s.state == S.DROPPED and s.prefetched_blocks == 0
    assert sched.metrics.blocks_offloaded == offloaded  # released, not copied again
    m = sched.metrics
    assert m.blocks_prefetched == 3 and m.blocks_prefetch_used == 0
    # and a's next turn still finds its prefix (on the host, by hash), right bytes
    sched.set_max_pinned_sessions(2)
    plan = _turn(sched, clock, gpu, "a", [*hist_a, 5])
    assert plan.num_computed < len(hist_a)
    sched.check_invariants()


def test_a_turn_arriving_mid_prefetch_waits_for_it_then_runs() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    hist_a = _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "restoring"
    plan = _turn(sched, clock, gpu, "a", [*hist_a, 4, 4, 4])  # checks the bytes it is served
    assert plan.num_tokens == len(hist_a) + 3
    sched.check_invariants()


def test_a_turn_parked_on_its_prefetch_blocks_no_one_and_starts_when_it_lands() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    hist_a = _offload_a(sched, clock, gpu)
    sched.set_max_pinned_sessions(3)  # room for a to land next to b and c
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "restoring"
    assert sched.begin_turn("a", [4, 4, 4]) is None  # parked on its prefetch, not queued
    assert not sched.session("a").is_queued and sched.num_queued == 0
    with pytest.raises(SessionError, match="queued"):
        sched.begin_turn("a", [5])  # one turn at a time, parked or not
    sched.check_invariants()
    sched.open_session("c")  # a later turn of another session goes ahead at once
    plan_c = sched.begin_turn("c", [8] * BS)
    assert plan_c is not None
    sched.mark_computed("c")
    sched.end_turn("c")
    ready = []
    for _ in range(8):
        clock.now += 0.25
        ready += [ev for ev in sched.poll() if isinstance(ev, TurnReady)]
        sched.check_invariants()
    (ev,) = ready
    assert ev.session_id == "a" and ev.plan.num_tokens == len(hist_a) + 3
    assert ev.plan.compute_start == len(hist_a)  # the prefetched blocks, no copy
    assert sched.metrics.blocks_prefetch_used == 3
    got = read_tokens(gpu, ev.plan.block_ids, ev.plan.compute_start)
    assert torch.equal(got, expected_tokens(token_values(0, hist_a)))


def test_an_engine_refusal_while_a_parked_turn_starts_does_not_escape_poll() -> None:
    """The prefetch a turn is parked on fails, and the engine refuses the restore its
    start then needs: poll() returns, the turn waits in the queue (at its front), and
    the other copies committed in the same poll are handled."""
    sched, clock, gpu = _prefetching_scheduler(engine_type=RefusingEngine)
    _offload_a(sched, clock, gpu)
    sched.set_max_pinned_sessions(3)
    clock.now += 1.0
    sched.poll()
    assert sched.begin_turn("a", [4, 4]) is None  # parked
    sched._evict(sched.session("b"))  # b is offloaded: its copy lands in the same poll
    assert sched.cache.location("b") == "offloading"
    sched.cache.cancel("a")  # the prefetch copy fails
    sched.cache.engine.refuse = True  # type: ignore[attr-defined]
    clock.now += 1.0
    assert sched.poll() == []
    sched.check_invariants()
    assert sched.session("a").is_queued
    assert not sched._releasing  # b's offload was committed (b may be prefetched back)
    sched.cache.engine.refuse = False  # type: ignore[attr-defined]
    sched.set_max_pinned_sessions(2)
    ready = []
    for _ in range(8):
        clock.now += 0.25
        ready += [ev.session_id for ev in sched.poll() if isinstance(ev, TurnReady)]
    assert ready == ["a"]
    sched.check_invariants()


def test_a_running_turn_that_needs_room_now_gets_what_a_prefetch_in_flight_holds() -> None:
    sched, clock, gpu = _prefetching_scheduler(20, headroom=0.1)
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "restoring"
    assert sched.begin_turn("b", [1]) is not None
    sched.append_tokens("b", [5] * (BS * 16))  # needs the prefetch's blocks: it lands first
    sched.check_invariants()
    assert sched.session("a").state != S.IDLE and sched.metrics.blocks_prefetch_wasted == 3


def test_a_session_closed_before_it_returns_wasted_its_prefetch() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.metrics.blocks_prefetched == 3
    sched.close_session("a", offload=False)
    assert sched.metrics.blocks_prefetch_wasted == 3  # counted against the budget


def test_closing_a_session_drops_its_undelivered_events() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.begin_turn("a", [4]) is None  # parked on its prefetch
    clock.now += 1.0
    for r in sched.cache.poll():  # the copy lands between polls: TurnReady is pending
        sched._on_transfer(r)
    assert [ev.session_id for ev in sched._events] == ["a"]
    sched.close_session("a", offload=False)
    assert sched.poll() == []  # no event for a closed session
    sched.check_invariants()


def test_closing_a_session_parked_on_its_prefetch_releases_it() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.begin_turn("a", [4]) is None
    sched.close_session("a", offload=False)
    for _ in range(4):
        clock.now += 0.25
        assert sched.poll() == []
        sched.check_invariants()
    assert sched.cache.location("a") is None


def test_no_prefetch_without_room_or_prediction() -> None:
    # a session bigger than the prefetch budget, and one the model says is not coming
    sched, clock, gpu = _prefetching_scheduler(max_inflight_blocks=2)
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "host"  # 3 blocks > the 2-block budget
    sched, clock, gpu = _prefetching_scheduler(horizon_s=0.1, min_return_probability=0.9)
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "host"
    assert sched.metrics.blocks_prefetched == 0
    with pytest.raises(ValueError, match="horizon_s"):
        PrefetchConfig(horizon_s=0)
    with pytest.raises(TypeError, match="prefetch must be a PrefetchConfig"):
        SchedulerConfig(prefetch={"horizon_s": 1.0})  # type: ignore[arg-type]


# -- prefetch: regressions (issue 18) ----------------------------------------------------


def _land(sched: SessionScheduler, clock: Clock, sid: str = "a") -> None:
    """Poll until `sid`'s prefetch has landed (it must start at the first poll)."""
    sched.poll()
    assert sched.cache.location(sid) == "restoring", sched.cache.location(sid)
    for _ in range(4):
        clock.now += 0.25
        sched.poll()
    assert sched.session(sid).state == S.IDLE and sched.session(sid).prefetched_blocks


def test_a_session_idle_past_the_ttl_is_not_prefetched() -> None:
    # it would be offloaded again at the next poll, and fetched again: a thrash
    sched, clock, gpu = _prefetching_scheduler(config={"idle_ttl_s": 2.0})
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    assert clock.now - sched.session("a").last_active > 2.0
    for _ in range(12):
        sched.poll()
        clock.now += 0.25
    assert sched.metrics.blocks_prefetched == 0 and sched.metrics.bytes_restored == 0
    assert sched.cache.location("a") == "host"
    sched.check_invariants()


def test_a_wasted_prefetch_backs_off_until_its_session_returns() -> None:
    sched, clock, gpu = _prefetching_scheduler(
        protect=False, backoff_s=100.0, config={"idle_ttl_s": 30.0}
    )
    hist_a = _offload_a(sched, clock, gpu)
    clock.now += 1.0
    _land(sched, clock)
    sched.set_max_pinned_sessions(1)
    _turn(sched, clock, gpu, "b", [9] * (2 * BS) + [1])  # a, prefetched, is released
    s = sched.session("a")
    assert s.state == S.DROPPED and s.prefetch_wasted == 1
    assert s.prefetch_after == pytest.approx(clock.now + 100.0, abs=1.0)
    assert sched.metrics.blocks_prefetch_wasted == 3
    sched.set_max_pinned_sessions(2)
    sched.close_session("b")
    sched.cache.gpu.pool.evict(sched.cache.gpu.pool.num_cached)
    for _ in range(8):  # room and a slot, still likely back: but not fetched again
        sched.poll()
        clock.now += 0.25
    assert sched.metrics.blocks_prefetched == 3 and sched.cache.location("a") is None
    _turn(sched, clock, gpu, "a", [*hist_a, 5])  # it returns: the mark is cleared
    assert s.prefetch_wasted == 0 and s.prefetch_after == float("-inf")
    sched.check_invariants()


def test_the_prefetch_back_off_doubles_with_each_waste() -> None:
    sched, clock, _gpu = _prefetching_scheduler(backoff_s=2.0)
    s = sched.open_session("x")
    for n, wait in ((1, 2.0), (2, 4.0), (3, 8.0)):
        s.prefetched_blocks = 1
        sched._prefetch_wasted_by(s)
        assert (s.prefetch_wasted, s.prefetch_after) == (n, clock.now + wait)
    s.prefetch_wasted = 10_000  # no overflow
    s.prefetched_blocks = 1
    sched._prefetch_wasted_by(s)
    assert s.prefetch_after > clock.now


def test_a_session_with_a_queued_turn_is_not_prefetched() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    hist_a = _offload_a(sched, clock, gpu)
    # b runs a long turn (6 of the 12 blocks, not evictable while it runs) ...
    assert sched.begin_turn("b", [8] * (4 * BS)) is not None
    # ... so a's turn (3 blocks of history + 4 new) waits in the queue, while a
    # prefetch of a's history alone (3 blocks) would fit
    assert sched.begin_turn("a", [4] * (4 * BS)) is None
    assert sched.session("a").is_queued
    clock.now += 1.0
    for _ in range(4):
        sched.poll()
        clock.now += 0.25
    assert sched.cache.location("a") == "host" and sched.metrics.blocks_prefetched == 0
    table = sched.cache.gpu.table("b")
    write_kv(
        gpu,
        sched.cache.gpu.slot_mapping("b", table.num_computed_tokens, table.num_tokens).tolist(),
        token_values(0, [9] * (2 * BS) + [8] * (4 * BS))[table.num_computed_tokens :],
    )
    sched.mark_computed("b")
    sched.end_turn("b")
    ready = []
    for _ in range(8):
        clock.now += 0.25
        ready += [ev for ev in sched.poll() if isinstance(ev, TurnReady)]
    assert [ev.session_id for ev in ready] == ["a"]
    assert ready[0].plan.num_tokens == len(hist_a) + 4 * BS
    sched.check_invariants()


@pytest.mark.parametrize("protect", [False, True])
def test_a_prefetched_session_is_evicted_by_a_lower_priority_turn(protect: bool) -> None:
    sched, clock, gpu = _prefetching_scheduler(protect=protect)
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    _land(sched, clock)
    # c (priority -1, below a's 0): b runs, so c needs a's slot
    assert sched.begin_turn("b", [1]) is not None
    plan = sched.resume("c", [3] * (2 * BS), priority=-1)
    assert plan is not None  # at once: a (prefetched, not back) is released for it
    assert sched.session("a").state == S.DROPPED
    sched.check_invariants()


def test_a_prefetched_session_is_evicted_past_the_tenant_fair_share_guard() -> None:
    sched, clock, gpu = _prefetching_scheduler(protect=False)
    _offload_a(sched, clock, gpu, tenant="x", b_tenant="y")
    clock.now += 1.0
    _land(sched, clock)
    # y holds its fair share (1 of 2 slots, with b running); x holds a, prefetched: c
    # (tenant y) may not shrink x below its share, except by releasing a prefetch
    assert sched.begin_turn("b", [1]) is not None
    plan = sched.resume("c", [3] * (2 * BS), tenant="y")
    assert plan is not None and sched.session("a").state == S.DROPPED
    sched.check_invariants()


def test_lru_victim_order_evicts_a_prefetched_session_first() -> None:
    sched, clock, gpu = _prefetching_scheduler(
        16, cap=3, protect=False, config={"victim_order": "lru"}
    )
    _offload_a(sched, clock, gpu)
    sched.set_max_pinned_sessions(3)
    clock.now += 1.0
    _land(sched, clock)
    assert sched.num_pinned == 2  # b (idle since before a's prefetch landed), a
    assert sched.resume("c", [3] * (2 * BS)) is not None  # takes the third slot
    sched.mark_computed("c")
    sched.end_turn("c")
    assert sched.resume("d", [6] * (2 * BS)) is not None  # needs a slot: a goes, not b
    assert sched.session("a").state == S.DROPPED
    assert sched.session("b").state == S.IDLE and sched.session("c").state == S.IDLE
    sched.check_invariants()


@pytest.mark.parametrize("resting", ["offloaded", "dropped"])
def test_an_engine_that_refuses_a_prefetch_leaves_everything_as_it_was(resting: str) -> None:
    sched, clock, gpu = _prefetching_scheduler(
        engine_type=RefusingEngine, config={"backup_idle": resting == "dropped"}
    )
    # backed up, a is released onto its host copy (DROPPED) rather than offloaded
    _offload_a(sched, clock, gpu, rests=S.DROPPED if resting == "dropped" else S.OFFLOADED)
    engine = sched.cache.engine
    assert isinstance(engine, RefusingEngine)
    engine.refuse = True
    gpu_pool, host_pool = sched.cache.gpu.pool, sched.cache.host.pool  # type: ignore[union-attr]
    before = (
        gpu_pool.num_in_use, gpu_pool.num_available, host_pool.num_in_use,
        host_pool.num_available, sched.num_pinned, sched.cache.location("a"),
        sched.session("a").state, dict(sched.metrics.as_dict()),
    )  # fmt: skip
    clock.now += 1.0
    for _ in range(3):
        assert sched.poll() == []  # the engine's error does not escape
        clock.now += 0.25
    after = (
        gpu_pool.num_in_use, gpu_pool.num_available, host_pool.num_in_use,
        host_pool.num_available, sched.num_pinned, sched.cache.location("a"),
        sched.session("a").state, dict(sched.metrics.as_dict()),
    )  # fmt: skip
    assert after == before
    assert not sched._prefetching and sched.session("a").prefetched_blocks == 0
    sched.check_invariants()
    sched.cache.check_invariants()
    engine.refuse = False  # and the next try works
    sched.poll()
    assert sched.cache.location("a") == "restoring"


def test_an_infeasible_likeliest_candidate_does_not_block_the_next() -> None:
    sched, clock, gpu = _prefetching_scheduler(cap=1, max_inflight_blocks=3)
    hist_s, hist_g = list(range(2 * BS)), list(range(100, 100 + 5 * BS))
    for sid, hist in (("s", hist_s), ("g", hist_g), ("b", [9] * (2 * BS))):
        sched.open_session(sid)
        _turn(sched, clock, gpu, sid, hist)  # each pushes out the one before
    for _ in range(4):
        clock.now += 0.25
        sched.poll()
    assert sched.cache.location("s") == "host" and sched.cache.location("g") == "host"
    # g rested last: scanned first, as likely as s, and 5 blocks > the 3-block budget
    assert list(sched._offloaded) == ["s", "g"]
    sched.set_max_pinned_sessions(2)
    sched.cache.gpu.pool.evict(sched.cache.gpu.pool.num_cached)
    sched.poll()
    assert sched.cache.location("s") == "restoring" and sched.cache.location("g") == "host"
    sched.check_invariants()


def test_only_dropped_sessions_with_a_host_copy_are_prefetch_candidates() -> None:
    for backup in (False, True):
        sched, clock, gpu = _prefetching_scheduler(
            config={"backup_idle": backup, "offload_idle": False}
        )
        sched.open_session("a")
        _turn(sched, clock, gpu, "a", list(range(3 * BS)))
        clock.now += 1.0  # a's backup (if any) lands
        sched.poll()
        sched.set_max_pinned_sessions(1)
        sched.open_session("b")
        _turn(sched, clock, gpu, "b", [9] * (2 * BS))
        s = sched.session("a")
        assert s.state == S.DROPPED
        # released onto its host copy, a candidate; dropped with none, not one
        assert ("a" in sched._dropped) == backup, backup


def test_prefetch_respects_the_tenant_pinned_blocks_cap() -> None:
    for cap, fetched in ((4, False), (5, True)):  # b holds 2 blocks, a needs 3
        sched, clock, gpu = _prefetching_scheduler(config={"tenant_default_max_pinned_blocks": cap})
        _offload_a(sched, clock, gpu)
        clock.now += 1.0
        sched.poll()
        assert (sched.cache.location("a") == "restoring") == fetched, cap
        if fetched:
            for _ in range(4):
                clock.now += 0.25
                sched.poll()
            assert sched.tenant_gpu_blocks("default") <= cap
        sched.check_invariants()


def test_a_prefetch_refused_at_landing_counts_as_prefetched_and_wasted() -> None:
    sched, clock, gpu = _prefetching_scheduler()
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "restoring"
    # c takes the last pin slot while a's copy is in flight
    assert sched.resume("c", [3] * BS) is not None
    sched.mark_computed("c")
    sched.end_turn("c")
    for _ in range(4):  # lands with no slot, and b and c are not on the host: no swap
        clock.now += 0.25
        sched.poll()
    s = sched.session("a")
    assert s.state == S.DROPPED and s.evicted_by == "prefetch" and s.prefetch_wasted == 1
    m = sched.metrics
    assert (m.blocks_prefetched, m.blocks_prefetch_used, m.blocks_prefetch_wasted) == (3, 0, 3)
    assert m.bytes_prefetched == 3 * sched.cost.bytes_per_block
    sched.check_invariants()


def test_a_landing_prefetch_swaps_out_an_idle_session_likely_to_stay_idle() -> None:
    sched, clock, gpu = _prefetching_scheduler(config={"backup_idle": True})
    _offload_a(sched, clock, gpu, rests=S.DROPPED)
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "restoring"
    assert sched.resume("c", [3] * (2 * BS)) is not None
    sched.mark_computed("c")
    sched.end_turn("c")  # c just ended: it stays idle a while (gaps are 3-4 s); backed up
    for _ in range(4):
        clock.now += 0.25
        sched.poll()
    assert sched.session("a").state == S.IDLE
    assert sched.session("c").state == S.DROPPED and sched.session("c").evicted_by == "backed_up"
    assert sched.metrics.blocks_prefetch_wasted == 0
    sched.check_invariants()


def test_a_protected_prefetch_is_spared_while_another_idle_session_can_go() -> None:
    sched, clock, gpu = _prefetching_scheduler(protect=True)
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    _land(sched, clock)  # within its 5 s window: protected
    sched.set_max_pinned_sessions(1)  # one must go: b (idle) rather than a
    assert sched.session("a").state == S.IDLE and sched.session("b").state != S.IDLE
    sched.set_max_pinned_sessions(2)
    assert sched.resume("c", [3] * BS) is not None
    # d needs a slot, and a is the only idle session: the last resort goes
    assert sched.resume("d", [6] * BS) is not None
    assert sched.session("a").state == S.DROPPED
    sched.check_invariants()


def test_the_waste_budget_stops_prefetch_when_prefetches_are_wasted() -> None:
    # an allowance of 3 blocks at an 80% target: one 3-block prefetch may be wasted
    sched, clock, gpu = _prefetching_scheduler(
        protect=False, backoff_s=0.0, min_hit_rate=0.8, waste_allowance_blocks=3
    )
    _offload_a(sched, clock, gpu)
    clock.now += 1.0
    _land(sched, clock)
    sched.set_max_pinned_sessions(1)
    _turn(sched, clock, gpu, "b", [9] * (2 * BS) + [1])  # a is released: wasted
    sched.set_max_pinned_sessions(2)
    sched.close_session("b")
    sched.cache.gpu.pool.evict(sched.cache.gpu.pool.num_cached)
    cfg = sched.config.prefetch
    assert cfg is not None
    assert sched._prefetch_credit(cfg) == pytest.approx(3 - 0.8 * 3)
    # a is a candidate again (no back-off) ...
    assert [s.session_id for _w, s in sched._prefetch_candidates(cfg, clock.now, 12)] == ["a"]
    sched.poll()
    assert sched.metrics.blocks_prefetched == 3  # ... but not fetched: 0.8 * 3 > 0.6 left
    # without a budget it is fetched again
    sched.config = replace(
        sched.config,
        prefetch=replace(sched.config.prefetch, min_hit_rate=0.0),  # type: ignore[type-var]
    )
    sched.poll()
    assert sched.cache.location("a") == "restoring"


def test_a_split_restore_counts_the_tokens_it_recomputes() -> None:
    sched, clock = make_scheduler(
        num_gpu=16, max_pinned_sessions=1, restore_split=True, high_watermark=1.0
    )

    def run(sid: str, tokens: list[int]) -> None:
        plan = sched.begin_turn(sid, tokens)
        for _ in range(100):
            if plan is not None:
                break
            clock.now += 0.01
            plan = next((e.plan for e in sched.poll() if isinstance(e, TurnReady)), None)
        run_turn(sched, plan)

    hist = list(range(3 * BS + 2))  # 4 blocks, the last holding 2 tokens
    for sid, toks in (("a", hist), ("b", [9] * BS)):  # b's turn pushes a out
        sched.open_session(sid)
        run(sid, toks)
    clock.now += 1.0
    sched.poll()
    assert sched.cache.location("a") == "host"
    sched.cache.gpu.pool.evict(sched.cache.gpu.pool.num_cached)
    sched._split_plan = lambda cached, num_blocks, after, *, count=True: 1  # type: ignore[method-assign, assignment]
    sched.close_session("b")
    run("a", [5])  # copies 1 of its 4 host blocks, computes the other 10 tokens
    m = sched.metrics
    assert m.restores_split == 1
    assert m.tokens_split_recomputed == len(hist) - BS  # 10, not 3 whole blocks (12)


def test_split_restore_refuses_nan_negative_or_infinite_latency_and_weight() -> None:
    cost = CostModel(block_size=16)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="copy_latency_s"):
            cost.split_restore(4, 0, 1, layerwise=True, copy_latency_s=bad)
        with pytest.raises(ValueError, match="compute_weight"):
            cost.split_restore(4, 0, 1, layerwise=True, compute_weight=bad)
    assert cost.split_restore(4, 0, 1, layerwise=True, copy_latency_s=0.0, compute_weight=0.0)


def test_prefetch_config_validates_its_new_fields() -> None:
    for kw, err in (
        ({"backoff_s": -1.0}, ValueError),
        ({"backoff_s": float("nan")}, ValueError),
        ({"min_hit_rate": 1.0}, ValueError),
        ({"min_hit_rate": float("nan")}, ValueError),
        ({"waste_allowance_blocks": -1}, ValueError),
        ({"waste_allowance_blocks": 1.5}, TypeError),
        ({"protect": 1}, TypeError),
        ({"horizon_s": float("inf")}, ValueError),
    ):
        with pytest.raises(err):
            PrefetchConfig(**kw)
    assert PrefetchConfig(min_hit_rate=0.75).waste_fraction == pytest.approx(0.25)
