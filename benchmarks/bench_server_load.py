"""Many clients, two tenants, one server: TTFT under load, no cross-tenant hit, nothing
leaked (prints a table; exits 1 if isolation or the leak check fails).

    python benchmarks/bench_server_load.py                      # 64 clients x 8 turns, CPU
    python benchmarks/bench_server_load.py --clients 128 --turns 12 --model demo
    python benchmarks/bench_server_load.py --json benchmarks/results/server_load_cpu.json

The reference server runs in-process (uvicorn on a loopback port) with API keys for two
tenants, `alice` and `bob`, plus a `probe` tenant that sends nothing during the load.
Each client opens one WebSocket connection with its tenant's key and runs a multi-turn
conversation with `previous_response_id`: the same system prompt for every client of
both tenants, then a first user message of its own and short follow-ups. TTFT is
client-measured (request sent -> first output delta).

Checks, after the load:

- isolation: the probe tenant re-sends, word for word, the first-turn prompts that
  alice's and bob's clients sent (all of them now cached for their own tenant): each must
  report 0 cached tokens; meanwhile every client after the first of its tenant got the
  shared system prompt from the cache (sharing within a tenant works);
- leaks: with every client closed, the engine holds no session and no GPU block in use
  (blocks kept only by the prefix cache are not in use), the connection quotas are back
  to zero, and the scheduler and cache invariants hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import connect

from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.serving.auth import Authenticator
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.serving.local_server import LocalServer
from pagedkv.serving.quotas import ConnectionQuotas
from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.server import create_app
from pagedkv.serving.testing import engine_check

KEYS = {"sk-alice": "alice", "sk-bob": "bob"}
SYSTEM = (
    "You are a coding agent working in a large repository. Follow the style guide, "
    "run the tests after every change, and explain each step briefly. "
) * 4
DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")
DONE = ("response.completed", "response.incomplete")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(round(q / 100 * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[k]


async def run_turn(ws: Any, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(TTFT in seconds, the finished response)."""
    sent = time.perf_counter()
    await ws.send(json.dumps({"type": "response.create", **body}))
    ttft: float | None = None
    while True:
        ev = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if ev["type"] in DELTAS and ttft is None:
            ttft = time.perf_counter() - sent
        if ev["type"] in DONE:
            return (ttft if ttft is not None else time.perf_counter() - sent), ev["response"]
        if ev["type"] in ("error", "response.failed"):
            raise RuntimeError(f"turn failed: {ev}")


async def client(
    url: str,
    key: str,
    idx: int,
    turns: int,
    max_out: int,
    seeded: asyncio.Event,
    seed_done: Callable[[], None] | None,
) -> dict[str, Any]:
    first = f"Client {idx}: fix the failing test in module_{idx}.py and report what changed."
    out: dict[str, Any] = {"key": key, "idx": idx, "ttft": [], "cached": [], "input": []}
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                       max_size=None, open_timeout=60) as ws:  # fmt: skip
        prev = None
        for t in range(turns):
            if t == 0 and seed_done is None:  # after each tenant's seed client's turn
                await seeded.wait()
            body: dict[str, Any] = {"model": "pagedkv", "max_output_tokens": max_out,
                                    "temperature": 0}  # fmt: skip
            if t == 0:
                body.update(instructions=SYSTEM, input=first)
                out["first_prompt"] = {"instructions": SYSTEM, "input": first}
            else:
                body.update(instructions=SYSTEM, previous_response_id=prev,
                            input=f"Turn {t}: the tool printed {idx * 31 + t} lines; continue.")  # fmt: skip
            ttft, response = await run_turn(ws, body)
            prev = response["id"]
            usage = response["usage"]
            out["ttft"].append(ttft)
            out["cached"].append(usage["input_tokens_details"]["cached_tokens"])
            out["input"].append(usage["input_tokens"])
            if t == 0 and seed_done is not None:
                seed_done()
    return out


async def probe(url: str, prompts: list[dict[str, Any]], max_out: int) -> list[int]:
    """cached_tokens seen for each prompt by a tenant that has sent nothing before (one
    new probe tenant per prompt, so a probe cannot hit its own earlier prompts)."""
    seen = []
    for i, p in enumerate(prompts):
        async with connect(url, additional_headers={"Authorization": f"Bearer sk-probe-{i}"},
                           max_size=None) as ws:  # fmt: skip
            _ttft, response = await run_turn(ws, {"model": "pagedkv", "max_output_tokens": max_out,
                                                  "temperature": 0, **p})  # fmt: skip
            seen.append(response["usage"]["input_tokens_details"]["cached_tokens"])
    return seen


