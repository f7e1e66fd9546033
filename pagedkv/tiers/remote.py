"""The remote tier: full KV blocks in a shared store (Redis / Valkey) under GPU and host.

Several replicas of a server share one store, so a client that lands on another
replica (its own died, or a reconnect went elsewhere) finds its prefix there instead of
recomputing it. The store is behind `RemoteStore` (`get_many` / `set_many`), so another
backend (LMCache, Mooncake Store) can stand in; `RedisStore` is the one built here, on
the `redis` client (a standalone server, Valkey, or a cluster client: every call is a
non-transactional pipeline, which redis-py splits per cluster node).

Keys are the tenant-salted chain hashes (hex) under a namespace naming the KV layout
(and, from the engine, a fingerprint of the weights), so tenants never share and
neither do models. A value is one block for every layer:

    b"PKV1" | u32 content length | u64 payload length | content | payload | xxh3-128
                                                                           (seeded)

where `content` is the block's hash-chain content (parent hash + token ids) and the
payload the block's bytes in the host store's layout. A hit is verified: magic, lengths,
checksum and content must all match, so a collision, a truncated or a corrupted value is
a miss, never wrong KV.

Writes go behind: when the host tier receives full blocks (an offload or a backup
completes) their bytes are snapshot on the caller's thread and queued a pipelined batch
at a time, so one writer thread sends batch k while the caller snapshots batch k+1. The
queue is bounded (`max_pending_blocks`, `max_pending_bytes`): when it is full, or the
store is down, blocks are dropped and counted, never queued without bound. A snapshot
is one copy of the block into a value buffer (header, content, payload and checksum in
place); buffers come back to a free list once their batch was sent (or dropped) and
nothing else refers to them, so a steady stream of writes allocates (and page-faults)
nothing. The free list holds at most the queue's byte bound and is emptied after
`_POOL_IDLE_S` without writes.

Reads ask for the blocks that continue a prompt's chain past what GPU and host hold, in
one round trip for a batch, keep the longest verified run, and write it into free host
blocks as cached blocks: the normal host-to-GPU restore takes it from there. A read that
fails or times out counts as a miss; after a failure the store is not asked again for a
backoff (doubling up to `max_backoff_s`), then the client reconnects by itself on the
next call.

Sizing: Redis's own `maxmemory` with `maxmemory-policy allkeys-lru` bounds the store,
and `ttl_s` (SET PX) expires blocks nobody reads. One block is about
`KVSpec.bytes_per_block` + 100 bytes (docs/serving.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import struct
import sys
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from pagedkv.cache.block_pool import BlockPool
from pagedkv.tiers.kv_store import KVStore

log = logging.getLogger("pagedkv.tiers.remote")

MAGIC = b"PKV1"
_HEADER = struct.Struct("<4sIQ")  # magic, content length, payload length
_CHECKSUM = 16  # xxh3-128, seeded by the hash secret
_CONTENT_ALLOWANCE = 100  # bytes counted per block for key and content in the byte bound
_POOL_IDLE_S = 30.0  # free value buffers are given back after this long without writes


Value = bytes | memoryview  # what is written (memoryview: no extra copy of a block)


class RemoteUnavailable(Exception):
    """The remote store could not answer (down, timed out, refused)."""


class RemoteStore(ABC):
    """A key-value store of bytes, shared by replicas."""

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of `keys` (None for a missing key), in one round trip.

        Raises:
            RemoteUnavailable: the store did not answer.
        """

    @abstractmethod
    def set_many(self, items: Sequence[tuple[bytes, Value]], ttl_s: float | None) -> None:
        """Store every (key, value), expiring after `ttl_s` (None: never), in one round trip.

        The values' buffers are the writer's: once this returns (or raises) their views
        are released and the buffers reused, so a store that keeps a value past the call
        must copy it (`bytes(value)`).

        Raises:
            RemoteUnavailable: the store did not answer.
        """

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class RedisStore(RemoteStore):
    """`RemoteStore` on the `redis` client: Redis, Valkey, or a cluster.

    Args:
        url: `redis://host:port/db` (or `rediss://`, `unix://`); ignored with `client`.
        client: an existing `redis.Redis` or `redis.RedisCluster`.
        cluster: build a `RedisCluster` from `url` instead.
        timeout_s: socket timeout of every command (a slow store is a miss, fast).
        connect_timeout_s: connect timeout.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        client: Any = None,
        cluster: bool = False,
        timeout_s: float = 0.1,
        connect_timeout_s: float = 0.1,
    ) -> None:
        import redis

        # any failure of the client is the store's (a non-Redis server on the URL makes
        # redis-py raise AttributeError, ...): a miss, never a failed turn
        self._errors: tuple[type[BaseException], ...] = (Exception,)
        if client is None:
            options = dict(socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s)
            if cluster:
                client = redis.RedisCluster.from_url(url, **options)
            else:
                client = redis.Redis.from_url(url, retry_on_timeout=False, **options)
        self.client = client

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            values = pipe.execute()
        except self._errors as exc:
            raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from None
        return [v if isinstance(v, bytes) else None for v in values]

    def set_many(self, items: Sequence[tuple[bytes, Value]], ttl_s: float | None) -> None:
        px = None if ttl_s is None else max(int(ttl_s * 1000), 1)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, px=px)
            pipe.execute()
        except self._errors as exc:
            raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.client.close()


class MemoryStore(RemoteStore):
    """A `RemoteStore` in this process's memory (unit tests, single-process runs); with
    `fail` set, every call raises `RemoteUnavailable` (fault injection)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.fail = False
        self.round_trips = 0
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            self.round_trips += 1
            if self.fail:
                raise RemoteUnavailable("MemoryStore: failing on purpose")
            return [self.data.get(k) for k in keys]

    def set_many(self, items: Sequence[tuple[bytes, Value]], ttl_s: float | None) -> None:
        with self._lock:
            self.round_trips += 1
            if self.fail:
                raise RemoteUnavailable("MemoryStore: failing on purpose")
            self.data.update((k, bytes(v)) for k, v in items)


