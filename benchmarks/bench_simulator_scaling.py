"""Simulator cost against workload size: linear in requests and in blocks (prints tables).

    python benchmarks/bench_simulator_scaling.py [--quick] [--json PATH]

1. Requests: agent workloads with rewrites (compaction at 32k tokens, subagents at 3% of
   turns, 64-token blocks) at 100-800 sessions (5.5k-43k requests) arriving one per 20 s
   on average, so the peak of open sessions (the regime: 59-69) stays the same while
   requests grow. GPU KV =
   a quarter of the peak open-session KV. Every policy replayed in this process, one at
   a time, plus `workload_facts` (the per-turn ideal). The fitted exponent b of
   wall ~ requests^b is the check: 1.0 is linear.
2. Blocks: 100 sessions at 64, 32 and 16 tokens per block (the same requests, 1x, 2x
   and 4x the blocks): wall ~ blocks^b per policy.
3. End to end, as a user runs it (`pagedkv simulate ... --policies all`, subprocess
   wall time, parallel workers as the CLI picks): the built-in default, and a trace of
   more than 20k requests written by the generator (compaction and subagents, 64-token
   blocks) and replayed with `--trace`. Target: each under a minute.

`--quick`: 25-100 sessions, no end-to-end runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pagedkv.sim.agent_workload import AgentWorkloadConfig, generate_agent_workload
from pagedkv.sim.compare import main_jobs, run_jobs, workload_facts
from pagedkv.sim.policies import HardwareProfile, SimSettings, default_pinned_cap, parse_policies
from pagedkv.sim.traces import write_trace
from pagedkv.sim.workload import Workload

POLICIES = ("stateless", "prefix", "prefix+host", "ours", "pinned", "ideal")
PROFILE = HardwareProfile()


def rewrites_config(
    num_sessions: int, tokens_per_block: int = 64, **kw: Any
) -> AgentWorkloadConfig:
    return AgentWorkloadConfig(
        num_sessions=num_sessions,
        compact_at_tokens=32_000,
        subagent_rate=0.03,
        tokens_per_block=tokens_per_block,
        session_rate_per_s=0.05,
        seed=1,
        **kw,
    )


def replay_each(w: Workload) -> dict[str, Any]:
    """`workload_facts` and every policy, one at a time in this process: wall seconds."""
    t0 = time.perf_counter()
    facts = workload_facts(w, cost=PROFILE.cost_model(w.tokens_per_block))
    facts_s = time.perf_counter() - t0
    tpb = w.tokens_per_block
    gpu = max(1, facts.peak_open_tokens // 4 // tpb)
    settings = SimSettings(
        gpu_blocks=gpu,
        host_blocks=PROFILE.blocks_for_bytes(PROFILE.host_memory_bytes, tpb),
        max_pinned_sessions=default_pinned_cap(w, gpu, high_watermark=0.95),
    )
    walls: dict[str, float] = {}
    for job in main_jobs(parse_policies(",".join(POLICIES)), settings, w, facts):
        t = time.perf_counter()
        (run,) = run_jobs(w, [job], PROFILE)
        facts.check_hits(run)
        walls[job.policy.name] = time.perf_counter() - t
    return {
        "requests": w.num_requests,
        "sessions": w.num_sessions,
        "tokens_per_block": tpb,
        "prompt_tokens": w.total_input_tokens,
        "prompt_blocks": sum(len(r.block_keys) for r in w.requests),
        "facts_s": facts_s,
        "policy_wall_s": walls,
        "total_s": facts_s + sum(walls.values()),
    }


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def print_case(title: str, rows: list[dict[str, Any]], x: str) -> dict[str, float]:
    print(f"\n{title}")
    head = ["sessions", "requests", "blocks", "tok/blk", "facts s", *POLICIES, "total s",
            "us/req", "us/blk"]  # fmt: skip
    print("  ".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = [
            f"{r['sessions']:,}",
            f"{r['requests']:,}",
            f"{r['prompt_blocks']:,}",
            str(r["tokens_per_block"]),
            f"{r['facts_s']:.2f}",
            *(f"{r['policy_wall_s'][p]:.2f}" for p in POLICIES),
            f"{r['total_s']:.1f}",
            f"{1e6 * r['total_s'] / r['requests']:,.0f}",
            f"{1e6 * r['total_s'] / r['prompt_blocks']:.2f}",
        ]
        print("  ".join(f"{c:>11}" for c in cells))
    xs = [float(r[x]) for r in rows]
    fits = {p: exponent(xs, [r["policy_wall_s"][p] for r in rows]) for p in POLICIES}
    fits["facts"] = exponent(xs, [r["facts_s"] for r in rows])
    fits["total"] = exponent(xs, [r["total_s"] for r in rows])
    print(f"exponent b of wall ~ {x}^b: " + ", ".join(f"{k} {v:.2f}" for k, v in fits.items()))
    return fits


def cli_wall(args: list[str]) -> tuple[float, str]:
    """Wall seconds of `pagedkv simulate ARGS --no-progress`, and its first line."""
    cmd = [sys.executable, "-m", "pagedkv.cli.main", "simulate", *args, "--no-progress"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, done.stdout.splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    sizes = (25, 50, 100) if args.quick else (100, 200, 400, 800)
    rows = [replay_each(generate_agent_workload(rewrites_config(n))) for n in sizes]
    out["requests"] = {"rows": rows, "exponents": print_case(
        "1. requests: agent workloads with rewrites, 64-token blocks, GPU = 1/4 of peak",
        rows, "requests")}  # fmt: skip
    base = sizes[1]
    rows = [
        replay_each(generate_agent_workload(rewrites_config(base, tpb))) for tpb in (64, 32, 16)
    ]
    out["blocks"] = {"rows": rows, "exponents": print_case(
        f"2. blocks: {base} sessions at 64, 32 and 16 tokens per block", rows, "prompt_blocks")}  # fmt: skip

    if not args.quick:
        print("\n3. end to end (pagedkv simulate --policies all, the CLI's workers)")
        wall, head = cli_wall(["--policies", "all"])
        out["default_cli_s"] = wall
        print(f"  built-in default: {wall:.1f} s   ({head})")
        w = generate_agent_workload(rewrites_config(400))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "agent20k.jsonl"
            write_trace(w, path)
            wall, head = cli_wall(["--trace", str(path), "--policies", "all"])
        out["trace_20k"] = {"requests": w.num_requests, "prompt_tokens": w.total_input_tokens,
                            "cli_s": wall}  # fmt: skip
        print(f"  {w.num_requests:,}-request trace: {wall:.1f} s   ({head})")
        ok = all(x < 60 for x in (out["default_cli_s"], wall))
        print(f"  both under a minute: {'yes' if ok else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=_json) + "\n")


def _json(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    main()
