"""API gaps the serving engine works around, as minimal failing (xfail strict) tests.

Each test states the behaviour serving needs from `scheduler`/`pagedkv`; when the
lower layer changes, the test starts passing and strict xfail flags it for removal of
the workaround.
"""

from __future__ import annotations

import pytest
from sched_helpers import make_scheduler, run_turn


@pytest.mark.xfail(
    strict=True,
    reason=(
        "begin_turn on an IDLE session appends the new tokens with no max_cached_tokens "
        "cap, so when every new token is a hash-cache hit the plan has nothing to compute "
        "and the caller has no token to run for next-token logits (resume and the "
        "NEW/DROPPED path cap reuse at len - 1). serving.engine works around it by "
        "rerunning the last token with its K/V store skipped (slot -1)."
    ),
)
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