async def load(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Clients 0 (alice) and 1 (bob) run their first turn alone, so that each tenant's
    cache holds the system prompt; then every client runs."""
    keys = ["sk-alice", "sk-bob"]
    seeded = asyncio.Event()
    seeds_left = [min(2, args.clients)]

    def seed_done() -> None:
        seeds_left[0] -= 1
        if seeds_left[0] == 0:
            seeded.set()

    tasks = [
        client(
            url,
            keys[i % 2],
            i,
            args.turns,
            args.max_output_tokens,
            seeded,
            seed_done if i < 2 else None,
        )
        for i in range(args.clients)
    ]
    return list(await asyncio.gather(*tasks))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--model", default="tiny", choices=("tiny", "demo", "llama_1b"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-output-tokens", type=int, default=8)
    p.add_argument("--num-gpu-blocks", type=int, default=4096)
    p.add_argument("--max-pinned-sessions", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model, device=args.device)
    engine = build_engine(
        model,
        num_gpu_blocks=args.num_gpu_blocks,
        num_host_blocks=2 * args.num_gpu_blocks,
        max_batch_tokens=2048,
        prefill_chunk_tokens=2048,
        scheduler=SchedulerConfig(
            max_pinned_sessions=args.max_pinned_sessions, max_queue=1024, queue_timeout_s=300.0
        ),
    )
    probes = {f"sk-probe-{i}": f"probe-{i}" for i in range(args.clients)}
    auth = Authenticator.from_keys({**KEYS, **probes})
    quotas = ConnectionQuotas(max_connections=4 * args.clients)
    config = ServerConfig(model_name="pagedkv", max_output_tokens_cap=max(args.max_output_tokens, 16),
                          default_max_output_tokens=min(args.max_output_tokens, 16))  # fmt: skip
    app = create_app(engine, config, auth=auth, quotas=quotas)
    with LocalServer(app) as srv:
        url = srv.ws_url
        start = time.perf_counter()
        results = asyncio.run(load(url, args))
        wall = time.perf_counter() - start
        prompts = [r["first_prompt"] for r in results]
        probe_cached = asyncio.run(probe(url, prompts, args.max_output_tokens))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = engine_check(engine)
            if stats["num_sessions"] == 0 and quotas.snapshot()["connections"] == 0:
                break
            time.sleep(0.05)
        stats = engine_check(engine)
        conns = quotas.snapshot()["connections"]

    ttft_all = [t for r in results for t in r["ttft"]]
    ttft_first = [r["ttft"][0] for r in results]
    ttft_later = [t for r in results for t in r["ttft"][1:]]
    cached = sum(c for r in results for c in r["cached"])
    inputs = sum(i for r in results for i in r["input"])
    # every client after its tenant's first shares the system prompt: its first turn hits
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: r["idx"]):
        by_tenant.setdefault(KEYS[r["key"]], []).append(r)
    shared_hits = {t: sum(1 for r in rs[1:] if r["cached"][0] > 0) for t, rs in by_tenant.items()}
    leaked = stats["num_sessions"] != 0 or stats["gpu_blocks"]["in_use"] != 0 or conns != 0
    cross_tenant_hits = sum(1 for c in probe_cached if c > 0)

    rows = [
        ("clients x turns", f"{args.clients} x {args.turns} (tenants alice, bob)"),
        ("model / device", f"{args.model} / {args.device} ({platform.processor() or 'cpu'})"),
        ("wall time", f"{wall:.1f} s ({args.clients * args.turns / wall:.1f} turns/s)"),
        ("TTFT p50 / p99, all turns", f"{1e3 * statistics.median(ttft_all):.1f} / "
                                      f"{1e3 * percentile(ttft_all, 99):.1f} ms"),
        ("TTFT p50 / p99, turn 1", f"{1e3 * statistics.median(ttft_first):.1f} / "
                                   f"{1e3 * percentile(ttft_first, 99):.1f} ms"),
        ("TTFT p50 / p99, turns 2+", f"{1e3 * statistics.median(ttft_later):.1f} / "
                                     f"{1e3 * percentile(ttft_later, 99):.1f} ms"),
        ("cached / input tokens", f"{cached} / {inputs} ({cached / max(inputs, 1):.1%})"),
        ("same-tenant first-turn hits", ", ".join(f"{t} {n}/{len(by_tenant[t]) - 1}"
                                                  for t, n in shared_hits.items())),
        ("cross-tenant hits (probe)", f"{cross_tenant_hits} of {len(probe_cached)} prompts"),
        ("after close: sessions, GPU in use, conns",
         f"{stats['num_sessions']}, {stats['gpu_blocks']['in_use']}, {conns}"
         f" ({'LEAK' if leaked else 'nothing leaked'}; cached blocks kept: "
         f"{stats['gpu_blocks']['cached']})"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args),
            "machine": platform.platform(),
            "torch": torch.__version__,
            "wall_s": wall,
            "ttft_ms": {
                "all": {"p50": 1e3 * statistics.median(ttft_all), "p99": 1e3 * percentile(ttft_all, 99)},
                "turn1": {"p50": 1e3 * statistics.median(ttft_first),
                          "p99": 1e3 * percentile(ttft_first, 99)},
                "later": {"p50": 1e3 * statistics.median(ttft_later),
                          "p99": 1e3 * percentile(ttft_later, 99)},
            },
            "cached_tokens": cached,
            "input_tokens": inputs,
            "same_tenant_first_turn_hits": shared_hits,
            "cross_tenant_hits": cross_tenant_hits,
            "probe_prompts": len(probe_cached),
            "after_close": {"sessions": stats["num_sessions"],
                            "gpu_in_use": stats["gpu_blocks"]["in_use"], "connections": conns},
            "table": [list(r) for r in rows],
        }, indent=2) + "\n")  # fmt: skip
    return 1 if leaked or cross_tenant_hits else 0


if __name__ == "__main__":
    sys.exit(main())
