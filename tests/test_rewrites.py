"""Histories that are not append-only, on the simulator and on the real engine.

Agent traces rewrite their context (compaction, an edited or rewound history), fork
subagent sessions from a parent's prefix that then run beside it, idle for hours, and
come with 16- or 64-token blocks. A turn may reuse only the longest prefix its prompt
shares with what is cached (or with what its session holds); everything after the
divergence is computed again. These properties check that, against a brute-force
reference that shares no code with the implementation (`ideal_reference`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import greedy, reference
from hypothesis import given, settings
from hypothesis import strategies as st
from ideal_reference import reference_turn_ideal

from pagedkv.model.llama import LlamaModel
from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import EngineRequest, TurnDone
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.sim.compare import main_jobs, run_jobs, workload_facts
from pagedkv.sim.policies import HardwareProfile, SimSettings, parse_policies
from pagedkv.sim.report import build_report
from pagedkv.sim.simulator import DONE, PolicyRun
from pagedkv.sim.workload import Request, Workload

PROFILE = HardwareProfile()
HOUR = 3600.0


# -- random traces ---------------------------------------------------------------------


@st.composite
def rewriting_traces(draw: st.DrawFn) -> Workload:
    """Sessions whose turns extend, compact, edit or rewind their history; subagent
    sessions that start from another session's prefix; one-shot requests; gaps from a
    second to hours; 16- or 64-token blocks; two tenants."""
    tpb = draw(st.sampled_from([16, 64]))
    fresh = iter(range(1_000, 10**9))  # never-seen content
    pool = (7, 8, 9)  # content that different sessions may happen to share
    num_sessions = draw(st.integers(1, 4))
    sessions: list[list[tuple[float, tuple[int, ...], int]]] = []  # (arrival, keys, len)
    tenants = [draw(st.sampled_from(["t0", "t1"])) for _ in range(num_sessions)]
    out: list[tuple[float, int, int, Request]] = []
    for s in range(num_sessions):
        t = draw(st.floats(0.0, 20.0))
        turns: list[tuple[float, tuple[int, ...], int]] = []
        for k in range(draw(st.integers(1, 6))):
            if k == 0:
                base_keys: tuple[int, ...] = ()
                base_len = 0
                parents = [p for p in range(s) if tenants[p] == tenants[s] and sessions[p]]
                if parents and draw(st.booleans()):  # a subagent forked from a parent turn
                    parent = sessions[draw(st.sampled_from(parents))]
                    _, base_keys, base_len = parent[draw(st.integers(0, len(parent) - 1))]
            else:
                _, base_keys, base_len = turns[-1]
            full = base_len // tpb
            kind = draw(st.sampled_from(["extend", "extend", "rewrite"]))
            keep = full if kind == "extend" else draw(st.integers(0, full))
            start = base_len if kind == "extend" else keep * tpb
            length = start + draw(st.integers(1, 3 * tpb))
            num_blocks = -(-length // tpb)
            new = [
                draw(st.sampled_from(pool)) if draw(st.integers(0, 4)) == 0 else next(fresh)
                for _ in range(num_blocks - keep)
            ]
            keys = base_keys[:keep] + tuple(new)
            if k:
                t += draw(st.sampled_from([1.0, 2.5, 30.0, 2 * HOUR, 5 * HOUR]))
            turns.append((t, keys, length))
        sessions.append(turns)
        n = len(turns)
        for k, (arrival, keys, length) in enumerate(turns):
            req = Request(
                arrival_s=arrival,
                session_id=f"s{s}",
                tenant=tenants[s],
                block_keys=keys,
                input_len=length,
                output_len=draw(st.integers(1, 8)),
                turn_index=k + 1,
                reconnect=k > 0 and draw(st.integers(0, 3)) == 0,
                last_turn=k == n - 1,
            )
            out.append((arrival, s, k, req))
    for j in range(draw(st.integers(0, 2))):  # one-shot requests reusing a session's prefix
        _, keys, length = draw(st.sampled_from([turn for turns in sessions for turn in turns]))
        cut = draw(st.integers(1, length))
        arrival = draw(st.floats(0.0, 6 * HOUR))
        req = Request(arrival, None, tenants[0], keys[: -(-cut // tpb)], cut, 4)
        out.append((arrival, num_sessions + j, 0, req))
    out.sort(key=lambda item: item[:3])
    return Workload("rewrites", tpb, tuple(item[3] for item in out))


def hits(run: PolicyRun) -> np.ndarray:
    t = run.turns
    out: np.ndarray = t.hit_pinned + t.hit_gpu + t.hit_host
    return out


@settings(max_examples=60)
@given(w=rewriting_traces(), gpu_blocks=st.integers(12, 80))
def test_no_policy_serves_more_than_the_prompt_shares(w: Workload, gpu_blocks: int) -> None:
    ref = reference_turn_ideal(w)
    got = w.turn_ideal()
    for field in ("raw", "servable", "own", "hit", "shared"):
        assert getattr(got, field).tolist() == ref[field], field
    facts = workload_facts(w)
    assert facts.ideal_hit_tokens == sum(ref["hit"]) <= w.total_input_tokens
    settings_ = SimSettings(
        gpu_blocks=gpu_blocks, host_blocks=2 * gpu_blocks, max_pinned_sessions=2, idle_ttl_s=5.0
    )
    jobs = main_jobs(parse_policies("all"), settings_, w, facts)
    runs = {r.policy.name: r for r in run_jobs(w, jobs, PROFILE, check_every=3)}
    build_report(facts=facts, profile={}, settings={}, runs=list(runs.values()))  # checks hits
    input_len = np.array([r.input_len for r in w.requests])
    bound = np.maximum(ref["own"], ref["shared"])
    for name, run in runs.items():
        t = run.turns
        done = t.status == DONE
        h = hits(run)
        np.testing.assert_array_equal((h + t.computed)[done], input_len[done])
        assert (h[done] <= bound[done]).all(), name
        assert (h[done] < input_len[done]).all(), name  # the last token is always computed
        assert int(h[done].sum()) <= facts.ideal_hit_tokens, name
        assert (run.end_gpu_in_use, run.end_host_in_use, run.end_sessions_open) == (0, 0, 0)
    # turns here never overlap (gaps of a second or more, prompts of a few blocks), so
    # the ideal runs in arrival order and reaches the per-turn ideal exactly
    ideal = runs["ideal"]
    assert (ideal.turns.status == DONE).all()
    assert hits(ideal).tolist() == ref["hit"]
    assert hits(runs["stateless"]).sum() == 0


def trace(*rows: tuple[float, str, tuple[int, ...], int], tpb: int = 16) -> Workload:
    """Requests `(arrival, session, keys, input_len)`; each session's last is its last."""
    last = {sid: i for i, (_, sid, _, _) in enumerate(rows)}
    turn: dict[str, int] = {}
    reqs = []
    for i, (arrival, sid, keys, length) in enumerate(rows):
        turn[sid] = turn.get(sid, 0) + 1
        reqs.append(
            Request(
                arrival, sid, "t", keys, length, 4, turn_index=turn[sid], last_turn=last[sid] == i
            )
        )
    return Workload("case", tpb, tuple(reqs))