@dataclass
class RemoteStats:
    """Counters of one `RemoteKVTier` (monotonic)."""

    blocks_queued: int = 0  # snapshot and queued for writing
    blocks_written: int = 0
    blocks_dropped: int = 0  # not written: queue full, store down, or a failed write
    write_errors: int = 0  # failed write batches
    bytes_written: int = 0
    reads: int = 0  # read round trips
    read_errors: int = 0  # failed or timed-out reads (each a miss)
    reads_skipped: int = 0  # lookups not sent while the store was backed off
    blocks_hit: int = 0  # verified blocks copied into the host tier
    blocks_missed: int = 0  # asked for and absent
    blocks_corrupt: int = 0  # present but failing verification (treated as misses)
    bytes_read: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RemoteKVTier:
    """Moves full blocks between a host `KVStore` and a `RemoteStore` (see the module
    docstring). Reads run on the caller's (engine) thread; writes on a writer thread.

    Args:
        store: the shared store.
        host_store: the host tier's KV tensor (CPU).
        namespace: keys are `pkv1:{namespace}:{layout}:{hash hex}`; replicas that should
            share blocks use the same namespace (and the same hash secret). The engine
            puts a fingerprint of the model's weights in it, so models never share.
        secret: seeds the values' checksum (the engine passes its hash secret).
        max_pending_bytes: the same bound in bytes.
        read_deadline_s: a read that has not answered by then (plus its bytes at 250 MB/s)
            is a miss (the call goes on off the caller's thread; no other read starts
            until it ends).
        ttl_s: expiry of each written block (None: Redis's maxmemory policy only).
        max_pending_blocks: blocks snapshot and waiting for the writer, at most.
        write_batch: blocks per pipelined write.
        max_fetch_blocks: blocks asked for in one read round trip.
        backoff_s, max_backoff_s: after a failure the store is left alone this long,
            doubling per further failure up to the maximum.
        clock: for the backoff (tests inject one).
    """

    def __init__(
        self,
        store: RemoteStore,
        host_store: KVStore,
        *,
        namespace: str = "default",
        secret: bytes = b"",
        ttl_s: float | None = 3600.0,
        max_pending_blocks: int = 1024,
        max_pending_bytes: int = 256 * 1024 * 1024,
        read_deadline_s: float = 0.25,
        write_batch: int = 64,
        max_fetch_blocks: int = 64,
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if host_store.device.type != "cpu":
            raise ValueError(
                f"RemoteKVTier: the host store must be on the CPU, got {host_store.device}"
            )
        for name, value in (("max_pending_blocks", max_pending_blocks), ("write_batch", write_batch),
                            ("max_fetch_blocks", max_fetch_blocks)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RemoteKVTier: {name} must be an int >= 1, got {value!r}")
        self.store = store
        self.host_store = host_store
        spec = host_store.spec
        layout = (
            f"{spec.num_layers}x{spec.num_kv_heads}x{spec.head_dim}x{spec.block_size}:{spec.dtype}"
        )
        self._prefix = f"pkv1:{namespace}:{layout}:".encode()
        self._seed = int.from_bytes(xxhash.xxh3_64_digest(b"pagedkv-remote\x00" + secret), "little")
        self.max_pending_bytes = max_pending_bytes
        self.read_deadline_s = read_deadline_s
        self._reader = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="pagedkv-remote-reader"
        )
        self._inflight_read: concurrent.futures.Future[tuple[int, int, int, int]] | None = None
        self._block_bytes = host_store.kv[0].numel() * host_store.kv.element_size()
        # where the reader puts verified blocks (max_fetch_blocks x one block)
        self._staging = torch.empty((max_fetch_blocks, self._block_bytes), dtype=torch.uint8)
        self.ttl_s = ttl_s
        self.write_batch = write_batch
        self.max_fetch_blocks = max_fetch_blocks
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._down_until = 0.0
        self._backoff = backoff_s
        self.stats = RemoteStats()
        self._stats_lock = threading.Lock()
        # batches of (key, value); the bound is on blocks, kept by `_pending`
        self.max_pending_blocks = max_pending_blocks
        self._queue: queue.SimpleQueue[list[tuple[bytes, Value]] | None] = queue.SimpleQueue()
        self._pending = 0  # blocks queued and not yet sent or dropped
        self._pending_lock = threading.Lock()
        self._drained = threading.Condition(self._pending_lock)
        # value buffers not in flight, by length (see `_take_buffer` / `_recycle`): at most
        # the queue's byte bound, so buffers in flight plus free ones stay within twice it
        self._free_buffers: dict[int, list[bytearray]] = {}
        self._free_bytes = 0
        self._pool_limit = min(max_pending_bytes, max_pending_blocks * self._per_block_bytes)
        self._pool_lock = threading.Lock()
        self._pool_idle_s = _POOL_IDLE_S
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="pagedkv-remote-writer",
                                        daemon=True)  # fmt: skip
        self._writer.start()

    # ------------------------------------------------------------------ encoding
    def key(self, block_hash: bytes) -> bytes:
        return self._prefix + block_hash.hex().encode()

    def _block_view(self, block_id: int) -> torch.Tensor:
        return self.host_store.kv[block_id].reshape(-1).view(torch.uint8)

    @property
    def _per_block_bytes(self) -> int:
        """What one queued block is counted as in `max_pending_bytes`."""
        return _HEADER.size + self._block_bytes + _CHECKSUM + _CONTENT_ALLOWANCE

    def value_len(self, content: bytes) -> int:
        """Bytes of the value of a block with hash-chain `content`."""
        return _HEADER.size + len(content) + self._block_bytes + _CHECKSUM

    def encode(self, block_id: int, content: bytes) -> memoryview:
        """The value of host block `block_id` with hash-chain `content`: a snapshot in a
        buffer of its own (the block's bytes are copied once, straight into it)."""
        return self._encode_into(bytearray(self.value_len(content)), block_id, content)

    def _encode_into(self, buf: bytearray, block_id: int, content: bytes) -> memoryview:
        """Write the value of `block_id` into `buf` (exactly `value_len(content)` bytes):
        header, content, the block's bytes (one copy), then the checksum over the rest."""
        head, n_content, n_payload = _HEADER.size, len(content), self._block_bytes
        _HEADER.pack_into(buf, 0, MAGIC, n_content, n_payload)
        buf[head : head + n_content] = content
        # numpy's copy is one memcpy without the GIL (as is xxh3), so the writer thread
        # sends meanwhile; torch's copy_ would fan out to its intra-op threads, which spin
        # against the writer and the store for the same cores. The temporary array is
        # gone when this returns (no reference to `buf` is left behind).
        dst = np.frombuffer(buf, dtype=np.uint8, count=n_payload, offset=head + n_content)
        dst[:] = self._block_view(block_id).numpy()
        del dst
        view = memoryview(buf)
        view[-_CHECKSUM:] = xxhash.xxh3_128_digest(view[:-_CHECKSUM], seed=self._seed)
        return view

    def _take_buffer(self, size: int) -> bytearray:
        """A value buffer of `size` bytes: a free one (not in flight) if any, else new."""
        with self._pool_lock:
            free = self._free_buffers.get(size)
            if free:
                self._free_bytes -= size
                return free.pop()
        return bytearray(size)

    def _recycle(self, values: Sequence[Value]) -> None:
        """Put the buffers of values that were sent or dropped back on the free list.

        Each value's view is released first (so transient references to the batch, the
        caller's or a traceback's, keep no buffer alive), then its buffer is reused only
        if nothing else refers to it: no other view of it (a slice, a store's that kept a
        value against `RemoteStore.set_many`'s contract) and no other reference. Such a
        buffer is left to its holders and the garbage collector. Beyond the pool's limit
        buffers are freed."""
        for value in values:
            if not isinstance(value, memoryview):
                continue
            try:
                buf = value.obj
                value.release()
            except (BufferError, ValueError):  # an export of it is held; released already
                continue
            # references: `buf` and getrefcount's argument; any more is somebody else's
            if type(buf) is not bytearray or sys.getrefcount(buf) > 2:
                continue
            size = len(buf)
            with self._pool_lock:
                if self._free_bytes + size <= self._pool_limit:
                    self._free_buffers.setdefault(size, []).append(buf)
                    self._free_bytes += size
            del buf

    def _trim_pool(self) -> None:
        """Give every free value buffer back to the allocator (after an idle spell)."""
        with self._pool_lock:
            self._free_buffers.clear()
            self._free_bytes = 0

    def decode(self, value: bytes, content: bytes) -> memoryview | None:
        """The payload of a value if it verifies for `content`, else None."""
        head = _HEADER.size
        if len(value) < head + _CHECKSUM:
            return None
        magic, n_content, n_payload = _HEADER.unpack_from(value)
        if (
            magic != MAGIC
            or n_payload != self._block_bytes
            or len(value) != head + n_content + n_payload + _CHECKSUM
        ):
            return None
        view = memoryview(value)
        if xxhash.xxh3_128_digest(view[:-_CHECKSUM], seed=self._seed) != value[-_CHECKSUM:]:
            return None
        if view[head : head + n_content] != content:
            return None
        return view[head + n_content : -_CHECKSUM]

    # ------------------------------------------------------------------ writes
    def write_behind(self, block_ids: Sequence[int], hashes: Sequence[bytes],
                     contents: Sequence[bytes]) -> int:  # fmt: skip
        """Snapshot these host blocks now and queue them for the store; returns how many
        were queued (the rest are dropped and counted: queue full or store down).

        Every snapshot is taken before this returns (the blocks may be overwritten right
        after); each full pipeline is queued as soon as it is snapshot, so the writer
        sends it while the next one is taken.

        Raises:
            ValueError: `block_ids`, `hashes` and `contents` differ in length.
        """
        if not len(block_ids) == len(hashes) == len(contents):
            raise ValueError(
                f"write_behind: {len(block_ids)} block ids, {len(hashes)} hashes and "
                f"{len(contents)} contents; expected as many of each"
            )
        with self._pending_lock:
            room = 0 if self._is_down() else self.max_pending_blocks - self._pending
            room = min(room, self.max_pending_bytes // self._per_block_bytes - self._pending)
            take = max(min(room, len(block_ids)), 0)
            self._pending += take
        with self._stats_lock:
            self.stats.blocks_dropped += len(block_ids) - take
        queued = 0
        try:
            for start in range(0, take, self.write_batch):  # full pipelines
                end = min(start + self.write_batch, take)
                batch = self._snapshot(block_ids[start:end], hashes[start:end],
                                       contents[start:end])  # fmt: skip
                with self._stats_lock:
                    self.stats.blocks_queued += len(batch)
                self._queue.put(batch)
                queued = end
        except BaseException:
            with self._drained:  # what was not queued is no longer pending
                self._pending -= take - queued
                self._drained.notify_all()
            with self._stats_lock:
                self.stats.blocks_dropped += take - queued
            raise
        return take

    def _snapshot(self, block_ids: Sequence[int], hashes: Sequence[bytes],
                  contents: Sequence[bytes]) -> list[tuple[bytes, Value]]:  # fmt: skip
        """(key, value) of each block, each value in a buffer that is not in flight."""
        return [
            (self.key(h), self._encode_into(self._take_buffer(self.value_len(c)), b, c))
            for b, h, c in zip(block_ids, hashes, contents, strict=True)
        ]

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued block was sent (or dropped). True if it drained."""
        with self._drained:
            return self._drained.wait_for(lambda: self._pending == 0, timeout)

    def _write_loop(self) -> None:
        while True:
            try:  # with free buffers held, wake up after an idle spell to give them back
                batch = self._queue.get(timeout=self._pool_idle_s if self._free_bytes else None)
            except queue.Empty:
                self._trim_pool()
                continue
            if batch is None:
                return
            self._send(batch)
            self._recycle([value for _, value in batch])  # sent or dropped: not in flight
            with self._drained:
                self._pending -= len(batch)
                if self._pending == 0:
                    self._drained.notify_all()

    def _send(self, batch: list[tuple[bytes, Value]]) -> None:
        if self._is_down():
            with self._stats_lock:
                self.stats.blocks_dropped += len(batch)
            return
        try:
            self.store.set_many(batch, self.ttl_s)
        except RemoteUnavailable as exc:
            self._failed("write", exc)
            with self._stats_lock:
                self.stats.write_errors += 1
                self.stats.blocks_dropped += len(batch)
            return
        except Exception:  # a bug in a store: never kill the writer
            log.exception("remote tier: write failed")
            with self._stats_lock:
                self.stats.write_errors += 1
                self.stats.blocks_dropped += len(batch)
            return
        self._ok()
        with self._stats_lock:
            self.stats.blocks_written += len(batch)
            self.stats.bytes_written += sum(len(v) for _, v in batch)

    # ------------------------------------------------------------------ reads
    def _read(self, keys: list[bytes], contents: list[bytes]) -> tuple[int, int, int, int]:
        """On the reader thread: fetch, verify, and copy the verified run into the
        staging buffer (so the values are allocated and freed on this thread, and a read
        past its deadline only ever writes the buffer, which nobody reads until it ends).
        Returns (verified blocks, missed, corrupt, bytes read)."""
        values = self.store.get_many(keys)
        verified = missed = corrupt = nbytes = 0
        with warnings.catch_warnings():  # read-only buffers: torch only reads them here
            warnings.simplefilter("ignore", UserWarning)
            for i, value in enumerate(values):
                if value is None:
                    missed = 1
                    break
                payload = self.decode(value, contents[i])
                if payload is None:
                    corrupt = 1
                    break
                self._staging[i].copy_(torch.frombuffer(payload, dtype=torch.uint8))
                verified += 1
                nbytes += len(value)
        return verified, missed, corrupt, nbytes

    def fetch_into_host(
        self, pool: BlockPool, hashes: Sequence[bytes], contents: Sequence[bytes]
    ) -> int:
        """Look up the blocks of a chain segment (`hashes`/`contents`, the blocks that
        continue what the caller already holds; at most `max_fetch_blocks` of them, in
        one round trip), copy the longest verified run into host blocks of `pool` that
        nobody uses (free or cached; the run is cut to fit), cached and findable by hash,
        and return its length. The caller must hold (acquire) any cached host blocks it
        means to keep, since these allocations may reclaim unreferenced ones.

        Never raises for the store's faults: a failure is a miss, counted.
        """
        start, end = 0, min(len(hashes), self.max_fetch_blocks)
        if end <= start:
            return 0
        if self._is_down():
            with self._stats_lock:
                self.stats.reads_skipped += 1
            return 0
        if self._inflight_read is not None and not self._inflight_read.done():
            with self._stats_lock:  # an earlier read is still stuck: do not pile up
                self.stats.reads_skipped += 1
            return 0
        keys = [self.key(h) for h in hashes[start:end]]
        fut = self._reader.submit(self._read, keys, list(contents[start:end]))
        self._inflight_read = fut
        try:
            # the deadline grows with what is asked for (at 250 MB/s), so a big batch of
            # big blocks is not cut short by a budget meant for the round trip
            budget = self.read_deadline_s + len(keys) * self._block_bytes / 250e6
            verified, missed, corrupt, nbytes = fut.result(timeout=budget)
        except Exception as exc:  # RemoteUnavailable, past the deadline, a store's bug
            if isinstance(exc, concurrent.futures.TimeoutError):
                exc = RemoteUnavailable(f"no answer within {self.read_deadline_s} s")
            self._failed("read", exc)
            with self._stats_lock:
                self.stats.reads += 1
                self.stats.read_errors += 1
            return 0
        self._ok()
        # the reader is done with the staging buffer (no read is in flight now)
        run = min(verified, pool.num_available)
        ids = pool.allocate(run) if run else []
        for j, block_id in enumerate(ids):
            self._block_view(block_id).copy_(self._staging[j])
        kept: list[int] = []
        for j, block_id in enumerate(ids):
            if pool.register(block_id, hashes[start + j], contents[start + j]):
                kept.append(block_id)
            else:  # the host already indexes this hash: stop the run at its copy
                break
        pool.release(ids[::-1])  # registered ones stay findable as cached blocks
        with self._stats_lock:
            self.stats.reads += 1
            self.stats.blocks_hit += len(kept)
            self.stats.blocks_missed += missed
            self.stats.blocks_corrupt += corrupt
            self.stats.bytes_read += nbytes
        return len(kept)

    # ------------------------------------------------------------------ health
    def _is_down(self) -> bool:
        return self._clock() < self._down_until

    def _failed(self, what: str, exc: Exception) -> None:
        self._down_until = self._clock() + self._backoff
        log.warning("remote tier: %s failed (%s); leaving the store alone for %.2f s",
                    what, exc, self._backoff)  # fmt: skip
        self._backoff = min(self._backoff * 2, self.max_backoff_s)

    def _ok(self) -> None:
        self._backoff = self.backoff_s

    def close(self, timeout: float = 5.0) -> None:
        """Stop the writer (queued blocks are sent first, up to `timeout`)."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._queue.put(None)
        self._writer.join(timeout)
        self._trim_pool()
        self._reader.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.store.close()
