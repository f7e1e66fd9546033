"""Forks that share KV blocks, and lanes against connections (prints two tables).

    python benchmarks/bench_lanes.py                       # 16k-token conversation, CPU
    python benchmarks/bench_lanes.py --context 4096 --lanes 8
    python benchmarks/bench_lanes.py --json benchmarks/results/lanes_cpu.json

1. Best-of-N forks. A conversation of `--context` tokens runs on one lane; then
   `--forks` forks of it (one lane each, all sent at once) each add a short candidate
   message. Against the baseline, N independent sessions (N connections, each sending
   the whole conversation plus its candidate under its own `prompt_cache_key`, so
   nothing is shared): prefill tokens computed and GPU blocks held once every response
   has finished (sessions stay pinned while their connection is open), as a ratio of
   one session's blocks (the parent alone). Target: forks hold <= 1.15x one session.
2. Lanes against connections. `--lanes` conversations of `--turns` turns each, every
   turn of every conversation sent at once, either as lanes of one connection or on
   one connection each (a fresh server for each run, the runs alternated `--repeats`
   times). Client-measured TTFT (request sent -> first output delta), p50 and p99 per
   mode, and their ratio. Target: lanes within 10% of connections.

Exits 1 if a fork's `cached_tokens` is not its parent's full-block prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import connect

from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.serving.local_server import LocalServer
from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.server import create_app
from pagedkv.serving.testing import engine_check

DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")
DONE = ("response.completed", "response.incomplete")
BASE = {"type": "response.create", "model": "pagedkv", "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(round(q / 100 * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[k]


class Reader:
    """Reads one connection's events and hands each response's to its lane's waiter."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.waiters: dict[str | None, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self.sent: dict[str | None, float] = {}
        self.first: dict[str | None, float] = {}
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for raw in self.ws:
            ev = json.loads(raw)
            lane = ev.get("stream_id")
            if ev["type"] in DELTAS and lane not in self.first:
                self.first[lane] = time.perf_counter()
            elif ev["type"] in DONE:
                ttft = self.first.pop(lane, time.perf_counter()) - self.sent[lane]
                self.waiters.pop(lane).set_result((ttft, ev["response"]))
            elif ev["type"] in ("error", "response.failed"):
                self.waiters.pop(lane).set_exception(RuntimeError(f"failed: {ev}"))

    async def send(self, lane: str | None, **body: Any) -> tuple[float, dict[str, Any]]:
        """Send a request on `lane`; (TTFT in seconds, the finished response)."""
        fut: asyncio.Future[tuple[float, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.waiters[lane] = fut
        message = {**BASE, **body}
        if lane is not None:
            message["stream_id"] = lane
        self.sent[lane] = time.perf_counter()
        await self.ws.send(json.dumps(message))
        return await asyncio.wait_for(fut, 600)


def make_server(args: argparse.Namespace, num_gpu_blocks: int) -> tuple[Any, Any]:
    model = build_model(args.model, device=args.device, max_position=args.context + 1024)
    engine = build_engine(
        model,
        num_gpu_blocks=num_gpu_blocks,
        num_host_blocks=num_gpu_blocks,
        max_batch_tokens=2048,
        prefill_chunk_tokens=2048,
        scheduler=SchedulerConfig(max_pinned_sessions=64, max_queue=256, queue_timeout_s=600.0),
    )
    config = ServerConfig(model_name="pagedkv", max_message_bytes=64 * 1024 * 1024)
    return engine, create_app(engine, config)


def conversation(tokens: int) -> str:
    """A user message of about `tokens` tokens (the tokenizer is byte-level)."""
    line = "step: read the file, run the tests, note what failed and why. "
    return (line * (tokens // len(line) + 1))[: tokens - 40]


def in_use(engine: Any) -> int:
    return int(engine_check(engine)["gpu_blocks"]["in_use"])


async def forks_run(url: str, engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    text = conversation(args.context)
    async with connect(url, max_size=None, open_timeout=60) as ws:
        r = Reader(ws)
        _, parent = await r.send("root", input=text, max_output_tokens=4)
        one = in_use(engine)
        held = parent["usage"]["input_tokens"] + parent["usage"]["output_tokens"]
        done = await asyncio.gather(*(
            r.send(f"fork{i}", input=f"candidate plan {i}", previous_response_id=parent["id"],
                   max_output_tokens=args.fork_output)
            for i in range(args.forks)
        ))  # fmt: skip
        blocks = in_use(engine)
        r.task.cancel()
    full = held // args.block_size * args.block_size
    cached = [resp["usage"]["input_tokens_details"]["cached_tokens"] for _, resp in done]
    computed = parent["usage"]["input_tokens"] + sum(
        resp["usage"]["input_tokens"] - c for (_, resp), c in zip(done, cached, strict=True)
    )
    return {"one_session_blocks": one, "blocks": blocks, "prefill_tokens": computed,
            "parent_prefill_tokens": parent["usage"]["input_tokens"],
            "parent_tokens": held, "fork_cached": cached, "full_block_prefix": full,
            "cached_ok": all(c >= full for c in cached)}  # fmt: skip


async def independent_run(url: str, engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    text = conversation(args.context)
    wss = [await connect(url, max_size=None, open_timeout=60) for _ in range(args.forks)]
    try:
        readers = [Reader(ws) for ws in wss]
        done = await asyncio.gather(*(
            r.send(None, input=[{"role": "user", "content": text},
                                {"role": "user", "content": f"candidate plan {i}"}],
                   prompt_cache_key=f"independent-{i}", max_output_tokens=args.fork_output)
            for i, r in enumerate(readers)
        ))  # fmt: skip
        blocks = in_use(engine)
        for r in readers:
            r.task.cancel()
    finally:
        for ws in wss:
            await ws.close()
    computed = sum(
        resp["usage"]["input_tokens"] - resp["usage"]["input_tokens_details"]["cached_tokens"]
        for _, resp in done
    )
    return {"blocks": blocks, "prefill_tokens": computed}


async def lanes_run(url: str, args: argparse.Namespace, *, lanes: bool) -> list[float]:
    n = args.lanes
    if lanes:
        ws_list = [await connect(url, max_size=None, open_timeout=60)]
    else:
        ws_list = [await connect(url, max_size=None, open_timeout=60) for _ in range(n)]
    readers = [Reader(ws) for ws in ws_list]
    ttfts: list[float] = []
    prev: list[str | None] = [None] * n
    try:
        for turn in range(args.turns):
            calls = []
            for i in range(n):
                reader, lane = (readers[0], f"lane{i}") if lanes else (readers[i], None)
                calls.append(reader.send(
                    lane, input=f"conversation {i}, turn {turn}: " + "explain the change " * 8,
                    previous_response_id=prev[i], max_output_tokens=args.turn_output,
                ))  # fmt: skip
            done = await asyncio.gather(*calls)
            for i, (ttft, resp) in enumerate(done):
                prev[i] = resp["id"]
                if turn > 0:  # the first turn's TTFT is the cold prefill of each mode alike
                    ttfts.append(ttft)
    finally:
        for r in readers:
            r.task.cancel()
        for ws in ws_list:
            await ws.close()
    return ttfts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "demo", "llama_1b"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--context", type=int, default=16384, help="tokens of the forked conversation")
    p.add_argument("--forks", type=int, default=8)
    p.add_argument("--fork-output", type=int, default=8)
    p.add_argument("--lanes", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--turn-output", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    args.block_size = 16
    if args.threads:
        torch.set_num_threads(args.threads)
    session_blocks = args.context // args.block_size + 64
    gpu_blocks = (args.forks + 2) * session_blocks

    t0 = time.perf_counter()
    engine, app = make_server(args, gpu_blocks)
    with LocalServer(app) as srv:
        forks = asyncio.run(forks_run(srv.ws_url, engine, args))
    engine, app = make_server(args, gpu_blocks)
    with LocalServer(app) as srv:
        indep = asyncio.run(independent_run(srv.ws_url, engine, args))
    fork_secs = time.perf_counter() - t0

    ttft: dict[str, list[float]] = {"lanes": [], "connections": []}
    t1 = time.perf_counter()
    for rep in range(args.repeats):
        for mode in ("lanes", "connections") if rep % 2 == 0 else ("connections", "lanes"):
            engine, app = make_server(args, 4096)
            with LocalServer(app) as srv:
                ttft[mode] += asyncio.run(lanes_run(srv.ws_url, args, lanes=mode == "lanes"))
    lane_secs = time.perf_counter() - t1

    one = forks["one_session_blocks"]
    print(f"\nbest-of-{args.forks} forks of a {forks['parent_tokens']}-token conversation "
          f"({args.model}, {args.device}; block {args.block_size}; {fork_secs:.1f} s)")  # fmt: skip
    print(f"{'':28} {'prefill tokens':>15} {'GPU blocks':>11} {'x one session':>14}")
    print(
        f"{'one session (the parent)':28} {forks['parent_prefill_tokens']:>15} {one:>11} {1.0:>14.2f}"
    )
    print(f"{f'{args.forks} forks on lanes':28} {forks['prefill_tokens']:>15} "
          f"{forks['blocks']:>11} {forks['blocks'] / one:>14.2f}")  # fmt: skip
    print(f"{f'{args.forks} independent sessions':28} {indep['prefill_tokens']:>15} "
          f"{indep['blocks']:>11} {indep['blocks'] / one:>14.2f}")  # fmt: skip
    print(f"fork cached_tokens {sorted(set(forks['fork_cached']))} (full-block prefix "
          f"{forks['full_block_prefix']}); target <= 1.15x one session: "
          f"{'met' if forks['blocks'] <= 1.15 * one else 'NOT met'}")  # fmt: skip

    rows = {m: (percentile(v, 50) * 1e3, percentile(v, 99) * 1e3, len(v)) for m, v in ttft.items()}
    print(f"\n{args.lanes} conversations x {args.turns} turns, TTFT of turns 2+ "
          f"({args.repeats} alternated runs each; {lane_secs:.1f} s)")  # fmt: skip
    print(f"{'':22} {'p50 ms':>9} {'p99 ms':>9} {'samples':>8}")
    for mode in ("lanes", "connections"):
        p50, p99, n = rows[mode]
        label = (
            f"{args.lanes} lanes, 1 connection" if mode == "lanes" else f"{args.lanes} connections"
        )
        print(f"{label:22} {p50:>9.1f} {p99:>9.1f} {n:>8}")
    r50 = rows["lanes"][0] / rows["connections"][0]
    r99 = rows["lanes"][1] / rows["connections"][1]
    print(f"{'ratio lanes/conns':22} {r50:>9.2f} {r99:>9.2f}   target within 10%: "
          f"{'met' if max(r50, r99) <= 1.10 else 'NOT met'}")  # fmt: skip

    if args.json:
        out = {"args": vars(args), "machine": platform.platform(), "cpus": torch.get_num_threads(),
               "forks": forks, "independent": indep,
               "ttft_ms": {m: {"p50": r[0], "p99": r[1], "n": r[2]} for m, r in rows.items()},
               "ratio_p50": r50, "ratio_p99": r99}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if forks["cached_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
