"""Offload / restore throughput of whole sessions (prints a table, asserts nothing).

    python benchmarks/bench_offload.py [--tokens 1024 8192 32768] [--json PATH]

Llama-3-8B KV shapes (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token),
block_size 16. For each session size, a session is offloaded GPU -> host and restored
host -> GPU through `TieredKVCache` (metadata, planning and `copy_blocks` included), and
compared with a single large `copy_` of the same number of bytes between the same kinds
of memory, measured in the same run. On a GPU the host store is pinned, and a decode
kernel is timed alone and while an offload runs on the transfer stream (the compute
stream must not be blocked). Without a GPU the "device" store is CPU memory, so the table
shows CPU-to-CPU copies.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.cache.spec import KVSpec
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import CopyTransferEngine

SPEC = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fragment(pool: BlockPool) -> None:
    """Hold every other block of `pool` (a long-running server's pool after churn), so a
    session's blocks are never consecutive: one copy per block instead of a few runs."""
    held = pool.allocate(pool.num_blocks)
    pool.release(held[1::2])


def bench_size(
    num_tokens: int, device: torch.device, repeats: int, *, fragmented: bool = False
) -> dict[str, float]:
    num_blocks = SPEC.num_blocks_for(num_tokens)
    pool_blocks = 2 * num_blocks if fragmented else num_blocks
    gpu = KVStore(SPEC, pool_blocks, device=device)
    host = KVStore(SPEC, pool_blocks, device="cpu", pin_memory=None)
    gpu.kv.view(torch.int16).random_()
    hasher = BlockHasher(block_size=SPEC.block_size)
    gpu_pool, host_pool = BlockPool(pool_blocks, name="gpu"), BlockPool(pool_blocks, name="host")
    if fragmented:
        fragment(gpu_pool)
        fragment(host_pool)
    cache = TieredKVCache(
        BlockManager(gpu_pool, hasher),
        BlockManager(host_pool, hasher),
        CopyTransferEngine(gpu, host),
    )
    tokens = torch.randint(0, 128_000, (num_tokens,), dtype=torch.int32).numpy()
    nbytes = num_blocks * SPEC.bytes_per_block

    # a fresh session each time, so nothing is already on the destination tier; only the
    # offload (or restore) call and its completion are timed
    def cycle(times: dict[str, list[float]]) -> None:
        cache.begin_sequence("s", tokens)
        cache.gpu.mark_computed("s")
        for direction in ("offload", "restore"):
            if direction == "restore":
                cache.gpu.pool.evict(num_blocks)  # the GPU copies are gone: really copy
            sync(device)
            t0 = time.perf_counter()
            cache.offload("s") if direction == "offload" else cache.restore("s")
            r = cache.wait("s")
            sync(device)
            times[direction].append(time.perf_counter() - t0)
            assert r is not None and r.ok
        cache.free("s")
        cache.host.pool.evict(num_blocks)
        cache.gpu.pool.evict(num_blocks)

    times: dict[str, list[float]] = {"offload": [], "restore": []}
    for _ in range(repeats + 1):  # the first cycle warms up
        cycle(times)
    t_off = statistics.median(times["offload"][1:])
    t_res = statistics.median(times["restore"][1:])

    # baseline: one large copy_ of the same bytes between the same kinds of memory
    flat_src = gpu.kv[:num_blocks].view(-1)
    flat_dst = host.kv[:num_blocks].view(-1)
    nb = device.type == "cuda"
    t_d2h = median_s(lambda: flat_dst.copy_(flat_src, non_blocking=nb), device, repeats)
    t_h2d = median_s(lambda: flat_src.copy_(flat_dst, non_blocking=nb), device, repeats)
    out: dict[str, float] = {
        "tokens": num_tokens,
        "fragmented": fragmented,
        "bytes": nbytes,
        "offload_gbps": nbytes / t_off / 1e9,
        "restore_gbps": nbytes / t_res / 1e9,
        "copy_d2h_gbps": nbytes / t_d2h / 1e9,
        "copy_h2d_gbps": nbytes / t_h2d / 1e9,
    }
    if device.type == "cuda" and not fragmented:
        out.update(bench_overlap(cache, gpu, tokens, device, repeats))
    return out


def bench_overlap(
    cache: TieredKVCache, gpu: KVStore, tokens: object, device: torch.device, repeats: int
) -> dict[str, float]:
    """Decode kernel time alone vs while an offload runs on the transfer stream."""
    from pagedkv.kernels import decode_workspace, paged_decode

    batch, hq = 8, 32
    ctx_blocks = min(gpu.num_blocks, 256)
    tables = torch.arange(ctx_blocks, dtype=torch.int32, device=device).repeat(batch, 1)
    lens = torch.full((batch,), ctx_blocks * SPEC.block_size, dtype=torch.int32, device=device)
    q = torch.randn(batch, hq, SPEC.head_dim, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    ws = decode_workspace(q, gpu.k_cache(0), tables)

    def decode() -> None:
        for layer in range(SPEC.num_layers):
            paged_decode(q, gpu.k_cache(layer), gpu.v_cache(layer), tables, lens,
                         out=out, workspace=ws)  # fmt: skip

    alone = median_s(decode, device, repeats)
    concurrent, overlapped = [], 0
    for i in range(repeats):
        seq = f"o{i}"
        cache.begin_sequence(seq, tokens)  # type: ignore[arg-type]
        cache.gpu.mark_computed(seq)
        torch.cuda.synchronize(device)
        handle = cache.offload(seq)  # on the transfer stream; time decode concurrently
        t0 = time.perf_counter()
        decode()
        torch.cuda.current_stream(device).synchronize()
        concurrent.append(time.perf_counter() - t0)
        overlapped += not handle.done()  # the copy was still running when decode ended
        cache.wait(seq)
        cache.free(seq)
        # the next round copies everything again: nothing cached on either tier
        cache.gpu.pool.evict(cache.gpu.pool.num_cached)
        assert cache.host is not None
        cache.host.pool.evict(cache.host.pool.num_cached)
    return {
        "decode_ms_alone": alone * 1e3,
        "decode_ms_with_offload": statistics.median(concurrent) * 1e3,
        "offload_still_running_after_decode": overlapped / repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="session sizes (default: 1024 8192 32768)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.tokens or [1024, 8192, 32768]
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_pinned": device.type == "cuda",
    }  # fmt: skip
    print(f"env: {env}")
    kind = "GPU<->pinned host" if device.type == "cuda" else "CPU->CPU (no GPU)"
    print(f"session offload/restore, Llama-3-8B KV (128 KiB/token), {kind}")
    print("layout: contiguous = the session's blocks are consecutive ids on both tiers; "
          "fragmented = every other block is held by others (one copy per block)")  # fmt: skip
    header = f"{'tokens':>7} {'layout':>10} {'MiB':>7} {'offload GB/s':>13} {'copy_ GB/s':>11} {'ratio':>6} {'restore GB/s':>13} {'copy_ GB/s':>11} {'ratio':>6}"
    print(header)
    rows = []
    for n in sizes:
        for fragmented in (False, True):
            r = bench_size(n, device, args.repeats, fragmented=fragmented)
            rows.append(r)
            layout = "fragmented" if fragmented else "contiguous"
            print(
                f"{n:>7} {layout:>10} {r['bytes'] / 2**20:>7.0f} {r['offload_gbps']:>13.2f} "
                f"{r['copy_d2h_gbps']:>11.2f} {r['offload_gbps'] / r['copy_d2h_gbps']:>6.2f} "
                f"{r['restore_gbps']:>13.2f} {r['copy_h2d_gbps']:>11.2f} "
                f"{r['restore_gbps'] / r['copy_h2d_gbps']:>6.2f}"
            )
            if "decode_ms_alone" in r:
                print(f"        decode 32 layers B=8: {r['decode_ms_alone']:.3f} ms alone, "
                      f"{r['decode_ms_with_offload']:.3f} ms during offload; the offload was "
                      f"still copying when decode ended in "
                      f"{r['offload_still_running_after_decode']:.0%} of rounds")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
