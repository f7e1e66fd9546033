"""Scheduler overhead per turn (prints a table, asserts nothing).

    python benchmarks/bench_scheduler.py [--quick] [--json PATH]

Metadata-only pools (no tensors, no copies). For 10, 1,000 and 100,000 open IDLE pinned
sessions, one turn = begin_turn (16 new tokens) + mark_computed + end_turn on a random
session; its time must not grow with the number of sessions. Then a 32k-token session:
(a) its next turn while pinned (connection-scoped caching: nothing to look up), and
(b) a reconnect that presents the 32k history, all of it cached on the GPU (a full
prefix hit), shown with and without the time spent hashing the history.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import numpy as np

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.scheduler.scheduler import SessionScheduler
from pagedkv.tiers.tiered import TieredKVCache

BS = 16


def make(num_blocks: int, max_pinned: int) -> SessionScheduler:
    hasher = BlockHasher(block_size=BS)
    cache = TieredKVCache(BlockManager(BlockPool(num_blocks), hasher), None, None)
    config = SchedulerConfig(max_pinned_sessions=max_pinned, high_watermark=1.0)
    return SessionScheduler(cache, config, clock=time.monotonic)


def turn(sched: SessionScheduler, sid: object, tokens: np.ndarray) -> None:
    sched.begin_turn(sid, tokens)
    sched.mark_computed(sid)
    sched.end_turn(sid)


def bench_sessions(num_sessions: int, num_turns: int) -> float:
    """Median µs per turn with `num_sessions` open pinned sessions."""
    sched = make(num_blocks=num_sessions * 4 + num_turns * 2 + 64, max_pinned=num_sessions)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 50_000, size=(num_sessions, 24), dtype=np.int32)
    for i in range(num_sessions):
        sched.open_session(i)
        turn(sched, i, first[i])
    new = rng.integers(0, 50_000, size=(num_turns, 16), dtype=np.int32)
    order = [random.Random(1).randrange(num_sessions) for _ in range(num_turns)]
    times = []
    for k, sid in enumerate(order):
        t0 = time.perf_counter()
        turn(sched, sid, new[k])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench_32k(repeats: int) -> dict[str, float]:
    n = 32768
    sched = make(num_blocks=4 * n // BS, max_pinned=4)
    hist = np.random.default_rng(2).integers(0, 50_000, size=n, dtype=np.int32)
    sched.open_session("long")
    turn(sched, "long", hist)
    extra = np.arange(16, dtype=np.int32)
    pinned = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        turn(sched, "long", extra)
        pinned.append(time.perf_counter() - t0)
    full = sched.cache.gpu.table("long").tokens.copy()
    sched.close_session("long")  # its blocks stay in the GPU hash cache
    resume, hashing = [], []
    hasher = sched.cache.gpu.hasher
    for i in range(repeats):
        sid = f"r{i}"
        t0 = time.perf_counter()
        plan = sched.resume(sid, full)
        sched.mark_computed(sid)
        sched.end_turn(sid)
        resume.append(time.perf_counter() - t0)
        assert plan is not None and plan.compute_start == len(full) - len(full) % BS - (
            BS if len(full) % BS == 0 else 0
        )
        sched.close_session(sid)
        t0 = time.perf_counter()
        hasher.hash_chain(hasher.root("default"), full, with_content=True)
        hashing.append(time.perf_counter() - t0)
    r, h = statistics.median(resume), statistics.median(hashing)
    return {
        "pinned_turn_us": statistics.median(pinned) * 1e6,
        "resume_us": r * 1e6,
        "resume_hash_us": h * 1e6,
        "resume_excl_hash_us": (r - h) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    turns = 300 if args.quick else 2000
    print(f"python {platform.python_version()}, {platform.machine()}")
    print("per-turn scheduler overhead (begin_turn + mark_computed + end_turn, 16 new tokens)")
    print(f"{'open sessions':>14} {'µs/turn':>9}")
    rows = {}
    for n in (10, 1_000, 100_000):
        rows[n] = bench_sessions(n, turns)
        print(f"{n:>14,} {rows[n]:>9.1f}")
    r = bench_32k(5 if args.quick else 15)
    print("\n32k-token session")
    print(f"  next turn while pinned (16 new tokens):        {r['pinned_turn_us']:8.1f} µs")
    print(f"  reconnect, full prefix hit on 2048 blocks:     {r['resume_us']:8.1f} µs")
    print(f"    of which hashing the 32k-token history:      {r['resume_hash_us']:8.1f} µs")
    print(f"    excluding hashing:                           {r['resume_excl_hash_us']:8.1f} µs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_turn_us": rows, "long_session": r}, f, indent=2)


if __name__ == "__main__":
    main()
