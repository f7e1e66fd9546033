"""Routing policies over 4 replicas, against one pooled replica (prints tables).

    python benchmarks/bench_sim_replicas.py [--replicas N] [--quick] [--out DIR]

Runs `pagedkv simulate --replicas N` on three workloads and a control, every routing
policy in each, and writes each report (`sim_replicas_<case>.json`) and all the tables
(`sim_replicas.txt`) under DIR (default benchmarks/results):

1. `agent`: the built-in agent workload over WebSocket connections (40 sessions per
   replica; a connection stays on its replica, so the router places only new sessions
   and reconnects), GPU for a quarter of the peak open-session KV over all replicas.
2. `agent-http`: the same conversations with every turn on a new connection (HTTP
   clients re-sending the history), GPU sized as in 1: the router places every turn.
3. `mooncake`: the Mooncake FAST'25 conversation trace (12,031 requests; every follow-up
   arrives on a new connection), each replica a quarter of the single-node setup the
   simulator's bench uses for it (98 GB of GPU KV, 800 TFLOP/s; pooled: 392 GB and
   3,200 TFLOP/s).
4. `mooncake-no-remote`: 3 with no remote tier anywhere, so the remote tier's share of
   `ours` shows.

The targets (issue 16): kv-aware/ours within 5% of the pooled replica, and >= 20 points of
hit ratio over round-robin; the last lines of each table give both figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time
from pathlib import Path

from pagedkv.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared/traces/mooncake/conversation_trace.jsonl"


def cases(replicas: int, quick: bool) -> list[tuple[str, list[str]]]:
    per_replica = ["--gpu-kv-gb", str(392 / replicas), "--gpu-tflops", str(3200 / replicas)]
    agent = ["--sessions", str(10 * replicas)] if quick else []
    out = [
        ("agent", [*agent]),
        ("agent-http", [*agent, "--per-request-connections"]),
    ]
    if TRACE.exists() and not quick:
        out += [
            ("mooncake", ["--trace", str(TRACE), *per_replica]),
            ("mooncake-no-remote", ["--trace", str(TRACE), *per_replica, "--remote", "none"]),
        ]
    elif not quick:
        print(f"note: {TRACE} is missing; the Mooncake cases are skipped")
    return out


def main_bench() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="small agent cases only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = [
        f"# bench_sim_replicas: {args.replicas} replicas; {platform.machine()}, "
        f"python {platform.python_version()}",
    ]
    for name, extra in cases(args.replicas, args.quick):
        path = args.out / f"sim_replicas_{name}.json"
        argv = ["simulate", "--replicas", str(args.replicas), "--no-progress", "--json", str(path)]
        t0 = time.perf_counter()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main([*argv, *extra])
        if code:
            raise SystemExit(f"{name}: pagedkv simulate exited {code}")
        wall = time.perf_counter() - t0
        shown = " ".join(a if "/" not in a else Path(a).name for a in [*argv[:-2], *extra])
        text = f"\n## {name}: pagedkv {shown} ({wall:.0f} s)\n\n{buf.getvalue()}"
        print(text, flush=True)
        texts.append(text)
    if not args.quick:
        (args.out / "sim_replicas.txt").write_text("\n".join(texts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_bench())
