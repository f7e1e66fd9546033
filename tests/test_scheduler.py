"""Scenario tests for each scheduler rule."""

from __future__ import annotations

import numpy as np
import pytest
from sched_helpers import make_scheduler, run_turn

from pagedkv.scheduler.errors import OverCapacityError, SessionError
from pagedkv.scheduler.scheduler import TurnReady, TurnRefused
from pagedkv.scheduler.session import SessionState as S


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_turn_two_reuses_the_pinned_prefix() -> None:
    sched, _clock = make_scheduler()
    sched.open_session("a")
    p1 = sched.begin_turn("a", toks(0, 10))
    assert p1 is not None and p1.compute_start == 0 and p1.num_tokens == 10
    run_turn(sched, p1, output=[7, 7])
    assert sched.session("a").state == S.IDLE and sched.num_pinned == 1
    p2 = sched.begin_turn("a", toks(50, 5))
    assert p2 is not None
    assert (p2.hit_pinned, p2.compute_start, p2.num_tokens, p2.num_computed) == (12, 12, 17, 5)
    assert len(p2.slot_mapping) == 5
    sched.check_invariants()


def test_pinned_cap_offloads_the_least_recent_idle_session_and_restores_it() -> None:
    sched, clock = make_scheduler(max_pinned_sessions=2)
    for sid in ("a", "b"):
        sched.open_session(sid)
        run_turn(sched, sched.begin_turn(sid, toks(100 * ord(sid), 8)))
        clock.now += 1
    sched.open_session("c")
    pc = sched.begin_turn("c", toks(900, 8))  # cap reached: "a" (oldest idle) is offloaded
    assert pc is not None
    assert sched.session("a").state == S.OFFLOADED and sched.num_pinned == 2
    run_turn(sched, pc)
    clock.now += 1
    sched.poll()  # the offload copy completes
    # the offloaded blocks stay cached on the GPU until reclaimed: a's next turn gets
    # them back with no copy at all
    assert sched.cache.cached_prefix(toks(100 * ord("a"), 8)) == (8, 0)
    sched.cache.gpu.pool.evict(100)  # now reclaim them: the prefix is only on the host
    assert sched.cache.cached_prefix(toks(100 * ord("a"), 8)) == (0, 8)
    # a's next turn: a pin slot is needed again (b is now the oldest idle), then a restore
    assert sched.begin_turn("a", [1, 2, 3]) is None  # waits for the host-to-GPU copy
    assert sched.session("b").state == S.OFFLOADED
    clock.now += 1
    (ev,) = sched.poll()
    assert isinstance(ev, TurnReady) and ev.session_id == "a"
    p = ev.plan
    assert (p.num_tokens, p.compute_start, p.hit_gpu, p.hit_host) == (11, 8, 0, 8)
    assert sched.metrics.blocks_restored == 2 and sched.metrics.tokens_hit_host == 8
    run_turn(sched, p)
    sched.check_invariants()


def test_drop_when_no_host_tier_and_reconnect_through_gpu_hash_cache() -> None:
    sched, _clock = make_scheduler(num_host=None, max_pinned_sessions=1)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", toks(0, 12)))
    sched.open_session("b")
    run_turn(sched, sched.begin_turn("b", toks(500, 4)))  # evicts a: dropped (no host)
    assert sched.session("a").state == S.DROPPED
    p = sched.begin_turn("a", [99])  # a's history is still cached on the GPU by hash
    # wait: b (idle) is evicted for the slot; a's 12 tokens come back from the hash cache
    assert p is not None and p.hit_gpu == 12 and p.compute_start == 12 and p.num_tokens == 13
    sched.check_invariants()


def test_resume_after_close_by_tier_and_tenant_isolation() -> None:
    sched, _clock = make_scheduler(num_gpu=16)
    history = toks(0, 20)
    sched.open_session("a", tenant="acme")
    run_turn(sched, sched.begin_turn("a", history))
    sched.close_session("a")
    p = sched.resume("a2", [*history, 5], tenant="acme")
    assert p is not None and p.hit_gpu == 20 and p.compute_start == 20
    run_turn(sched, p)
    sched.close_session("a2")
    other = sched.resume("x", [*history, 5], tenant="evil")
    assert other is not None and other.hit_gpu == other.hit_host == 0
    assert other.compute_start == 0
    sched.check_invariants()


