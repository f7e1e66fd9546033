"""Turn replays into numbers: per-policy summaries, the terminal tables, JSON and a plot.

Definitions (docs/simulator.md):
- hit ratio: cached prompt tokens / prompt tokens, over the turns that ran; by tier:
  the session's own pinned blocks, the GPU hash cache, the host tier.
- vs ideal: hit ratio / the ideal policy's hit ratio in the same run (or, without an
  ideal run, the workload's per-turn ideal, see `WorkloadFacts`).
- computed: prefilled tokens; x ideal: computed / the ideal's computed.
- TTFT: modelled time to first token (see `simulator`), in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pagedkv.sim.compare import WorkloadFacts
from pagedkv.sim.simulator import DONE, PolicyRun

__all__ = ["REPORT_TURNS", "format_tables", "plot_report", "summarize", "write_json"]

REPORT_TURNS = (1, 2, 10, 30)  # turn indices shown in the table (all are in the JSON)
GB = 1e9


def _pct(values: np.ndarray, q: float) -> float | None:
    """Percentile in ms of finite values (None when there are none)."""
    v = values[np.isfinite(values)]
    return round(float(np.percentile(v, q)) * 1e3, 3) if v.size else None


def _dist_ms(values: np.ndarray) -> dict[str, float | int | None]:
    v = values[np.isfinite(values)]
    return {
        "count": int(v.size),
        "mean": round(float(v.mean()) * 1e3, 3) if v.size else None,
        "p50": _pct(v, 50),
        "p90": _pct(v, 90),
        "p99": _pct(v, 99),
        "max": round(float(v.max()) * 1e3, 3) if v.size else None,
    }


def summarize(
    run: PolicyRun, facts: WorkloadFacts, *, ideal: PolicyRun | None = None
) -> dict[str, Any]:
    """Everything the report shows about one policy's run, as plain JSON-able values."""
    t = run.turns
    done = t.status == DONE
    m = run.metrics
    prompt = int(t.prompt_tokens[done].sum())
    pinned, gpu, host = (int(x[done].sum()) for x in (t.hit_pinned, t.hit_gpu, t.hit_host))
    computed = int(t.computed[done].sum())
    hit = pinned + gpu + host
    ratio = hit / prompt if prompt else 0.0
    if ideal is not None:
        ideal_done = ideal.turns.status == DONE
        ideal_prompt = int(ideal.turns.prompt_tokens[ideal_done].sum())
        ideal_computed = int(ideal.turns.computed[ideal_done].sum())
        ideal_ratio = 1.0 - ideal_computed / ideal_prompt if ideal_prompt else 0.0
    else:
        ideal_computed = facts.total_input_tokens - facts.ideal_hit_tokens
        ideal_ratio = facts.ideal_hit_ratio
    ttft = t.ttft_s
    by_turn: dict[str, Any] = {}
    curve: dict[str, list[Any]] = {"turn_index": [], "count": [], "p50": [], "p90": []}
    if done.any():
        idx = t.turn_index[done]
        vals = ttft[done]
        order = np.argsort(idx, kind="stable")
        idx, vals = idx[order], vals[order]
        turns, starts = np.unique(idx, return_index=True)
        bounds = [*starts.tolist(), len(idx)]
        for k, turn in enumerate(turns.tolist()):
            group = vals[bounds[k] : bounds[k + 1]]
            curve["turn_index"].append(turn)
            curve["count"].append(int(group.size))
            curve["p50"].append(_pct(group, 50))
            curve["p90"].append(_pct(group, 90))
            if turn in REPORT_TURNS:
                by_turn[str(turn)] = _dist_ms(group)
    queue_wait = t.admit_s - t.submit_s
    restore_wait = t.ready_s - t.admit_s
    gpu_wait = t.prefill_start_s - t.ready_s
    bpb = run.bytes_per_block
    refused = int((t.status == 2).sum())
    return {
        "policy": run.policy.name,
        "summary": run.policy.summary,
        "varies_with_gpu": run.policy.reuse_prefix and not run.policy.infinite_gpu,
        "gpu_blocks": run.gpu_blocks,
        "gpu_kv_gb": round(run.gpu_blocks * bpb / GB, 3),
        "host_blocks": run.host_blocks,
        "host_gb": round(run.host_blocks * bpb / GB, 3),
        "block_size": run.block_size,
        "max_pinned_sessions": run.max_pinned_sessions if run.policy.capped else None,
        "idle_ttl_s": run.idle_ttl_s,
        "turns": {
            "total": int(t.status.size),
            "done": int(done.sum()),
            "refused": refused,
            "refused_by_reason": run.refusals,
            "unfinished": int((t.status == 0).sum()),
        },
        "tokens": {
            "prompt": prompt,
            "hit": hit,
            "hit_pinned": pinned,
            "hit_gpu": gpu,
            "hit_host": host,
            "computed": computed,
            "refused_prompt": int(t.input_len[t.status == 2].sum()),
        },
        "hit_ratio": {
            "total": round(ratio, 6),
            "pinned": round(pinned / prompt, 6) if prompt else 0.0,
            "gpu": round(gpu / prompt, 6) if prompt else 0.0,
            "host": round(host / prompt, 6) if prompt else 0.0,
            "vs_ideal": round(ratio / ideal_ratio, 6) if ideal_ratio else None,
        },
        "computed_vs_ideal": round(computed / ideal_computed, 6) if ideal_computed else None,
        "bytes": {"offloaded": m["bytes_offloaded"], "restored": m["bytes_restored"]},
        "ttft_ms": _dist_ms(ttft[done]),
        "ttft_by_turn_ms": by_turn,
        "ttft_curve_ms": curve,
        "waits": {
            "admission_waits": m["admission_waits"],
            "admission_refusals": m["admission_refusals"],
            "queued_turns": int((done & (queue_wait > 0)).sum()),
            "queue_wait_ms": _dist_ms(queue_wait[done & (queue_wait > 0)]),
            "restore_turns": int((done & (restore_wait > 0)).sum()),
            "restore_wait_ms": _dist_ms(restore_wait[done & (restore_wait > 0)]),
            "gpu_queue_ms": _dist_ms(gpu_wait[done]),
        },
        "peaks": {
            "gpu_blocks_in_use": run.peak_gpu_in_use,
            "host_blocks_in_use": run.peak_host_in_use,
            "pinned_sessions": run.peak_pinned,
        },
        "at_end": {
            "gpu_blocks_in_use": run.end_gpu_in_use,
            "host_blocks_in_use": run.end_host_in_use,
            "sessions_open": run.end_sessions_open,
        },
        "restores": {
            "layerwise": run.policy.layerwise,
            "split": run.policy.split,
            "prefetch": run.policy.prefetch,
            "restores_split": m.get("restores_split", 0),
            "tokens_split_recomputed": m.get("tokens_split_recomputed", 0),
            "blocks_prefetched": m.get("blocks_prefetched", 0),
            "bytes_prefetched": m.get("bytes_prefetched", 0),
            "blocks_prefetch_used": m.get("blocks_prefetch_used", 0),
            "prefetch_hit_rate": round(m["blocks_prefetch_used"] / m["blocks_prefetched"], 6)
            if m.get("blocks_prefetched")
            else None,
            "prefetch_wasted_bytes": (
                m.get("blocks_prefetched", 0) - m.get("blocks_prefetch_used", 0)
            )
            * bpb,
        },
        "metrics": m,
        "sim_end_s": round(run.sim_end_s, 3),
        "wall_s": round(run.wall_s, 3),
    }


