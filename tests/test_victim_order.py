"""Victim order from learned idle gaps, and write-back of idle sessions (backup_idle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sched_helpers import make_scheduler, run_turn

from pagedkv.scheduler.errors import OverCapacityError
from pagedkv.scheduler.eviction import IdleGapModel, IdleSessions
from pagedkv.scheduler.session import Session, SessionState

S = SessionState


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_gap_model_ranks_a_tool_loop_with_a_human_tail() -> None:
    model = IdleGapModel(min_samples=32)
    assert model.stays_idle(0.0) is None and model.survival(1.0) is None  # no opinion yet
    rng = np.random.default_rng(0)
    tool = rng.lognormal(math.log(10.0), 0.8, 3000)  # tool execution, median 10 s
    human = rng.lognormal(math.log(300.0), 0.5, 150)  # a person, minutes
    gaps = np.concatenate((tool, human))
    for gap in gaps:
        model.observe(float(gap))
    for t in (1.0, 5.0, 10.0, 30.0, 200.0):  # the learned survival matches the data
        assert model.survival(t) == pytest.approx(float(np.mean(gaps > t)), abs=0.03)
    fresh, due, human_wait = (model.stays_idle(a) for a in (0.5, 9.0, 120.0))
    assert fresh is not None and due is not None and human_wait is not None
    # a session near the typical tool time is the likeliest back soon; one idle for
    # minutes is waiting for a person and the best victim
    assert due < fresh < human_wait and human_wait > 0.9
    assert model.stays_idle(1e9) == 1.0  # beyond all data: nothing says it returns


def test_gap_model_forgets_old_observations_and_rejects_bad_input() -> None:
    model = IdleGapModel(min_samples=8, half_life=64)
    for _ in range(500):
        model.observe(100.0)
    for _ in range(500):
        model.observe(1.0)  # the workload changed
    survival = model.survival(10.0)
    assert survival is not None and survival < 0.2
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="gap must be >= 0"):
            model.observe(bad)
    with pytest.raises(ValueError, match="min_s < max_s"):
        IdleGapModel(min_s=10.0, max_s=1.0)
    with pytest.raises(ValueError, match="horizon_s"):
        IdleGapModel(horizon_s=0.0)


def test_pick_victim_uses_the_score_over_both_ends_and_falls_back_to_lru() -> None:
    idle = IdleSessions()
    sessions = [Session(f"s{i}", "t", 0, 0.0, last_active=float(i)) for i in range(20)]
    for s in sessions:
        idle.add(s)
    kw: dict[str, object] = {"max_priority": 0, "exclude": None, "tenant": None, "over_cap": {}}
    assert idle.pick_victim(**kw).session_id == "s0"  # type: ignore[arg-type, union-attr]
    newest = idle.pick_victim(**kw, score=lambda s: s.last_active)  # type: ignore[arg-type]
    assert newest is not None and newest.session_id == "s19"
    # ties and "no opinion" go to the least recently active
    tie = idle.pick_victim(**kw, score=lambda s: 1.0)  # type: ignore[arg-type]
    none = idle.pick_victim(**kw, score=lambda s: None)  # type: ignore[arg-type]
    assert tie is not None and none is not None
    assert tie.session_id == none.session_id == "s0"
    # the middle of the recency order is never scanned (bounded cost)
    seen: list[str] = []
    idle.pick_victim(**kw, score=lambda s: seen.append(s.session_id) or 0.0)  # type: ignore[arg-type, func-returns-value]
    assert len(seen) == 8 and "s10" not in seen
    # exclusions still apply with a score
    got = idle.pick_victim(  # type: ignore[misc]
        max_priority=0, exclude="s19", tenant=None, over_cap={}, score=lambda s: s.last_active
    )
    assert got is not None and got.session_id == "s18"


def _idle_pair(victim_order: str) -> tuple[object, str]:
    """Two idle sessions after 40 observed gaps of about 10 s: "old" idle 8 s (due back
    soon), "fresh" idle 0.5 s. A third session needs the only free pin slot."""
    sched, clock = make_scheduler(
        num_gpu=64, num_host=64, max_pinned_sessions=2, victim_order=victim_order
    )
    sched.open_session("old")
    sched.open_session("fresh")
    for i in range(20):  # both sessions loop with 10 s gaps: 40 observations
        for sid in ("old", "fresh"):
            run_turn(sched, sched.begin_turn(sid, [i + 1]))
        clock.now += 10.0
        sched.poll()
    run_turn(sched, sched.begin_turn("old", [7]))
    clock.now += 7.5
    run_turn(sched, sched.begin_turn("fresh", [7]))
    clock.now += 0.5
    sched.open_session("new")
    run_turn(sched, sched.begin_turn("new", toks(500, 4)))
    sched.check_invariants()
    victim = next(sid for sid in ("old", "fresh") if not sched.session(sid).is_pinned)
    return sched, victim


def test_predicted_order_evicts_the_session_expected_to_stay_idle_longest() -> None:
    sched, victim = _idle_pair("predicted")
    assert victim == "fresh"
    assert sched.idle_gaps.num_observed >= 40  # type: ignore[attr-defined]
    _sched, victim = _idle_pair("lru")
    assert victim == "old"


def test_backup_idle_writes_back_at_turn_end_so_eviction_copies_nothing() -> None:
    sched, clock = make_scheduler(num_gpu=16, num_host=64, max_pinned_sessions=1, backup_idle=True)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", toks(100, 18)))  # 4 full blocks + 2 tokens
    assert sched.session("a").state == S.IDLE and sched.cache.location("a") == "gpu"
    clock.now += 1
    sched.poll()  # the backup copy completes; "a" stays pinned
    m = sched.metrics
    assert (m.blocks_backed_up, m.blocks_offloaded, m.sessions_offloaded) == (4, 4, 0)
    assert sched.cache.cached_prefix(toks(100, 16)) == (16, 0)
    assert sched.cache.host.num_cached_tokens(toks(100, 16)) == 16  # type: ignore[union-attr]
    sched.open_session("b")
    in_use = sched.cache.gpu.pool.num_in_use
    plan = sched.begin_turn("b", toks(900, 4))  # the cap evicts "a": released at once
    assert plan is not None and sched.session("a").state == S.DROPPED
    assert sched.cache.num_pending == 0 and m.blocks_offloaded == 4  # nothing copied
    assert sched.cache.gpu.pool.num_in_use == in_use - 5 + 1
    assert (m.sessions_released_backed_up, m.sessions_offloaded, m.sessions_dropped) == (1, 0, 0)
    run_turn(sched, plan)
    sched.cache.gpu.pool.evict(100)
    assert sched.begin_turn("a", [1]) is None  # its full blocks come back from the host
    clock.now += 1
    (ev,) = sched.poll()
    # the partial last block (2 tokens) is recomputed with the new token
    assert ev.plan.hit_host == 16 and ev.plan.num_computed == 3  # type: ignore[attr-defined]
    run_turn(sched, ev.plan)  # type: ignore[attr-defined]
    sched.check_invariants()
    # a full host tier skips the backup and changes nothing
    sched2, _clock2 = make_scheduler(num_gpu=16, num_host=2, backup_idle=True)
    sched2.open_session("x")
    run_turn(sched2, sched2.begin_turn("x", toks(0, 16)))
    assert sched2.metrics.blocks_backed_up == 0 and sched2.cache.host.pool.num_in_use == 0  # type: ignore[union-attr]
    sched2.check_invariants()


def test_evicting_during_a_backup_waits_for_it_instead_of_copying_again() -> None:
    """A session evicted while its backup is in flight is released (no second copy);
    the turn that needed room waits for the backup's blocks instead of evicting more."""
    sched, clock = make_scheduler(
        num_gpu=12, num_host=64, max_pinned_sessions=4, backup_idle=True, high_watermark=1.0
    )
    for i, sid in enumerate("abc"):
        sched.open_session(sid)
        run_turn(sched, sched.begin_turn(sid, toks(100 * (i + 1), 16)))  # 4 blocks each
    assert sched.cache.num_pending == 3 and sched.cache.gpu.pool.num_available == 0
    sched.open_session("d")
    assert sched.begin_turn("d", toks(900, 4)) is None  # waits for a's backup
    assert sched.session("a").state == S.DROPPED
    assert [sched.session(x).state for x in "bc"] == [S.IDLE, S.IDLE]  # not evicted too
    assert sched.metrics.blocks_offloaded == 0  # no offload copy was started
    clock.now += 1
    (ev,) = sched.poll()  # the backups complete: a's blocks are free, d starts
    assert ev.session_id == "d"  # type: ignore[attr-defined]
    assert sched.metrics.blocks_offloaded == sched.metrics.blocks_backed_up == 12
    run_turn(sched, ev.plan)  # type: ignore[attr-defined]
    sched.check_invariants()


