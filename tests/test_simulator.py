"""The simulator: accounting identities, the ideal, leaks, invariants, determinism, traces."""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from ideal_reference import reference_turn_ideal

from pagedkv.sim.agent_workload import AgentWorkloadConfig, LogNormalRange, generate_agent_workload
from pagedkv.sim.compare import (
    WorkloadFacts,
    gpu_sweep_sizes,
    main_jobs,
    run_jobs,
    sweep_jobs,
    workload_facts,
)
from pagedkv.sim.policies import (
    POLICIES,
    HardwareProfile,
    SimSettings,
    default_pinned_cap,
    ideal_gpu_blocks,
    parse_policies,
)
from pagedkv.sim.report import build_report, format_tables, summarize
from pagedkv.sim.simulator import DONE, REFUSED, PolicyRun, replay
from pagedkv.sim.tokens import PromptTokens
from pagedkv.sim.traces import load_mooncake
from pagedkv.sim.workload import Request, Workload

PROFILE = HardwareProfile()
OURS_VARIANTS = ("ours-off", "ours-layerwise", "ours-split")
ALL = ("stateless", "prefix", "prefix+host", "ours", "pinned", "ideal", *OURS_VARIANTS)


def tiny_config(**kw: object) -> AgentWorkloadConfig:
    """A few overlapping agent sessions with short prompts (runs in well under a second)."""
    base: dict[str, object] = dict(
        num_sessions=24,
        num_tenants=2,
        session_rate_per_s=4.0,
        tasks_per_session=(1, 2),
        turns_per_task=(4, 10),
        system_prompt_len=(200, 400),
        task_prompt_len=(20, 60),
        tool_output_len=LogNormalRange(median=60.0, sigma=0.8, low=10.0, high=300.0),
        model_output_len=LogNormalRange(median=20.0, sigma=0.5, low=5.0, high=60.0),
        tool_time_s=LogNormalRange(median=3.0, sigma=0.5, low=0.5, high=20.0),
        drop_rate=0.15,
        seed=1,
    )
    base.update(kw)
    return AgentWorkloadConfig(**base)  # type: ignore[arg-type]


@cache
def tiny() -> tuple[Workload, WorkloadFacts, SimSettings]:
    w = generate_agent_workload(tiny_config())
    facts = workload_facts(w, cost=PROFILE.cost_model(w.tokens_per_block))
    gpu = facts.peak_open_tokens // 4 // w.tokens_per_block  # a quarter of the open KV
    settings = SimSettings(
        gpu_blocks=gpu,
        host_blocks=4 * gpu,
        max_pinned_sessions=default_pinned_cap(w, gpu, high_watermark=0.95),
        idle_ttl_s=5.0,
    )
    return w, facts, settings


@cache
def tiny_runs() -> dict[str, PolicyRun]:
    w, facts, settings = tiny()
    jobs = main_jobs(parse_policies("all"), settings, w, facts)
    runs = run_jobs(w, jobs, PROFILE, check_every=7)
    return {r.policy.name: r for r in runs}


def hits(run: PolicyRun) -> np.ndarray:
    t = run.turns
    out: np.ndarray = t.hit_pinned + t.hit_gpu + t.hit_host
    return out


# -- accounting ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_hits_plus_computed_equal_the_prompt_for_every_turn(name: str) -> None:
    w, _facts, _settings = tiny()
    run = tiny_runs()[name]
    t = run.turns
    assert set(np.unique(t.status)) <= {DONE, REFUSED}, "every request ran or was refused"
    done = t.status == DONE
    assert done.sum() > 0.9 * w.num_requests
    np.testing.assert_array_equal(hits(run)[done] + t.computed[done], t.prompt_tokens[done])
    np.testing.assert_array_equal(t.prompt_tokens[done], t.input_len[done])
    m = run.metrics
    assert (
        m["tokens_hit_pinned"] + m["tokens_hit_gpu"] + m["tokens_hit_host"] + m["tokens_computed"]
        == m["tokens_prompt"]
    )
    assert m["tokens_prompt"] == int(t.prompt_tokens.sum())
    assert (np.isnan(t.first_token_s) == ~done).all()
    ttft = t.ttft_s[done]
    assert (ttft > 0).all()
    # the TTFT parts are ordered: submit <= admitted <= ready <= prefill start < first token
    for a, b in itertools.pairwise(
        (t.submit_s, t.admit_s, t.ready_s, t.prefill_start_s, t.first_token_s)
    ):
        assert (a[done] <= b[done]).all()


@pytest.mark.parametrize("name", ALL)
def test_nothing_leaks_and_invariants_hold(name: str) -> None:
    run = tiny_runs()[name]
    assert run.invariant_checks > 3
    assert (run.end_gpu_in_use, run.end_host_in_use, run.end_sessions_open) == (0, 0, 0)
    assert run.peak_gpu_in_use <= run.gpu_blocks


