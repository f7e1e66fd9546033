"""The held-block index: each replica publishes which block hashes it holds, in Redis.

The router (`pagedkv.serving.kv_routing`) reads it to send a new session to the replica
holding the longest prefix of its prompt (the way Dynamo's KV router works: workers
publish the blocks they hold, the router hashes a request's tokens with the same
tokenizer and hasher and scores replicas by the longest held prefix).

Keys, under the `--remote-namespace` the replicas share (without the weights
fingerprint the remote tier adds: the router loads no model; the hashes themselves
depend on the hash secret, tenant, block size and tokens, not on the weights):

    pkvidx1:{namespace}:{replica}        a set of raw 16-byte chain hashes
    pkvidx1:{namespace}:{replica}:meta   JSON: block_size, compat, auth, max_hashes, ...

where `replica` is the URL the router knows the replica by (`--advertise-url`). Both
keys expire (`ttl_s`, default 5x the interval) unless refreshed, so a dead replica's set
disappears by itself.

What is published: the full-block chain hashes indexed on the GPU pool and the host
pool (blocks in use and cached: everything a prefix lookup can hit), GPU before host,
blocks in use before cached ones, cached ones most recently released first, cut at
`max_hashes` (default 65536: 1 Mi tokens at 16 per block, about 5 MiB of Redis per
replica). The snapshot is taken on the engine thread between steps, once per interval
(`BlockPool.held_keys`: a C-level copy of the index below the cap, one pass over it
above); deduplication, the diff against what was published and the Redis calls run on
a publisher thread. Each publish is one pipeline: SADD what is new, SREM what is gone,
PEXPIRE, SET the meta. A set found missing (expired, flushed, Redis restarted), a
failed publish, or every `resync_s`, rewrites the set whole, in one transaction
(MULTI/EXEC: DEL, SADD, PEXPIRE, SET), so readers never see it empty or half written.

`meta.compat` is the chain hash of a fixed probe conversation: a router whose
tokenizer, block size or hash secret differs from a replica's computes another one and
does not route by that replica's hashes (they could never match). `meta.auth` is
`auth_fingerprint` of the replica's keys: a router that resolves tenants differently
(no keys file, another one) would compute other tenants' chains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pagedkv.cache.hashing import BlockHasher, as_token_array
from pagedkv.model.tokenizer import ChatTokenizer
from pagedkv.serving.conversation import Message, render_prompt

if TYPE_CHECKING:
    from pagedkv.tiers.tiered import TieredKVCache

log = logging.getLogger("pagedkv.serving.kv_index")

INDEX_PREFIX = "pkvidx1"
DEFAULT_MAX_HASHES = 65536
_CHUNK = 4096  # members per SADD / SREM / SMISMEMBER command
_PROBE_TENANT = "\x00pagedkv-compat-probe"  # not a tenant name any caller can have
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog; 0123456789. " * 12


def index_keys(namespace: str, replica: str) -> tuple[bytes, bytes]:
    """(set key, meta key) of a replica's published hashes."""
    base = f"{INDEX_PREFIX}:{namespace}:{replica.rstrip('/')}"
    return base.encode(), (base + ":meta").encode()


def compat_fingerprint(tokenizer: ChatTokenizer, hasher: BlockHasher) -> str:
    """The last chain hash (hex) of a fixed probe conversation: equal on two processes
    exactly when their tokenizer renders it alike and their hashers share block size
    and secret (the secret stays hidden: the root is a keyed BLAKE2b)."""
    tokens = render_prompt(tokenizer, instructions="pagedkv compat probe", tools=(),
                           items=(Message("user", _PROBE_TEXT),))  # fmt: skip
    root = hasher.root(_PROBE_TENANT)
    hashes, _ = hasher.hash_chain(root, as_token_array(tokens))
    return (hashes[-1] if hashes else root).hex()


def snapshot_held(cache: TieredKVCache, limit: int) -> list[bytes]:
    """The hashes `cache` can serve by prefix lookup, GPU then host, at most `limit` of
    each (duplicates between tiers are left for the publisher thread to drop). Call it
    on the thread that owns the cache (the engine thread); it changes nothing."""
    keys = cache.gpu.pool.held_keys(limit)
    if cache.host is not None and len(keys) < limit:
        keys += cache.host.pool.held_keys(limit)
    return [k for k in keys if isinstance(k, bytes)]


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishConfig:
    """How a replica publishes its held hashes.

    Attributes:
        interval_s: seconds between snapshots (and publishes).
        ttl_s: expiry of the set and its meta (None: 5x the interval, at least 2 s).
        max_hashes: the most hashes published (see the module docstring for the order).
        resync_s: the set is rewritten whole this often, whatever happened.
    """

    interval_s: float = 1.0
    ttl_s: float | None = None
    max_hashes: int = DEFAULT_MAX_HASHES
    resync_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < float("inf"):
            raise ValueError(f"PublishConfig.interval_s must be > 0, got {self.interval_s}")
        if self.ttl_s is not None and not self.ttl_s > self.interval_s:
            raise ValueError(f"PublishConfig.ttl_s must exceed interval_s "
                             f"({self.interval_s}), got {self.ttl_s}")  # fmt: skip
        if isinstance(self.max_hashes, bool) or not isinstance(self.max_hashes, int) \
                or self.max_hashes < 1:  # fmt: skip
            raise ValueError(f"PublishConfig.max_hashes must be an int >= 1, got "
                             f"{self.max_hashes!r}")  # fmt: skip

    @property
    def expiry_s(self) -> float:
        return self.ttl_s if self.ttl_s is not None else max(5 * self.interval_s, 2.0)


