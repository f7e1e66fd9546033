"""Two tiers on CPU tensors: offload / restore round trips, sharing, faults, deferral."""

from __future__ import annotations

import pytest
import torch
from tier_helpers import compute, make_cache, read_tokens

from pagedkv.cache.errors import OutOfBlocksError
from pagedkv.tiers.transfer import CopyTransferEngine, FaultInjectingEngine, SimulatedTransferEngine


def test_round_trip_bit_exact_with_sharing_and_partial_blocks() -> None:
    cache, gpu, _host = make_cache(num_gpu=16, num_host=16)
    gen = torch.Generator().manual_seed(0)
    common = list(range(100, 108))  # two full blocks shared by both sessions
    cache.begin_sequence("a", [*common, 1, 2, 3, 4, 5])  # partial last block (1 token)
    compute(cache, gpu, "a", gen)
    cache.begin_sequence("b", [*common, 9, 9])
    compute(cache, gpu, "b", gen)
    assert cache.gpu.table("b").block_ids[:2] == cache.gpu.table("a").block_ids[:2]
    before = {
        s: read_tokens(gpu, cache.gpu.table(s).block_ids, cache.gpu.table(s).num_tokens)
        for s in "ab"
    }
    old_ids = {s: list(cache.gpu.table(s).block_ids) for s in "ab"}

    cache.offload("a")
    cache.offload("b")  # a's host copies are not findable while in flight: b copies all
    results = cache.wait_all()
    assert [r.ok for r in results] == [True, True]
    assert [r.num_blocks_copied for r in results] == [4, 3]
    for s in "ab":  # again, one after the other
        cache.restore(s)
        cache.wait(s)
    cache.offload("a")
    cache.wait("a")
    cache.offload("b")
    results = [cache.wait("b")]
    assert results[0] is not None and results[0].ok
    # b's shared prefix was already on the host: only its own tail block was copied
    assert [r.num_blocks_copied for r in results] == [1]  # type: ignore[union-attr]
    assert cache.location("a") == cache.location("b") == "host"
    assert cache.cached_prefix([*common, 9, 9, 1, 1]) == (8, 0)  # GPU copies still cached

    cache.gpu.pool.evict(cache.gpu.pool.num_cached)  # reclaim the GPU copies
    gpu.kv.fill_(float("nan"))  # overwrite the whole GPU pool
    squatters = cache.gpu.pool.allocate(3)  # occupy low ids so the restore lands elsewhere
    assert cache.cached_prefix([*common, 9, 9, 1, 1]) == (0, 8)  # now only on the host

    for s in "ab":
        plan = cache.restore(s)
        # b finds the common prefix that a's restore just brought back to the GPU
        assert plan.pending and plan.num_gpu_cached_tokens == {"a": 0, "b": 8}[s]
        (r,) = [cache.wait(s)]
        assert r is not None and r.ok and r.valid_tokens == cache.gpu.table(s).num_tokens
    for s in "ab":
        t = cache.gpu.table(s)
        assert t.block_ids != old_ids[s] and set(t.block_ids).isdisjoint(squatters)
        after = read_tokens(gpu, t.block_ids, t.num_tokens)
        assert torch.equal(after.view(torch.int32), before[s].view(torch.int32))  # bit-exact
    assert cache.gpu.table("a").block_ids[:2] == cache.gpu.table("b").block_ids[:2]
    cache.gpu.pool.release(squatters)
    cache.check_invariants()


def test_begin_sequence_uses_gpu_then_host_hits_and_reports_them() -> None:
    cache, gpu, _host = make_cache(num_gpu=12, num_host=12)
    gen = torch.Generator().manual_seed(1)
    tokens = list(range(16))  # 4 full blocks
    cache.begin_sequence("a", tokens)
    compute(cache, gpu, "a", gen)
    kv = read_tokens(gpu, cache.gpu.table("a").block_ids, 16)
    cache.offload("a")
    cache.wait_all()
    cache.drop_offloaded("a")  # only hash-cache entries remain, on both tiers
    cache.gpu.pool.evict(2)  # reclaim the two tail blocks on the GPU (tail-first order)
    plan = cache.begin_sequence("b", [*tokens, 50], max_cached_tokens=16)
    assert (plan.num_gpu_cached_tokens, plan.num_host_cached_tokens) == (8, 8)
    assert plan.compute_start == 16 and len(plan.slot_mapping) == 1 and plan.pending
    r = cache.wait("b")
    assert r is not None and r.ok and r.valid_tokens == 16
    assert torch.equal(read_tokens(gpu, cache.gpu.table("b").block_ids, 16), kv)
    cache.check_invariants()
    # another tenant with the same tokens gets nothing from either tier
    assert cache.cached_prefix(tokens, tenant="other") == (0, 0)


