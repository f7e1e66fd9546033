"""The remote tier's write path: snapshots into reusable value buffers, queued a
pipeline at a time. What is written is the block as it was when `write_behind`
returned, a buffer is never reused while its value may be in flight, and the free list
stays bounded and is given back when idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from redis_helpers import RedisProcess
from tier_helpers import SPEC

from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.remote import MemoryStore, RedisStore, RemoteKVTier, RemoteStore, Value

NUM_BLOCKS = 16


class GatedStore(MemoryStore):
    """A `MemoryStore` whose writes wait for `gate` once it is closed; every value is
    checked to be unchanged from the moment the write started to the moment it is
    stored (a reused buffer would change under it)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set by every write on entry
        self.changed_in_flight = 0
        self.calls = 0

    def set_many(self, items: Sequence[tuple[bytes, Value]], ttl_s: float | None) -> None:
        before = [bytes(v) for _, v in items]
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        self.changed_in_flight += sum(
            bytes(v) != b for (_, v), b in zip(items, before, strict=True)
        )
        super().set_many(items, ttl_s)


def make_tier(store: RemoteStore, **kw: object) -> tuple[RemoteKVTier, KVStore]:
    host = KVStore(SPEC, NUM_BLOCKS, fill=0.0)
    return RemoteKVTier(store, host, ttl_s=None, **kw), host  # type: ignore[arg-type]


def fill(host: KVStore, block_ids: Sequence[int], seed: int) -> dict[int, bytes]:
    """Random bytes into these host blocks; returns each block's bytes."""
    gen = torch.Generator().manual_seed(seed)
    for b in block_ids:
        host.kv[b] = torch.randn(host.kv[b].shape, generator=gen)
    return {b: host.kv[b].numpy().tobytes() for b in block_ids}


def chain(tag: int, num: int) -> tuple[list[bytes], list[bytes]]:
    """`num` distinct (hash, content) pairs; `tag` keeps rounds apart."""
    hashes = [tag.to_bytes(8, "little") + i.to_bytes(8, "little") for i in range(num)]
    return hashes, [h + b"t" * 16 for h in hashes]


def stored_payload(tier: RemoteKVTier, store: MemoryStore, h: bytes, content: bytes) -> bytes:
    payload = tier.decode(store.data[tier.key(h)], content)
    assert payload is not None, "the stored value does not verify"
    return bytes(payload)


def test_the_snapshot_taken_before_write_behind_returns_is_what_is_written() -> None:
    store = GatedStore()
    tier, host = make_tier(store, write_batch=1)
    ids = [0, 1, 2]
    want = fill(host, ids, seed=0)
    hashes, contents = chain(0, 3)
    store.gate.clear()
    assert tier.write_behind(ids, hashes, contents) == 3
    host.kv[ids] = float("nan")  # the blocks are reused at once: nothing may read them
    store.gate.set()
    assert tier.flush()
    for b, h, c in zip(ids, hashes, contents, strict=True):
        assert stored_payload(tier, store, h, c) == want[b]
    assert store.changed_in_flight == 0 and tier.stats.blocks_written == 3
    tier.close()


def test_a_buffer_is_never_reused_while_its_value_is_in_flight() -> None:
    store = GatedStore()
    tier, host = make_tier(store, write_batch=2, max_pending_blocks=256)
    warm_ids = list(range(8))
    fill(host, warm_ids, seed=1)
    store.gate.clear()  # all 8 in flight at once: 8 buffers (else sent ones are reused)
    assert tier.write_behind(warm_ids, *chain(99, 8)) == 8
    store.gate.set()
    assert tier.flush()
    value_len = tier.value_len(chain(0, 1)[1][0])
    assert tier._free_bytes == 8 * value_len  # sent: every buffer back on the free list
    store.gate.clear()  # from now on the first batch is stuck in flight, the rest queued
    want: dict[bytes, tuple[bytes, bytes]] = {}
    for r in range(6):  # rounds of snapshots, each of blocks overwritten since the last
        ids = [2 * r, 2 * r + 1, 2 * r + 2]
        data = fill(host, ids, seed=100 + r)
        hashes, contents = chain(r, 3)
        assert tier.write_behind(ids, hashes, contents) == 3
        want.update({h: (c, data[b]) for b, h, c in zip(ids, hashes, contents, strict=True)})
        if r == 0:
            assert store.entered.wait(5)
    assert tier._free_bytes == 0  # the 8 free buffers were taken, then new ones made
    store.gate.set()
    assert tier.flush()
    assert store.changed_in_flight == 0
    for h, (c, payload) in want.items():
        assert stored_payload(tier, store, h, c) == payload
    assert tier.stats.blocks_written == 8 + 18 and tier.stats.blocks_dropped == 0
    tier.close()


