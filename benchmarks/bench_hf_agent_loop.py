"""A transformers model in an agent loop: its own `generate` versus pagedkv (one table).

    python benchmarks/bench_hf_agent_loop.py                  # tiny Qwen2 config, CPU
    python benchmarks/bench_hf_agent_loop.py --arch llama --turns 12
    python benchmarks/bench_hf_agent_loop.py --json benchmarks/results/hf_agent_loop_cpu.json
    python benchmarks/bench_hf_agent_loop.py --size qwen2-0.5b --device cuda --dtype bfloat16 \
        --system-tokens 4096 --tool-tokens 1024      # a real architecture's shapes, on a GPU

One agent conversation of `--turns` turns: a system prompt and a task, then each turn
the model generates `--output-tokens` (greedy) and a tool result of `--tool-tokens`
random tokens is appended. The same model weights run it twice in this process:

- baseline: `model.generate(history)` with transformers' default cache (a fresh
  DynamicCache per call, `attn_implementation="sdpa"`), so every turn prefills the
  whole history;
- pagedkv: the same model class built with `attn_implementation="pagedkv"`, driven by
  `PagedLM` on one session, so every turn prefills only what is new.

Per turn: tokens prefilled and wall time of each, their ratio; the runs alternate
`--repeats` times and the per-turn median is reported. The generated tokens of the two
must be equal in fp32 (the run exits 1 otherwise): the speed is not bought with wrong
output. In bf16/fp16 the two round differently, so a mismatch is only reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers

from pagedkv.integrations.hf_model import from_config
from pagedkv.integrations.session import PagedLM

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2),
    # Qwen2.5-0.5B's shapes (random weights; nothing is downloaded)
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2),
}  # fmt: skip


def make_config(arch: str, vocab: int, max_position: int, size: str = "tiny") -> Any:
    common = dict(vocab_size=vocab, max_position_embeddings=max_position, eos_token_id=None,
                  bos_token_id=None, **SIZES[size])  # fmt: skip
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    return transformers.LlamaConfig(**common)


def conversation(args: argparse.Namespace) -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(args.seed)
    first = torch.randint(0, args.vocab, (args.system_tokens,), generator=gen).tolist()
    tools = [
        torch.randint(0, args.vocab, (args.tool_tokens,), generator=gen).tolist()
        for _ in range(args.turns)
    ]
    return first, tools


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_baseline(
    model: Any, first: list[int], tools: list[list[int]], n: int, device: str
) -> list[dict]:
    history = list(first)
    rows = []
    for tool in tools:
        ids = torch.tensor([history], device=device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
        _sync(device)
        wall = time.perf_counter() - t0
        new = out[0, len(history) :].tolist()
        rows.append({"prefill": len(history), "wall_s": wall, "tokens": new})
        history += new + tool
    return rows


def run_paged(lm: PagedLM, first: list[int], tools: list[list[int]], n: int) -> list[dict]:
    history = list(first)
    rows = []
    lm.open_session("agent")
    for tool in tools:
        t0 = time.perf_counter()
        out = lm.generate([history], max_new_tokens=n, sessions=["agent"])[0]
        wall = time.perf_counter() - t0
        rows.append({"prefill": out.prompt_tokens - out.cached_tokens, "wall_s": wall,
                     "tokens": out.tokens, "cached": out.cached_tokens})  # fmt: skip
        history += out.tokens + tool
    lm.close_session("agent")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("qwen2", "llama", "mistral"), default="qwen2")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--tool-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    total = args.system_tokens + args.turns * (args.tool_tokens + args.output_tokens) + 64
    config = make_config(args.arch, args.vocab, total, args.size)
    dtype = getattr(torch, args.dtype)
    paged_model = from_config(config, seed=args.seed, device=args.device, dtype=dtype)
    baseline = (
        transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype
        )
        .to(args.device)
        .eval()
    )
    baseline.load_state_dict(paged_model.hf.state_dict())
    first, tools = conversation(args)
    base_runs, paged_runs = [], []
    for _ in range(args.repeats):
        base_runs.append(run_baseline(baseline, first, tools, args.output_tokens, args.device))
        lm = PagedLM(paged_model, num_gpu_blocks=-(-total // 16) + 8, num_host_blocks=0,
                     max_batch_tokens=4096)  # fmt: skip
        paged_runs.append(run_paged(lm, first, tools, args.output_tokens))
    same = all(
        b["tokens"] == q["tokens"] for br, pr in zip(base_runs, paged_runs, strict=True)
        for b, q in zip(br, pr, strict=True)
    )  # fmt: skip
    rows = []
    for t in range(args.turns):
        bw = statistics.median(r[t]["wall_s"] for r in base_runs)
        pw = statistics.median(r[t]["wall_s"] for r in paged_runs)
        rows.append({
            "turn": t + 1,
            "baseline_prefill": base_runs[0][t]["prefill"],
            "pagedkv_prefill": paged_runs[0][t]["prefill"],
            "pagedkv_cached": paged_runs[0][t]["cached"],
            "baseline_ms": bw * 1e3,
            "pagedkv_ms": pw * 1e3,
            "speedup": bw / pw,
        })  # fmt: skip
    n_params = sum(q.numel() for q in baseline.parameters())
    print(f"{args.arch}: {n_params / 1e6:.1f} M params, {args.turns} turns, system "
          f"{args.system_tokens} + tool {args.tool_tokens} + output {args.output_tokens} "
          f"tokens/turn; transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{args.device} {args.dtype}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}; "
          f"median of {args.repeats}")  # fmt: skip
    print("turn | prefilled: generate  pagedkv (cached) | wall ms: generate  pagedkv | speedup")
    for r in rows:
        print(f"{r['turn']:>4} | {r['baseline_prefill']:>19} {r['pagedkv_prefill']:>8} "
              f"({r['pagedkv_cached']:>5}) | {r['baseline_ms']:>17.1f} {r['pagedkv_ms']:>8.1f} "
              f"| {r['speedup']:>6.2f}x")  # fmt: skip
    tb = sum(r["baseline_prefill"] for r in rows)
    tp = sum(r["pagedkv_prefill"] for r in rows)
    wb = sum(r["baseline_ms"] for r in rows)
    wp = sum(r["pagedkv_ms"] for r in rows)
    print(f" all | {tb:>19} {tp:>8}         | {wb:>17.1f} {wp:>8.1f} | {wb / wp:>6.2f}x")
    print(f"prefilled tokens {tp / tb:.3f}x of generate's; last turn {rows[-1]['speedup']:.2f}x "
          f"faster; identical tokens: {'yes' if same else 'NO'}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "params": n_params, "transformers": transformers.__version__,
            "torch": torch.__version__, "machine": platform.machine(),
            "rows": rows, "identical_tokens": same,
        }, indent=2))  # fmt: skip
    # fp32 must agree token for token; bf16/fp16 kernels round differently from sdpa's,
    # so there a mismatch is reported, not fatal
    return 0 if same or args.dtype != "float32" else 1


if __name__ == "__main__":
    sys.exit(main())
