"""Workload data model and the built-in agent-loop generator."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ideal_reference import reference_turn_ideal

from pagedkv.sim.agent_workload import (
    DEFAULT_NUM_SESSIONS,
    AgentWorkloadConfig,
    LogNormalRange,
    generate_agent_workload,
)
from pagedkv.sim.workload import Request, Workload

# -- helpers ---------------------------------------------------------------------------


def req(arrival_s: float = 0.0, keys: tuple[int, ...] = (1,), **kw: Any) -> Request:
    """A valid one-shot request with `len(keys)` blocks of 4 tokens (last one full)."""
    fields: dict[str, Any] = {
        "arrival_s": arrival_s,
        "session_id": None,
        "tenant": "default",
        "block_keys": keys,
        "input_len": 4 * len(keys),
        "output_len": 1,
    }
    fields.update(kw)
    return Request(**fields)


def brute_force_hits(w: Workload) -> list[int]:
    """O(n^2) reference for `ideal_hit_tokens_per_request`."""
    tpb = w.tokens_per_block
    hits = []
    for i, r in enumerate(w.requests):
        num_full = r.input_len // tpb
        best = 0
        for e in w.requests[:i]:
            if e.tenant != r.tenant:
                continue
            k = 0
            limit = min(num_full, e.input_len // tpb)
            while k < limit and e.block_keys[k] == r.block_keys[k]:
                k += 1
            best = max(best, k)
        hits.append(best * tpb)
    return hits


def by_session(w: Workload) -> dict[str, list[Request]]:
    sessions: dict[str, list[Request]] = defaultdict(list)
    for r in w.requests:
        assert r.session_id is not None
        sessions[r.session_id].append(r)
    return sessions


def small_config(**kw: Any) -> AgentWorkloadConfig:
    base: dict[str, Any] = {"num_sessions": 12, "num_tenants": 3, "seed": 7}
    base.update(kw)
    return AgentWorkloadConfig(**base)


# -- Request / Workload validation -----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("arrival_s", -1.0, "arrival_s must be a finite number >= 0, got -1.0"),
        ("arrival_s", math.nan, "arrival_s"),
        ("arrival_s", True, "arrival_s"),
        ("session_id", "", "session_id must be None or a non-empty str"),
        ("tenant", "", "tenant must be a non-empty str"),
        ("input_len", 0, "input_len must be an int >= 1, got 0"),
        ("output_len", 0, "output_len must be an int >= 1, got 0"),
        ("output_len", 2.0, "output_len must be an int"),
        ("turn_index", 0, "turn_index must be an int >= 1"),
        ("reconnect", 1, "reconnect must be a bool, got 1"),
        ("block_keys", [1], "block_keys must be a tuple"),
        ("block_keys", (1, "x"), "block_keys must hold ints, got 'x'"),
        ("block_keys", (1, True), "block_keys must hold ints, got True"),
        ("block_keys", (-1,), r"block_keys must lie in \[0, 2\*\*63 - 1\], got -1"),
        ("block_keys", (2**63,), "block_keys must lie in"),
    ],
)
def test_request_rejects_bad_field(field: str, value: object, match: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=match):
        req(**kwargs)


def test_request_without_session_is_one_shot() -> None:
    with pytest.raises(ValueError, match="one-shot connection"):
        req(turn_index=2)
    with pytest.raises(ValueError, match="one-shot connection"):
        req(last_turn=False)


def test_workload_rejects_unsorted_and_wrong_block_count() -> None:
    with pytest.raises(ValueError, match=r"requests\[1\]: arrival_s 1.0 is earlier"):
        Workload(name="w", tokens_per_block=4, requests=(req(2.0), req(1.0)))
    with pytest.raises(ValueError, match=r"requests\[0\]: has 1 block_keys, expected .* = 2"):
        Workload(name="w", tokens_per_block=4, requests=(req(input_len=5),))
    with pytest.raises(ValueError, match="tokens_per_block must be an int >= 1, got 0"):
        Workload(name="w", tokens_per_block=0, requests=())
    with pytest.raises(ValueError, match="requests must be a tuple"):
        Workload(name="w", tokens_per_block=4, requests=[req()])  # type: ignore[arg-type]


def test_workload_checks_session_rules() -> None:
    def turn(t: float, i: int, *, last: bool = False, tenant: str = "a") -> Request:
        return req(t, session_id="s", tenant=tenant, turn_index=i, last_turn=last)

    with pytest.raises(ValueError, match="turn_index 1 of session 's' does not increase"):
        Workload(name="w", tokens_per_block=4, requests=(turn(0, 1), turn(1, 1)))
    with pytest.raises(ValueError, match="already ended with a last_turn request"):
        Workload(name="w", tokens_per_block=4, requests=(turn(0, 1, last=True), turn(1, 2)))
    with pytest.raises(ValueError, match="changes tenant from 'a' to 'b'"):
        Workload(name="w", tokens_per_block=4, requests=(turn(0, 1), turn(1, 2, tenant="b")))
    # A session may start at a later turn (a trace that begins mid-conversation).
    Workload(name="w", tokens_per_block=4, requests=(turn(0, 3), turn(1, 5, last=True)))


def test_ideal_hits_count_only_full_blocks_within_a_tenant() -> None:
    requests = (
        req(0, (1, 2, 3), input_len=10),  # 2 full blocks + partial (key 3)
        req(1, (1, 2, 3), input_len=12),  # full (1, 2) seen; key 3 as a full block is new
        req(2, (1, 2, 3, 4), input_len=16),  # (1, 2, 3) full seen -> 12
        req(3, (1, 2, 3), input_len=12, tenant="other"),  # other tenant: nothing
        req(4, (9,), input_len=3),  # partial only: never hits
        req(5, (9,), input_len=3),
    )
    w = Workload(name="w", tokens_per_block=4, requests=requests)
    assert w.ideal_hit_tokens_per_request() == [0, 8, 12, 0, 0, 0]
    assert w.ideal_hit_tokens() == 20
    assert w.ideal_hit_ratio() == pytest.approx(20 / (10 + 12 + 16 + 12 + 3 + 3))
    stats = w.stats()
    assert (stats.num_requests, stats.num_sessions, stats.num_tenants) == (6, 6, 2)
    assert stats.ideal_hit_tokens == 20


def test_ideal_hits_follow_chains_not_keys() -> None:
    # Key 2 was seen, but after key 1, not after key 5: no hit at the second block.
    w = Workload(
        name="w", tokens_per_block=4, requests=(req(0, (1, 2)), req(1, (5, 2)), req(2, (1, 2)))
    )
    assert w.ideal_hit_tokens_per_request() == [0, 0, 8]


def test_disconnects_after_marks_drops_and_last_turns() -> None:
    def turn(t: float, i: int, **kw: Any) -> Request:
        return req(t, session_id="s", turn_index=i, **{"last_turn": False, **kw})

    w = Workload(
        name="w",
        tokens_per_block=4,
        requests=(
            turn(0, 1),
            req(0.5),
            turn(1, 2),
            turn(2, 3, reconnect=True),  # the connection dropped after turn 2
            turn(3, 4, last_turn=True),
        ),
    )
    assert w.disconnects_after() == [False, True, True, False, True]


_keys = st.lists(st.integers(0, 2), min_size=1, max_size=6)


@st.composite
def sessionless_workloads(draw: st.DrawFn) -> Workload:
    tpb = draw(st.integers(1, 4))
    requests = []
    t = 0.0
    for keys in draw(st.lists(_keys, max_size=12)):
        t += draw(st.sampled_from([0.0, 0.5]))
        fill = draw(st.integers(1, tpb))
        requests.append(
            Request(
                arrival_s=t,
                session_id=None,
                tenant=draw(st.sampled_from(["a", "b"])),
                block_keys=tuple(keys),
                input_len=(len(keys) - 1) * tpb + fill,
                output_len=1,
            )
        )
    return Workload(name="h", tokens_per_block=tpb, requests=tuple(requests))


@given(sessionless_workloads())
def test_ideal_hits_match_brute_force(w: Workload) -> None:
    assert w.ideal_hit_tokens_per_request() == brute_force_hits(w)


# -- agent generator: options ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_sessions": 0}, "num_sessions must be an int >= 1, got 0"),
        ({"num_sessions": 5, "duration_s": 60.0}, "give num_sessions or duration_s, not both"),
        ({"duration_s": -1.0}, "duration_s must be a finite number > 0"),
        ({"session_rate_per_s": 0}, "session_rate_per_s must be a finite number > 0"),
        ({"num_tenants": 0}, "num_tenants must be an int >= 1"),
        ({"turns_per_task": (40, 20)}, r"turns_per_task must be a \(low, high\) pair"),
        ({"turns_per_task": (0, 20)}, "turns_per_task"),
        ({"system_prompt_len": [2048, 4096]}, "system_prompt_len"),
        ({"tasks_per_session": (1.0, 2)}, "tasks_per_session"),
        ({"drop_rate": 1.5}, r"drop_rate must be a probability in \[0, 1\], got 1.5"),
        ({"drop_rate": -0.1}, "drop_rate must be a finite number >= 0"),
        ({"reconnect_delay_s": (5.0, 1.0)}, "reconnect_delay_s must be low <= high"),
        ({"reconnect_delay_s": (-1.0, 1.0)}, "reconnect_delay_s must be a"),
        ({"tokens_per_block": 0}, "tokens_per_block must be an int >= 1"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"tool_output_len": (50, 4000)}, "tool_output_len must be a LogNormalRange"),
        ({"nominal_decode_tokens_per_s": math.inf}, "nominal_decode_tokens_per_s"),
        ({"name": ""}, "name must be a non-empty str"),
        ({"compact_at_tokens": 0}, "compact_at_tokens must be an int >= 1"),
        ({"summary_len": (0, 10)}, "summary_len must be a"),
        ({"subagent_rate": 1.5}, "subagent_rate must be a probability"),
        ({"subagent_turns": (3, 1)}, "subagent_turns must be a"),
    ],
)
def test_config_rejects_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AgentWorkloadConfig(**options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"median": 0.0}, "median must be > 0"),
        ({"sigma": -1.0}, "sigma must be >= 0"),
        ({"low": 5.0, "high": 1.0}, "needs 0 <= low <= high"),
        ({"high": math.inf}, "high must be finite"),
    ],
)
def test_lognormal_range_rejects_bad_options(options: dict[str, Any], match: str) -> None:
    base = {"median": 10.0, "sigma": 1.0, "low": 1.0, "high": 100.0, **options}
    with pytest.raises(ValueError, match=match):
        LogNormalRange(**base)


def test_model_output_must_emit_a_token() -> None:
    with pytest.raises(ValueError, match="model_output_len must be low >= 1"):
        AgentWorkloadConfig(model_output_len=LogNormalRange(median=5, sigma=1, low=0, high=9))


def test_config_is_frozen_and_keyword_only() -> None:
    cfg = AgentWorkloadConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        AgentWorkloadConfig("agent")  # type: ignore[call-arg]
    assert cfg.session_limit == DEFAULT_NUM_SESSIONS
    assert AgentWorkloadConfig(duration_s=10.0).session_limit is None


# -- agent generator: behaviour --------------------------------------------------------


def test_generator_is_deterministic() -> None:
    cfg = small_config(drop_rate=0.1)
    a, b = generate_agent_workload(cfg), generate_agent_workload(cfg)
    assert a == b
    c = generate_agent_workload(dataclasses.replace(cfg, seed=8))
    assert c != a
    assert [r.input_len for r in c.requests] != [r.input_len for r in a.requests]


def test_generator_shapes_sessions_as_configured() -> None:
    cfg = small_config(num_sessions=40, drop_rate=0.0)
    w = generate_agent_workload(cfg)
    assert w.tokens_per_block == 16
    assert [r.arrival_s for r in w.requests] == sorted(r.arrival_s for r in w.requests)
    sessions = by_session(w)
    assert len(sessions) == 40
    assert len({r.tenant for r in w.requests}) <= 3
    num_tasks = []
    for turns in sessions.values():
        assert [r.turn_index for r in turns] == list(range(1, len(turns) + 1))
        assert [r.last_turn for r in turns] == [False] * (len(turns) - 1) + [True]
        assert not any(r.reconnect for r in turns)
        # Each turn appends an output (20-300) and a tool output (50-4,000) or a task message.
        deltas = [b.input_len - a.input_len for a, b in itertools.pairwise(turns)]
        assert min(deltas) >= 20 + 50 and max(deltas) <= 300 + 4000
        # The first turn: a system prompt (2k-4k) and a task message (50-500).
        assert 2048 + 50 <= turns[0].input_len <= 4096 + 500
        assert all(20 <= r.output_len <= 300 for r in turns)
        # Tasks of 20-40 turns, 1-2 per session: find task starts via the long human gaps.
        num_tasks.append(1 if len(turns) <= 40 else 2)
        assert 20 <= len(turns) <= 80
    assert set(num_tasks) == {1, 2}


def test_think_times_have_the_configured_medians() -> None:
    cfg = small_config(num_sessions=60, tasks_per_session=(2, 2), turns_per_task=(20, 20))
    w = generate_agent_workload(cfg)
    tool_gaps: list[float] = []
    human_gaps: list[float] = []
    for turns in by_session(w).values():
        for k, (a, b) in enumerate(itertools.pairwise(turns)):
            if b.reconnect:
                continue
            service = (
                a.input_len / cfg.nominal_prefill_tokens_per_s
                + a.output_len / cfg.nominal_decode_tokens_per_s
            )
            gap = b.arrival_s - a.arrival_s - service
            (human_gaps if k == 19 else tool_gaps).append(gap)
    assert statistics.median(tool_gaps) == pytest.approx(10.0, rel=0.1)
    assert min(tool_gaps) >= 0.5 - 1e-9
    assert statistics.median(human_gaps) == pytest.approx(120.0, rel=0.3)
    beyond_5_min = sum(g > 300 for g in human_gaps) / len(human_gaps)
    assert 0.05 < beyond_5_min < 0.4  # lognormal(median 120 s, sigma 1): about 18%


def test_tool_outputs_are_heavy_tailed_within_bounds() -> None:
    dist = AgentWorkloadConfig().tool_output_len
    draws = dist.sample(np.random.default_rng(0), 20_000)
    assert draws.min() >= 50 and draws.max() <= 4000
    assert float(np.median(draws)) == pytest.approx(200, rel=0.05)
    assert draws.mean() > 1.5 * np.median(draws)  # right-skewed
    assert np.quantile(draws, 0.99) > 10 * np.median(draws)


def test_drops_become_reconnects_with_full_history() -> None:
    cfg = small_config(num_sessions=30, drop_rate=0.1, reconnect_delay_s=(100.0, 100.0))
    w = generate_agent_workload(cfg)
    turns_after_first = [r for r in w.requests if r.turn_index > 1]
    rate = sum(r.reconnect for r in turns_after_first) / len(turns_after_first)
    assert rate == pytest.approx(0.1, abs=0.04)
    for turns in by_session(w).values():
        assert not turns[0].reconnect
        for a, b in itertools.pairwise(turns):
            if b.reconnect:
                assert b.arrival_s - a.arrival_s > 100.0
                assert b.block_keys[: a.input_len // 16] == a.block_keys[: a.input_len // 16]
    assert sum(w.disconnects_after()) == w.num_sessions + sum(r.reconnect for r in w.requests)


def test_duration_bounds_session_arrivals() -> None:
    cfg = small_config(num_sessions=None, duration_s=200.0, session_rate_per_s=0.2)
    w = generate_agent_workload(cfg)
    firsts = [turns[0].arrival_s for turns in by_session(w).values()]
    assert max(firsts) < 200.0
    assert 20 <= len(firsts) <= 60  # Poisson, mean 40


def test_block_identities_are_content_consistent() -> None:
    cfg = small_config(num_sessions=16, num_tenants=3, drop_rate=0.05)
    w = generate_agent_workload(cfg)
    tpb = w.tokens_per_block
    sessions = by_session(w)
    full_keys: dict[str, list[int]] = {}
    all_keys: dict[str, set[int]] = {}
    for sid, turns in sessions.items():
        for a, b in itertools.pairwise(turns):
            num_full = a.input_len // tpb
            assert b.block_keys[:num_full] == a.block_keys[:num_full]  # append-only
            if a.input_len % tpb:  # the partial block's key changes once it fills
                assert a.block_keys[-1] not in b.block_keys
        last = turns[-1]
        full_keys[sid] = list(last.block_keys[: last.input_len // tpb])
        all_keys[sid] = {k for r in turns for k in r.block_keys}
    tenant_of = {sid: turns[0].tenant for sid, turns in sessions.items()}
    prefix_by_tenant: dict[str, set[int]] = {}
    ids = sorted(sessions)
    for i, x in enumerate(ids):
        for y in ids[i + 1 :]:
            shared = all_keys[x] & all_keys[y]
            if tenant_of[x] != tenant_of[y]:
                assert not shared
                continue
            # Same tenant: exactly the system prompt's full blocks (2k-4k tokens), as a prefix.
            n = len(shared)
            assert 2048 // tpb <= n <= 4096 // tpb
            assert set(full_keys[x][:n]) == shared == set(full_keys[y][:n])
            assert prefix_by_tenant.setdefault(tenant_of[x], shared) == shared


def test_session_keys_are_unique_within_and_across_sessions() -> None:
    w = generate_agent_workload(small_config(num_sessions=10, num_tenants=1))
    seen: dict[int, tuple[str | None, int]] = {}
    for r in w.requests:
        for j, key in enumerate(r.block_keys):
            assert seen.setdefault(key, (r.session_id, j))[1] == j  # a key keeps its position
    assert all(0 <= key < 2**63 for key in seen)


def test_default_workload_size_matches_the_docs() -> None:
    w = generate_agent_workload()
    stats = w.stats()
    assert stats.num_sessions == DEFAULT_NUM_SESSIONS == 100
    assert stats.num_tenants == 4
    assert 3_500 <= stats.num_requests <= 5_500
    assert 0.9 < stats.ideal_hit_ratio < 1.0
    assert 0 < stats.num_reconnects < 0.05 * stats.num_requests


@given(
    num_sessions=st.integers(1, 4),
    num_tenants=st.integers(1, 3),
    tokens_per_block=st.integers(1, 64),
    seed=st.integers(0, 2**32),
    drop_rate=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_generator_properties(
    num_sessions: int, num_tenants: int, tokens_per_block: int, seed: int, drop_rate: float
) -> None:
    cfg = AgentWorkloadConfig(
        num_sessions=num_sessions,
        num_tenants=num_tenants,
        tokens_per_block=tokens_per_block,
        seed=seed,
        drop_rate=drop_rate,
        turns_per_task=(2, 5),
        tasks_per_session=(1, 2),
        system_prompt_len=(0, 100),
        task_prompt_len=(1, 40),
    )
    w = generate_agent_workload(cfg)  # Workload validates order and block counts
    assert w.num_sessions == num_sessions
    for turns in by_session(w).values():
        for a, b in itertools.pairwise(turns):
            num_full = a.input_len // tokens_per_block
            assert b.block_keys[:num_full] == a.block_keys[:num_full]
            assert b.reconnect == (drop_rate == 1.0) or drop_rate == 0.3
            assert b.arrival_s > a.arrival_s
    assert w.ideal_hit_tokens_per_request() == brute_force_hits(w)


# -- rewrites: compaction and subagents ----------------------------------------------------


def test_compaction_keeps_only_the_system_prompt() -> None:
    cfg = small_config(
        num_sessions=8, num_tenants=1, compact_at_tokens=6000, summary_len=(300, 600)
    )
    w = generate_agent_workload(cfg)
    tpb = w.tokens_per_block
    num_compactions = 0
    for turns in by_session(w).values():
        for a, b in itertools.pairwise(turns):
            full = a.input_len // tpb
            if b.block_keys[:full] == a.block_keys[:full]:
                assert b.input_len > a.input_len  # an ordinary append
                continue
            num_compactions += 1
            pairs = zip(a.block_keys, b.block_keys, strict=False)
            common = next(j for j, (x, y) in enumerate(pairs) if x != y)
            assert 2048 // tpb <= common <= 4096 // tpb  # the system prompt's full blocks
            assert b.input_len <= 4096 + 600 + 4000 + 300  # system + summary + new input
        assert all(r.input_len <= 6000 + 4000 + 300 for r in turns)
    assert num_compactions >= 8
    ideal = w.turn_ideal()
    assert ideal.hit.sum() < w.total_input_tokens  # compaction recomputes the summary
    assert w.ideal_hit_tokens_per_request() == brute_force_hits(w)


def test_subagents_start_from_their_parents_prompt_and_run_beside_it() -> None:
    cfg = small_config(num_sessions=6, num_tenants=1, subagent_rate=0.2, subagent_turns=(2, 4))
    w = generate_agent_workload(cfg)
    tpb = w.tokens_per_block
    sessions = by_session(w)
    subs = [sid for sid in sessions if "." in sid]
    assert len(subs) >= 5
    overlapping = 0
    for sid in subs:
        parent = sessions[sid.split(".")[0]]
        first = sessions[sid][0]
        assert 2 <= len(sessions[sid]) <= 4 and sessions[sid][-1].last_turn
        # the parent turn it forked from: the latest before it whose full blocks it starts with
        src = [p for p in parent if p.arrival_s < first.arrival_s
               and first.block_keys[: p.input_len // tpb] == p.block_keys[: p.input_len // tpb]]  # fmt: skip
        assert src, sid
        fork = src[-1]
        assert first.input_len > fork.input_len
        assert first.block_keys[fork.input_len // tpb :][0] not in fork.block_keys
        overlapping += any(
            first.arrival_s < p.arrival_s < sessions[sid][-1].arrival_s for p in parent
        )
    assert overlapping >= 1  # subagents run while their parent goes on
    assert w.turn_ideal().hit.tolist() == reference_turn_ideal(w)["hit"]


def test_rewrites_off_leave_the_workload_as_it_was() -> None:
    base = generate_agent_workload(small_config())
    assert generate_agent_workload(small_config(summary_len=(1, 2), subagent_turns=(1, 1))) == base
    with_rewrites = generate_agent_workload(small_config(subagent_rate=0.3, compact_at_tokens=5000))
    # the main sessions draw exactly what they drew before, up to the first compaction
    mains = {r.session_id for r in base.requests}
    assert mains <= {r.session_id for r in with_rewrites.requests}
    first_turns = lambda w: sorted(  # noqa: E731
        (r.session_id, r.arrival_s, r.input_len) for r in w.requests
        if r.turn_index == 1 and "." not in (r.session_id or "")
    )  # fmt: skip
    assert first_turns(with_rewrites) == first_turns(base)
