"""`pagedkv demo`: a 30-turn agent loop, pinned WebSocket vs stateless HTTP, side by side.

Runs in-process on the built-in demo model (random weights): two local servers (one with
connection-scoped pinning, one stateless with the prefix cache off) and the `openai` SDK
as the client. The same conversation goes through each; the table prints every turn's
context length, cached tokens and client-measured time to first token.

With pinning only each turn's new tokens (the tool output) are prefilled, so TTFT stays
low; the stateless server re-reads the whole history, so its TTFT grows with it. The
default sizes (a 300-token system prompt plus the tool schemas, tool outputs of 20-60
tokens, 4 output tokens per call: about 4,500 tokens by turn 30) keep the run under a
minute on a 2-core CPU, where the pure-torch attention is the bottleneck;
`benchmarks/bench_agent_loop.py` runs the full-size comparison (3,000-token system
prompt, tool outputs of 100-1,000 tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from typing import TYPE_CHECKING, Any

from pagedkv.cli.main import UsageError
from pagedkv.cli.serve import PRESETS, build_model_from_args, engine_config_from_args

if TYPE_CHECKING:  # the serving stack (torch, starlette) loads in `run`, not for --help
    from pagedkv.serving.agent_loop import AgentLoopSpec, TurnTiming


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `demo` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="agent loop: pinned WebSocket vs stateless HTTP, TTFT per turn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_args(p, system_tokens=300, tool_tokens=(20, 60), max_output_tokens=4)
    p.set_defaults(func=run)
    return p


def add_demo_args(
    p: argparse.ArgumentParser,
    *,
    system_tokens: int,
    tool_tokens: tuple[int, int],
    max_output_tokens: int,
) -> None:
    """The agent-loop and model options (shared with the benchmark)."""
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--system-tokens", type=int, default=system_tokens)
    p.add_argument("--tool-tokens", type=int, nargs=2, default=list(tool_tokens),
                   metavar=("MIN", "MAX"), help="tool output length range")  # fmt: skip
    p.add_argument("--max-output-tokens", type=int, default=max_output_tokens)
    p.add_argument("--model", choices=PRESETS, default="demo")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--max-position", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-fraction", type=float, default=0.5)
    p.add_argument("--num-host-blocks", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--max-pinned-sessions", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--queue-timeout", type=float, default=600.0)
    p.add_argument("--idle-ttl", type=float, default=None)
    p.add_argument("--repeats", type=int, default=3,
                   help="run the pinned session this many times (a fresh server each) and "
                   "report per-turn medians: a single run's TTFT is noisy on a shared "
                   "machine (default 3; the slower stateless runs once)")  # fmt: skip


def spec_from_args(args: argparse.Namespace) -> AgentLoopSpec:
    from pagedkv.serving.agent_loop import AgentLoopSpec

    lo, hi = args.tool_tokens
    return AgentLoopSpec(
        turns=args.turns,
        system_tokens=args.system_tokens,
        tool_min_tokens=lo,
        tool_max_tokens=hi,
        max_output_tokens=args.max_output_tokens,
        seed=args.seed,
    )


def context_bound(spec: AgentLoopSpec) -> int:
    """An upper bound of the session's final context (sizes the model's positions)."""
    per_turn = spec.tool_max_tokens + spec.max_output_tokens + 160
    return spec.system_tokens + 600 + spec.turns * per_turn


def serve_and_run(
    model: Any, config: Any, run: Any, spec: AgentLoopSpec, *, sessions: int = 1
) -> list[list[TurnTiming]]:
    """Start a local server on `model` with engine `config`, warm it up, run `run`."""
    import torch

    from pagedkv.serving.agent_loop import run_concurrent
    from pagedkv.serving.engine import Engine
    from pagedkv.serving.local_server import LocalServer
    from pagedkv.serving.response_run import ServerConfig
    from pagedkv.serving.server import create_app

    engine = Engine(model, config)
    app = create_app(engine, ServerConfig(model_name="demo", max_output_tokens_cap=4096))
    with LocalServer(app) as server:
        warm = dataclasses.replace(spec, turns=2, system_tokens=64, tool_min_tokens=8,
                                   tool_max_tokens=8, seed=spec.seed + 99)  # fmt: skip
        run(server.base_url, warm, 0)  # first-call overheads out of the timings
        timings = run_concurrent(run, server.base_url, spec, sessions)
    # the next mode's engine sizes its KV pool from free memory: free this one's now (the
    # app's closures keep the engine in a reference cycle until a collection)
    del app, engine, server
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return timings


def configure(args: argparse.Namespace) -> tuple[AgentLoopSpec, Any, Any]:
    """The agent loop, model and engine config from the options (shared with the
    benchmark). Raises `UsageError` naming the bad option's problem."""
    try:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        spec = spec_from_args(args)
        model = build_model_from_args(args, min_position=context_bound(spec))
        return spec, model, engine_config_from_args(args, model)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def run_repeated(
    model: Any, config: Any, run: Any, spec: AgentLoopSpec, *, repeats: int, sessions: int = 1
) -> list[TurnTiming]:
    """`serve_and_run` `repeats` times (a fresh server each); per-turn medians over every
    session of every repeat."""
    from pagedkv.serving.agent_loop import median_by_turn

    runs: list[list[TurnTiming]] = []
    for _ in range(repeats):
        runs += serve_and_run(model, config, run, spec, sessions=sessions)
    return median_by_turn(runs)


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print the table. Returns the exit code."""
    from pagedkv.serving.agent_loop import (
        AgentLoopError,
        flop_growth,
        format_table,
        growth,
        run_http,
        run_websocket,
    )

    spec, model, base = configure(args)
    cfg = model.config
    print(
        f"pagedkv demo: {spec.turns}-turn agent loop, {spec.system_tokens}-token system "
        f"prompt, tool outputs of {spec.tool_min_tokens}-{spec.tool_max_tokens} tokens, "
        f"{spec.max_output_tokens} output tokens per call"
    )
    print(
        f"model: {args.checkpoint or args.model} ({cfg.num_params / 1e6:.1f} M params, "
        f"random weights, {cfg.dtype}) on {args.device}\n"
    )
    t0 = time.perf_counter()
    no_cache = dataclasses.replace(base.scheduler, reuse_prefix=False)
    stateless_config = dataclasses.replace(base, scheduler=no_cache)
    try:
        pinned = run_repeated(model, base, run_websocket, spec, repeats=args.repeats)
        t1 = time.perf_counter()
        print(f"  pinned WebSocket session x {args.repeats}: {t1 - t0:.1f} s")
        stateless = serve_and_run(model, stateless_config, run_http, spec)[0]
    except AgentLoopError as err:  # e.g. a pool too small for the session
        raise UsageError(str(err)) from None
    print(f"  stateless HTTP session:   {time.perf_counter() - t1:.1f} s\n")
    print(format_table({"pinned WebSocket": pinned, "stateless HTTP": stateless}))
    print(
        f"\nTTFT turn {spec.turns} / turn 2: pinned {growth(pinned):.2f}x, "
        f"stateless {growth(stateless):.2f}x   (target for pinned: <= 1.25x)"
    )
    print(
        f"prefill FLOPs turn {spec.turns} / turn 2 of the tokens pinned computed: "
        f"{flop_growth(cfg, pinned):.2f}x (no cache goes below this: attention over the "
        "longer context; this small model is attention-heavy)"
    )
    print(
        f"TTFT turn {spec.turns}: pinned {pinned[-1].ttft_ms:.1f} ms vs stateless "
        f"{stateless[-1].ttft_ms:.1f} ms ({stateless[-1].ttft_ms / pinned[-1].ttft_ms:.1f}x)"
    )
    return 0
