"""The remote KV tier: blocks written behind to a shared store, found by another
"replica" (a separate GPU and host tier under the same hash secret), verified on read;
faults lose nothing. Unit tests on `MemoryStore`; the integration tests on a real
redis-server started on a loopback port."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from redis_helpers import RedisProcess
from tier_helpers import SPEC, compute

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.remote import MemoryStore, RedisStore, RemoteKVTier, RemoteStore
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import CopyTransferEngine

SECRET = b"shared-by-replicas"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Replica:
    """One server's tiers: GPU and host pools over CPU tensors, and the remote tier."""

    def __init__(self, store: RemoteStore, *, num_gpu: int = 32, num_host: int = 32,
                 clock: Clock | None = None, **remote_kw: object) -> None:  # fmt: skip
        self.gpu_store = KVStore(SPEC, num_gpu, fill=float("nan"))
        self.host_store = KVStore(SPEC, num_host, fill=float("nan"))
        hasher = BlockHasher(block_size=SPEC.block_size, secret=SECRET)
        self.remote = RemoteKVTier(
            store,
            self.host_store,
            clock=clock or time.monotonic,
            **remote_kw,  # type: ignore[arg-type]
        )
        self.cache = TieredKVCache(
            BlockManager(BlockPool(num_gpu, name="gpu"), hasher),
            BlockManager(BlockPool(num_host, name="host"), hasher),
            CopyTransferEngine(self.gpu_store, self.host_store),
            remote=self.remote,
        )

    def serve(self, seq: str, tokens: list[int], gen: torch.Generator, tenant: str = "t") -> None:
        """A turn: the sequence computed on the GPU, then offloaded (written behind)."""
        self.cache.begin_sequence(seq, tokens, tenant=tenant)
        self.cache.wait_all()
        compute(self.cache, self.gpu_store, seq, gen)
        self.cache.offload(seq)
        self.cache.wait_all()

    def gpu_kv(self, seq: str, num_blocks: int) -> torch.Tensor:
        ids = self.cache.gpu.table(seq).block_ids[:num_blocks]
        return self.gpu_store.kv[ids].clone()

    def host_kv(self, seq: str, num_blocks: int) -> torch.Tensor:
        assert self.cache.host is not None
        ids = self.cache.host.table(seq).block_ids[:num_blocks]
        return self.host_store.kv[ids].clone()


TOKENS = list(range(100, 122))  # 5 full blocks of 4 and a partial one


def test_a_block_verifies_and_any_damage_is_a_miss() -> None:
    r = Replica(MemoryStore())
    r.host_store.kv[3] = torch.randn(r.host_store.kv[3].shape)
    content = b"p" * 16 + b"c" * 16
    value = r.remote.encode(3, content)
    payload = r.remote.decode(value, content)
    assert payload is not None and bytes(payload) == r.host_store.kv[3].numpy().tobytes()
    flipped = bytearray(value)
    flipped[40] ^= 1
    assert r.remote.decode(bytes(flipped), content) is None  # checksum
    assert r.remote.decode(value[:-1], content) is None  # truncated
    assert r.remote.decode(value[:20], content) is None
    assert r.remote.decode(value, b"q" * 32) is None  # a hash collision: other tokens
    assert r.remote.decode(b"XKV1" + value[4:], content) is None
    r.remote.close()


def test_another_replica_restores_the_prefix_from_the_store() -> None:
    store = MemoryStore()
    a, b = Replica(store), Replica(store)
    gen = torch.Generator().manual_seed(0)
    a.serve("s", TOKENS, gen)
    assert a.remote.flush()
    want = a.host_kv("s", 5)
    assert a.remote.stats.blocks_written == 5 and len(store.data) == 5
    trips = store.round_trips
    plan = b.cache.begin_sequence("s2", [*TOKENS, 7, 8], tenant="t")
    assert store.round_trips == trips + 1  # one round trip for the whole run
    assert plan.num_gpu_cached_tokens == 0 and plan.num_host_cached_tokens == 20
    b.cache.wait_all()
    assert torch.equal(b.gpu_kv("s2", 5), want)
    assert b.remote.stats.blocks_hit == 5 and b.cache.gpu.table("s2").num_computed_tokens == 20
    assert b.remote.stats.blocks_missed == 1  # the sixth full block was never written
    # another tenant with the same tokens finds nothing: keys are tenant-salted
    plan = b.cache.begin_sequence("other", TOKENS, tenant="u")
    assert plan.num_host_cached_tokens == 0
    assert b.remote.stats.blocks_missed == 2
    b.cache.check_invariants()
    for r in (a, b):
        r.remote.close()


def test_a_long_prefix_is_read_in_batches_until_the_run_ends() -> None:
    store = MemoryStore()
    a, b = Replica(store), Replica(store, max_fetch_blocks=2)
    a.serve("s", TOKENS, torch.Generator().manual_seed(9))
    assert a.remote.flush()
    trips = store.round_trips
    plan = b.cache.begin_sequence("s", [*TOKENS, 1, 2], tenant="t")
    assert plan.num_host_cached_tokens == 20
    assert store.round_trips == trips + 3  # 2 + 2 + 1 blocks, then the sixth was missing
    b.cache.wait_all()
    assert torch.equal(b.gpu_kv("s", 5), a.host_kv("s", 5))
    for r in (a, b):
        r.remote.close()