def test_resume_from_host_after_gpu_reclaimed() -> None:
    sched, clock = make_scheduler(num_gpu=8, max_pinned_sessions=1, idle_ttl_s=5.0)
    history = toks(0, 16)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", history))
    clock.now = 10.0
    sched.poll()  # idle TTL: offloaded proactively
    clock.now = 11.0
    sched.poll()  # offload copy done: host-pinned
    assert sched.session("a").state == S.OFFLOADED
    sched.close_session("a")  # host blocks go to the host hash cache
    sched.cache.gpu.pool.evict(100)  # GPU copies reclaimed
    assert sched.resume("a2", [*history, 1]) is None  # restoring from the host
    clock.now = 12.0
    (ev,) = sched.poll()
    assert isinstance(ev, TurnReady) and ev.plan.hit_host == 16 and ev.plan.compute_start == 16
    sched.check_invariants()


def test_admission_queue_fifo_no_starvation_timeout_and_queue_limit() -> None:
    sched, clock = make_scheduler(max_pinned_sessions=1, max_queue=2, queue_timeout_s=10.0)
    sched.open_session("busy")
    busy = sched.begin_turn("busy", toks(0, 4))  # ACTIVE: never a victim
    assert busy is not None
    for sid in ("w1", "w2"):
        sched.open_session(sid)
        assert sched.begin_turn(sid, toks(100, 4)) is None
    assert sched.num_queued == 2 and sched.sessions_by_state()["queued"] == 2
    sched.open_session("w3")
    with pytest.raises(OverCapacityError, match="queue_full") as err:
        sched.begin_turn("w3", [1])
    assert err.value.reason == "queue_full" and sched.session("w3").state == S.NEW
    run_turn(sched, busy)  # busy goes idle: w1 (first in line) evicts it and starts
    (ev,) = sched.poll()
    assert isinstance(ev, TurnReady) and ev.session_id == "w1"
    clock.now = 11.0
    (ev,) = sched.poll()  # w2 waited past the timeout while w1 runs
    assert isinstance(ev, TurnRefused) and ev.error.reason == "timeout"
    assert sched.session("w2").state == S.NEW and not sched.session("w2").is_queued
    assert sched.metrics.admission_refusals == 2 and sched.metrics.admission_waits == 2
    sched.check_invariants()


def test_low_priority_never_evicts_high_priority_and_tenant_caps() -> None:
    sched, _clock = make_scheduler(max_pinned_sessions=1, tenant_max_pinned={"t": 1})
    sched.open_session("vip", priority=5)
    run_turn(sched, sched.begin_turn("vip", toks(0, 4)))
    sched.open_session("low", priority=0)
    assert sched.begin_turn("low", toks(10, 4)) is None  # waits: cannot evict vip
    assert sched.session("vip").state == S.IDLE
    sched.close_session("low")
    sched2, _ = make_scheduler(max_pinned_sessions=4, tenant_max_pinned={"t": 1})
    sched2.open_session("t1", tenant="t")
    run_turn(sched2, sched2.begin_turn("t1", toks(0, 4)))
    sched2.open_session("u1", tenant="u")
    run_turn(sched2, sched2.begin_turn("u1", toks(50, 4)))
    sched2.open_session("t2", tenant="t")
    assert sched2.begin_turn("t2", toks(90, 4)) is not None  # evicts its own tenant's t1
    assert sched2.session("t1").state == S.OFFLOADED and sched2.session("u1").state == S.IDLE
    sched2.check_invariants()


def test_close_during_turn_and_during_restore_leaks_nothing() -> None:
    sched, clock = make_scheduler(max_pinned_sessions=1)
    sched.open_session("a")
    p = sched.begin_turn("a", toks(0, 9))
    assert p is not None
    sched.mark_computed("a")
    sched.close_session("a")  # client vanished mid-turn
    sched.open_session("b")
    run_turn(sched, sched.begin_turn("b", toks(40, 9)))
    sched.open_session("c")
    run_turn(sched, sched.begin_turn("c", toks(80, 9)))  # b offloading
    sched.close_session("b")  # during the offload copy
    clock.now += 1
    sched.poll()
    sched.close_session("c")
    sched.cache.gpu.pool.evict(100)  # b's history is now only on the host
    assert sched.resume("r", toks(40, 9)) is None  # restoring b's history from the host
    sched.close_session("r")  # client vanished during the restore copy
    clock.now += 1
    sched.poll()
    assert sched.cache.num_pending == 0
    assert sched.cache.gpu.pool.num_in_use == 0 and sched.cache.host.pool.num_in_use == 0
    assert sched.num_pinned == 0
    sched.check_invariants()


