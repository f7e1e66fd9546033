"""Benchmark the paged attention kernels: decode, prefill and store_kv.

On a GPU: Llama-3-8B layer shapes (Hq 32, Hkv 8, head_dim 128), bf16, block_size 16,
randomly permuted block tables. Each case prints the median time, the achieved GB/s
(decode, store_kv) or TFLOP/s (prefill), and ratios against baselines measured in the
same run: (a) the device-to-device copy bandwidth, (b) torch SDPA on the same data laid
out contiguously, (c) the torch reference on the paged data.

Without a GPU: a CPU mode that checks the Triton kernels (interpreted) against the
reference on tiny shapes and times the reference path (what CPU tensors run).

    python benchmarks/bench_attention.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # the Triton kernels run interpreted on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pagedkv import kernels
from pagedkv.kernels import (
    paged_decode,
    paged_decode_reference,
    paged_prefill,
    paged_prefill_reference,
    store_kv,
    store_kv_reference,
)

HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3-8B attention layer


# ----------------------------------------------------------------------------- timing


def env_info(device: torch.device) -> dict[str, Any]:
    """Device and library versions recorded with every result."""
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": kernels.TRITON_VERSION,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


class Timer:
    """Median wall time of a callable: CUDA events with an L2 flush before each rep on
    a GPU (so a small KV cache is not served from L2), perf_counter on the CPU."""

    def __init__(self, device: torch.device, budget_s: float) -> None:
        self.device = device
        self.budget_s = budget_s
        self.flush = (
            torch.empty(256 * 2**20, dtype=torch.int8, device=device)
            if device.type == "cuda"
            else None
        )

    def __call__(self, fn: Callable[[], object], warmup: int = 3) -> float:
        """Median milliseconds of `fn` (warm-up first; reps fit the time budget)."""
        for _ in range(warmup):
            fn()
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        once = max(time.perf_counter() - start, 1e-6)
        reps = int(min(50, max(3, self.budget_s / once)))
        if self.device.type != "cuda":
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        assert self.flush is not None
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        for begin, end in events:
            self.flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(b.elapsed_time(e) for b, e in events)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


# ------------------------------------------------------------------------------ cases


def paged_batch(
    batch: int, ctx: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kv `[num_blocks, 1, 2, bs, Hkv, D]` with random values, a randomly permuted block
    table `[batch, ctx / bs]` and seq_lens (all `ctx`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pages = math.ceil(ctx / BLOCK_SIZE)
    kv = torch.empty(batch * pages, 1, 2, BLOCK_SIZE, HKV, HEAD_DIM, dtype=dtype, device=device)
    kv.normal_(generator=gen)
    perm = torch.randperm(batch * pages, device=device, generator=gen)
    tables = perm.view(batch, pages).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return kv, tables, seq_lens


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """The paged cache of every sequence as a dense `[B, Hkv, ctx, D]` tensor for SDPA."""
    batch = tables.shape[0]
    dense = torch.empty(batch, HKV, ctx, HEAD_DIM, dtype=cache.dtype, device=cache.device)
    for b in range(batch):
        pages = cache.index_select(0, tables[b].long())  # [pages, bs, Hkv, D]
        dense[b] = pages.reshape(-1, HKV, HEAD_DIM)[:ctx].transpose(0, 1)
    return dense


def sdpa_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lower_right: bool, native_gqa: bool
) -> tuple[Callable[[], torch.Tensor] | None, str]:
    """An SDPA call restricted to the fast backends (flash, cuDNN, efficient), with native
    GQA (`enable_gqa`) or K/V heads expanded to Hq. Falls back from native GQA to expanded
    heads when no fast backend takes it, and gives (None, reason) when that does not fit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    mask: Any = None
    if lower_right:  # new tokens are the last ones: causal aligned bottom-right
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[2], k.shape[2])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if native_gqa:

        def gqa() -> torch.Tensor:
            with sdpa_kernel(fast):
                return sdpa(q, k, v, attn_mask=mask, enable_gqa=True)

        try:
            gqa()
            return gqa, "native-gqa"
        except RuntimeError as exc:  # no fast backend for this GQA call
            if isinstance(exc, torch.OutOfMemoryError):
                return None, "out of memory"
    group = q.shape[1] // k.shape[1]
    if not fits(q.device, 2 * group * k.numel() * k.element_size()):
        return None, "expanded K/V do not fit"
    k_wide, v_wide = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def expanded() -> torch.Tensor:
        with sdpa_kernel(fast):
            return sdpa(q, k_wide, v_wide, attn_mask=mask)

    expanded()
    return expanded, "expanded-heads"