def test_the_run_stops_at_the_first_missing_or_corrupt_block() -> None:
    store = MemoryStore()
    a, b = Replica(store), Replica(store)
    a.serve("s", TOKENS, torch.Generator().manual_seed(1))
    assert a.remote.flush()
    keys = sorted(store.data)
    chain = [a.remote.key(h) for h in a.cache.host.table("s").hashes]  # type: ignore[union-attr]
    assert sorted(chain) == keys
    value = bytearray(store.data[chain[2]])
    value[-20] ^= 0xFF  # block 2 corrupted: blocks 0 and 1 are served, 2+ recomputed
    store.data[chain[2]] = bytes(value)
    plan = b.cache.begin_sequence("s", TOKENS, tenant="t")
    assert plan.num_host_cached_tokens == 8
    assert b.remote.stats.blocks_corrupt == 1 and b.remote.stats.blocks_hit == 2
    b.cache.wait_all()
    b.cache.check_invariants()
    for r in (a, b):
        r.remote.close()


def test_a_store_that_fails_is_a_miss_then_left_alone_then_used_again() -> None:
    store = MemoryStore()
    clock = Clock()
    a = Replica(store, clock=clock, backoff_s=1.0, max_backoff_s=4.0)
    b = Replica(store, clock=clock, backoff_s=1.0, max_backoff_s=4.0)
    store.fail = True
    gen = torch.Generator().manual_seed(2)
    a.serve("s", TOKENS, gen)  # its lookup fails (a miss); the offload completes and
    assert a.remote.flush()  # its writes are dropped: the store is backed off
    assert a.remote.stats.read_errors == 1 and a.remote.stats.blocks_dropped == 5
    plan = b.cache.begin_sequence("x", TOKENS, tenant="t")  # a read that fails: a miss
    assert plan.num_host_cached_tokens == 0 and b.remote.stats.read_errors == 1
    b.cache.free("x")
    b.cache.begin_sequence("y", TOKENS, tenant="t")  # backed off: not even asked
    assert b.remote.stats.reads_skipped == 1
    b.cache.free("y")
    store.fail = False
    clock.now = 1.5  # past the backoff: the store is used again
    other = [t + 1000 for t in TOKENS]  # (what was dropped while down stays unwritten)
    a.serve("s2", other, gen)
    assert a.remote.flush() and a.remote.stats.blocks_written == 5
    plan = b.cache.begin_sequence("z", other, tenant="t")
    assert plan.num_host_cached_tokens == 20
    b.cache.wait_all()
    b.cache.check_invariants()
    for r in (a, b):
        r.remote.close()


def test_writes_beyond_the_queue_bound_are_dropped_and_counted() -> None:
    class Slow(MemoryStore):
        def set_many(self, items, ttl_s):  # type: ignore[no-untyped-def]
            time.sleep(0.2)
            super().set_many(items, ttl_s)

    r = Replica(Slow(), max_pending_blocks=2, write_batch=1)
    r.serve("s", TOKENS, torch.Generator().manual_seed(3))
    st = r.remote.stats
    assert st.blocks_queued + st.blocks_dropped == 5 and st.blocks_dropped >= 2
    assert r.remote.flush()
    assert r.remote.stats.blocks_written == r.remote.stats.blocks_queued
    r.remote.close()


def test_a_full_host_pool_cuts_the_run_and_keeps_its_own_hits() -> None:
    store = MemoryStore()
    a = Replica(store)
    b = Replica(store, num_host=3)
    a.serve("s", TOKENS, torch.Generator().manual_seed(4))
    assert a.remote.flush()
    plan = b.cache.begin_sequence("s", TOKENS, tenant="t")
    assert plan.num_host_cached_tokens == 12  # three host blocks
    b.cache.wait_all()
    assert torch.equal(b.gpu_kv("s", 3), a.host_kv("s", 3))
    b.cache.check_invariants()
    for r in (a, b):
        r.remote.close()


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


def test_two_replicas_share_blocks_through_a_real_redis(redis_server: RedisProcess) -> None:
    a = Replica(RedisStore(redis_server.url))
    b = Replica(RedisStore(redis_server.url))
    a.serve("s", TOKENS, torch.Generator().manual_seed(5))
    assert a.remote.flush() and a.remote.stats.blocks_written == 5
    want = a.host_kv("s", 5)
    plan = b.cache.begin_sequence("s", [*TOKENS, 9], tenant="t")
    assert plan.num_host_cached_tokens == 20
    b.cache.wait_all()
    assert torch.equal(b.gpu_kv("s", 5), want)
    # a value overwritten in Redis (corruption, or another writer) is a miss, not wrong KV
    import redis

    client = redis.Redis.from_url(redis_server.url)
    keys = [a.remote.key(h) for h in a.cache.host.table("s").hashes]  # type: ignore[union-attr]
    client.set(keys[0], b"garbage")
    c = Replica(RedisStore(redis_server.url))
    assert c.cache.begin_sequence("s", TOKENS, tenant="t").num_host_cached_tokens == 0
    assert c.remote.stats.blocks_corrupt == 1
    ttl = client.pttl(keys[1])
    assert 0 < ttl <= 3600 * 1000  # Redis expires what nobody reads
    client.close()
    for r in (a, b, c):
        r.remote.close()