def test_stateless_never_hits_and_baselines_never_pin() -> None:
    runs = tiny_runs()
    assert hits(runs["stateless"]).sum() == 0
    assert (
        runs["stateless"].metrics["tokens_computed"] == runs["stateless"].metrics["tokens_prompt"]
    )
    for name in ("stateless", "prefix", "prefix+host"):
        assert runs[name].turns.hit_pinned.sum() == 0
    for name in ("stateless", "prefix", "pinned", "ideal"):
        assert runs[name].turns.hit_host.sum() == 0
        assert runs[name].metrics["bytes_offloaded"] == 0


def test_ideal_matches_the_workloads_own_ideal() -> None:
    w, facts, _settings = tiny()
    run = tiny_runs()["ideal"]
    assert (run.turns.status == DONE).all()
    # independent: brute-force longest common prefixes, the per-turn rule
    expect = reference_turn_ideal(w)
    np.testing.assert_array_equal(hits(run), expect["hit"])
    assert facts.ideal_hit_tokens == sum(expect["hit"])
    assert facts.prefix_ideal_hit_tokens == sum(expect["raw"])
    # pinned sessions reuse their partial last block: more than full blocks alone
    assert facts.ideal_hit_tokens > sum(expect["servable"])
    summary = summarize(run, facts, ideal=run)
    assert summary["hit_ratio"]["vs_ideal"] == 1.0 and summary["computed_vs_ideal"] == 1.0


def test_no_policy_beats_the_ideal_on_full_blocks_and_ours_beats_prefix_when_tight() -> None:
    runs = tiny_runs()
    ideal = runs["ideal"].metrics["tokens_computed"]
    for name in ("prefix", "prefix+host"):  # no pinning: at best the ideal
        assert runs[name].metrics["tokens_computed"] >= ideal
    ours, prefix = runs["ours"], runs["prefix"]
    assert ours.gpu_blocks == prefix.gpu_blocks
    assert hits(ours).sum() > hits(prefix).sum()
    assert ours.metrics["tokens_computed"] < prefix.metrics["tokens_computed"]
    assert ours.turns.hit_pinned.sum() > 0 and ours.turns.hit_host.sum() > 0


def test_reconnects_find_their_history_by_hash() -> None:
    w, _facts, _settings = tiny()
    reconnect = np.array([r.reconnect for r in w.requests])
    assert reconnect.sum() >= 3
    for name in ("ours", "ideal"):
        t = tiny_runs()[name].turns
        sel = reconnect & (t.status == DONE)
        assert t.hit_pinned[sel].sum() == 0  # a new connection holds nothing pinned
        assert (t.hit_gpu[sel] + t.hit_host[sel] > 0).all()


# -- determinism and parallel runs ------------------------------------------------------


def comparable(run: PolicyRun) -> tuple[object, ...]:
    t = run.turns
    arrays = (t.status, t.first_token_s, t.computed, t.hit_pinned, t.hit_gpu, t.hit_host)
    return (
        run.metrics,
        run.refusals,
        run.peak_gpu_in_use,
        run.peak_host_in_use,
        *(a.tobytes() for a in arrays),
    )


def test_same_seed_same_numbers_in_process_and_in_workers() -> None:
    w, facts, settings = tiny()
    jobs = main_jobs(parse_policies("prefix+host,ours"), settings, w, facts)
    first = run_jobs(w, jobs, PROFILE)
    again = run_jobs(generate_agent_workload(tiny_config()), jobs, PROFILE, num_workers=2)
    assert [comparable(r) for r in first] == [comparable(r) for r in again]
    other = generate_agent_workload(tiny_config(seed=2))
    assert comparable(replay(other, POLICIES["ours"], settings, PROFILE)) != comparable(first[1])


# -- tokens ----------------------------------------------------------------------------