def build_report(
    *,
    facts: WorkloadFacts,
    profile: dict[str, Any],
    settings: dict[str, Any],
    runs: Sequence[PolicyRun],
    sweep: Sequence[PolicyRun] = (),
    wall_s: float | None = None,
) -> dict[str, Any]:
    """The whole report: workload facts, profile, settings, per-policy summaries and the
    GPU-memory sweep (one row per policy and size)."""
    for r in (*runs, *sweep):
        facts.check_hits(r)
    ideal = next((r for r in runs if r.policy.infinite_gpu), None)
    workload = {
        "name": facts.name,
        "requests": facts.num_requests,
        "sessions": facts.num_sessions,
        "tokens_per_block": facts.tokens_per_block,
        "input_tokens": facts.total_input_tokens,
        "output_tokens": facts.total_output_tokens,
        "duration_s": round(facts.duration_s, 3),
        "mean_input_len": round(facts.mean_input_len, 1),
        "ideal_hit_ratio": round(facts.ideal_hit_ratio, 6),
        "prefix_ideal_hit_ratio": round(facts.prefix_ideal_hit_ratio, 6),
        "peak_open_sessions": facts.peak_open_sessions,
        "peak_open_tokens": facts.peak_open_tokens,
    }
    rows = []
    for r in sweep:
        s = summarize(r, facts, ideal=ideal)
        rows.append(
            {
                "policy": s["policy"],
                "gpu_blocks": s["gpu_blocks"],
                "gpu_kv_gb": s["gpu_kv_gb"],
                "max_pinned_sessions": s["max_pinned_sessions"],
                "hit_ratio": s["hit_ratio"]["total"],
                "computed": s["tokens"]["computed"],
                "refused": s["turns"]["refused"],
                "ttft_p50_ms": s["ttft_ms"]["p50"],
                "ttft_p99_ms": s["ttft_ms"]["p99"],
                "wall_s": s["wall_s"],
            }
        )
    return {
        "workload": workload,
        "profile": profile,
        "settings": settings,
        "policies": [summarize(r, facts, ideal=ideal) for r in runs],
        "sweep": rows,
        "wall_s": None if wall_s is None else round(wall_s, 3),
    }


