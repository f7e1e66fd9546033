"""Behaviour the serving engine relies on from `scheduler`/`pagedkv`, as minimal tests
(each was once a gap the engine had to work around)."""

from __future__ import annotations

from sched_helpers import make_scheduler, run_turn


def test_idle_turn_plan_always_leaves_a_token_to_compute() -> None:
    sched, _clock = make_scheduler(block_size=4)
    tokens = list(range(100, 116))
    sched.open_session("b")
    run_turn(sched, sched.begin_turn("b", tokens[:8]))
    sched.open_session("a")
    run_turn(sched, sched.begin_turn("a", tokens))  # a's blocks cover all 16 tokens
    plan = sched.begin_turn("b", tokens[8:])  # b is IDLE: its 8 new tokens all hit
    assert plan is not None
    assert plan.num_computed >= 1, (plan.num_tokens, plan.compute_start)