def time_sdpa(
    row: dict[str, Any], timer: Timer, call: Callable[[], torch.Tensor] | None, note: str
) -> None:
    """Fill the SDPA columns of `row` (ratio = SDPA time / ours: > 1 means we are faster)."""
    row["sdpa_variant"] = note
    if call is not None:
        row["sdpa_ms"] = timer(call)
        row["vs_sdpa"] = row["sdpa_ms"] / row["ms"]


def fits(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free - 2 * 2**30


def bench_decode(
    timer: Timer, batch: int, ctx: int, dtype: torch.dtype, copy_gbps: float, with_ref: bool
) -> dict[str, Any]:
    device = timer.device
    row: dict[str, Any] = {"op": "decode", "case": f"B={batch} ctx={ctx}"}
    kv_bytes = batch * ctx * HKV * HEAD_DIM * 2 * torch.finfo(dtype).bits // 8
    if not fits(device, kv_bytes):
        row["skipped"] = "does not fit"
        return row
    kv, tables, seq_lens = paged_batch(batch, ctx, dtype, device)
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=dtype, device=device)
    out = torch.empty_like(q)
    args = (q, k_cache, v_cache, tables, seq_lens)
    nbytes = kv_bytes + 2 * q.numel() * q.element_size() + tables.numel() * 4
    plan = kernels.plan_decode(
        num_seqs=batch, num_kv_heads=HKV, head_dim=HEAD_DIM, block_size=BLOCK_SIZE,
        max_blocks=tables.shape[1], device=device,
    )  # fmt: skip
    workspace = kernels.decode_workspace(q, k_cache, tables)
    ms = timer(lambda: paged_decode(*args, out=out, workspace=workspace))
    row.update(ms=ms, gbps=nbytes / ms / 1e6)
    if device.type == "cuda":  # on the CPU, backend="auto" runs the reference
        row["splits"] = plan.num_splits
    row["vs_copy"] = row["gbps"] / copy_gbps
    if fits(device, 2 * kv_bytes + 2**30):
        k_dense, v_dense = contiguous_kv(k_cache, tables, ctx), contiguous_kv(v_cache, tables, ctx)
        call, note = sdpa_call(q[:, :, None], k_dense, v_dense, lower_right=False, native_gqa=True)
        time_sdpa(row, timer, call, note)
        del k_dense, v_dense, call
    else:
        row["sdpa_variant"] = "dense copy does not fit"
    if with_ref:
        row["ref_ms"] = timer(lambda: paged_decode_reference(*args), warmup=1)
        row["vs_ref"] = row["ref_ms"] / ms
    return row