def test_failed_offload_keeps_gpu_copy_and_good_host_prefix() -> None:
    fail_dst: set[int] = set()
    cache, gpu, _host = make_cache(
        num_gpu=8, num_host=8, wrap=FaultInjectingEngine,
        fail=lambda d, s, t: d == "offload" and t in fail_dst,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    cache.begin_sequence("a", list(range(14)))
    compute(cache, gpu, "a", gen)
    fail_dst.add(2)  # the third host block (the third block of "a") fails to copy
    cache.offload("a")
    (r,) = cache.wait_all()
    # block 2 failed; block 3 moved but sits past the gap: both are reported, 2 kept
    assert not r.ok and r.failed_blocks == [2, 3] and r.valid_tokens == 0
    assert r.num_blocks_copied == 2
    assert cache.location("a") == "gpu"  # rolled back: the session is intact on the GPU
    assert cache.host.pool.num_in_use == 0
    assert cache.host.num_cached_tokens(list(range(14))) == 8  # good prefix is findable
    cache.check_invariants()


def test_failed_restore_reports_valid_prefix_and_never_serves_garbage() -> None:
    fail_src: set[int] = set()
    cache, gpu, _host = make_cache(
        num_gpu=8, num_host=8, wrap=FaultInjectingEngine,
        fail=lambda d, s, t: d == "restore" and s in fail_src,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    cache.begin_sequence("a", list(range(14)))
    compute(cache, gpu, "a", gen)
    cache.offload("a")
    cache.wait_all()
    cache.gpu.pool.evict(cache.gpu.pool.num_cached)
    fail_src.add(cache.host.table("a").block_ids[1])
    cache.restore("a")
    r = cache.wait("a")
    assert r is not None and not r.ok and r.failed_blocks == [1, 2, 3] and r.valid_tokens == 4
    assert r.num_blocks_copied == 1
    t = cache.gpu.table("a")
    assert t.num_computed_tokens == 4 and t.num_tokens == 14
    # the un-restored blocks are not findable on the GPU; the caller recomputes from 4
    assert cache.gpu.num_cached_tokens(list(range(14))) == 4
    assert len(cache.gpu.slot_mapping("a", 4, 14)) == 10
    cache.check_invariants()


def test_out_of_host_blocks_changes_nothing() -> None:
    cache, gpu, _host = make_cache(num_gpu=8, num_host=2)
    cache.begin_sequence("a", list(range(13)))
    compute(cache, gpu, "a", torch.Generator().manual_seed(4))
    with pytest.raises(OutOfBlocksError, match="4 new blocks, 2 available"):
        cache.offload("a")
    assert cache.location("a") == "gpu" and len(cache.host) == 0
    cache.check_invariants()


def test_free_during_transfer_is_deferred_and_leaks_nothing() -> None:
    now = [0.0]
    cache, _gpu, _host = make_cache(num_gpu=8, num_host=8)
    cache.engine = SimulatedTransferEngine(
        bytes_per_block=1000, bandwidth_bytes_per_s=1e6, latency_s=0.0, clock=lambda: now[0]
    )
    cache.begin_sequence("a", list(range(9)))
    cache.gpu.mark_computed("a")
    h = cache.offload("a")
    assert h.ready_at == pytest.approx(3e-3) and cache.location("a") == "offloading"
    cache.free("a")
    assert cache.poll() == [] and cache.gpu.pool.num_in_use == 3  # still held by the copy
    now[0] = 1.0
    (r,) = cache.poll()
    assert r.ok and cache.location("a") is None
    assert cache.gpu.pool.num_in_use == cache.host.pool.num_in_use == 0
    assert cache.host.num_cached_tokens(list(range(9))) == 8
    cache.check_invariants()


def test_bad_calls() -> None:
    cache, _gpu, _host = make_cache(num_gpu=4, num_host=4)
    cache.begin_sequence("a", [1, 2, 3])
    with pytest.raises(ValueError, match="not computed yet"):
        cache.offload("a")
    with pytest.raises(ValueError, match="already exists"):
        cache.begin_sequence("a", [1])
    with pytest.raises(ValueError, match="expected an offloaded sequence, it is at 'gpu'"):
        cache.restore("a")
    with pytest.raises(ValueError, match="no transfer in flight"):
        cache.cancel("a")
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.free("zz")
    with pytest.raises(OutOfBlocksError):
        cache.begin_sequence("b", list(range(20)))
    assert cache.location("b") is None
    cache.check_invariants()


def test_host_blocks_of_an_in_flight_restore_cannot_be_reclaimed() -> None:
    """Regression: a resume's host blocks stay referenced until its copy completes."""
    from sched_helpers import Clock
    from tier_helpers import DeferredCopyEngine

    clock = Clock()
    cache, gpu, host = make_cache(num_gpu=8, num_host=8)
    cache.engine = DeferredCopyEngine(gpu, host, clock, delay=1.0)
    gen = torch.Generator().manual_seed(5)
    tokens = list(range(12))
    cache.begin_sequence("a", tokens)
    compute(cache, gpu, "a", gen)
    want = read_tokens(gpu, cache.gpu.table("a").block_ids, 12)
    cache.offload("a")
    clock.now = 1.0
    cache.poll()
    cache.drop_offloaded("a")  # host blocks cached, refcount 0
    cache.gpu.pool.evict(100)
    plan = cache.begin_sequence("b", [*tokens, 7], max_cached_tokens=12)
    assert plan.pending and plan.num_host_cached_tokens == 12
    # memory pressure on the host while the copy is in flight: nothing reclaimable
    assert cache.host.pool.evict(100) == []
    cache.check_invariants()
    clock.now = 2.0
    (r,) = cache.poll()
    assert r.ok and r.valid_tokens == 12
    assert torch.equal(read_tokens(gpu, cache.gpu.table("b").block_ids, 12), want)
    assert len(cache.host.pool.evict(100)) == 3  # released after completion
    cache.check_invariants()


def test_engine_that_raises_leaves_both_tiers_as_they_were() -> None:
    class Broken(CopyTransferEngine):
        def submit(self, direction, src_ids, dst_ids):  # type: ignore[no-untyped-def]
            raise RuntimeError("DMA engine on fire")

    cache, gpu, host = make_cache(num_gpu=8, num_host=8)
    cache.begin_sequence("a", list(range(9)))
    compute(cache, gpu, "a", torch.Generator().manual_seed(6))
    cache.engine = Broken(gpu, host)
    with pytest.raises(RuntimeError, match="on fire"):
        cache.offload("a")
    assert cache.location("a") == "gpu" and len(cache.host) == 0
    assert cache.host.pool.num_in_use == 0
    cache.check_invariants()


def test_pool_larger_than_its_store_is_refused() -> None:
    from tier_helpers import SPEC

    from pagedkv.cache.block_manager import BlockManager
    from pagedkv.cache.block_pool import BlockPool
    from pagedkv.cache.hashing import BlockHasher
    from pagedkv.tiers.kv_store import KVStore
    from pagedkv.tiers.tiered import TieredKVCache

    hasher = BlockHasher(block_size=SPEC.block_size)
    engine = CopyTransferEngine(KVStore(SPEC, 4), KVStore(SPEC, 4))
    with pytest.raises(
        ValueError, match="gpu pool has 8 blocks but the engine's gpu store holds only 4"
    ):
        TieredKVCache(
            BlockManager(BlockPool(8), hasher), BlockManager(BlockPool(4), hasher), engine
        )


def test_backup_keeps_the_sequence_on_gpu_and_makes_offload_copy_only_the_tail() -> None:
    from pagedkv.tiers import Backup

    cache, gpu, _host = make_cache(num_gpu=12, num_host=12)
    gen = torch.Generator().manual_seed(7)
    cache.begin_sequence("a", list(range(14)))  # 3 full blocks + 2 tokens
    compute(cache, gpu, "a", gen)
    kv = read_tokens(gpu, cache.gpu.table("a").block_ids, 14)
    h = cache.backup("a")
    assert h is not None and h.num_blocks == 3  # the partial last block is not backed up
    assert cache.location("a") == "gpu" and cache.is_pending(Backup("a"))
    with pytest.raises(ValueError, match="already in flight"):
        cache.backup("a")
    (r,) = cache.poll()
    assert r.seq_id == Backup("a") and r.ok and r.valid_tokens == 12
    assert cache.host.pool.num_in_use == 0 and cache.host.pool.num_cached == 3
    assert cache.backup("a") is None  # nothing new to copy
    # the session grew by a turn; an offload now copies only the blocks not backed up
    cache.gpu.append_tokens("a", [90, 91, 92])
    compute(cache, gpu, "a", gen)
    kv = read_tokens(gpu, cache.gpu.table("a").block_ids, 17)
    cache.offload("a")
    (r,) = cache.wait_all()
    assert r.ok and r.num_blocks_copied == 2
    cache.gpu.pool.evict(cache.gpu.pool.num_cached)
    gpu.kv.fill_(float("nan"))
    cache.restore("a")
    cache.wait("a")
    t = cache.gpu.table("a")
    assert torch.equal(read_tokens(gpu, t.block_ids, 17).view(torch.int32), kv.view(torch.int32))
    cache.check_invariants()


def test_backup_source_blocks_survive_a_free_and_a_failed_copy_keeps_the_good_prefix() -> None:
    from tier_helpers import DeferredCopyEngine

    from pagedkv.tiers import Backup

    now = [0.0]
    cache, gpu, host = make_cache(num_gpu=6, num_host=8)
    cache.engine = DeferredCopyEngine(gpu, host, lambda: now[0], delay=1.0)
    gen = torch.Generator().manual_seed(8)
    tokens = list(range(16))
    cache.begin_sequence("a", tokens)
    compute(cache, gpu, "a", gen)
    kv = read_tokens(gpu, cache.gpu.table("a").block_ids, 16)
    cache.backup("a")
    cache.free("a")  # the session goes away while its backup is in flight
    assert cache.location("a") is None and cache.gpu.pool.num_in_use == 4  # held by the copy
    with pytest.raises(OutOfBlocksError):
        cache.gpu.pool.allocate(3)  # the sources cannot be reused before the copy is done
    cache.check_invariants()
    now[0] = 2.0
    (r,) = cache.poll()
    assert r.ok and cache.gpu.pool.num_in_use == 0 and cache.host.pool.num_in_use == 0
    cache.gpu.pool.evict(cache.gpu.pool.num_cached)
    gpu.kv.fill_(float("nan"))
    plan = cache.begin_sequence("b", [*tokens, 1])
    assert plan.num_host_cached_tokens == 16
    cache.wait("b")
    assert torch.equal(read_tokens(gpu, cache.gpu.table("b").block_ids, 16), kv)
    cache.free("b")
    # a failing copy: only the good prefix becomes findable, and nothing leaks
    cache2, gpu2, _host2 = make_cache(
        num_gpu=8, num_host=8, wrap=FaultInjectingEngine,
        fail=lambda d, s, t: d == "offload" and t == 2,
    )  # fmt: skip
    cache2.begin_sequence("c", tokens)
    compute(cache2, gpu2, "c", gen)
    cache2.backup("c")
    (r,) = cache2.wait_all()
    assert r.seq_id == Backup("c") and not r.ok and r.failed_blocks == [2, 3]
    assert r.valid_tokens == 8 and cache2.host.num_cached_tokens(tokens) == 8
    assert cache2.location("c") == "gpu" and cache2.host.pool.num_in_use == 0
    cache2.check_invariants()


def test_backup_bad_calls_change_nothing() -> None:
    cache, gpu, _host = make_cache(num_gpu=8, num_host=2)
    with pytest.raises(ValueError, match="expected a sequence on the GPU"):
        cache.backup("nobody")
    cache.begin_sequence("a", list(range(13)))
    assert cache.backup("a") is None  # nothing computed yet: nothing to back up
    compute(cache, gpu, "a", torch.Generator().manual_seed(9))
    with pytest.raises(OutOfBlocksError):
        cache.backup("a")  # 3 full blocks, 2 host blocks
    assert cache.location("a") == "gpu" and len(cache.host) == 0
    assert cache.host.pool.num_in_use == 0
    cache.check_invariants()
    no_host, _g, _h = make_cache(num_gpu=4, num_host=4)
    no_host.host = None
    with pytest.raises(ValueError, match="no host tier"):
        no_host.backup("a")


def test_backup_copies_only_computed_full_blocks() -> None:
    cache, _gpu, _host = make_cache(num_gpu=8, num_host=8)
    cache.begin_sequence("a", list(range(14)))  # 3 full blocks + 2 tokens
    cache.gpu.mark_computed("a", 9)  # 2 full blocks computed so far
    t = cache.gpu.table("a")
    assert t.num_full_blocks == 3 and t.num_cacheable_blocks == 2
    h = cache.backup("a")
    assert h is not None and h.num_blocks == 2
    cache.wait_all()
    assert cache.host.num_cached_tokens(list(range(14))) == 8
    cache.check_invariants()
