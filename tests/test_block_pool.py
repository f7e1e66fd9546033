"""BlockPool and BlockManager: behaviour, bad input, and regressions."""

from __future__ import annotations

import pytest

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.errors import InvariantError, OutOfBlocksError
from pagedkv.cache.hashing import BlockHasher
from pagedkv.cache.spec import KVSpec


def make(num_blocks: int = 8, bs: int = 4) -> BlockManager:
    return BlockManager(BlockPool(num_blocks), BlockHasher(block_size=bs, secret=b"s"))


def run_seq(m: BlockManager, seq_id: str, tokens: list[int], tenant: str = "default") -> None:
    m.add_sequence(seq_id, tenant=tenant)
    m.append_tokens(seq_id, tokens)
    m.mark_computed(seq_id)


def test_allocate_takes_uncached_before_cached_and_lru_order() -> None:
    m = make(6)
    run_seq(m, "a", list(range(8)))  # blocks 0, 1 full
    m.free_sequence("a")
    assert m.pool.num_cached == 2 and m.pool.num_free_uncached == 4
    assert m.pool.allocate(4) == [2, 3, 4, 5]  # uncached first: the cache survives
    assert m.num_cached_tokens(list(range(8))) == 8
    # tail-first release: block 1 (the descendant) is reclaimed before block 0
    assert m.pool.allocate(1) == [1]
    assert m.num_cached_tokens(list(range(8))) == 4


def test_cached_hit_is_taken_back_and_counts_as_computed() -> None:
    m = make(8)
    run_seq(m, "a", list(range(10)))
    m.free_sequence("a")
    m.add_sequence("b")
    r = m.append_tokens("b", list(range(10)), max_cached_tokens=9)
    assert r.num_cached_tokens == 8 and r.hit_block_ids == [0, 1]
    assert r.compute_start == 8 and r.slot_mapping.tolist() == [
        r.new_block_ids[0] * 4 + 0,
        r.new_block_ids[0] * 4 + 1,
    ]
    assert m.pool.num_cached == 0 and m.pool.refcount(0) == 1
    m.check_invariants()


def test_max_cached_tokens_keeps_last_token_to_compute() -> None:
    m = make(8)
    run_seq(m, "a", list(range(8)))
    m.add_sequence("b")
    r = m.append_tokens("b", list(range(8)), max_cached_tokens=7)
    assert r.num_cached_tokens == 4 and r.compute_start == 4
    m.add_sequence("c")
    assert m.append_tokens("c", list(range(8)), max_cached_tokens=0).num_cached_tokens == 0


def test_out_of_blocks_counts_cached_hits_as_unavailable() -> None:
    """Regression: a hit on a cached block must not also be counted as allocatable."""
    m = make(4)
    run_seq(m, "a", list(range(8)))  # blocks 0, 1
    m.free_sequence("a")  # both cached
    m.add_sequence("x")
    m.append_tokens("x", [9] * 8)  # blocks 2, 3 in use; only the 2 cached left
    m.add_sequence("b")
    before = (list(m.pool._ref), list(m.pool._lru), dict(m.pool._index))
    # b hits both cached blocks and needs 1 more: 2 available minus 2 hits = 0
    with pytest.raises(OutOfBlocksError, match="needs 1 new blocks, 0 available") as err:
        m.append_tokens("b", [*range(8), 5])
    assert err.value.needed == 1 and err.value.available == 0
    assert (list(m.pool._ref), list(m.pool._lru), dict(m.pool._index)) == before
    assert m.table("b").num_tokens == 0
    m.check_invariants()


def test_fork_shares_full_blocks_and_copies_partial() -> None:
    m = make(8)
    run_seq(m, "a", list(range(10)))
    r = m.fork("a", "b")
    assert r.shared_block_ids == [0, 1] and r.copy_src_block == 2
    assert r.copy_dst_block not in (0, 1, 2)
    assert m.pool.refcount(0) == 2 and m.pool.refcount(2) == 1
    m.append_tokens("b", [1, 2])
    assert m.table("a").tokens.tolist() == list(range(10))
    m.check_invariants()
    m.free_sequence("a")
    m.free_sequence("b")
    assert m.pool.num_in_use == 0
    m.check_invariants()