def bench_prefill(
    timer: Timer, num_seqs: int, new: int, cached: int, dtype: torch.dtype, with_ref: bool
) -> dict[str, Any]:
    device = timer.device
    total = cached + new
    kv, tables, seq_lens = paged_batch(num_seqs, total, dtype, device)
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    q = torch.randn(num_seqs * new, HQ, HEAD_DIM, dtype=dtype, device=device)
    qsl = torch.arange(0, num_seqs * new + 1, new, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    args = (q, k_cache, v_cache, tables, qsl, seq_lens)
    # Useful FLOPs: QK^T and PV over the visible (causal, lower-right) key positions.
    visible = num_seqs * (new * cached + new * (new + 1) // 2)
    flops = 4 * HEAD_DIM * HQ * visible
    row: dict[str, Any] = {"op": "prefill", "case": f"{num_seqs}x{new} new, {cached} cached"}
    ms = timer(lambda: paged_prefill(*args, out=out, max_query_len=new))
    row.update(ms=ms, tflops=flops / ms / 1e9)
    k_dense, v_dense = contiguous_kv(k_cache, tables, total), contiguous_kv(v_cache, tables, total)
    q_dense = q.view(num_seqs, new, HQ, HEAD_DIM).transpose(1, 2)  # [B, Hq, new, D]
    # Compute-bound: expanded K/V heads keep SDPA on its fastest (flash) path.
    call, note = sdpa_call(q_dense, k_dense, v_dense, lower_right=True, native_gqa=False)
    time_sdpa(row, timer, call, note)
    if with_ref:
        row["ref_ms"] = timer(lambda: paged_prefill_reference(*args), warmup=1)
        row["vs_ref"] = row["ref_ms"] / ms
    return row


def bench_store(
    timer: Timer, num_tokens: int, dtype: torch.dtype, copy_gbps: float, with_ref: bool
) -> dict[str, Any]:
    device = timer.device
    num_layers, num_blocks = 32, 2 * num_tokens // BLOCK_SIZE
    kv = torch.zeros(
        num_blocks, num_layers, 2, BLOCK_SIZE, HKV, HEAD_DIM, dtype=dtype, device=device
    )
    k_cache, v_cache = kv[:, 7, 0], kv[:, 7, 1]  # one layer's strided views
    k = torch.randn(num_tokens, HKV, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:num_tokens]
    nbytes = 4 * k.numel() * k.element_size() + slots.numel() * 8  # read k, v; write both
    row: dict[str, Any] = {"op": "store_kv", "case": f"{num_tokens} tokens"}
    ms = timer(lambda: store_kv(k, v, k_cache, v_cache, slots))
    row.update(ms=ms, gbps=nbytes / ms / 1e6)
    row["vs_copy"] = row["gbps"] / copy_gbps
    if with_ref:
        row["ref_ms"] = timer(lambda: store_kv_reference(k, v, k_cache, v_cache, slots), warmup=1)
        row["vs_ref"] = row["ref_ms"] / ms
    return row


# ------------------------------------------------------------------------------ output


def fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    print(f"\n(a) device copy bandwidth (read + write): {copy_gbps:.1f} GB/s")
    print("(b) vs_sdpa = SDPA time / ours on dense K/V; (c) vs_ref = torch reference time / ours")
    header = f"{'op':<9} {'case':<26} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'vs copy':>8} "
    header += f"{'vs sdpa':>8} {'vs ref':>8}  notes"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{r['op']:<9} {r['case']:<26} skipped: {r['skipped']}")
            continue
        notes = []
        if "splits" in r:
            notes.append(f"splits={r['splits']}")
        if "sdpa_variant" in r:
            notes.append(f"sdpa={r['sdpa_variant']}")
        print(
            f"{r['op']:<9} {r['case']:<26} {fmt(r.get('ms'), '9.3f')} {fmt(r.get('gbps'), '8.1f')} "
            f"{fmt(r.get('tflops'), '8.3f')} {fmt(r.get('vs_copy'), '8.2f')} "
            f"{fmt(r.get('vs_sdpa'), '8.2f')} {fmt(r.get('vs_ref'), '8.1f')}  {' '.join(notes)}"
        )


# -------------------------------------------------------------------------------- modes


def gpu_mode(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda")
    timer = Timer(device, budget_s=0.5 if args.quick else 1.5)
    dtype = torch.bfloat16
    copy_gbps = copy_bandwidth(timer, 2**30)
    rows = []
    batches = (1, 8) if args.quick else (1, 8, 64, 256)
    contexts = (1024, 4096) if args.quick else (1024, 4096, 16384, 32768)
    for batch in batches:
        for ctx in contexts:
            with_ref = batch * ctx <= 2**20  # the per-sequence reference gets slow beyond
            rows.append(bench_decode(timer, batch, ctx, dtype, copy_gbps, with_ref))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    for cached in (0, 2048):
        rows.append(bench_prefill(timer, 8, 2048, cached, dtype, with_ref=True))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    rows.append(bench_store(timer, 4096, dtype, copy_gbps, with_ref=True))
    print_table(rows, copy_gbps)
    return {"copy_gbps": copy_gbps, "rows": rows}


def cpu_mode(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu")
    print("CPU mode: no CUDA device. Sanity of the Triton kernels (interpreted) vs the reference:")
    checks = sanity_checks() if kernels.HAS_TRITON else {"skipped": "triton not importable"}
    for name, value in checks.items():
        print(f"  {name:<28} {value}")
    timer = Timer(device, budget_s=0.3)
    copy_gbps = copy_bandwidth(timer, 256 * 2**20)
    dtype = torch.bfloat16
    rows = []
    for batch, ctx in ((1, 1024), (1, 4096), (8, 1024)):
        rows.append(bench_decode(timer, batch, ctx, dtype, copy_gbps, with_ref=False))
    rows.append(bench_prefill(timer, 2, 256, 0, dtype, with_ref=False))
    rows.append(bench_prefill(timer, 2, 256, 256, dtype, with_ref=False))
    rows.append(bench_store(timer, 4096, dtype, copy_gbps, with_ref=False))
    print("\nReference path (what CPU tensors run under backend='auto'):")
    print_table(rows, copy_gbps)
    return {"copy_gbps": copy_gbps, "rows": rows, "checks": checks}


def sanity_checks() -> dict[str, Any]:
    """Max |triton - reference| on tiny shapes, kernels interpreted on the CPU."""
    torch.manual_seed(0)
    dtype, bs, hkv, hq, d = torch.float16, 16, 2, 8, 64
    lens = [1, 15, 16, 17, 70]
    pages = [math.ceil(n / bs) for n in lens]
    kv = torch.randn(sum(pages) + 2, 1, 2, bs, hkv, d, dtype=dtype)
    perm = torch.randperm(sum(pages)).tolist()
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    for b, n in enumerate(pages):
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    results: dict[str, Any] = {}
    q = torch.randn(len(lens), hq, d, dtype=dtype)
    args = (q, k_cache, v_cache, tables, seq_lens)
    for splits in (1, 3):
        got = paged_decode(*args, num_splits=splits, backend="triton")
        diff = (got.float() - paged_decode_reference(*args).float()).abs().max().item()
        results[f"decode fp16 splits={splits}"] = f"max |diff| = {diff:.2e}"
    query_lens = [1, 15, 16, 17, 40]
    qp = torch.randn(sum(query_lens), hq, d, dtype=dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, dtype=torch.int32)
    pargs = (qp, k_cache, v_cache, tables, qsl, seq_lens)
    got = paged_prefill(*pargs, backend="triton")
    diff = (got.float() - paged_prefill_reference(*pargs).float()).abs().max().item()
    results["prefill fp16"] = f"max |diff| = {diff:.2e}"
    kv_a, kv_b = torch.zeros_like(kv), torch.zeros_like(kv)
    k_new = torch.randn(6, hkv, d, dtype=dtype)
    slots = torch.tensor([0, 5, -1, 17, 40, 33])
    store_kv(k_new, k_new, kv_a[:, 0, 0], kv_a[:, 0, 1], slots, backend="triton")
    store_kv_reference(k_new, k_new, kv_b[:, 0, 0], kv_b[:, 0, 1], slots)
    results["store_kv"] = "bit-exact" if torch.equal(kv_a, kv_b) else "MISMATCH"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write raw results to this file")
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter timing")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU mode: torch intra-op threads (default 1: tiny ops on a loaded machine "
        "time mostly thread hand-offs otherwise)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = env_info(device)
    print("env: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    start = time.perf_counter()
    result = gpu_mode(args) if device.type == "cuda" else cpu_mode(args)
    result["env"] = info
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"\nwall time {result['wall_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