def test_bad_calls_change_nothing() -> None:
    sched, _clock = make_scheduler()
    sched.open_session("a")
    with pytest.raises(SessionError, match="already open"):
        sched.open_session("a")
    with pytest.raises(SessionError, match="unknown session id 'zz'"):
        sched.begin_turn("zz", [1])
    with pytest.raises(ValueError, match="outside int32"):
        sched.begin_turn("a", [2**40])
    assert sched.session("a").state == S.NEW and sched.cache.gpu.pool.num_in_use == 0
    p = sched.begin_turn("a", [1, 2, 3])
    with pytest.raises(SessionError, match="session is active"):
        sched.begin_turn("a", [4])
    with pytest.raises(SessionError, match="never computed"):
        sched.end_turn("a")
    run_turn(sched, p)
    with pytest.raises(SessionError, match="expected a running turn"):
        sched.append_tokens("a", [1])
    with pytest.raises(OverCapacityError, match="too_large"):
        sched.begin_turn("a", np.zeros(10_000, dtype=np.int32))
    assert sched.session("a").state == S.IDLE
    sched.check_invariants()


SYS = list(range(64))  # a shared "system prompt": 16 blocks of 4


def test_admission_counts_a_shared_prefix_once() -> None:
    """Regression: a new session sharing a running session's prefix needs only its own
    new blocks; it must neither wait nor evict anyone."""
    sched, _clock = make_scheduler(num_gpu=20, high_watermark=1.0, queue_timeout_s=5.0)
    sched.open_session("a")
    assert sched.begin_turn("a", [*SYS, 1]) is not None  # 17 blocks in use, a running
    sched.mark_computed("a")
    sched.open_session("b")
    pb = sched.begin_turn("b", [*SYS, 2])  # shares 16 blocks, needs 1 new: 3 are free
    assert pb is not None and pb.hit_gpu == 64 and pb.num_computed == 1
    sched2, _ = make_scheduler(num_gpu=20, high_watermark=1.0)
    sched2.open_session("a")
    run_turn(sched2, sched2.begin_turn("a", [*SYS, 1]))
    sched2.open_session("b")
    assert sched2.begin_turn("b", [*SYS, 2]) is not None
    assert sched2.session("a").state == S.IDLE  # nobody was offloaded
    sched2.check_invariants()


def test_decode_growth_drops_one_idle_session_instead_of_offloading_all() -> None:
    """Regression: blocks needed *now* (decode) come from dropping, which frees them at
    once; offloading everything and then failing anyway was the old behaviour."""
    sched, clock = make_scheduler(num_gpu=16, max_pinned_sessions=10, high_watermark=1.0)
    for sid in "bcd":
        sched.open_session(sid)
        run_turn(sched, sched.begin_turn(sid, toks(100 * ord(sid), 16)))
        clock.now += 1
    sched.open_session("a")
    sched.begin_turn("a", [1, 2, 3, 4])
    sched.mark_computed("a")
    sched.append_tokens("a", list(range(12)))
    sched.mark_computed("a")
    assert len(sched.append_tokens("a", [5])) == 1
    states = {sid: sched.session(sid).state for sid in "bcd"}
    assert states == {"b": S.DROPPED, "c": S.IDLE, "d": S.IDLE}
    assert sched.metrics.blocks_offloaded == 0
    sched.check_invariants()


def test_a_tenant_at_its_cap_does_not_block_other_tenants() -> None:
    sched, _clock = make_scheduler(
        max_pinned_sessions=8, tenant_max_pinned={"t": 1}, queue_timeout_s=5.0
    )
    sched.open_session("t1", tenant="t")
    assert sched.begin_turn("t1", [1, 2, 3]) is not None  # running: t is at its cap
    sched.open_session("t2", tenant="t")
    assert sched.begin_turn("t2", [4]) is None  # waits for t's cap
    sched.open_session("u1", tenant="u")
    sched.begin_turn("u1", [5])  # behind t2 in the queue, but not held by t's cap
    (ev,) = sched.poll()
    assert isinstance(ev, TurnReady) and ev.session_id == "u1"
    assert sched.session("t2").is_queued
    sched.check_invariants()


def test_queued_turn_keeps_its_own_copy_of_the_tokens() -> None:
    sched, _clock = make_scheduler(max_pinned_sessions=1)
    sched.open_session("busy")
    assert sched.begin_turn("busy", [1]) is not None
    buf = np.array([10, 11, 12], dtype=np.int32)
    sched.open_session("w")
    assert sched.begin_turn("w", buf) is None
    buf[:] = 0  # the caller reuses its buffer while the turn waits
    sched.mark_computed("busy")
    sched.end_turn("busy")
    (ev,) = sched.poll()
    assert isinstance(ev, TurnReady)
    assert sched.cache.gpu.table("w").tokens.tolist() == [10, 11, 12]


