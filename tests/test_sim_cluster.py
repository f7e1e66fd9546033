"""The simulator's replicas: routing policies, bounded loads, the shared remote tier, the
cluster report and `pagedkv simulate --replicas`."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_simulator import PROFILE, comparable, hits, tiny, tiny_config

from pagedkv.cli.main import main
from pagedkv.sim.agent_workload import generate_agent_workload
from pagedkv.sim.cluster import (
    ROUTINGS,
    ClusterSpec,
    RemoteProfile,
    Router,
    SimRemoteStore,
    parse_routings,
)
from pagedkv.sim.cluster_report import build_cluster_report, format_cluster_tables
from pagedkv.sim.compare import Job, run_jobs, workload_facts
from pagedkv.sim.policies import POLICIES, SimSettings
from pagedkv.sim.simulator import DONE, REFUSED, PolicyRun, replay
from pagedkv.sim.workload import Request, Workload

OURS = POLICIES["ours"]


@cache
def per_request() -> tuple[Workload, SimSettings]:
    """The tiny agent workload with every follow-up on a new connection, on replicas the
    size of the single server of `tiny()` (a quarter of the open KV each)."""
    w, _facts, settings = tiny()
    return w.per_request_connections(), settings


@cache
def cluster_runs(remote: str = "ours") -> dict[str, PolicyRun]:
    w, settings = per_request()
    jobs = [
        Job(OURS, settings, 0, cluster=ClusterSpec(3, r))
        for r in parse_routings("all", remote=remote)  # type: ignore[arg-type]
    ]
    return {r.routing: r for r in run_jobs(w, jobs, PROFILE, check_every=5)}  # type: ignore[misc]


# -- the replay itself -------------------------------------------------------------------


def test_one_replica_replays_exactly_like_one_server() -> None:
    w, _facts, settings = tiny()
    plain = replay(w, OURS, settings, PROFILE)
    for routing in parse_routings("all", remote="none"):
        one = replay(w, OURS, settings, PROFILE, cluster=ClusterSpec(1, routing))
        assert comparable(one) == comparable(plain), routing.name
        assert (one.turns.replica[one.turns.status == DONE] == 0).all()


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_every_turn_is_accounted_for_and_nothing_leaks(routing: str) -> None:
    w, _settings = per_request()
    run = cluster_runs()[routing]
    t = run.turns
    assert set(np.unique(t.status)) <= {DONE, REFUSED}
    done = t.status == DONE
    assert done.sum() > 0.9 * w.num_requests
    np.testing.assert_array_equal(hits(run)[done] + t.computed[done], t.prompt_tokens[done])
    assert run.invariant_checks > 3
    assert (run.end_gpu_in_use, run.end_host_in_use, run.end_sessions_open) == (0, 0, 0)
    # each replica's own tally agrees with the per-turn records
    used = set(np.unique(t.replica[done]).tolist())
    if routing == "kv-aware":  # no load bound: the shared system prompts make a hot spot
        assert used <= {0, 1, 2}
    else:
        assert used == {0, 1, 2}
    for k, rep in enumerate(run.replicas):
        mine = done & (t.replica == k)
        assert rep["requests"] == int(mine.sum())
        assert rep["computed_tokens"] == int(t.computed[mine].sum())
    facts = workload_facts(w, cost=PROFILE.cost_model(w.tokens_per_block))
    facts.check_hits(run)  # no turn served more than it shares with what came before


def test_affinity_keeps_a_session_on_one_replica_and_round_robin_rotates() -> None:
    w, _settings = per_request()
    runs = cluster_runs()
    by_session: dict[str, set[int]] = {}
    t = runs["affinity"].turns
    for i, r in enumerate(w.requests):
        if t.status[i] == DONE and r.session_id is not None:
            by_session.setdefault(r.tenant + r.session_id, set()).add(int(t.replica[i]))
    assert by_session and all(len(s) == 1 for s in by_session.values())
    rr = runs["round-robin"].turns
    counts = np.bincount(rr.replica[rr.status == DONE], minlength=3)
    assert counts.max() - counts.min() <= 0.1 * counts.sum()  # every connection rotates


def test_cache_aware_routing_beats_round_robin_when_every_turn_is_routed() -> None:
    runs = cluster_runs()

    def ratio(run: PolicyRun) -> float:
        done = run.turns.status == DONE
        return float(hits(run)[done].sum() / run.turns.prompt_tokens[done].sum())

    rr, kv, ours = (ratio(runs[n]) for n in ("round-robin", "kv-aware", "ours"))
    assert kv > rr + 0.1 and ours > rr + 0.1, (rr, kv, ours)
    assert runs["kv-aware"].remote["routed_kv"] > 0
    assert runs["ours"].remote["routed_kv"] > 0

    def busiest(run: PolicyRun) -> int:
        return int(np.bincount(run.turns.replica[run.turns.status == DONE], minlength=3).max())

    # the load bound is what keeps the cache-aware router off a hot spot
    assert busiest(runs["ours"]) < busiest(runs["kv-aware"])


def test_the_remote_tier_serves_a_turn_that_lands_on_another_replica() -> None:
    """Round-robin scatters the turns; with the remote tier its follow-ups find their
    prefix written behind by the replica that served the previous turn."""
    without, with_remote = cluster_runs("none")["round-robin"], cluster_runs("all")["round-robin"]
    assert without.remote.get("blocks_read", 0) == 0
    r = with_remote.remote
    assert r["blocks_written"] > 0 and r["blocks_read"] > 0
    assert r["blocks_stored_peak"] <= r["blocks_written"]
    assert int(hits(with_remote).sum()) > int(hits(without).sum())
    assert with_remote.turns.computed.sum() < without.turns.computed.sum()


def test_remote_reads_cost_time_on_their_replica() -> None:
    w, settings = per_request()
    rr = ROUTINGS["round-robin"]
    fast = RemoteProfile(read_bytes_per_s=1e12, latency_s=0.0)
    slow = RemoteProfile(read_bytes_per_s=1e8, latency_s=0.01)
    a = replay(w, OURS, settings, PROFILE, cluster=ClusterSpec(3, replace(rr, remote=True), fast))
    b = replay(w, OURS, settings, PROFILE, cluster=ClusterSpec(3, replace(rr, remote=True), slow))
    assert b.remote["read_us"] > 100 * max(1, a.remote["read_us"])
    done = (a.turns.status == DONE) & (b.turns.status == DONE)
    assert np.nanmean(b.turns.ttft_s[done]) > np.nanmean(a.turns.ttft_s[done])


def test_a_small_store_evicts_and_a_full_write_queue_drops() -> None:
    w, settings = per_request()
    rr = replace(ROUTINGS["round-robin"], remote=True)
    bpb = PROFILE.kv_bytes_per_token * w.tokens_per_block
    tiny_store = RemoteProfile(capacity_bytes=20 * bpb)
    run = replay(w, OURS, settings, PROFILE, cluster=ClusterSpec(3, rr, tiny_store))
    assert run.remote["capacity_blocks"] == 20
    assert run.remote["blocks_stored_peak"] <= 20 and run.remote["blocks_evicted"] > 0
    choked = RemoteProfile(write_bytes_per_s=bpb / 10.0, max_pending_blocks=4)
    run = replay(w, OURS, settings, PROFILE, cluster=ClusterSpec(3, rr, choked))
    assert run.remote["blocks_dropped"] > 0
    assert run.remote["blocks_stored_peak"] <= run.remote["blocks_written"]


def test_store_writes_become_readable_when_they_land() -> None:
    clock = SimpleNamespace(now=0.0)
    store = SimRemoteStore(RemoteProfile(), bytes_per_block=100, clock=lambda: clock.now)
    store.put([b"a", b"b"], 5.0)
    clock.now = 4.9
    assert store.run([b"a", b"b"]) == 0
    clock.now = 5.0
    assert store.run([b"a", b"b", b"c"]) == 2 and store.run([b"b"]) == 1
    assert store.run([b"c", b"a"]) == 0  # a run starts at the first block


# -- the router --------------------------------------------------------------------------


class FakeNode:
    def __init__(self, index: int, num_open: int, held: int) -> None:
        self.index, self.num_open, self.held = index, num_open, held
        probe = SimpleNamespace(hashes=[b"h"] * 8, contents=[b"c"] * 8)
        self.sched = SimpleNamespace(
            cache=SimpleNamespace(probe_prefix=lambda tokens, tenant: probe)
        )

    def held_blocks(self, hashes: list[bytes], contents: list[bytes]) -> int:
        return self.held


def request(session: str) -> Request:
    return Request(
        arrival_s=0.0, session_id=session, tenant="t", block_keys=(1,), input_len=10, output_len=1
    )


def test_ours_takes_the_longest_prefix_under_the_load_bound() -> None:
    # 12 open connections over 3 replicas: the bound is ceil(1.25 * 13 / 3) = 6
    nodes = [FakeNode(0, 6, 8), FakeNode(1, 3, 5), FakeNode(2, 3, 2)]
    router = Router(ClusterSpec(3, ROUTINGS["ours"]), nodes)  # type: ignore[arg-type]
    assert router.pick(request("s"), np.zeros(10)) is nodes[1]  # 0 holds more, but is full
    plain = Router(ClusterSpec(3, ROUTINGS["kv-aware"]), nodes)  # type: ignore[arg-type]
    assert plain.pick(request("s"), np.zeros(10)) is nodes[0]  # no bound: the hot spot


def test_a_cold_prompt_falls_back_to_bounded_consistent_hashing() -> None:
    nodes = [FakeNode(k, 0, 0) for k in range(4)]
    router = Router(ClusterSpec(4, ROUTINGS["ours"]), nodes)  # type: ignore[arg-type]
    picks = []
    for k in range(200):
        node = router.pick(request(f"s{k}"), np.zeros(10))
        picks.append(node.index)
        node.num_open += 1  # type: ignore[attr-defined]
        bound = -(-1.25 * sum(n.num_open for n in nodes) // 4)
        assert max(n.num_open for n in nodes) <= bound + 1
    assert router.counts["routed_hash"] == 200
    # the same key maps to the same replica while loads allow
    fresh = [FakeNode(k, 0, 0) for k in range(4)]
    again = Router(ClusterSpec(4, ROUTINGS["ours"]), fresh)  # type: ignore[arg-type]
    assert again.pick(request("s0"), np.zeros(10)).index == picks[0]


def test_routing_names_are_checked() -> None:
    assert [r.name for r in parse_routings("all")] == list(ROUTINGS)
    assert [r.remote for r in parse_routings("all", remote="all")] == [True] * 4
    assert [r.remote for r in parse_routings("ours,kv-aware", remote="none")] == [False] * 2
    for bad, message in (
        ("", "no routing policy"),
        ("hash", "unknown routing policy 'hash'"),
        ("ours,ours", "repeats"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_routings(bad)
    with pytest.raises(ValueError, match="replicas must be"):
        ClusterSpec(0, ROUTINGS["ours"])
    with pytest.raises(ValueError, match="read_bytes_per_s"):
        RemoteProfile(read_bytes_per_s=0)


# -- the report and the command ---------------------------------------------------------


def test_cluster_report_compares_against_the_pooled_replica() -> None:
    w, settings = per_request()
    facts = workload_facts(w, cost=PROFILE.cost_model(w.tokens_per_block))
    pooled = replay(
        w,
        OURS,
        replace(
            settings,
            gpu_blocks=3 * settings.gpu_blocks,
            host_blocks=3 * settings.host_blocks,
            max_pinned_sessions=3 * settings.max_pinned_sessions,
        ),
        replace(PROFILE, gpu_flops=3 * PROFILE.gpu_flops),
    )
    runs = list(cluster_runs().values())
    report = build_cluster_report(
        facts=facts,
        profile={"gpu_flops": PROFILE.gpu_flops},
        settings={
            "gpu_kv_gb": 1.0,
            "gpu_blocks": settings.gpu_blocks,
            "host_gb": 1.0,
            "max_pinned_sessions": settings.max_pinned_sessions,
        },
        cluster={
            "replicas": 3,
            "node_policy": "ours",
            "remote": {
                "capacity_bytes": 1e12,
                "read_bytes_per_s": 1e10,
                "write_bytes_per_s": 1e10,
                "latency_s": 3e-4,
            },
        },
        pooled=pooled,
        runs=runs,
    )
    by = {r["routing"]: r for r in report["routings"]}
    p = report["pooled"]
    for name, r in by.items():
        c = r["cluster"]
        assert c["hit_vs_pooled"] == pytest.approx(
            r["hit_ratio"]["total"] / p["hit_ratio"]["total"]
        )
        assert c["computed_vs_pooled"] == pytest.approx(
            r["tokens"]["computed"] / p["tokens"]["computed"]
        )
        assert c["hit_local"] + c["hit_remote"] == pytest.approx(r["hit_ratio"]["total"], abs=1e-5)
        assert c["prefill_imbalance"] >= 1.0, name
    assert by["ours"]["remote_tier"] and not by["round-robin"]["remote_tier"]
    t = report["targets"]["ours"]
    assert t["hit_points_over_round_robin"] == pytest.approx(
        100 * (by["ours"]["hit_ratio"]["total"] - by["round-robin"]["hit_ratio"]["total"]),
        abs=1e-2,
    )
    text = format_cluster_tables(report)
    assert "pooled (3x)" in text and "round-robin" in text and "points of hit ratio" in text
    json.dumps(report)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_replicas_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "cluster.json"
    code, out, err = run_cli(
        [
            "simulate",
            "--replicas",
            "2",
            "--sessions",
            "6",
            "--per-request-connections",
            "--jobs",
            "1",
            "--no-progress",
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0, err
    assert "2 replicas, each" in out and "pooled (2x)" in out
    for name in ROUTINGS:
        assert f"\n{name} " in out
    report: dict[str, Any] = json.loads(out_json.read_text())
    assert [r["routing"] for r in report["routings"]] == list(ROUTINGS)
    assert report["cluster"]["per_request_connections"] is True
    assert report["settings"]["block_size"] == 64  # the cluster default
    assert set(report["targets"]) == {"kv-aware", "ours"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "2", "--plot", "x.png"], "--plot compares one server's policies"),
        (["--replicas", "2", "--sweep"], "--sweep compares one server's policies"),
        (["--replicas", "2", "--routing", "random"], "unknown routing policy 'random'"),
        (["--replicas", "2", "--policies", "ours,prefix"], "name the one policy"),
        (["--replicas", "2", "--policies", "ideal"], "infinite memory"),
        (["--remote-gb", "10"], "--remote-gb needs --replicas"),
        (["--routing", "ours"], "--routing needs --replicas"),
        (["--replicas", "0"], "expected an int >= 1"),
        (["--replicas", "2", "--remote-gbps", "0"], "expected a number > 0"),
    ],
)
def test_bad_cluster_options_give_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["simulate", *args, "--no-progress"], capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err and out == ""


def test_per_request_connections_changes_only_the_connections() -> None:
    w = generate_agent_workload(tiny_config(num_sessions=6))
    p = w.per_request_connections()
    assert [r.input_len for r in p.requests] == [r.input_len for r in w.requests]
    assert all(r.reconnect for r in p.requests if r.turn_index > 1)
    assert p.ideal_hit_tokens() == w.ideal_hit_tokens()
    assert sum(p.disconnects_after()) > sum(w.disconnects_after())