def exact_runs(w: Workload, **kw: Any) -> dict[str, PolicyRun]:
    facts = workload_facts(w)
    base: dict[str, Any] = dict(gpu_blocks=256, host_blocks=256, max_pinned_sessions=8)
    settings_ = SimSettings(**{**base, **kw})
    jobs = main_jobs(parse_policies("all"), settings_, w, facts)
    runs = run_jobs(w, jobs, PROFILE)
    build_report(facts=facts, profile={}, settings={}, runs=runs)
    return {r.policy.name: r for r in runs}


def test_compaction_keeps_the_system_prompt_and_recomputes_the_summary() -> None:
    # turn 3 replaces turns 1-2's history after the 2-block system prompt by a summary
    w = trace(
        (0.0, "a", (1, 2, 3, 4), 60),
        (10.0, "a", (1, 2, 3, 4, 5, 6), 90),
        (20.0, "a", (1, 2, 50, 51), 64),
    )
    assert w.turn_ideal().hit.tolist() == [0, 60, 32]
    for name, run in exact_runs(w).items():
        want = (
            [0, 0, 0] if name == "stateless" else [0, 48 if name.startswith("prefix") else 60, 32]
        )
        assert hits(run).tolist() == want, name


def test_a_subagent_forks_the_parents_prefix_and_runs_beside_it() -> None:
    # the parent's turn 2 and the subagent's turns interleave; the subagent starts from
    # the parent's first 3 blocks and never sees the parent's later blocks
    w = trace(
        (0.0, "parent", (1, 2, 3, 4), 50),
        (5.0, "sub", (1, 2, 3, 70), 56),
        (6.0, "parent", (1, 2, 3, 4, 5, 6), 90),
        (9.0, "sub", (1, 2, 3, 70, 71, 72), 88),
    )
    assert w.turn_ideal().hit.tolist() == [0, 48, 50, 56]
    runs = exact_runs(w)
    assert hits(runs["ours"]).tolist() == [0, 48, 50, 56]
    assert hits(runs["prefix"]).tolist() == [0, 48, 48, 48]


