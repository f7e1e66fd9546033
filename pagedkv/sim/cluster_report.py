"""The cluster comparison: routing policies over N replicas against one pooled replica.

Definitions (docs/simulator.md, "Replicas"):
- pooled: one replica with N times the GPU and host memory, pinned cap and prefill
  compute (and the same remote tier when a routing under comparison has one): what the
  cluster would be if it were one machine, so every session sees all the memory; each
  routing is measured against it.
- hit: cached prompt tokens / prompt tokens; `remote`: the share of prompt tokens read
  from the shared remote tier (restored through the host tier, so also in the host
  share of `summarize`); `local`: the rest of the hits.
- vs pooled: hit ratio / the pooled hit ratio; x pooled: computed tokens / the pooled
  computed tokens.
- imbalance: the busiest replica's prefill seconds / the mean over replicas (1.00 is
  even); requests imbalance likewise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagedkv.sim.compare import WorkloadFacts
from pagedkv.sim.report import _num, _pct_text, _table, build_report, summarize
from pagedkv.sim.simulator import PolicyRun

__all__ = ["build_cluster_report", "format_cluster_tables"]

GB = 1e9


def _imbalance(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0.0
    return round(max(values) / mean, 4) if mean > 0 else None


def _routing_summary(
    run: PolicyRun, facts: WorkloadFacts, pooled: dict[str, Any]
) -> dict[str, Any]:
    s = summarize(run, facts)
    prompt = s["tokens"]["prompt"]
    remote_tokens = int(run.remote.get("blocks_read", 0)) * run.block_size
    hit = s["tokens"]["hit"]
    p_hit, p_computed = pooled["hit_ratio"]["total"], pooled["tokens"]["computed"]
    bpb = run.bytes_per_block
    return {
        **s,
        "routing": run.routing,
        "remote_tier": bool(run.remote.get("capacity_blocks")),
        "cluster": {
            "hit_local": round((hit - remote_tokens) / prompt, 6) if prompt else 0.0,
            "hit_remote": round(remote_tokens / prompt, 6) if prompt else 0.0,
            "hit_vs_pooled": round(s["hit_ratio"]["total"] / p_hit, 6) if p_hit else None,
            "computed_vs_pooled": round(s["tokens"]["computed"] / p_computed, 6)
            if p_computed
            else None,
            "hit_points_vs_pooled": round(100 * (s["hit_ratio"]["total"] - p_hit), 3),
            "prefill_imbalance": _imbalance([r["prefill_s"] for r in run.replicas]),
            "requests_imbalance": _imbalance([r["requests"] for r in run.replicas]),
            "replicas": run.replicas,
            "remote": dict(run.remote),
            "remote_gb_read": round(int(run.remote.get("blocks_read", 0)) * bpb / GB, 3),
            "remote_gb_written": round(int(run.remote.get("blocks_written", 0)) * bpb / GB, 3),
        },
    }


def build_cluster_report(
    *,
    facts: WorkloadFacts,
    profile: dict[str, Any],
    settings: dict[str, Any],
    cluster: dict[str, Any],
    pooled: PolicyRun,
    runs: Sequence[PolicyRun],
    wall_s: float | None = None,
) -> dict[str, Any]:
    """The report: workload, profile, per-replica settings, the cluster's shape, the
    pooled reference and one summary per routing policy."""
    base = build_report(facts=facts, profile=profile, settings=settings, runs=[pooled])
    for r in runs:
        facts.check_hits(r)
    ref = base["policies"][0]
    ref = _routing_summary(pooled, facts, ref)
    routings = [_routing_summary(r, facts, ref) for r in runs]
    by_name = {r["routing"]: r for r in routings}
    targets: dict[str, Any] = {}
    rr = by_name.get("round-robin")
    for name in ("kv-aware", "ours"):
        if name in by_name:
            c = by_name[name]["cluster"]
            targets[name] = {
                "hit_vs_pooled": c["hit_vs_pooled"],
                "computed_vs_pooled": c["computed_vs_pooled"],
                "hit_points_over_round_robin": None
                if rr is None
                else round(
                    100 * (by_name[name]["hit_ratio"]["total"] - rr["hit_ratio"]["total"]), 3
                ),
            }
    return {
        "workload": base["workload"],
        "profile": profile,
        "settings": settings,
        "cluster": cluster,
        "pooled": ref,
        "routings": routings,
        "targets": targets,
        "wall_s": None if wall_s is None else round(wall_s, 3),
    }


def format_cluster_tables(report: dict[str, Any]) -> str:
    """The terminal report: a header, the routing table, the latency table and the
    targets' figures."""
    w, st, cl = report["workload"], report["settings"], report["cluster"]
    head = [
        f"workload {w['name']}: {w['requests']:,} requests, {w['sessions']:,} sessions, "
        f"{w['input_tokens'] / 1e6:,.1f}M prompt tokens, {w['tokens_per_block']} tokens/block, "
        f"{w['duration_s'] / 60:,.1f} min; ideal hit ratio {_pct_text(w['ideal_hit_ratio'])}",
        f"{cl['replicas']} replicas, each: GPU KV {st['gpu_kv_gb']:,.1f} GB ({st['gpu_blocks']:,} "
        f"blocks), host {st['host_gb']:,.1f} GB, pinned cap {st['max_pinned_sessions']}, "
        f"{report['profile']['gpu_flops'] / 1e12:,.0f} TFLOP/s; node policy "
        f"{cl['node_policy']}; pooled = 1 replica with {cl['replicas']}x all of it",
        f"remote tier: {cl['remote']['capacity_bytes'] / GB:,.0f} GB, "
        f"{cl['remote']['read_bytes_per_s'] / GB:g} GB/s read and "
        f"{cl['remote']['write_bytes_per_s'] / GB:g} GB/s write per replica, "
        f"{cl['remote']['latency_s'] * 1e6:,.0f} us a round trip"
        + ("; every turn on a new connection" if cl.get("per_request_connections") else ""),
    ]
    p = pr = report["pooled"]
    rows = [
        [
            f"pooled ({cl['replicas']}x)",
            "yes" if pr["remote_tier"] else "no",
            _pct_text(p["hit_ratio"]["total"]),
            _pct_text(pr["cluster"]["hit_local"]),
            _pct_text(pr["cluster"]["hit_remote"]) if pr["remote_tier"] else "-",
            "1.000",
            f"{p['tokens']['computed']:,}",
            "1.000",
            "-",
            "-",
            _num(pr["cluster"]["remote_gb_read"]) if pr["remote_tier"] else "-",
            f"{pr['cluster']['remote'].get('blocks_dropped', 0):,}" if pr["remote_tier"] else "-",
        ]
    ]
    lat = [_lat_row(f"pooled ({cl['replicas']}x)", p)]
    for r in report["routings"]:
        c = r["cluster"]
        rows.append(
            [
                r["routing"],
                "yes" if r["remote_tier"] else "no",
                _pct_text(r["hit_ratio"]["total"]),
                _pct_text(c["hit_local"]),
                _pct_text(c["hit_remote"]) if r["remote_tier"] else "-",
                _num(c["hit_vs_pooled"], 3),
                f"{r['tokens']['computed']:,}",
                _num(c["computed_vs_pooled"], 3),
                _num(c["prefill_imbalance"], 2),
                _num(c["requests_imbalance"], 2),
                _num(c["remote_gb_read"]) if r["remote_tier"] else "-",
                f"{c['remote'].get('blocks_dropped', 0):,}" if r["remote_tier"] else "-",
            ]
        )
        lat.append(_lat_row(r["routing"], r))
    cache = _table(
        [
            "routing",
            "remote",
            "hit",
            "local",
            "remote",
            "vs pooled",
            "computed tok",
            "x pooled",
            "imbalance",
            "req imb",
            "remote GB read",
            "writes dropped",
        ],
        rows,
    )
    latency = _table(
        ["routing", "TTFT p50", "p90", "p99 ms", "turn 2 p50", "turn 30 p50", "refused", "wall s"],
        lat,
    )
    out = [*head, "", cache, "", latency]
    for name, t in report["targets"].items():
        over = t["hit_points_over_round_robin"]
        out.append(
            f"{name}: hit {_num(t['hit_vs_pooled'], 3)}x and computed "
            f"{_num(t['computed_vs_pooled'], 3)}x of pooled"
            + ("" if over is None else f"; {over:+.1f} points of hit ratio over round-robin")
        )
    return "\n".join(out)


def _lat_row(name: str, s: dict[str, Any]) -> list[str]:
    t = s["ttft_ms"]
    by_turn = s["ttft_by_turn_ms"]
    return [
        name,
        _num(t["p50"]),
        _num(t["p90"]),
        _num(t["p99"]),
        _num(by_turn.get("2", {}).get("p50")),
        _num(by_turn.get("30", {}).get("p50")),
        f"{s['turns']['refused']:,}",
        _num(s["wall_s"]),
    ]