def test_duplicate_computation_is_deduplicated() -> None:
    m = make(8)
    for s in ("a", "b"):
        m.add_sequence(s)
        m.append_tokens(s, list(range(9)))
    m.mark_computed("a")
    m.mark_computed("b")
    assert m.table("b").block_ids[:2] == m.table("a").block_ids[:2]
    assert m.pool.num_in_use == 4  # 2 shared full + 2 private partial
    m.check_invariants()


def test_tenants_never_share() -> None:
    m = make(8)
    run_seq(m, "a", list(range(8)), tenant="acme")
    assert m.num_cached_tokens(list(range(8)), tenant="acme") == 8
    assert m.num_cached_tokens(list(range(8)), tenant="evil") == 0
    m.add_sequence("b", tenant="evil")
    assert m.append_tokens("b", list(range(8))).num_cached_tokens == 0


class CollidingHasher(BlockHasher):
    """Every block of every chain hashes to the same key: a worst-case collision."""

    def hash_content(self, content: bytes) -> bytes:
        return b"\0" * 16

    def hash_chain(self, parent, tokens, *, with_content=False):  # type: ignore[no-untyped-def]
        hashes, contents = super().hash_chain(parent, tokens, with_content=True)
        return [b"\0" * 16] * len(hashes), contents if with_content else []


def test_forced_collision_is_never_served() -> None:
    m = BlockManager(BlockPool(8), CollidingHasher(block_size=4, secret=b"s"))
    run_seq(m, "victim", [1, 2, 3, 4])
    assert m.num_cached_tokens([1, 2, 3, 4]) == 4  # the true content still hits
    assert m.num_cached_tokens([9, 9, 9, 9]) == 0  # same key, other tokens: a miss
    assert m.num_cached_tokens([1, 2, 3, 4], tenant="other") == 0  # same key, other tenant
    m.add_sequence("attacker")
    r = m.append_tokens("attacker", [9, 9, 9, 9])
    assert r.num_cached_tokens == 0 and r.hit_block_ids == []
    m.mark_computed("attacker")  # key taken: attacker's block stays private
    assert m.table("attacker").block_ids != m.table("victim").block_ids
    m.check_invariants(deep=False)


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (lambda p: p.allocate(-1), ValueError, "num must be an int >= 0, got -1"),
        (lambda p: p.release([3]), ValueError, "double free of block 3"),
        (lambda p: p.release([99]), ValueError, r"block id 99 out of range \[0, 8\)"),
        (lambda p: p.release(["1"]), TypeError, "block id must be an int"),
        (lambda p: p.acquire([5]), ValueError, "cannot acquire block 5: it is free"),
        (lambda p: p.release([0, 0]), ValueError, "released 2 times but referenced 1"),
        (lambda p: p.register(5, b"k"), ValueError, "not in use"),
        (lambda p: p.evict_block(0), ValueError, "not cached"),
        (lambda p: p.allocate(9), OutOfBlocksError, "need 9 blocks, only 7 available"),
    ],
)
def test_pool_bad_input_changes_nothing(call, exc, pattern) -> None:  # type: ignore[no-untyped-def]
    p = BlockPool(8)
    p.allocate(1)
    before = (list(p._ref), list(p._free), list(p._lru), dict(p._index))
    with pytest.raises(exc, match=pattern):
        call(p)
    assert (list(p._ref), list(p._free), list(p._lru), dict(p._index)) == before
    p.check_invariants()


def test_manager_bad_input() -> None:
    m = make()
    m.add_sequence("a")
    with pytest.raises(ValueError, match="already exists"):
        m.add_sequence("a")
    with pytest.raises(KeyError, match="unknown sequence id 'zz'"):
        m.append_tokens("zz", [1])
    with pytest.raises(ValueError, match="max_cached_tokens must be >= 0, got -1"):
        m.append_tokens("a", [1], max_cached_tokens=-1)
    m.append_tokens("a", [1, 2, 3])
    with pytest.raises(ValueError, match=r"num_tokens must be in \[0, 3\], got 4"):
        m.mark_computed("a", 4)
    with pytest.raises(ValueError, match="not yet computed"):
        m.fork("a", "b")
    with pytest.raises(TypeError, match="tenant must be a str"):
        m.add_sequence("c", tenant=3)  # type: ignore[arg-type]
    m.check_invariants()


