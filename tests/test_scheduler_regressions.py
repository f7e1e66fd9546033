"""Scheduler bugs found by the simulator: each a minimal failing example.

Marked `xfail(strict=True)` until the scheduler is fixed, so the suite stays green and a
fix is noticed (the test then passes and strict xfail fails it: drop the marker).
"""

from __future__ import annotations

from sched_helpers import make_scheduler, run_turn

from pagedkv.scheduler.session import SessionState as S


def test_make_room_does_not_evict_every_idle_session_while_offloads_are_in_flight() -> None:
    # 16 GPU blocks, watermark 0.95 -> at most 15 in use; three idle sessions of 4 blocks
    sched, clock = make_scheduler(num_gpu=16, num_host=64, max_pinned_sessions=10)
    for sid in ("a", "b", "c"):
        sched.open_session(sid)
        run_turn(sched, sched.begin_turn(sid, list(range(100 * ord(sid), 100 * ord(sid) + 16))))
        clock.now += 1
    # d needs 4 blocks: 12 + 4 > 15, one block short. Offloading "a" (the least recent)
    # frees 4 once its copy completes; "b" and "c" should stay pinned meanwhile.
    sched.open_session("d")
    assert sched.begin_turn("d", list(range(5000, 5016))) is None  # waits for a's copy
    assert sched.session("a").state == S.OFFLOADED
    assert sched.session("b").state == S.IDLE
    assert sched.session("c").state == S.IDLE


def test_a_session_closed_right_after_its_turn_is_not_offloaded_first() -> None:
    sched, _clock = make_scheduler(max_pinned_sessions=1)
    sched.open_session("a")
    plan = sched.begin_turn("a", list(range(16)))
    sched.open_session("b")
    assert sched.begin_turn("b", list(range(100, 116))) is None  # waits for a pin slot
    run_turn(sched, plan)  # a's last turn ends: b is admitted by evicting a ...
    sched.close_session("a", offload=False)  # ... which the client closes for good
    sched.poll()
    assert sched.metrics.blocks_offloaded == 0


def test_a_dropped_connection_finds_its_history_on_the_host_after_gpu_reclaim() -> None:
    sched, clock = make_scheduler(num_gpu=16, num_host=64)
    history = list(range(16))
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", history))
    sched.close_session("a")  # the socket dropped while the session was pinned
    clock.now += 1
    sched.poll()  # any copy started at close completes
    sched.cache.gpu.pool.evict(100)  # pressure reclaims the GPU hash cache
    assert sched.cache.cached_prefix(history) == (0, 16)  # the reconnect restores it