def test_empty_turn_is_refused() -> None:
    sched, _clock = make_scheduler()
    sched.open_session("a")
    with pytest.raises(ValueError, match="new_tokens is empty"):
        sched.begin_turn("a", [])
    assert sched.session("a").state == S.NEW


def test_no_turn_is_ready_while_its_restore_copy_is_in_flight() -> None:
    """Regression (stale instant results): after instant offloads and restores, a real
    restore must not be reported ready before its copy completes."""
    hist = list(range(16))
    sched, clock = make_scheduler(num_gpu=32, num_host=16, max_pinned_sessions=1)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", hist[:12]))
    sched.open_session("b1")
    run_turn(sched, sched.begin_turn("b1", [500]))  # a is offloaded
    clock.now += 1
    sched.poll()
    sched.close_session("b1")
    plan = sched.begin_turn("a", hist[12:])  # its blocks are still on the GPU: no copy
    assert plan is not None and plan.num_computed >= 1
    run_turn(sched, plan)
    sched.open_session("b2")
    run_turn(sched, sched.begin_turn("b2", [501]))
    clock.now += 1
    sched.poll()
    sched.close_session("b2")
    sched.cache.gpu.pool.evict(100)
    assert sched.begin_turn("a", [7]) is None  # a real host-to-GPU copy
    assert sched.poll() == [] and sched.cache.location("a") == "restoring"
    with pytest.raises(SessionError, match="restoring"):
        sched.mark_computed("a")
    clock.now += 1
    (ev,) = sched.poll()
    assert isinstance(ev, TurnReady) and ev.plan.compute_start == 16
    sched.check_invariants()


def test_an_offloaded_session_asking_for_room_is_not_dropped_to_make_host_room() -> None:
    """Regression: a's turn needs a's slot, so idle b is offloaded; the host is full of
    a's own blocks, and making host room must not drop a (the session asking)."""
    sched, clock = make_scheduler(num_gpu=16, num_host=3, max_pinned_sessions=1)
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", toks(0, 12)))  # 3 blocks
    sched.open_session("b")
    run_turn(sched, sched.begin_turn("b", toks(500, 12)))  # a offloaded: host full
    clock.now += 1
    sched.poll()
    assert sched.session("a").state == S.OFFLOADED
    plan = sched.begin_turn("a", [1])  # b must go: it cannot be offloaded: dropped
    assert sched.session("b").state == S.DROPPED
    if plan is None:  # a's blocks were reclaimed on the GPU: restored from the host
        clock.now += 1
        plan = next(e.plan for e in sched.poll() if isinstance(e, TurnReady))
    assert plan.compute_start == 12 and plan.num_tokens == 13
    sched.check_invariants()


def test_admission_watermark_counts_hits_that_eviction_turns_cached() -> None:
    """Regression (found by the thorough state-machine run): a newcomer's prefix hits are
    in use by an idle session when admission is planned; evicting that session for the pin
    slot turns them cached, so taking them back grows the in-use count beyond the new
    blocks. Here write-through copies in flight hold 3 GPU blocks, so the old plan (growth
    counted before the eviction) admitted to 8 blocks in use over a limit of 7."""
    sched, clock = make_scheduler(num_gpu=8, num_host=3, max_pinned_sessions=1, high_watermark=0.9)
    limit = int(0.9 * 8)
    for sid, tokens in (("s0", list(range(100, 108))), ("s1", [*range(200, 204), 0])):
        sched.open_session(sid)
        run_turn(sched, sched.begin_turn(sid, tokens))
        # full blocks written through to the host: copies in flight (clock stopped)
        sched.close_session(sid)
    assert sched.cache.num_pending == 2 and sched.cache.gpu.pool.num_in_use == 3
    shared = list(range(12))
    sched.open_session("s4")
    run_turn(sched, sched.begin_turn("s4", [*shared, 0]))  # idle, 4 blocks: 7 in use
    sched.open_session("s5")
    plan = sched.begin_turn("s5", [*shared, 0, 0, 0, 0, 0])  # 3 shared hits + 2 new blocks
    if plan is None:
        clock.now += 1
        plan = next(e.plan for e in sched.poll() if isinstance(e, TurnReady))
    assert sched.cache.gpu.pool.num_in_use <= limit
    assert plan.num_tokens == 17
    sched.check_invariants()
