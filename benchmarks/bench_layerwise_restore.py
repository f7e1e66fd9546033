"""Time to first token of a turn whose long prefix comes back from the host tier, with
and without layer-wise overlap (prints a table, asserts nothing).

    python benchmarks/bench_layerwise_restore.py [--context 4096] [--new 256]
        [--repeats 5] [--json PATH]

The built-in engine (the real runtime path: scheduler, `TieredKVCache`,
`CopyTransferEngine`, `LlamaModel`) serves one session whose `--context` tokens were
computed, pushed to the host tier (the pin cap makes room for another session) and
dropped from the device pool, so its next turn of `--new` tokens restores the whole
prefix. Per repeat the same return turn runs three ways, interleaved in one engine:

- whole restore: `layerwise_restore=False`, the prefill starts when the copy ended;
- layer-wise: the plan comes with the copy, which a copy thread (CUDA: the restore
  stream, one event per layer group) moves layer by layer while the prefill of layer i
  waits only for layer i;
- pinned: the prefix never left the device (the floor: the prefill alone).

TTFT is `OutputStarted.ttft_s` (arrival to the first output token). On a CPU-only machine
the "device" pool is CPU memory and the copy and the prefill share the same cores and
memory bandwidth, so the overlap gains less than on a GPU, where the copy runs on the
DMA engines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from pagedkv.model.llama import LlamaModel
from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import EngineRequest, OutputStarted, TurnDone
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.serving.generation import OutputSpec

BS = 16


def _turn(engine: Engine, sid: str, prompt: list[int], rid: str) -> float:
    events: list[Any] = []
    engine.submit(
        EngineRequest(
            request_id=rid,
            session_id=sid,
            prompt_tokens=tuple(prompt),
            output=OutputSpec(max_output_tokens=1, temperature=0.0),
            arrival=time.monotonic(),
        ),
        events.append,
    )
    engine.run_until_idle()
    done = events[-1]
    if not isinstance(done, TurnDone):
        raise RuntimeError(f"turn {rid} did not finish: {events[-3:]}")
    started = [e for e in events if isinstance(e, OutputStarted)]
    return started[0].ttft_s


def _push_to_host(engine: Engine, other: str, n: int) -> None:
    """Another session's turn takes the only pin slot, so the idle one is offloaded;
    then its device copy is dropped from the hash cache."""
    engine.open_session(other)
    _turn(engine, other, [5] * BS, f"push{n}")
    engine.close_session(other)
    engine.run_until_idle()
    engine.cache.wait_all()
    engine.run_until_idle()
    pool = engine.cache.gpu.pool
    pool.evict(pool.num_cached)


def run(model: LlamaModel, context: int, new: int, repeats: int) -> dict[str, Any]:
    need = -(-(context + new + 64) // BS)
    engine = build_engine(
        model,
        block_size=BS,
        num_gpu_blocks=need + 16,
        num_host_blocks=2 * need + 16,
        max_batch_tokens=max(context, new) + 64,
        prefill_chunk_tokens=max(context, new) + 64,
        scheduler=SchedulerConfig(max_pinned_sessions=1, high_watermark=1.0),
    )
    base = engine.scheduler.config
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"whole restore": [], "layer-wise": [], "pinned": []}
    n = 0
    for rep in range(repeats + 1):  # the first round warms up
        for mode in ("whole restore", "layer-wise", "pinned"):
            n += 1
            sid = f"s{n}"
            engine.open_session(sid)
            history = torch.randint(0, 256, (context,), generator=gen).tolist()
            _turn(engine, sid, history, f"c{n}")
            # the engine appended its one output token: the next turn extends all of it
            prompt = list(engine.cache.gpu.table(engine._sessions[sid].key).tokens)
            prompt += torch.randint(0, 256, (new,), generator=gen).tolist()
            if mode != "pinned":
                _push_to_host(engine, f"o{n}", n)
                key = engine._sessions[sid].key
                assert engine.cache.location(key) == "host", engine.cache.location(key)
            engine.scheduler.config = dataclasses.replace(
                base, layerwise_restore=mode == "layer-wise"
            )
            before = engine.scheduler.metrics.restores_layerwise
            ttft = _turn(engine, sid, prompt, f"r{n}")
            layered = engine.scheduler.metrics.restores_layerwise - before
            assert layered == (mode == "layer-wise"), (mode, layered)
            engine.close_session(sid)
            engine.run_until_idle()
            if rep:
                times[mode].append(ttft)
    engine.cache.wait_all()
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    return {
        "context": context,
        "new": new,
        "repeats": repeats,
        "ttft_s": times,
        "median_s": med,
        "ratio_layerwise_vs_whole": med["layer-wise"] / med["whole restore"],
        "restore_overhead_whole_s": med["whole restore"] - med["pinned"],
        "restore_overhead_layerwise_s": med["layer-wise"] - med["pinned"],
        "kv_bytes_restored": context * model.config.kv_spec(BS).bytes_per_block // BS,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the device pool's place)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for name in ("context", "new", "repeats", "layers", "kv_heads", "head_dim"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # the demo model's width with Llama-3-8B's KV heads and head size (a 4k-token prefix
    # is hundreds of MB, as on a GPU server where the copy competes with the prefill)
    model = build_model(
        "demo",
        seed=0,
        num_layers=args.layers,
        num_heads=args.kv_heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position=args.context * 2,
        device=args.device,
    )
    result = run(model, args.context, args.new, args.repeats)
    result["machine"] = (
        torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    result["torch_threads"] = torch.get_num_threads()
    result["model"] = {
        "layers": args.layers,
        "hidden": model.config.hidden_size,
        "kv_heads": model.config.num_kv_heads,
        "head_dim": model.config.head_dim,
        "dtype": model.config.dtype,
    }
    med = result["median_s"]
    mb = result["kv_bytes_restored"] / 2**20
    print(
        f"{args.context}-token prefix ({mb:.0f} MiB of KV) restored from the host tier, "
        f"then {args.new} new tokens; {args.repeats} repeats, medians; "
        f"{result['machine']}, {result['torch_threads']} torch threads"
    )
    print(f"{'mode':<16}{'TTFT ms':>10}{'vs pinned ms':>14}")
    for mode in ("whole restore", "layer-wise", "pinned"):
        print(f"{mode:<16}{med[mode] * 1e3:>10.1f}{(med[mode] - med['pinned']) * 1e3:>14.1f}")
    print(f"layer-wise / whole restore TTFT: {result['ratio_layerwise_vs_whole']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
