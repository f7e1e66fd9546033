"""Several replicas behind a router, optionally sharing a remote KV tier: the simulator's
model of `pagedkv route` in front of N `pagedkv serve --remote-url` replicas.

Every replica is a full `SessionScheduler` over its own GPU and host pools, with its own
prefill timeline; one virtual clock and one event loop drive them all
(`simulator.replay(..., cluster=...)`). A connection is routed when it opens (a new
session, or a reconnect that re-sends its history) and stays on its replica until it
closes, as the router keeps a WebSocket on one replica for its life.

Routing policies (`ROUTINGS`):

- `round-robin`: each new connection to the next replica, the plain load balancer.
- `affinity`: consistent hashing on tenant + conversation key (the session, else the
  prompt's first block, as the router's `prompt_cache_key` / first input item), no load
  bound: sticky sessions.
- `kv-aware`: the replica that holds the longest prefix of the prompt (GPU, then host:
  what replicas publish), ties and cold prompts to the least loaded, no load bound.
- `ours`: `kv-aware` among replicas under the bounded-load cap (Mirrokni et al., c =
  1.25 over open connections), else consistent hashing with bounded loads, plus the
  shared remote tier.

The remote tier (`SimRemoteStore`, one for the cluster; `SimRemoteTier`, each replica's
client, the metadata-only stand-in for `tiers.remote.RemoteKVTier` that `TieredKVCache`
calls the same way): full blocks are written behind when an offload or a backup lands
on the host, on a per-replica write link (`write_bytes_per_s`, one `latency_s` per
batch), visible to readers when their write ends, dropped when more than
`max_pending_blocks` would be queued; the store keeps at most `capacity_bytes`, least
recently used first out (Redis's `allkeys-lru`). A read asks for up to
`max_fetch_blocks` blocks in one round trip and blocks the replica's engine thread for
`latency_s + bytes / read_bytes_per_s` (the library reads synchronously in
`begin_sequence`): no prefill starts on that replica and the host-to-GPU restore of the
blocks read starts after it.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import xxhash

from pagedkv.cache.block_pool import BlockPool
from pagedkv.sim.workload import Request

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from pagedkv.sim.simulator import _Node

__all__ = [
    "DEFAULT_ROUTINGS",
    "ROUTINGS",
    "ClusterSpec",
    "RemoteProfile",
    "Router",
    "Routing",
    "SimRemoteStore",
    "SimRemoteTier",
    "parse_routings",
]

GB = 1e9
_VNODES = 64  # points per replica on the hash ring


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteProfile:
    """The shared remote tier: a Redis / Valkey cluster over the datacenter network.

    Defaults: 2 TB of store memory; per replica, 10 GB/s each way (a 100 GbE NIC at 80%)
    and 300 us per round trip; reads of at most 64 blocks per round trip and at most
    1024 blocks queued for writing per replica (`RemoteKVTier`'s defaults).
    """

    capacity_bytes: float = 2000 * GB
    read_bytes_per_s: float = 10 * GB
    write_bytes_per_s: float = 10 * GB
    latency_s: float = 300e-6
    max_fetch_blocks: int = 64
    max_pending_blocks: int = 1024

    def __post_init__(self) -> None:
        for name in ("capacity_bytes", "read_bytes_per_s", "write_bytes_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"RemoteProfile.{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"RemoteProfile.latency_s must be >= 0, got {self.latency_s}")
        for name in ("max_fetch_blocks", "max_pending_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"RemoteProfile.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Routing:
    """One routing policy under comparison.

    Attributes:
        pick: how a new connection chooses its replica (see the module docstring).
        bounded_load: the bounded-load factor c (a replica takes a new connection only
            while it has fewer than ceil(c * (open + 1) / replicas)); None: no bound.
        remote: the replicas share the remote tier.
    """

    name: str
    summary: str
    pick: Literal["round-robin", "affinity", "kv-aware"]
    bounded_load: float | None = None
    remote: bool = False

    def __post_init__(self) -> None:
        if self.bounded_load is not None and not self.bounded_load >= 1:
            raise ValueError(f"Routing.bounded_load must be >= 1, got {self.bounded_load}")


ROUTINGS: dict[str, Routing] = {
    r.name: r
    for r in (
        Routing(
            name="round-robin",
            summary="each new connection to the next replica (a plain load balancer)",
            pick="round-robin",
        ),
        Routing(
            name="affinity",
            summary="consistent hashing on tenant + conversation key (sticky sessions)",
            pick="affinity",
        ),
        Routing(
            name="kv-aware",
            summary="the replica holding the longest cached prefix, cold prompts to the "
            "least loaded (Dynamo's KV router, SGLang's cache-aware router)",
            pick="kv-aware",
        ),
        Routing(
            name="ours",
            summary="longest cached prefix within bounded loads (c = 1.25), else "
            "consistent hashing with bounded loads; a shared remote tier",
            pick="kv-aware",
            bounded_load=1.25,
            remote=True,
        ),
    )
}
DEFAULT_ROUTINGS: tuple[str, ...] = tuple(ROUTINGS)


def parse_routings(
    text: str, *, remote: Literal["ours", "all", "none"] = "ours"
) -> tuple[Routing, ...]:
    """Routing policies from a comma-separated list (`all` = every one).

    `remote` says who gets the shared remote tier: `ours` (as defined), `all` or `none`.

    Raises:
        ValueError: an unknown or repeated name, an empty list, or a bad `remote`.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        names = list(ROUTINGS)
    if not names:
        raise ValueError(f"no routing policy given; choose from {', '.join(ROUTINGS)}")
    for name in names:
        if name not in ROUTINGS:
            raise ValueError(
                f"unknown routing policy {name!r}; choose from {', '.join(ROUTINGS)}, all"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"routing list repeats a name: {text!r}")
    if remote not in ("ours", "all", "none"):
        raise ValueError(f"remote must be 'ours', 'all' or 'none', got {remote!r}")
    out = [ROUTINGS[n] for n in names]
    if remote != "ours":
        out = [replace(r, remote=remote == "all") for r in out]
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """`replicas` replicas behind `routing`, sharing `remote` when the routing says so."""

    replicas: int
    routing: Routing
    remote: RemoteProfile = field(default_factory=RemoteProfile)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"ClusterSpec.replicas must be >= 1, got {self.replicas}")