def test_decode_growth_finishes_a_backup_rather_than_failing() -> None:
    """A decode step that needs a block now, when the only idle victim's blocks are held
    by its backup copy, waits for that copy (a real engine can) and then drops it."""
    from tier_helpers import SPEC, DeferredCopyEngine

    from pagedkv.tiers.kv_store import KVStore

    bs = SPEC.block_size
    gpu, host = KVStore(SPEC, 8), KVStore(SPEC, 16)
    sched, clock = make_scheduler(num_gpu=8, num_host=16, backup_idle=True, high_watermark=1.0)
    sched.cache.engine = DeferredCopyEngine(gpu, host, clock, delay=1.0)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", toks(0, 4 * bs)))  # idle, backup in flight
    sched.open_session("b")
    plan = sched.begin_turn("b", toks(500, 4 * bs - 1))  # the pool is now full
    assert plan is not None and sched.cache.gpu.pool.num_available == 0
    sched.mark_computed("b")
    slots = sched.append_tokens("b", [1, 2])  # needs a fifth block for b
    assert len(slots) == 2 and sched.session("a").state == S.DROPPED
    assert sched.metrics.blocks_backed_up == 4  # the backup was finished, not cancelled
    sched.mark_computed("b")
    sched.end_turn("b")
    sched.check_invariants()


