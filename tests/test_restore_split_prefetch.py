"""Restores that hide behind compute: the load-and-compute split (cost model, cache,
engine) and the scheduler's prefetch of offloaded sessions."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_helpers import TOK, greedy, reference
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_helpers import Clock
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
from pagedkv.scheduler.eviction import IdleGapModel
from pagedkv.scheduler.scheduler import SessionScheduler, TurnReady
from pagedkv.scheduler.session import SessionState as S
from pagedkv.serving.conversation import Item, Message, render_prompt
from pagedkv.serving.engine_types import EngineRequest, TurnDone
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
        sessions = [f"s{i}" for i in range(4)]
        convs: dict[str, list[Item]] = {sid: [Message("user", f"{sid} " * 20)] for sid in sessions}
        events: dict[str, list[Any]] = {}
        for sid in sessions:
            engine.open_session(sid)
        n = 0
        for turn in range(3):
            for sid in sessions:
                prompt = render_prompt(TOK, instructions=None, tools=(), items=convs[sid])
                n += 1
                rid = f"r{n}"
                events[rid] = []
                engine.submit(
                    EngineRequest(
                        request_id=rid,
                        session_id=sid,
                        prompt_tokens=tuple(prompt),
                        output=greedy(4),
                    ),
                    events[rid].append,
                )
                engine.run_until_idle()
                done = events[rid][-1]
                assert isinstance(done, TurnDone), events[rid]
                assert done.item == reference(model, prompt, greedy(4))[1], (turn, sid)
                assert done.item is not None
                convs[sid] += [done.item, Message("user", f"turn {turn} " * 5)]
        m = engine.scheduler.metrics
        assert m.restores_split > 0 and m.tokens_split_recomputed > 0, splits
        for sid in sessions:
            engine.close_session(sid)
        engine.run_until_idle()
        engine.scheduler.check_invariants()
        engine.cache.check_invariants()
    finally:
        torch.set_num_threads(threads)


# -- prefetch --------------------------------------------------------------------------


def _prefetching_scheduler(
    num_gpu: int = 12, *, cap: int = 2, **prefetch: Any
) -> tuple[SessionScheduler, Clock, KVStore]:
    clock = Clock()
    gpu = KVStore(SPEC, num_gpu, fill=float("nan"))
    host = KVStore(SPEC, 32, fill=float("nan"))
    engine = DeferredCopyEngine(gpu, host, clock, delay=0.5)
    hasher = BlockHasher(block_size=BS, secret=b"pf")
    cache = TieredKVCache(
        BlockManager(BlockPool(num_gpu, name="gpu"), hasher),
        BlockManager(BlockPool(32, name="host"), hasher),
        engine,
    )
    cfg = PrefetchConfig(
        **{"headroom": 0.0, "max_inflight_blocks": 8, "horizon_s": 5.0, **prefetch}
    )
    config = SchedulerConfig(max_pinned_sessions=cap, high_watermark=1.0, prefetch=cfg)
    sched = SessionScheduler(cache, config, clock=clock)
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


def _offload_a(sched: SessionScheduler, clock: Clock, gpu: KVStore) -> list[int]:
    """Session a runs, goes idle and is offloaded to make room for b; b ends."""
    hist_a = list(range(3 * BS))
    sched.open_session("a")
    _turn(sched, clock, gpu, "a", hist_a)
    sched.open_session("b")
    sched.set_max_pinned_sessions(1)  # b's turn pushes a out
    _turn(sched, clock, gpu, "b", [9] * (2 * BS))
    for _ in range(8):
        clock.now += 0.25
        sched.poll()
    assert sched.session("a").state == S.OFFLOADED and sched.cache.location("a") == "host"
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
