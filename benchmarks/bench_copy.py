"""Benchmark copy_blocks: whole KV blocks between tiers vs one large copy_.

The pool is Llama-3-8B's whole KV cache in 16-token blocks, `[num_blocks, 32 layers, 2,
16, 8 KV heads, 128]` bf16 (2 MiB per block), 1 GiB moved per call. Each id table
(one contiguous run, runs of 8 blocks, fully scattered) moves GPU -> pinned host, pinned
host -> GPU and GPU -> GPU, against a single large `copy_` of the same bytes in the same
direction measured in the same run, against the device-to-device `copy_` bandwidth of the
same run, and against the torch reference (`copy_blocks(..., backend="torch")`). Without
a GPU: CPU -> CPU with the same tables.

    python benchmarks/bench_copy.py [--gib 1.0] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pagedkv import kernels
from pagedkv.kernels import copy_blocks

BLOCK_SHAPE = (32, 2, 16, 8, 128)  # [num_layers, 2, block_size, Hkv, D]
DTYPE = torch.bfloat16


def env_info(device: torch.device) -> dict[str, Any]:
    """Device and library versions recorded with every result."""
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": kernels.TRITON_VERSION,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall milliseconds of `fn` followed by a device sync (end-to-end cost,
    host-side planning and launch overhead included)."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(reps))


def id_tables(num_blocks: int, seed: int = 0) -> dict[str, tuple[list[int], list[int]]]:
    """(src_ids, dst_ids) per pattern; every table moves all `num_blocks` blocks."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(range(num_blocks))

    def perm() -> list[int]:
        return torch.randperm(num_blocks, generator=gen).tolist()

    run = 8
    chunks = torch.randperm(num_blocks // run, generator=gen).tolist()
    runs8 = [c * run + i for c in chunks for i in range(run)]
    return {
        "one run": (ids, ids),
        "runs of 8": (runs8, ids),
        "scattered": (perm(), perm()),
    }


def bench(
    src: torch.Tensor, dst: torch.Tensor, device: torch.device, reps: int, label: str
) -> list[dict[str, Any]]:
    """copy_blocks with every id table vs one `dst.copy_(src)` of the whole pool and vs
    the torch reference (`index_select` + `index_copy_`) on the same tables."""
    nbytes = src.numel() * src.element_size()
    flat_src, flat_dst = src.view(-1), dst.view(-1)
    base_ms = median_ms(lambda: flat_dst.copy_(flat_src, non_blocking=True), device, reps)
    base_gbps = nbytes / base_ms / 1e6
    rows: list[dict[str, Any]] = [
        {
            "direction": label,
            "pattern": "single copy_",
            "ms": base_ms,
            "gbps": base_gbps,
            "ratio": 1.0,
        }
    ]
    for pattern, (src_ids, dst_ids) in id_tables(src.shape[0]).items():
        ms = median_ms(lambda s=src_ids, d=dst_ids: copy_blocks(src, dst, s, d), device, reps)
        ref_ms = median_ms(
            lambda s=src_ids, d=dst_ids: copy_blocks(src, dst, s, d, backend="torch"),
            device,
            max(3, reps // 3),
        )
        gbps = nbytes / ms / 1e6
        rows.append(
            {
                "direction": label,
                "pattern": pattern,
                "ms": ms,
                "gbps": gbps,
                "ratio": gbps / base_gbps,
                "ref_ms": ref_ms,
                "vs_ref": ref_ms / ms,
            }
        )
        print(rows[-1], flush=True)
    copy_blocks(src, dst, src_ids, dst_ids)  # the last table, checked in full below
    expected = src.view(torch.int16)[torch.tensor(src_ids, device=src.device)].cpu()
    got = dst.view(torch.int16)[torch.tensor(dst_ids, device=dst.device)].cpu()
    rows[-1]["bit_exact"] = bool(torch.equal(expected, got))
    return rows


def add_device_ratio(rows: list[dict[str, Any]], label: str) -> float:
    """Set `vs_dev` on every row: GB/s over the single same-device `copy_` (`label`'s
    baseline row, e.g. gpu->gpu: the device-to-device bandwidth of this run)."""
    dev_gbps = next(r["gbps"] for r in rows if r["direction"] == label and r["ratio"] == 1.0)
    for r in rows:
        r["vs_dev"] = r["gbps"] / dev_gbps
    return float(dev_gbps)


def print_table(rows: list[dict[str, Any]], block_mib: float, dev_label: str) -> None:
    print(
        f"\nblock = {block_mib:.1f} MiB ({BLOCK_SHAPE} {DTYPE}); vs copy_ = GB/s over one "
        f"large copy_ in the same direction; vs {dev_label} = GB/s over one large "
        f"{dev_label} copy_; vs ref = torch reference time / ours"
    )
    header = (
        f"{'direction':<14} {'pattern':<14} {'ms':>9} {'GB/s':>8} {'vs copy_':>9} "
        f"{'vs ' + dev_label:>12} {'vs ref':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ref = f"{r['vs_ref']:7.2f}" if "vs_ref" in r else f"{'':>7}"
        print(
            f"{r['direction']:<14} {r['pattern']:<14} {r['ms']:9.2f} {r['gbps']:8.1f} "
            f"{r['ratio']:9.2f} {r['vs_dev']:12.2f} {ref}"
        )
    checks = [r["bit_exact"] for r in rows if "bit_exact" in r]
    print(f"bit-exact (scattered table, every block): {all(checks)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, help="bytes moved per call (default 1 GPU, 0.25 CPU)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write raw results to this file")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU mode: torch intra-op threads (default 1: on a loaded machine, multi-threaded "
        "2 MiB copies time mostly thread hand-offs)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = env_info(device)
    print("env: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    gib = args.gib if args.gib is not None else (1.0 if device.type == "cuda" else 0.25)
    block_bytes = torch.Size(BLOCK_SHAPE).numel() * torch.finfo(DTYPE).bits // 8
    num_blocks = max(8, int(gib * 2**30) // block_bytes // 8 * 8)
    shape = (num_blocks, *BLOCK_SHAPE)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if device.type == "cuda":
        gpu = torch.empty(shape, dtype=DTYPE, device=device).normal_()
        gpu_dst = torch.empty_like(gpu)
        host = torch.empty(shape, dtype=DTYPE, pin_memory=True)
        rows += bench(gpu, gpu_dst, device, args.reps, "gpu->gpu")
        rows += bench(gpu, host, device, args.reps, "gpu->host")
        rows += bench(host, gpu_dst, device, args.reps, "host->gpu")
        dev_label = "gpu->gpu"
    else:
        src = torch.randn(shape, dtype=DTYPE)
        dst = torch.empty_like(src)
        rows += bench(src, dst, device, args.reps, "cpu->cpu")
        dev_label = "cpu->cpu"
    add_device_ratio(rows, dev_label)
    print_table(rows, block_bytes / 2**20, dev_label)
    wall = round(time.perf_counter() - start, 1)
    print(f"\nwall time {wall} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"env": info, "num_blocks": num_blocks, "rows": rows, "wall_s": wall}
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