@dataclass
class PublishStats:
    """Counters of one publisher (monotonic, but `num_published`)."""

    snapshots: int = 0
    publishes: int = 0
    errors: int = 0
    resyncs: int = 0
    hashes_added: int = 0
    hashes_removed: int = 0
    num_published: int = 0  # hashes in the set after the last publish

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class HeldIndexPublisher:
    """Publishes one replica's held hashes (see the module docstring).

    `due()` and `offer()` are for the engine thread (cheap: a clock read; a hand-off of
    the snapshot list, the latest replacing one not yet published); the publisher
    thread does the rest. `publish(keys)` runs one publish on the calling thread
    (tests). Never raises for Redis's faults: they are counted and the next publish
    rewrites the set.

    Args:
        client: a `redis.Redis` (sync) client.
        namespace: the replicas' `--remote-namespace`.
        replica: the URL the router knows this replica by.
        meta: fields of the meta key (block_size, compat, auth ...), read at each
            publish (a caller may add to it before the first).
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str,
        replica: str,
        meta: dict[str, Any],
        config: PublishConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.config = cfg = config or PublishConfig()
        self.replica = replica.rstrip("/")
        self.set_key, self.meta_key = index_keys(namespace, self.replica)
        self.meta = meta
        self.stats = PublishStats()
        self._clock = clock
        self._next_snapshot = 0.0
        self._next_resync = 0.0
        self._published: set[bytes] = set()
        self._resync = True
        self._offered: list[bytes] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._ttl_ms = max(int(cfg.expiry_s * 1000), 1)

    # ------------------------------------------------------------------ engine thread
    def due(self) -> bool:
        """Whether a snapshot is due (and, if so, the next one is scheduled)."""
        now = self._clock()
        if now < self._next_snapshot or self._closed:
            return False
        self._next_snapshot = now + self.config.interval_s
        return True

    def offer(self, keys: list[bytes]) -> None:
        """Hand a snapshot to the publisher thread (started on the first offer)."""
        with self._cond:
            if self._closed:
                return
            self._offered = keys
            self.stats.snapshots += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pagedkv-kv-index",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._cond.notify()

    # ------------------------------------------------------------------ publisher thread
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._offered is not None or self._closed)
                if self._closed:
                    return
                keys, self._offered = self._offered, None
            assert keys is not None
            self.publish(keys)

    def publish(self, keys: Sequence[bytes]) -> bool:
        """Publish one snapshot: dedupe, cut to `max_hashes`, diff or rewrite. Returns
        whether Redis took it."""
        snap = list(dict.fromkeys(keys))[: self.config.max_hashes]
        try:
            ok = self._publish(snap)
            if not ok:  # the set was gone: rewrite it now rather than a cycle later
                ok = self._publish(snap)
        except Exception as exc:  # any client failure is Redis's: count it, resync next
            self._resync = True
            self.stats.errors += 1
            log.warning("kv index: publishing %s failed: %s: %s", self.replica,
                        type(exc).__name__, str(exc)[:200])  # fmt: skip
            return False
        return ok

    def _publish(self, snap: list[bytes]) -> bool:
        now = self._clock()
        resync = self._resync or now >= self._next_resync
        current = set(snap)
        # a rewrite is one MULTI/EXEC: a router reading meanwhile sees the old set or the
        # new one, never the empty or half-written set between the DEL and the last SADD
        # (a diff needs none: each of its states is a set the replica held, or nearly)
        pipe = self.client.pipeline(transaction=resync)
        if resync:
            pipe.delete(self.set_key)
            add, gone = snap, []
        else:
            pipe.pexpire(self.set_key, self._ttl_ms)  # 0: the set is gone
            published = self._published
            add = [k for k in snap if k not in published]
            gone = [k for k in published if k not in current]
        for i in range(0, len(add), _CHUNK):
            pipe.sadd(self.set_key, *add[i : i + _CHUNK])
        for i in range(0, len(gone), _CHUNK):
            pipe.srem(self.set_key, *gone[i : i + _CHUNK])
        pipe.pexpire(self.set_key, self._ttl_ms)
        meta = {**self.meta, "num_hashes": len(snap), "max_hashes": self.config.max_hashes,
                "interval_s": self.config.interval_s}  # fmt: skip
        pipe.set(self.meta_key, json.dumps(meta, sort_keys=True), px=self._ttl_ms)
        result = pipe.execute()
        if not resync and self._published and not result[0]:
            # expired or lost (flushed, restarted): what we diffed against is not there
            self._resync = True
            return False
        self._published = current
        self._resync = False
        if resync:
            self._next_resync = now + self.config.resync_s
            self.stats.resyncs += 1
            self.stats.hashes_added += len(snap)
        else:
            self.stats.hashes_added += len(add)
            self.stats.hashes_removed += len(gone)
        self.stats.publishes += 1
        self.stats.num_published = len(current)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Stop the publisher thread and delete the published keys (best effort: a
        replica that stops cleanly leaves the router nothing stale)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(Exception):  # Redis down: the keys expire by themselves
            self.client.delete(self.set_key, self.meta_key)
        with contextlib.suppress(Exception):
            self.client.close()