def test_sent_buffers_are_reused_bounded_and_given_back_when_idle() -> None:
    store = GatedStore()
    tier, host = make_tier(store, write_batch=1, max_pending_blocks=4)
    value_len = tier.value_len(chain(0, 1)[1][0])
    assert tier._pool_limit == 4 * tier._per_block_bytes
    fill(host, range(4), seed=2)
    store.gate.clear()  # all 4 in flight at once: 4 buffers
    assert tier.write_behind([0, 1, 2, 3], *chain(0, 4)) == 4
    assert tier._free_bytes == 0
    store.gate.set()
    assert tier.flush() and tier._free_bytes == 4 * value_len
    store.gate.clear()
    assert tier.write_behind([0, 1, 2], *chain(1, 3)) == 3
    assert tier._free_bytes == 1 * value_len  # three taken from the free list, none new
    store.gate.set()
    assert tier.flush() and tier._free_bytes == 4 * value_len
    for r in range(2, 6):  # never more than the queue's bound is kept
        tier.write_behind([0, 1, 2, 3], *chain(r, 4))
        assert tier.flush() and tier._free_bytes <= tier._pool_limit
    tier._pool_idle_s = 0.05  # read by the writer each time it waits for work
    tier.write_behind([0], *chain(9, 1))
    assert tier.flush()
    deadline = time.monotonic() + 5
    while tier._free_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tier._free_bytes == 0 and tier._free_buffers == {}
    tier.close()


def test_a_store_that_keeps_views_keeps_its_bytes() -> None:
    """Against the contract (copy what you keep), a store keeps slices of the values:
    those buffers are not reused, so what it kept never changes."""

    class Keeping(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.kept: dict[bytes, memoryview] = {}
            self.views: list[Value] = []

        def set_many(self, items: Sequence[tuple[bytes, Value]], ttl_s: float | None) -> None:
            self.kept.update((k, memoryview(v)[:]) for k, v in items)
            self.views.extend(v for _, v in items)  # the very views: released after the call

    store = Keeping()
    tier, host = make_tier(store, write_batch=1)
    first = fill(host, [0, 1], seed=3)
    hashes, contents = chain(0, 2)
    assert tier.write_behind([0, 1], hashes, contents) == 2 and tier.flush()
    assert tier._free_bytes == 0  # still referenced: not reused
    fill(host, [0, 1], seed=4)
    assert tier.write_behind([0, 1], *chain(1, 2)) == 2 and tier.flush()
    for b, h, c in zip([0, 1], hashes, contents, strict=True):
        payload = tier.decode(bytes(store.kept[tier.key(h)]), c)
        assert payload is not None and bytes(payload) == first[b]
    assert len(store.views) == 4
    for view in store.views:  # a view kept as it was fails loudly, never reads reused bytes
        with pytest.raises(ValueError, match="released memoryview"):
            bytes(view)
    tier.close()


def test_a_batch_is_sent_while_the_next_is_snapshot() -> None:
    store = MemoryStore()
    tier, host = make_tier(store, write_batch=2)
    fill(host, range(4), seed=5)
    sent_before_last: list[bool] = []
    encode_into = tier._encode_into

    def slow_last(buf: bytearray, block_id: int, content: bytes) -> memoryview:
        if block_id == 3:  # the last block of the second batch: the first is on its way
            deadline = time.monotonic() + 5
            while store.round_trips == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            sent_before_last.append(store.round_trips == 1)
        return encode_into(buf, block_id, content)

    tier._encode_into = slow_last  # type: ignore[method-assign]
    assert tier.write_behind([0, 1, 2, 3], *chain(0, 4)) == 4 and tier.flush()
    assert sent_before_last == [True] and store.round_trips == 2
    assert tier.stats.blocks_written == 4
    tier.close()


def test_a_snapshot_that_fails_drops_what_was_not_queued() -> None:
    store = MemoryStore()
    tier, host = make_tier(store, write_batch=2)
    want = fill(host, range(5), seed=6)
    encode_into = tier._encode_into

    def failing(buf: bytearray, block_id: int, content: bytes) -> memoryview:
        if block_id == 3:
            raise RuntimeError("snapshot failed")
        return encode_into(buf, block_id, content)

    tier._encode_into = failing  # type: ignore[method-assign]
    hashes, contents = chain(0, 5)
    with pytest.raises(RuntimeError, match="snapshot failed"):
        tier.write_behind(range(5), hashes, contents)
    assert tier.flush()  # nothing is left pending
    st = tier.stats
    assert st.blocks_queued == 2 and st.blocks_dropped == 3 and st.blocks_written == 2
    for b in (0, 1):
        assert stored_payload(tier, store, hashes[b], contents[b]) == want[b]
    with pytest.raises(ValueError, match="2 block ids, 1 hashes and 1 contents"):
        tier.write_behind([0, 1], hashes[:1], contents[:1])
    assert tier.flush() and tier.stats.blocks_queued == 2
    tier.close()


def test_redis_keeps_no_reference_to_sent_values(tmp_path: Path) -> None:
    """redis-py sends a memoryview as its own chunk and keeps nothing after `execute`:
    the buffers come back for reuse, and what was stored is what was snapshot."""
    server = RedisProcess(tmp_path).start()
    try:
        store = RedisStore(server.url, timeout_s=5.0, connect_timeout_s=5.0)
        tier, host = make_tier(store, write_batch=8)  # one pipeline: 8 buffers in flight
        want = fill(host, range(8), seed=7)
        hashes, contents = chain(0, 8)
        assert tier.write_behind(range(8), hashes, contents) == 8 and tier.flush()
        assert tier.stats.blocks_written == 8
        assert tier._free_bytes == 8 * tier.value_len(contents[0])
        values = store.get_many([tier.key(h) for h in hashes])
        for b, (value, c) in enumerate(zip(values, contents, strict=True)):
            assert value is not None
            payload = tier.decode(value, c)
            assert payload is not None and bytes(payload) == want[b]
        tier.close()
    finally:
        server.stop()