def _num(x: float | int | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int) or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _pct_text(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [_row(header, widths), "  ".join("-" * w for w in widths)]
    lines += [_row(r, widths) for r in rows]
    return "\n".join(lines)


def format_tables(report: dict[str, Any]) -> str:
    """The terminal report: a header, the cache table and the latency table."""
    w, st = report["workload"], report["settings"]
    head = [
        f"workload {w['name']}: {w['requests']:,} requests, {w['sessions']:,} sessions, "
        f"{w['input_tokens'] / 1e6:,.1f}M prompt tokens, {w['tokens_per_block']} tokens/block, "
        f"{w['duration_s'] / 60:,.1f} min; ideal hit ratio {_pct_text(w['ideal_hit_ratio'])} "
        f"(full-block prefix ideal {_pct_text(w['prefix_ideal_hit_ratio'])})",
        f"peak open sessions {w['peak_open_sessions']:,} holding {w['peak_open_tokens']:,} tokens "
        f"({w['peak_open_tokens'] * st['kv_bytes_per_token'] / GB:,.1f} GB of KV)",
        f"profile: {report['profile']['name']}; GPU KV {st['gpu_kv_gb']:,.1f} GB "
        f"({st['gpu_blocks']:,} blocks, {st['gpu_fraction_of_peak']:.2f} of the peak), "
        f"host {st['host_gb']:,.1f} GB ({st['host_blocks']:,} blocks), pinned cap "
        f"{st['max_pinned_sessions']}, idle TTL {_num(st['idle_ttl_s'])} s",
    ]
    cache_rows = []
    lat_rows = []
    for p in report["policies"]:
        hr, tok, b, pk = p["hit_ratio"], p["tokens"], p["bytes"], p["peaks"]
        cache_rows.append(
            [
                p["policy"],
                _pct_text(hr["total"]),
                _pct_text(hr["pinned"]),
                _pct_text(hr["gpu"]),
                _pct_text(hr["host"]),
                _num(hr["vs_ideal"], 3),
                f"{tok['computed']:,}",
                _num(p["computed_vs_ideal"], 3),
                _num(b["offloaded"] / GB),
                _num(b["restored"] / GB),
                f"{pk['gpu_blocks_in_use']:,}",
                f"{pk['host_blocks_in_use']:,}",
            ]
        )
        t, wt, turns = p["ttft_ms"], p["waits"], p["turns"]
        by_turn = [_num(p["ttft_by_turn_ms"].get(str(k), {}).get("p50")) for k in REPORT_TURNS]
        lat_rows.append(
            [
                p["policy"],
                _num(t["p50"]),
                _num(t["p90"]),
                _num(t["p99"]),
                *by_turn,
                f"{wt['queued_turns']:,}",
                _num(wt["queue_wait_ms"]["p99"]),
                f"{wt['restore_turns']:,}",
                f"{turns['refused']:,}",
                _num(p["wall_s"]),
            ]
        )
    cache = _table(
        [
            "policy",
            "hit",
            "pinned",
            "gpu",
            "host",
            "vs ideal",
            "computed tok",
            "x ideal",
            "offload GB",
            "restore GB",
            "peak GPU blk",
            "peak host blk",
        ],
        cache_rows,
    )
    latency = _table(
        [
            "policy",
            "TTFT p50",
            "p90",
            "p99 ms",
            *[f"turn {k} p50" for k in REPORT_TURNS],
            "queued",
            "queue p99 ms",
            "restores",
            "refused",
            "wall s",
        ],
        lat_rows,
    )
    out = [*head, "", cache, "", latency]
    mech = [
        p
        for p in report["policies"]
        if any(p["restores"][k] for k in ("layerwise", "split", "prefetch"))
    ]
    if mech:
        rows = []
        for p in report["policies"]:
            r = p["restores"]
            rows.append(
                [
                    p["policy"],
                    "yes" if r["layerwise"] else "no",
                    "yes" if r["split"] else "no",
                    f"{r['restores_split']:,}",
                    f"{r['tokens_split_recomputed']:,}",
                    "yes" if r["prefetch"] else "no",
                    _num(r["bytes_prefetched"] / GB),
                    _pct_text(r["prefetch_hit_rate"]),
                    _num(r["prefetch_wasted_bytes"] / GB),
                ]
            )
        out += [
            "",
            _table(
                [
                    "policy",
                    "layer-wise",
                    "split",
                    "split restores",
                    "split tok",
                    "prefetch",
                    "prefetched GB",
                    "prefetch hit",
                    "wasted GB",
                ],
                rows,
            ),
        ]
    if report["sweep"]:
        sizes = sorted({r["gpu_kv_gb"] for r in report["sweep"]})
        names = list(dict.fromkeys(r["policy"] for r in report["sweep"]))
        cell = {(r["policy"], r["gpu_kv_gb"]): r for r in report["sweep"]}
        rows = [[name, *[_pct_text(cell[(name, s)]["hit_ratio"]) for s in sizes]] for name in names]
        out += ["", "hit ratio vs GPU KV memory (GB)", _table(["policy", *map(_num, sizes)], rows)]
    return "\n".join(out)


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, allow_nan=False)
        f.write("\n")


