"""Two tiers under faults the happy-path tests do not reach: cancelling each kind of copy
while it is in flight, a completion check that raises (an asynchronous device error), an
inner engine that reports failures only once done, and misconfigured tiers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tier_helpers import SPEC, compute, make_cache, read_tokens

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.errors import OutOfBlocksError
from pagedkv.cache.hashing import BlockHasher
from pagedkv.tiers import Backup, TieredKVCache
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.transfer import (
    CopyTransferEngine,
    Direction,
    FaultInjectingEngine,
    TransferEngine,
    TransferHandle,
)

TOKENS = list(range(50, 64))  # 3 full blocks of 4 and a partial one


def filled(cache: TieredKVCache, store: KVStore, seq_id: str, tokens: list[int]) -> torch.Tensor:
    """Begin `seq_id` on the GPU with random K/V for every token; returns that K/V."""
    cache.begin_sequence(seq_id, tokens)
    compute(cache, store, seq_id, torch.Generator().manual_seed(len(seq_id)))
    t = cache.gpu.table(seq_id)
    return read_tokens(store, t.block_ids, t.num_tokens)


def test_cancelled_offload_rolls_back_and_keeps_nothing_it_copied() -> None:
    cache, gpu, _host = make_cache(num_gpu=8, num_host=8)
    kv = filled(cache, gpu, "a", TOKENS)
    cache.offload("a")
    cache.cancel("a")
    (r,) = cache.poll()
    assert not r.ok and r.failed_blocks == [0, 1, 2, 3] and r.num_blocks_copied == 0
    assert r.valid_tokens == 0 and cache.location("a") == "gpu"
    assert cache.host.num_cached_tokens(TOKENS) == 0  # nothing from the cancelled copy
    assert cache.host.pool.num_in_use == 0
    t = cache.gpu.table("a")
    assert torch.equal(read_tokens(gpu, t.block_ids, t.num_tokens), kv)
    cache.check_invariants()


def test_cancelled_restore_leaves_everything_to_recompute() -> None:
    cache, gpu, _host = make_cache(num_gpu=8, num_host=8)
    filled(cache, gpu, "a", TOKENS)
    cache.offload("a")
    cache.wait_all()
    cache.gpu.pool.evict(cache.gpu.pool.num_cached)
    cache.restore("a")
    cache.cancel("a")
    r = cache.wait("a")
    assert r is not None and not r.ok and r.valid_tokens == 0
    assert r.failed_blocks == [0, 1, 2, 3] and r.num_blocks_copied == 0
    t = cache.gpu.table("a")
    assert t.num_computed_tokens == 0 and t.num_tokens == len(TOKENS)
    assert cache.gpu.num_cached_tokens(TOKENS) == 0  # no restored block is findable
    assert cache.location("a") == "gpu" and "a" not in cache.host
    cache.check_invariants()


def test_cancelled_backup_makes_nothing_findable_and_releases_its_sources() -> None:
    cache, gpu, _host = make_cache(num_gpu=8, num_host=8)
    filled(cache, gpu, "a", TOKENS)
    refs = [cache.gpu.pool.refcount(b) for b in cache.gpu.table("a").block_ids]
    assert cache.backup("a") is not None
    cache.cancel(Backup("a"))
    (r,) = cache.poll()
    assert r.backup and not r.ok and r.valid_tokens == 0 and r.failed_blocks == [0, 1, 2]
    assert cache.host.num_cached_tokens(TOKENS) == 0 and cache.host.pool.num_in_use == 0
    assert [cache.gpu.pool.refcount(b) for b in cache.gpu.table("a").block_ids] == refs
    cache.check_invariants()


class _RaisingEngine(TransferEngine):
    """Copies through `inner`; the completion check of the handles listed in `broken`
    raises, as a CUDA event query does after an asynchronous device error."""

    def __init__(self, inner: TransferEngine) -> None:
        self.inner = inner
        self.broken: set[int] = set()
        self.submitted: list[TransferHandle] = []

    def submit(
        self, direction: Direction, src_ids: list[int], dst_ids: list[int]
    ) -> TransferHandle:
        inner = self.inner.submit(direction, src_ids, dst_ids)
        index = len(self.submitted)

        def check() -> bool:
            if index in self.broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return inner.done()

        def wait() -> None:
            check()

        handle = TransferHandle(direction, list(src_ids), list(dst_ids), _poll=check, _wait=wait)
        self.submitted.append(handle)
        return handle


@pytest.mark.parametrize("how", ["poll", "wait"])
def test_a_completion_check_that_raises_fails_that_copy_only(how: str) -> None:
    cache, gpu, _host = make_cache(num_gpu=16, num_host=16, wrap=_RaisingEngine)
    engine = cache.engine
    assert isinstance(engine, _RaisingEngine)
    filled(cache, gpu, "a", TOKENS)
    filled(cache, gpu, "b", [7, *TOKENS])
    cache.offload("a")
    cache.offload("b")
    engine.broken.add(0)  # a's copy
    results = {r.seq_id: r for r in (cache.poll() if how == "poll" else cache.wait_all())}
    assert not results["a"].ok and results["a"].valid_tokens == 0
    assert isinstance(engine.submitted[0].error, RuntimeError)
    assert cache.location("a") == "gpu"  # rolled back, K/V intact on the GPU
    assert results["b"].ok and cache.location("b") == "host"
    assert cache.host.num_cached_tokens(TOKENS) == 0  # nothing of the failed copy
    cache.check_invariants()


class _LateFailureEngine(TransferEngine):
    """Copies through `inner` but reports pair 0 failed, and only once the copy is done."""

    def __init__(self, inner: TransferEngine) -> None:
        self.inner = inner

    def submit(
        self, direction: Direction, src_ids: list[int], dst_ids: list[int]
    ) -> TransferHandle:
        inner = self.inner.submit(direction, src_ids, dst_ids)
        handle = TransferHandle(direction, list(src_ids), list(dst_ids))

        def done() -> bool:
            if inner.done():
                handle.failed = {0} if src_ids else set()
                return True
            return False

        def wait() -> None:
            inner.wait()
            done()

        handle._poll, handle._wait = done, wait
        return handle


def test_fault_injector_reports_what_the_inner_engine_finds_at_completion() -> None:
    def late(gpu: KVStore, host: KVStore) -> TransferEngine:
        return _LateFailureEngine(CopyTransferEngine(gpu, host))

    gpu_store = KVStore(SPEC, 8, fill=float("nan"))
    host_store = KVStore(SPEC, 8, fill=float("nan"))
    engine = FaultInjectingEngine(late(gpu_store, host_store), lambda d, s, t: False)
    hasher = BlockHasher(block_size=SPEC.block_size, secret=b"test")
    cache = TieredKVCache(
        BlockManager(BlockPool(8, name="gpu"), hasher),
        BlockManager(BlockPool(8, name="host"), hasher),
        engine,
    )
    filled(cache, gpu_store, "a", TOKENS)
    cache.offload("a")
    (r,) = cache.wait_all()
    assert not r.ok and r.failed_blocks == [0, 1, 2, 3] and cache.location("a") == "gpu"
    cache.check_invariants()


def test_stores_of_another_block_size_or_too_few_blocks_are_refused() -> None:
    hasher = BlockHasher(block_size=4, secret=b"t")
    gpu = BlockManager(BlockPool(8, name="gpu"), hasher)
    spec8 = replace(SPEC, block_size=8)
    engine = FaultInjectingEngine(
        CopyTransferEngine(KVStore(spec8, 8), KVStore(spec8, 8)), lambda d, s, t: False
    )
    with pytest.raises(ValueError, match="gpu manager has block_size 4 but the engine's gpu store"):
        TieredKVCache(gpu, BlockManager(BlockPool(8, name="host"), hasher), engine)
    small = FaultInjectingEngine(
        CopyTransferEngine(KVStore(SPEC, 4), KVStore(SPEC, 8)), lambda d, s, t: False
    )  # a wrapped engine's stores are checked too
    with pytest.raises(ValueError, match="gpu pool has 8 blocks but the engine's gpu store"):
        TieredKVCache(gpu, BlockManager(BlockPool(8, name="host"), hasher), small)


def test_a_full_host_tier_is_named_and_nothing_changes() -> None:
    cache, gpu, _host = make_cache(num_gpu=8, num_host=2)
    filled(cache, gpu, "a", TOKENS)
    for call in (lambda: cache.offload("a"), lambda: cache.backup("a")):
        with pytest.raises(OutOfBlocksError, match="'a': the host tier is full") as info:
            call()
        assert info.value.needed > info.value.available
        assert cache.location("a") == "gpu" and not list(cache.host.sequences())
        cache.check_invariants()


@pytest.mark.parametrize("direction", ["offload", "restore"])
def test_a_sequence_with_a_copy_in_flight_cannot_grow_or_be_freed_under_it(
    direction: str,
) -> None:
    cache, gpu, _host = make_cache(num_gpu=8, num_host=8)
    filled(cache, gpu, "a", TOKENS)
    if direction == "restore":
        cache.offload("a")
        cache.wait_all()
        cache.gpu.pool.evict(cache.gpu.pool.num_cached)
        cache.restore("a")
    else:
        cache.offload("a")
    table_before = list(cache.gpu.table("a").tokens)
    with pytest.raises(ValueError, match=f"append_token 'a': its {direction} copy is in flight"):
        cache.gpu.append_token("a", 5)
    with pytest.raises(ValueError, match=f"append_tokens 'a': its {direction} copy is in flight"):
        cache.gpu.append_tokens("a", [5, 6])
    with pytest.raises(ValueError, match=f"free_sequence 'a': its {direction} copy is in flight"):
        cache.gpu.free_sequence("a")
    assert list(cache.gpu.table("a").tokens) == table_before
    cache.check_invariants()
    (r,) = cache.wait_all()
    assert r.ok
    if direction == "restore":  # usable again once the copy is committed
        cache.gpu.append_token("a", 5)
    cache.check_invariants()