def test_check_invariants_really_checks() -> None:
    m = make()
    run_seq(m, "a", list(range(9)))
    m.pool._ref[0] += 1  # corrupt a refcount
    with pytest.raises(InvariantError, match="refcount 2 != 1 holders"):
        m.check_invariants()
    m.pool._ref[0] -= 1
    m.pool._free.append(0)  # a block both free and in use
    with pytest.raises(InvariantError, match="two states"):
        m.check_invariants()


def test_kvspec() -> None:
    s = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    assert s.bytes_per_token == 128 * 1024  # Llama-3-8B: 128 KiB per token
    assert s.bytes_per_block == 16 * 128 * 1024
    assert s.num_blocks_for(17) == 2 and s.num_blocks_in(3 * s.bytes_per_block + 5) == 3
    with pytest.raises(ValueError, match=r"KVSpec.head_dim must be > 0, got 0"):
        KVSpec(num_layers=1, num_kv_heads=1, head_dim=0)
    with pytest.raises(ValueError, match=r"KVSpec\.dtype must be one of"):
        KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype="int4")
    with pytest.raises(TypeError, match=r"KVSpec\.block_size must be an int"):
        KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, block_size=16.0)  # type: ignore[arg-type]


class FirstBlockCollision(BlockHasher):
    """Real chained hashes, except that two different first blocks share one hash."""

    COLLIDING = ((1, 2, 3, 4), (9, 9, 9, 9))

    def hash_chain(self, parent, tokens, *, with_content=False):  # type: ignore[no-untyped-def]
        hashes, contents = super().hash_chain(parent, tokens, with_content=True)
        if len(tokens) >= 4 and tuple(int(t) for t in tokens[:4]) in self.COLLIDING:
            # re-chain from a colliding first hash
            hashes = [b"C" * 16]
            contents = [contents[0]]
            rest_h, rest_c = super().hash_chain(hashes[0], tokens[4:], with_content=True)
            hashes += rest_h
            contents += rest_c
        return hashes, contents if with_content else []

    def chain_contents(self, parent, tokens, hashes):  # type: ignore[no-untyped-def]
        return self.hash_chain(parent, tokens, with_content=True)[1]


def test_collision_breaks_the_chain_so_descendants_are_never_served() -> None:
    """Regression: with only block 0 colliding, the attacker's *later* blocks chain from
    the colliding hash; they must not be indexed, or a lookup of the victim's prefix
    plus the attacker's next block would be served the attacker's bytes."""
    m = BlockManager(BlockPool(8), FirstBlockCollision(block_size=4, secret=b"s"))
    run_seq(m, "victim", [1, 2, 3, 4])
    run_seq(m, "attacker", [9, 9, 9, 9, 5, 6, 7, 8])
    assert m.table("attacker").broken_at == 0
    assert m.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]) == m.table("victim").block_ids[:1]
    assert m.match_prefix([9, 9, 9, 9, 5, 6, 7, 8]) == []
    m.add_sequence("attacker2")  # a broken chain takes no hits later either
    m.append_tokens("attacker2", [9, 9, 9, 9])
    m.mark_computed("attacker2")
    assert m.table("attacker2").broken_at == 0
    m.check_invariants(deep=False)


def test_touch_moves_a_cached_block_to_the_recent_end_of_the_lru() -> None:
    p = BlockPool(4)
    ids = p.allocate(4)
    for i, b in enumerate(ids):
        p.register(b, bytes([i]))
    p.release(ids)  # LRU order: 0, 1, 2, 3 (0 is reclaimed first)
    p.touch([0, 2])  # used again: now 1, 3, 0, 2
    assert p.evict(2) == [1, 3]
    p.touch([0])  # in-use or free blocks are ignored, cached ones move
    assert p.evict(2) == [2, 0]
    with pytest.raises(ValueError, match="out of range"):
        p.touch([7])
    p.check_invariants()