def test_redis_killed_and_restarted_loses_nothing_but_cache(redis_server: RedisProcess) -> None:
    clock = Clock()
    kw = dict(clock=clock, backoff_s=0.5, max_backoff_s=1.0)
    a = Replica(RedisStore(redis_server.url), **kw)  # type: ignore[arg-type]
    b = Replica(RedisStore(redis_server.url), **kw)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(6)
    redis_server.kill()
    t0 = time.monotonic()
    a.serve("s", TOKENS, gen)  # serving goes on; the writes are dropped
    assert a.remote.flush()
    plan = b.cache.begin_sequence("s", TOKENS, tenant="t")  # a fast miss
    assert time.monotonic() - t0 < 5.0
    assert plan.num_host_cached_tokens == 0
    assert a.remote.stats.blocks_dropped == 5 and a.remote.stats.read_errors == 1
    assert b.remote.stats.read_errors == 1
    b.cache.free("s")
    redis_server.start()  # empty: no persistence
    clock.now = 2.0  # past the backoff: both reconnect by themselves
    other = [t + 1000 for t in TOKENS]
    a.serve("s2", other, gen)
    assert a.remote.flush() and a.remote.stats.blocks_written == 5
    want = a.host_kv("s2", 5)
    plan = b.cache.begin_sequence("s3", other, tenant="t")
    assert plan.num_host_cached_tokens == 20
    b.cache.wait_all()
    assert torch.equal(b.gpu_kv("s3", 5), want)
    for r in (a, b):
        r.cache.check_invariants()
        r.remote.close()


# ---------------------------------------------------------------- state machine
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import initialize, rule  # noqa: E402
from test_tiered_state import TieredMachine  # noqa: E402


class RemoteTieredMachine(TieredMachine):
    """The GPU/host machine of `test_tiered_state` with a remote tier under the host,
    shared with a second "replica" whose lookups must verify too: the remote store
    fails, loses everything (a restart) and has values corrupted at random. The
    inherited invariants check every computed GPU token, every offloaded host block and
    every findable block byte for byte, so a block restored from the store that did not
    verify would show."""

    @initialize(num_gpu=st.integers(4, 14), num_host=st.integers(2, 14))
    def setup(self, num_gpu: int, num_host: int) -> None:
        super().setup(num_gpu, num_host)
        self.store = MemoryStore()
        self.remote = RemoteKVTier(self.store, self.host, clock=self.clock, backoff_s=0.5,
                                   max_backoff_s=1.0)  # fmt: skip
        self.cache.remote = self.remote

    def teardown(self) -> None:
        if hasattr(self, "remote"):
            self.remote.close()

    @rule(failing=st.booleans())
    def remote_faults(self, failing: bool) -> None:
        self.store.fail = failing

    @rule()
    def remote_restart(self) -> None:
        self.remote.flush()
        self.store.data.clear()

    @rule(data=st.data(), offset=st.integers(0, 10_000))
    def remote_corrupt(self, data: st.DataObject, offset: int) -> None:
        self.remote.flush()
        if self.store.data:
            key = data.draw(st.sampled_from(sorted(self.store.data)))
            value = bytearray(self.store.data[key])
            value[offset % len(value)] ^= 0x5A
            self.store.data[key] = bytes(value)

    @rule()
    def remote_flush(self) -> None:
        assert self.remote.flush()

    @rule(data=st.data(), extra=st.lists(st.integers(0, 3), max_size=6), wait=st.booleans())
    def elsewhere_reconnect(self, data: st.DataObject, extra: list[int], wait: bool) -> None:
        """Offload a session (written behind), lose every cached copy of it on this
        replica (GPU and host reclaimed), and reconnect with its history: what comes
        back now comes from the remote store, verified, or is recomputed."""
        seqs = [s for s in self._seqs_at("gpu") if self._computed(s)]
        if not seqs:
            return
        seq = data.draw(st.sampled_from(seqs))
        tenant, hist = self.model[seq]
        try:
            self.cache.offload(seq)
        except Exception:
            return
        r = self.cache.wait(seq)
        if r is not None:
            self._settle([r])
        self.remote.flush()
        if self.cache.location(seq) == "host":
            self.cache.drop_offloaded(seq)
            del self.model[seq]
        self.reclaim_gpu()
        for block_id in self.cache.host.pool.evict(self.cache.host.pool.num_cached):
            self.host.kv[block_id] = float("nan")
        self.begin(tenant, hist + extra, wait)


TestRemoteTieredMachine = RemoteTieredMachine.TestCase
