"""Agent-loop TTFT per turn: pinned WebSocket sessions vs stateless HTTP (prints a table,
asserts nothing).

    python benchmarks/bench_agent_loop.py                        # CPU, demo model
    python benchmarks/bench_agent_loop.py --model llama_1b --device cuda --sessions 16
    python benchmarks/bench_agent_loop.py --with-hash-cache --json out.json

A 30-turn coding-agent session (3,000-token system prompt, three tools, tool outputs of
100-1,000 tokens, every turn a function call) is driven by the `openai` SDK against
local servers on the same model:

- pinned WebSocket: `client.responses.connect()`, each turn sends only the new tool
  output with `previous_response_id`; the session stays pinned, so only new tokens are
  prefilled;
- stateless HTTP: `POST /v1/responses` (SSE) re-sending the whole history to a server
  with the prefix cache off (every turn recomputes the context);
- with `--with-hash-cache`, also stateless HTTP to a server whose content-hash prefix
  cache is on (what a vLLM/SGLang-style prefix cache gives without pinning).

TTFT is client-measured (request sent -> first output event), after a warm-up session.
With `--sessions N` each mode runs N sessions at once (continuous batching shares the
forward passes) and the table shows per-turn medians. The target: pinned TTFT at the
last turn within 1.25x of turn 2, while the stateless TTFT grows with the context. Next
to each ratio: the same ratio of prefill FLOPs for the tokens that mode computed (dense
layers + attention over the context), the floor no cache can beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedkv.cli.demo import add_demo_args, configure, serve_and_run
from pagedkv.cli.main import UsageError
from pagedkv.serving.agent_loop import (
    TurnTiming,
    flop_growth,
    format_table,
    growth,
    median_by_turn,
    run_http,
    run_websocket,
)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parents[1], check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return {
        "device": f"{device} ({name or platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": commit,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_demo_args(p, system_tokens=3000, tool_tokens=(100, 1000), max_output_tokens=16)
    p.add_argument("--sessions", type=int, default=1, help="concurrent sessions per mode")
    p.add_argument("--with-hash-cache", action="store_true",
                   help="add stateless HTTP with the content-hash prefix cache on")  # fmt: skip
    p.add_argument("--json", default=None, help="write every timing to this file")
    args = p.parse_args()
    try:
        spec, model, pinned_cfg = configure(args)
    except UsageError as err:
        print(f"bench_agent_loop: error: {err}", file=sys.stderr)
        return 2
    cfg = model.config
    env = environment(args)
    print(
        f"bench_agent_loop: {args.sessions} x {spec.turns}-turn session(s), "
        f"{spec.system_tokens}-token system prompt, tool outputs "
        f"{spec.tool_min_tokens}-{spec.tool_max_tokens} tokens, {spec.max_output_tokens} "
        f"output tokens per call"
    )
    print(
        f"model {args.checkpoint or args.model}: {cfg.num_params / 1e6:.1f} M params, "
        f"{cfg.num_layers} layers, {cfg.dtype}, random weights; "
        + ", ".join(f"{k} {v}" for k, v in env.items())
    )
    no_cache = dataclasses.replace(
        pinned_cfg, scheduler=dataclasses.replace(pinned_cfg.scheduler, reuse_prefix=False)
    )
    modes: list[tuple[str, Any, Any]] = [
        ("pinned WebSocket", pinned_cfg, run_websocket),
        ("stateless HTTP", no_cache, run_http),
    ]
    if args.with_hash_cache:
        modes.append(("HTTP + hash cache", pinned_cfg, run_http))
    results: dict[str, list[list[TurnTiming]]] = {}
    wall: dict[str, float] = {}
    for name, config, run in modes:
        t0 = time.perf_counter()
        repeats = args.repeats if run is run_websocket else 1
        results[name] = []
        for _ in range(repeats):
            results[name] += serve_and_run(model, config, run, spec, sessions=args.sessions)
        wall[name] = time.perf_counter() - t0
        print(f"  {name}: {wall[name]:.1f} s")
    columns = {name: median_by_turn(sessions) for name, sessions in results.items()}
    print()
    if args.sessions > 1 or args.repeats > 1:
        print(f"(per-turn medians over {args.sessions} concurrent session(s); the pinned "
              f"WebSocket mode repeated {args.repeats} times)")  # fmt: skip
    print(format_table(columns))
    print()
    for name, timings in columns.items():
        server = [t.server_ttft_ms for t in timings if t.server_ttft_ms is not None]
        print(
            f"{name:>20}: TTFT turn {spec.turns} / turn 2 = {growth(timings):5.2f}x "
            f"(prefill FLOPs {flop_growth(cfg, timings):5.2f}x), "
            f"turn {spec.turns} {timings[-1].ttft_ms:9.1f} ms (server-side "
            f"{server[-1] if server else float('nan'):.1f} ms), session wall {wall[name]:.1f} s"
        )
    if args.json:
        payload = {
            "env": env,
            "spec": dataclasses.asdict(spec),
            "sessions": args.sessions,
            "wall_s": wall,
            "timings": {
                name: [[dataclasses.asdict(t) for t in s] for s in sessions]
                for name, sessions in results.items()
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