def test_prompt_tokens_are_content_consistent_and_append_only() -> None:
    w, _facts, _settings = tiny()
    tok = PromptTokens(w)
    tpb = w.tokens_per_block
    prev: dict[str, int] = {}
    seen: dict[tuple[str, int], bytes] = {}  # (tenant, key) -> block tokens
    for i, r in enumerate(w.requests):
        full = tok.tokens(i, 0, r.input_len)
        assert full.dtype == np.int32 and len(full) == r.input_len
        assert (tok.tokens(i, 5, r.input_len - 3) == full[5:-3]).all()
        for j in range(r.input_len // tpb):
            block = full[j * tpb : (j + 1) * tpb].tobytes()
            assert seen.setdefault((r.tenant, r.block_keys[j]), block) == block
        assert r.session_id is not None
        if r.session_id in prev:  # the previous prompt of the session is a prefix of this
            p = prev[r.session_id]
            before = tok.tokens(p, 0, w.requests[p].input_len)
            assert (full[: len(before)] == before).all()
        prev[r.session_id] = i
    blocks = set(seen.values())
    assert len(blocks) == len(seen), "different keys give different blocks"
    with pytest.raises(ValueError, match="outside"):
        tok.tokens(0, 0, w.requests[0].input_len + tpb)


# -- refusals --------------------------------------------------------------------------


def test_a_prompt_larger_than_the_gpu_is_refused_and_the_replay_goes_on() -> None:
    keys = tuple(range(1, 41))
    w = Workload(
        name="big",
        tokens_per_block=16,
        requests=(
            Request(0.0, None, "t", keys[:4], input_len=60, output_len=5),
            Request(1.0, None, "t", keys, input_len=640, output_len=5),
            Request(2.0, None, "t", keys[:4], input_len=64, output_len=5),
        ),
    )
    settings = SimSettings(gpu_blocks=20, host_blocks=40, max_pinned_sessions=2)
    run = replay(w, POLICIES["ours"], settings, PROFILE, check_every=1)
    assert run.turns.status.tolist() == [DONE, REFUSED, DONE]
    assert run.refusals == {"too_large": 1}
    assert run.turns.hit_gpu[2] == 48  # the first request's 3 full blocks
    assert (run.end_gpu_in_use, run.end_sessions_open) == (0, 0)


# -- sizes, report ---------------------------------------------------------------------


def test_sizes_and_report() -> None:
    w, facts, settings = tiny()
    assert ideal_gpu_blocks(w, facts.ideal_hit_tokens, high_watermark=0.95) > settings.gpu_blocks
    sizes = gpu_sweep_sizes(100, 1000, 5)
    assert sizes[0] == 12 and sizes[-1] == 1000 and 100 in sizes and sizes == sorted(sizes)
    jobs = sweep_jobs(parse_policies("all"), settings, w, [50, 80], fixed_cap=False)
    assert {j.policy.name for j in jobs} == {
        "prefix",
        "prefix+host",
        "ours",
        "pinned",
        *OURS_VARIANTS,
    }
    assert {j.settings.gpu_blocks for j in jobs} == {50, 80}
    runs = list(tiny_runs().values())
    report = build_report(
        facts=facts,
        profile={"name": "test"},
        settings={
            "gpu_kv_gb": 1.0,
            "gpu_blocks": settings.gpu_blocks,
            "gpu_fraction_of_peak": 0.25,
            "host_gb": 2.0,
            "host_blocks": settings.host_blocks,
            "max_pinned_sessions": settings.max_pinned_sessions,
            "idle_ttl_s": settings.idle_ttl_s,
            "kv_bytes_per_token": PROFILE.kv_bytes_per_token,
        },
        runs=runs,
        sweep=[runs[1]],
    )
    text = format_tables(report)
    for name in ALL:
        assert f"\n{name} " in text
    assert "turn 30 p50" in text and "hit ratio vs GPU KV memory" in text
    by_name = {p["policy"]: p for p in report["policies"]}
    assert by_name["ideal"]["hit_ratio"]["vs_ideal"] == 1.0
    assert by_name["stateless"]["hit_ratio"]["total"] == 0.0


def test_policy_parsing() -> None:
    assert [p.name for p in parse_policies(" ours , ideal")] == ["ours", "ideal"]
    assert len(parse_policies("all")) == len(POLICIES)
    for bad, match in (("nope", "unknown policy 'nope'"), ("ours,ours", "repeats"), (",", "no")):
        with pytest.raises(ValueError, match=match):
            parse_policies(bad)


# -- a real trace ----------------------------------------------------------------------


def test_mooncake_slice(traces_dir: Path, tmp_path: Path) -> None:
    src = traces_dir / "mooncake" / "conversation_trace.jsonl"
    head = tmp_path / "head.jsonl"
    with open(src, encoding="utf-8") as f:
        head.write_text("".join(itertools.islice(f, 300)))
    w = load_mooncake(head)
    facts = workload_facts(w)
    assert w.tokens_per_block == 512 and w.num_requests == 300
    # ~0.5M tokens of GPU KV; eight GPUs' compute, so the GPU keeps up with the arrivals
    settings = SimSettings(gpu_blocks=1000, host_blocks=2000, max_pinned_sessions=16)
    profile = HardwareProfile(gpu_flops=3.2e15)
    jobs = main_jobs(parse_policies("prefix,prefix+host,ours,ideal"), settings, w, facts)
    runs = {r.policy.name: r for r in run_jobs(w, jobs, profile, check_every=50)}
    for run in runs.values():
        t = run.turns
        done = t.status == DONE
        np.testing.assert_array_equal(hits(run)[done] + t.computed[done], t.input_len[done])
        assert (run.end_gpu_in_use, run.end_host_in_use, run.end_sessions_open) == (0, 0, 0)
    assert runs["ideal"].refusals == {}
    assert hits(runs["ideal"]).sum() == facts.ideal_hit_tokens
    for name in ("prefix", "prefix+host", "ours"):
        assert 0 < hits(runs[name]).sum() <= hits(runs["ideal"]).sum()
        assert runs[name].turns.hit_pinned.sum() == 0  # every request is its own connection


def test_progress_reports_every_request_once() -> None:
    w, _facts, settings = tiny()
    seen: list[int] = []
    replay(w, POLICIES["prefix"], settings, PROFILE, on_progress=seen.append)
    assert sum(seen) == w.num_requests
    total: list[int] = []
    jobs = main_jobs(parse_policies("prefix,ours"), settings, w, workload_facts(w))
    run_jobs(w, jobs, PROFILE, num_workers=2, on_progress=total.append)
    assert sum(total) == 2 * w.num_requests


def test_a_failing_worker_reports_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import pagedkv.sim.compare as sim_compare
    from pagedkv.cache.errors import OutOfBlocksError

    def broken(*args: object, **kwargs: object) -> PolicyRun:
        raise OutOfBlocksError("gpu pool: need 9 blocks", needed=9, available=1)

    monkeypatch.setattr(sim_compare, "replay", broken)  # forked workers inherit the patch
    w, facts, settings = tiny()
    jobs = main_jobs(parse_policies("prefix,ours"), settings, w, facts)
    with pytest.raises(sim_compare.ReplayError, match=r"(?s)policy 'prefix'.*OutOfBlocksError"):
        run_jobs(w, jobs, PROFILE, num_workers=2)


# -- rewritten histories -----------------------------------------------------------------


def diverge(*, reconnect: bool) -> Workload:
    """The issue-20 trace: turn 2 shares only its first 2 blocks with turn 1."""
    return Workload(
        name="diverge",
        tokens_per_block=16,
        requests=(
            Request(0.0, "s1", "default", tuple(range(1, 11)), input_len=160, output_len=10,
                    last_turn=False),
            Request(30.0, "s1", "default", (1, 2, *range(91, 100)), input_len=176,
                    output_len=10, turn_index=2, reconnect=reconnect),
        ),
    )  # fmt: skip


@pytest.mark.parametrize("reconnect", [False, True])
def test_a_rewritten_history_reuses_only_the_common_prefix(reconnect: bool) -> None:
    w = diverge(reconnect=reconnect)
    facts = workload_facts(w)
    assert facts.ideal_hit_tokens == 32
    assert facts.own_tokens is not None and facts.shared_tokens is not None
    assert facts.own_tokens.tolist() == [0, 0] and facts.shared_tokens.tolist() == [32, 32]
    settings = SimSettings(gpu_blocks=64, host_blocks=64, max_pinned_sessions=4)
    jobs = main_jobs(parse_policies("all"), settings, w, facts)
    runs = {r.policy.name: r for r in run_jobs(w, jobs, PROFILE, num_workers=1)}
    for name, run in runs.items():
        t = run.turns
        assert t.status.tolist() == [DONE, DONE], name
        want_hit = [0, 0] if name == "stateless" else [0, 32]
        assert hits(run).tolist() == want_hit, name
        assert t.computed.tolist() == [160, 176 - want_hit[1]], name
    report = build_report(facts=facts, profile={}, settings={}, runs=list(runs.values()))
    by_name = {p["policy"]: p for p in report["policies"]}
    assert by_name["ours"]["hit_ratio"]["total"] == pytest.approx(32 / 336, abs=1e-6)


def test_a_hit_beyond_what_the_prompt_shares_fails_the_report() -> None:
    w = diverge(reconnect=False)
    facts = workload_facts(w)
    settings = SimSettings(gpu_blocks=64, host_blocks=64, max_pinned_sessions=4)
    run = replay(w, POLICIES["ours"], settings, PROFILE)
    facts.check_hits(run)  # the honest run passes
    # what the append-only simulator used to report: the whole first turn, pinned
    run.turns.hit_pinned[1], run.turns.hit_gpu[1], run.turns.hit_host[1] = 160, 0, 0
    with pytest.raises(
        AssertionError, match=r"policy 'ours' served more cached tokens.*#1: 160 > 32"
    ):
        facts.check_hits(run)
    with pytest.raises(AssertionError, match="policy 'ours'"):
        build_report(facts=facts, profile={}, settings={}, runs=[run])