def test_an_idle_gap_is_observed_once_even_if_the_turn_is_refused_and_retried() -> None:
    sched, clock = make_scheduler(num_gpu=8, num_host=0, max_queue=0, max_pinned_sessions=1)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", [1, 2, 3]))
    sched.open_session("b")
    run_turn(sched, sched.begin_turn("b", [4, 5]))  # evicts a (dropped: no host)
    sched.open_session("c")
    plan_c = sched.begin_turn("c", [7])
    assert plan_c is not None
    sched.mark_computed("c")  # c is running: it holds the only pin slot
    clock.now += 10
    with pytest.raises(OverCapacityError, match="over capacity"):
        sched.begin_turn("a", [9])  # refused: the queue holds nothing
    assert sched.idle_gaps.num_observed == 1
    clock.now += 5
    with pytest.raises(OverCapacityError, match="over capacity"):
        sched.begin_turn("a", [9])  # the retry is the same idle period
    assert sched.idle_gaps.num_observed == 1


def test_a_turn_that_ends_before_its_previous_backup_lands_gets_a_follow_up_backup() -> None:
    """Regression (review): turn 2 ended while turn 1's backup was in flight, so its
    blocks were never backed up, yet eviction treated the session as backed up and the
    next turn recomputed turn 2's blocks."""
    sched, clock = make_scheduler(num_gpu=32, num_host=64, max_pinned_sessions=1, backup_idle=True)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", toks(100, 16)))  # backup 1 in flight (4 blocks)
    run_turn(sched, sched.begin_turn("a", toks(200, 16)))  # turn 2 ends before it lands
    sched.open_session("b")
    run_turn(sched, sched.begin_turn("b", toks(900, 4)))  # the cap evicts "a"
    assert sched.session("a").state == S.OFFLOADED  # not covered: offloaded, nothing lost
    clock.now += 1
    sched.poll()
    sched.cache.gpu.pool.evict(100)
    assert sched.begin_turn("a", [1]) is None
    clock.now += 1
    (ev,) = sched.poll()
    assert ev.plan.hit_host == 32 and ev.plan.num_computed == 1  # type: ignore[attr-defined]
    run_turn(sched, ev.plan)  # type: ignore[attr-defined]
    sched.check_invariants()
    # without eviction, the follow-up backup starts when the first one completes
    sched2, clock2 = make_scheduler(num_gpu=32, num_host=64, backup_idle=True)
    sched2.open_session("a")
    run_turn(sched2, sched2.begin_turn("a", toks(100, 16)))
    run_turn(sched2, sched2.begin_turn("a", toks(200, 16)))
    assert sched2.metrics.blocks_backed_up == 0
    clock2.now += 1
    sched2.poll()  # backup 1 completes; the follow-up for turn 2's blocks starts
    assert sched2.metrics.blocks_backed_up == 4 and sched2.cache.num_pending == 1
    clock2.now += 1
    sched2.poll()
    assert sched2.metrics.blocks_backed_up == 8
    assert sched2.cache.host.num_cached_tokens(toks(100, 16) + toks(200, 16)) == 32  # type: ignore[union-attr]
    sched2.check_invariants()


def test_a_reopened_id_does_not_inherit_the_closed_sessions_backup() -> None:
    """Regression (review): a session opened under the id of a closed one whose backup was
    still in flight was taken for backed up, and evicting it lost its blocks."""
    sched, clock = make_scheduler(num_gpu=32, num_host=64, max_pinned_sessions=1, backup_idle=True)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", toks(100, 8)))  # old "a": backup in flight
    sched.close_session("a")
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", toks(500, 24)))  # new "a": 6 full blocks
    sched.open_session("b")
    run_turn(sched, sched.begin_turn("b", toks(900, 4)))  # evicts the new "a"
    assert sched.session("a").state == S.OFFLOADED  # its own blocks were copied
    clock.now += 1
    sched.poll()
    sched.cache.gpu.pool.evict(100)
    assert sched.cache.cached_prefix(toks(500, 24)) == (0, 24)
    assert sched.metrics.blocks_dropped == 0
    sched.check_invariants()