def _point(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


class Router:
    """Chooses a replica for each new connection (see `ROUTINGS`)."""

    def __init__(self, spec: ClusterSpec, nodes: Sequence[_Node]) -> None:
        self.spec = spec
        self.nodes = list(nodes)
        self._next = 0
        ring = sorted(
            (_point(b"replica-%d-%d" % (k, v)), k)
            for k in range(len(self.nodes))
            for v in range(_VNODES)
        )
        self._points = [p for p, _ in ring]
        self._owners = [k for _, k in ring]
        self.counts: Counter[str] = Counter()

    def pick(self, request: Request, prompt: np.ndarray) -> _Node:
        """The replica a new connection for `request` (its full `prompt`) goes to."""
        routing = self.spec.routing
        if len(self.nodes) == 1:
            return self.nodes[0]
        if routing.pick == "round-robin":
            self._next += 1
            self.counts["routed_round_robin"] += 1
            return self.nodes[(self._next - 1) % len(self.nodes)]
        bound = self._bound()
        if routing.pick == "kv-aware":
            best = self._longest_prefix(request, prompt, bound)
            if best is not None:
                self.counts["routed_kv"] += 1
                return best
            if routing.bounded_load is None:
                self.counts["routed_least_loaded"] += 1
                return min(self.nodes, key=lambda n: (n.num_open, n.index))
        self.counts["routed_hash"] += 1
        return self._ring(_routing_key(request), bound)

    def _bound(self) -> int | None:
        c = self.spec.routing.bounded_load
        if c is None:
            return None
        total = sum(n.num_open for n in self.nodes)
        return math.ceil(c * (total + 1) / len(self.nodes))

    def _ring(self, key: bytes, bound: int | None) -> _Node:
        start = bisect.bisect_left(self._points, _point(key))
        owners = self._owners
        for j in range(len(owners)):
            node = self.nodes[owners[(start + j) % len(owners)]]
            if bound is None or node.num_open < bound:
                if j:
                    self.counts["over_bound_skips"] += 1
                return node
        raise AssertionError("bounded loads: the cap always leaves a replica below it")

    def _longest_prefix(
        self, request: Request, prompt: np.ndarray, bound: int | None
    ) -> _Node | None:
        # every replica hashes with the same secret, so one chain serves every lookup
        probe = self.nodes[0].sched.cache.probe_prefix(prompt, tenant=request.tenant)
        hashes, contents = probe.hashes, probe.contents
        best: tuple[int, int, int] | None = None
        for node in self.nodes:
            if bound is not None and node.num_open >= bound:
                continue
            held = node.held_blocks(hashes, contents)
            if held and (best is None or (held, -node.num_open, -node.index) > best):
                best = (held, -node.num_open, -node.index)
        return None if best is None else self.nodes[-best[2]]


def _routing_key(request: Request) -> bytes:
    """Tenant + conversation key: the session, else the prompt's first block (the
    router's instructions + first input item)."""
    conv = request.session_id
    if conv is None:
        conv = f"block:{request.block_keys[0]}" if request.block_keys else "empty"
    return f"{request.tenant}\0{conv}".encode()


class SimRemoteStore:
    """The shared store: which block hashes it holds, LRU-bounded, with writes landing
    when their write ends."""

    def __init__(
        self, profile: RemoteProfile, *, bytes_per_block: int, clock: Callable[[], float]
    ) -> None:
        self.profile = profile
        self.bytes_per_block = bytes_per_block
        self.capacity_blocks = max(1, int(profile.capacity_bytes // bytes_per_block))
        self.clock = clock
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self._landing: list[tuple[float, int, list[bytes]]] = []
        self._seq = 0
        self.blocks_evicted = 0
        self.peak_blocks = 0

    def __len__(self) -> int:
        self._land()
        return len(self._blocks)

    def _land(self) -> None:
        now = self.clock()
        landing, blocks = self._landing, self._blocks
        while landing and landing[0][0] <= now:
            for h in heapq.heappop(landing)[2]:
                blocks[h] = None
                blocks.move_to_end(h)
            while len(blocks) > self.capacity_blocks:
                blocks.popitem(last=False)
                self.blocks_evicted += 1
            self.peak_blocks = max(self.peak_blocks, len(blocks))

    def put(self, hashes: list[bytes], lands_at: float) -> None:
        """`hashes` become readable at `lands_at`."""
        self._seq += 1
        heapq.heappush(self._landing, (lands_at, self._seq, hashes))

    def run(self, hashes: Sequence[bytes]) -> int:
        """Length of the leading run of `hashes` the store holds now (each one read is
        refreshed in the LRU order)."""
        self._land()
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            blocks.move_to_end(h)
            n += 1
        return n

    def stats(self, nodes: Sequence[_Node]) -> dict[str, int]:
        """Totals over the replicas' clients, and the store's own counts."""
        out: Counter[str] = Counter()
        for node in nodes:
            if node.remote is not None:
                out.update(node.remote.counts())
        self._land()
        out["blocks_stored_at_end"] = len(self._blocks)
        out["blocks_stored_peak"] = self.peak_blocks
        out["blocks_evicted"] = self.blocks_evicted
        out["capacity_blocks"] = self.capacity_blocks
        return dict(out)


class _HostShape:
    __slots__ = ("num_blocks",)

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks


class SimRemoteTier:
    """One replica's client of the shared store, duck-typed as `RemoteKVTier` for
    `TieredKVCache` (`max_fetch_blocks`, `host_store`, `fetch_into_host`,
    `write_behind`), moving no bytes."""

    def __init__(self, store: SimRemoteStore, node: _Node, *, host_blocks: int) -> None:
        self.store = store
        self.node = node
        p = store.profile
        self.max_fetch_blocks = p.max_fetch_blocks
        self.host_store = _HostShape(host_blocks)  # what TieredKVCache checks the size of
        self._bpb = store.bytes_per_block
        self._write_free_s = 0.0
        self.reads = 0
        self.blocks_read = 0
        self.blocks_written = 0
        self.blocks_dropped = 0
        self.read_s = 0.0

    def fetch_into_host(
        self, pool: BlockPool, hashes: Sequence[bytes], contents: Sequence[bytes]
    ) -> int:
        """As `RemoteKVTier.fetch_into_host`: the leading run the store holds goes into
        free host blocks, cached and findable; the engine thread waits for the read."""
        p = self.store.profile
        now = self.store.clock()
        want = list(hashes[: self.max_fetch_blocks])
        run = self.store.run(want)
        took = p.latency_s + run * self._bpb / p.read_bytes_per_s
        self.node.block_engine(now + took)
        self.reads += 1
        self.read_s += took
        run = min(run, pool.num_available)
        ids = pool.allocate(run) if run else []
        kept = 0
        for j, block_id in enumerate(ids):
            if not pool.register(block_id, want[j], contents[j]):
                break  # the host already indexes this hash: the run stops at its copy
            kept += 1
        pool.release(ids[::-1])
        self.blocks_read += kept
        return kept

    def write_behind(
        self, block_ids: Sequence[int], hashes: Sequence[bytes], contents: Sequence[bytes]
    ) -> None:
        """Queue full blocks for the store: they land when this replica's write link
        gets to them; a batch that would overfill the queue is dropped, counted."""
        p = self.store.profile
        now = self.store.clock()
        backlog = max(0.0, self._write_free_s - now) * p.write_bytes_per_s / self._bpb
        if backlog + len(hashes) > p.max_pending_blocks:
            self.blocks_dropped += len(hashes)
            return
        start = max(now, self._write_free_s)
        self._write_free_s = start + p.latency_s + len(hashes) * self._bpb / p.write_bytes_per_s
        self.store.put(list(hashes), self._write_free_s)
        self.blocks_written += len(hashes)

    def counts(self) -> dict[str, int]:
        return {
            "reads": self.reads,
            "blocks_read": self.blocks_read,
            "blocks_written": self.blocks_written,
            "blocks_dropped": self.blocks_dropped,
            "read_us": round(self.read_s * 1e6),
        }