def test_multi_hour_gaps_and_64_token_blocks() -> None:
    w = trace(
        (0.0, "a", (1, 2, 3), 150),
        (5 * HOUR, "a", (1, 2, 3, 4), 200),
        (10 * HOUR, "a", (1, 2, 9), 140),  # a rewind to before turn 2's block 3
        tpb=64,
    )
    assert w.turn_ideal().hit.tolist() == [0, 150, 128]
    runs = exact_runs(w, idle_ttl_s=60.0)
    # pinned keeps the idle session for five hours (nothing needs the room): its
    # partial last block too; ours backs the session up and releases it after the
    # idle TTL, so it resumes from its full blocks
    assert hits(runs["pinned"]).tolist() == [0, 150, 128]
    assert hits(runs["ours"]).tolist() == [0, 128, 128]
    assert runs["ours"].metrics["sessions_released_backed_up"] == 2
    assert hits(runs["prefix"]).tolist() == [0, 128, 128]
    assert hits(runs["ideal"]).tolist() == [0, 150, 128]


# -- the real engine -------------------------------------------------------------------

BS = 16


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return build_model("tiny", seed=5)


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


turn_ops = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),  # the session that sends the turn
        st.sampled_from(["a", "b"]),  # whose history it starts from (a fork when different)
        st.floats(0.0, 1.0),  # how much of that history it keeps (1.0: all of it)
        st.lists(st.integers(3, 200), min_size=1, max_size=40),  # new tokens
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=12)
@given(ops=turn_ops)
def test_engine_computes_exactly_what_no_matching_prefix_serves(
    model: LlamaModel, ops: list[tuple[str, str, float, list[int]]]
) -> None:
    torch.set_num_threads(1)
    engine: Engine = build_engine(
        model, num_gpu_blocks=256, num_host_blocks=64, scheduler=SchedulerConfig()
    )
    held: dict[str, list[int]] = {"a": [], "b": []}
    computed: list[list[int]] = []  # every sequence whose full blocks are cached
    for sid in held:
        engine.open_session(sid)
    spec = greedy(2)
    for n, (sid, source, keep, new) in enumerate(ops):
        base = held[source]
        prompt = base[: round(keep * len(base))] + new
        own = held[sid]
        if own and prompt[: len(own)] == own and len(prompt) > len(own):
            want = len(own)  # the pinned session extends
        else:
            shared = max((_lcp(prompt, seq) // BS * BS for seq in computed), default=0)
            want = min(shared, (len(prompt) - 1) // BS * BS)
        events: list[Any] = []
        req = EngineRequest(
            request_id=f"r{n}", session_id=sid, prompt_tokens=tuple(prompt), output=spec
        )
        engine.submit(req, events.append)
        engine.run_until_idle()
        done = events[-1]
        assert isinstance(done, TurnDone), events
        assert done.cached_tokens == want, (n, sid, len(prompt))
        assert done.input_tokens == len(prompt)
        out = engine._sessions[sid].held[len(prompt) :]
        assert out == reference(model, prompt, spec)[0]  # no stale KV was used
        held[sid] = list(engine._sessions[sid].held)
        computed.append(held[sid][: len(held[sid]) // BS * BS])
    for sid in held:
        engine.close_session(sid)
    engine.run_until_idle()
    assert engine.stats()["gpu_blocks"]["in_use"] == 0
    engine.scheduler.check_invariants()
