"""Block pool and prefix hashing throughput (CPU; prints a table, asserts nothing).

    python benchmarks/bench_block_pool.py [--quick] [--json PATH]

1. allocate+free in batches of 16 at pool sizes 10^4 and 10^6 (blocks/s), with the pool
   half full of cached blocks so reclamation is on the path too;
2. prefix hashing (tokens/s) at block_size 16 and 256: pagedkv's chained xxh3-128 over
   int32 bytes vs vLLM's default `sha256(pickle.dumps((parent, tuple(tokens), extra)))`
   per block, measured in the same run on the same tokens. pagedkv's rate is shown both
   from int32 arrays (what block tables store) and from a Python list (including the
   list -> int32 conversion, which also range-checks the ids);
3. one full `BlockManager` turn: append a prompt with a full prefix hit + mark computed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher, as_token_array


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_pool(pool_size: int) -> BlockPool:
    """A pool with half its blocks cached (indexed, refcount 0) and a quarter in use."""
    pool = BlockPool(pool_size)
    cached = pool.allocate(pool_size // 2)
    for i, b in enumerate(cached):
        pool.register(b, i.to_bytes(16, "little"))
    pool.release(cached)
    pool.allocate(pool_size // 4)
    return pool


def bench_alloc(pool: BlockPool, iters: int, repeats: int) -> float:
    """Blocks per second through allocate(16) + release(16)."""

    def run() -> None:
        for _ in range(iters):
            ids = pool.allocate(16)
            pool.release(ids[::-1])

    return 16 * iters / median_time(run, repeats)


def baseline_hash(tokens: list[int], bs: int) -> list[bytes]:
    parent: bytes | None = None
    out = []
    for i in range(0, len(tokens) - bs + 1, bs):
        parent = hashlib.sha256(pickle.dumps((parent, tuple(tokens[i : i + bs]), None))).digest()
        out.append(parent)
    return out


def bench_hash(bs: int, num_tokens: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 128_000, size=num_tokens, dtype=np.int32)
    lst = arr.tolist()
    hasher = BlockHasher(block_size=bs)
    root = hasher.root("bench")
    base = num_tokens / median_time(lambda: baseline_hash(lst, bs), repeats)
    ours_arr = num_tokens / median_time(lambda: hasher.hash_chain(root, arr), repeats)
    ours_list = num_tokens / median_time(
        lambda: hasher.hash_chain(root, as_token_array(lst)), repeats
    )
    return {"baseline": base, "array": ours_arr, "list": ours_list}


def bench_turn(num_tokens: int, repeats: int) -> float:
    """Seconds for one append with a full prefix hit (32k tokens) + mark_computed + free."""
    bs = 16
    m = BlockManager(BlockPool(4 * num_tokens // bs), BlockHasher(block_size=bs))
    tokens = np.arange(num_tokens, dtype=np.int32)
    m.add_sequence("warm")
    m.append_tokens("warm", tokens)
    m.mark_computed("warm")
    m.free_sequence("warm")

    def run() -> None:
        m.add_sequence("s")
        m.append_tokens("s", tokens, max_cached_tokens=num_tokens - 1)
        m.mark_computed("s")
        m.free_sequence("s")

    return median_time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke run)")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    results: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "numpy": np.__version__,
    }

    print("allocate + free, batches of 16 (pool: 1/2 cached, 1/4 in use)")
    print(f"{'pool blocks':>12} {'Mblocks/s':>10}")
    # the sizes are interleaved over several rounds, so machine noise hits both alike
    pools = {size: make_pool(size) for size in (10**4, 10**6)}
    samples: dict[int, list[float]] = {size: [] for size in pools}
    for _round in range(3 if args.quick else 5):
        for size, pool in pools.items():
            samples[size].append(bench_alloc(pool, 2000 if args.quick else 20000, repeats))
    alloc = {size: statistics.median(rates) for size, rates in samples.items()}
    for size, rate in alloc.items():
        print(f"{size:>12,} {rate / 1e6:>10.2f}")
    results["alloc_blocks_per_s"] = alloc

    print("\nprefix hashing, chained, tokens/s (same tokens, same run)")
    print(
        f"{'block_size':>10} {'sha256+pickle':>14} {'ours int32':>11} {'ratio':>6}"
        f" {'ours list':>10} {'ratio':>6}"
    )
    hashing = {}
    for bs in (16, 256):
        r = bench_hash(bs, 2**18 if args.quick else 2**21, repeats)
        hashing[bs] = r
        print(
            f"{bs:>10} {r['baseline'] / 1e6:>12.1f}M {r['array'] / 1e6:>10.1f}M "
            f"{r['array'] / r['baseline']:>5.1f}x {r['list'] / 1e6:>9.1f}M "
            f"{r['list'] / r['baseline']:>5.1f}x"
        )
    results["hash_tokens_per_s"] = hashing

    t = bench_turn(32768, repeats)
    results["turn_32k_full_hit_s"] = t
    print(f"\nBlockManager turn, 32k-token prompt, full prefix hit: {t * 1e6:.0f} µs")
    print("  (add + hash 2048 blocks + match + acquire + mark_computed + free)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