def _plot_sweep(
    ax: Any,
    report: dict[str, Any],
    color: dict[str, str],
    *,
    field: str,
    main_value: Callable[[dict[str, Any]], float | None],
    ylabel: str,
    title: str,
    log_y: bool = False,
) -> None:
    """`field` of the `--sweep` rows vs GPU KV memory, one line per policy; a policy
    that does not vary with the GPU size (or has no sweep rows) is a dashed line at
    `main_value` of its main run."""
    for p in report["policies"]:
        name = p["policy"]
        points = sorted(
            (r["gpu_kv_gb"], r[field])
            for r in report["sweep"]
            if r["policy"] == name and r[field] is not None
        )
        if not p["varies_with_gpu"] or not points:
            value = main_value(p)
            if value is not None:
                ax.axhline(value, ls="--", lw=1, color=color[name], label=name)
            continue
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
                color=color[name], label=name)  # fmt: skip
    ax.axvline(report["settings"]["gpu_kv_gb"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("GPU KV memory (GB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _plot_hit_bars(ax: Any, report: dict[str, Any]) -> None:
    """Hit ratio per policy at the run's one GPU size, stacked by tier (no sweep)."""
    names = [p["policy"] for p in report["policies"]]
    bottom = [0.0] * len(names)
    for tier in ("pinned", "gpu", "host"):
        values = [p["hit_ratio"][tier] for p in report["policies"]]
        ax.bar(names, values, bottom=bottom, label=tier)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("token hit ratio")
    ax.set_title(
        f"hit ratio by tier at {report['settings']['gpu_kv_gb']:.1f} GB GPU KV "
        "(--sweep: vs GPU memory)"
    )
    ax.legend(fontsize=8, title="served from")


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Panels, as a PNG: hit ratio vs GPU KV memory per policy (with a sweep; else the
    hit ratio per policy stacked by tier), p99 TTFT vs GPU KV memory (with a sweep), and
    p50 TTFT by turn index per policy.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (`pip install 'pagedkv[sim]'`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {p["policy"]: colors[i % len(colors)] for i, p in enumerate(report["policies"])}
    if report["sweep"]:
        fig, (ax_hit, ax_p99, ax_ttft) = plt.subplots(1, 3, figsize=(19, 5))
        _plot_sweep(ax_hit, report, color, field="hit_ratio",
                    main_value=lambda p: p["hit_ratio"]["total"],
                    ylabel="token hit ratio", title="hit ratio vs GPU memory")  # fmt: skip
        ax_hit.set_ylim(0, 1.02)
        # where the policies that all reach the ideal hit ratio still differ
        _plot_sweep(ax_p99, report, color, field="ttft_p99_ms",
                    main_value=lambda p: p["ttft_ms"]["p99"], ylabel="p99 modelled TTFT (ms)",
                    title="p99 TTFT vs GPU memory", log_y=True)  # fmt: skip
    else:
        fig, (ax_hit, ax_ttft) = plt.subplots(1, 2, figsize=(13, 5))
        _plot_hit_bars(ax_hit, report)
    for p in report["policies"]:
        c = p["ttft_curve_ms"]
        keep = [i for i, n in enumerate(c["count"]) if n >= 5 and c["p50"][i] is not None]
        if keep:
            ax_ttft.plot(
                [c["turn_index"][i] for i in keep],
                [c["p50"][i] for i in keep],
                color=color[p["policy"]],
                label=p["policy"],
            )
    ax_ttft.set_yscale("log")
    ax_ttft.set_xlabel("turn index within the session")
    ax_ttft.set_ylabel("p50 modelled TTFT (ms)")
    ax_ttft.set_title(f"TTFT by turn ({report['settings']['gpu_kv_gb']:.1f} GB GPU KV)")
    if ax_ttft.get_legend_handles_labels()[0]:
        ax_ttft.legend(fontsize=8)
    fig.suptitle(f"pagedkv simulate: {report['workload']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
