"""SchedulerConfig: the admission, pinning and eviction knobs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefetchConfig:
    """When and how much the scheduler prefetches resting sessions.

    An offloaded session (or a dropped one whose blocks the host holds) that the
    idle-gap model (`IdleGapModel.returns_within`) expects back within its window with
    at least `min_return_probability` is restored before it returns, and lands as an
    IDLE pinned session. Its window is `horizon_s`, cut where the idle TTL would offload
    it again (a session idle past the TTL is no candidate). Only one restore is in
    flight at a time (a prefetch starts only while no turn's own restore is copying, so
    a foreground restore waits behind one prefetch at most, of at most
    `max_inflight_blocks`: 1024 blocks of 2 MiB are 86 ms at 25 GB/s), only with a pin
    slot free, within its tenant's caps, and
    only when its blocks fit under the high watermark less `headroom` of the pool
    without evicting anyone.

    A prefetched session that has not returned is evictable by anyone (whatever its
    priority or tenant share): with `protect`, only as a last resort until its window
    ends, then first; without, always first. Its blocks are still on the host, so
    releasing it copies nothing, but the copy was wasted: that session is then not
    prefetched again for `backoff_s`, doubled for each further waste, until it returns.

    Waste budget: a prefetch of `n` blocks starts only while `min_hit_rate * n` fits in
    `waste_allowance_blocks + (1 - min_hit_rate) * used - min_hit_rate * (wasted +
    undecided)` (blocks prefetched and used, wasted, or neither yet; a session closed
    before it came back wasted its prefetch), so that waste stays
    under `1 - min_hit_rate` of the prefetched blocks plus the allowance over a run, and
    prefetch stops while the observed hit rate is under `min_hit_rate` (0: no budget).
    """

    # defaults tuned on the agent workload at a quarter of the peak (docs: issue 18):
    # a 30 s window at 80% keeps most prefetches used; 10% headroom leaves turns room
    headroom: float = 0.1
    max_inflight_blocks: int = 1024
    horizon_s: float = 30.0
    min_return_probability: float = 0.8
    protect: bool = True
    backoff_s: float = 60.0
    min_hit_rate: float = 0.8
    waste_allowance_blocks: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.headroom < 1.0:
            raise ValueError(f"PrefetchConfig.headroom must be in [0, 1), got {self.headroom}")
        for name in ("max_inflight_blocks", "waste_allowance_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PrefetchConfig.{name} must be an int, got {value!r}")
        if self.max_inflight_blocks < 1:
            raise ValueError(
                f"PrefetchConfig.max_inflight_blocks must be >= 1, got {self.max_inflight_blocks}"
            )
        if self.waste_allowance_blocks < 0:
            raise ValueError(
                "PrefetchConfig.waste_allowance_blocks must be >= 0, got "
                f"{self.waste_allowance_blocks}"
            )
        if not 0 < self.horizon_s < float("inf"):
            raise ValueError(
                f"PrefetchConfig.horizon_s must be > 0 and finite, got {self.horizon_s}"
            )
        if not 0.0 < self.min_return_probability <= 1.0:
            raise ValueError(
                "PrefetchConfig.min_return_probability must be in (0, 1], got "
                f"{self.min_return_probability}"
            )
        if not isinstance(self.protect, bool):
            raise TypeError(f"PrefetchConfig.protect must be a bool, got {self.protect!r}")
        if not 0.0 <= self.backoff_s < float("inf"):
            raise ValueError(
                f"PrefetchConfig.backoff_s must be >= 0 and finite, got {self.backoff_s}"
            )
        if not 0.0 <= self.min_hit_rate < 1.0:
            raise ValueError(
                f"PrefetchConfig.min_hit_rate must be in [0, 1), got {self.min_hit_rate}"
            )

    @property
    def waste_fraction(self) -> float:
        """The share of prefetched blocks the waste budget lets go unused."""
        return 1.0 - self.min_hit_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """How the scheduler admits turns and makes room.

    Attributes:
        max_pinned_sessions: sessions holding GPU blocks at once (ACTIVE + IDLE).
        high_watermark: admitted turns keep GPU blocks in use at or under this fraction
            of the pool (the rest is headroom for decode growth and in-flight restores).
        max_queue: waiting turns beyond which a new one is refused at once.
        queue_timeout_s: a turn waiting longer is refused.
        idle_ttl_s: a pinned IDLE session idle this long is offloaded proactively (None:
            only under pressure).
        pin_sessions: keep a session's blocks referenced between turns (connection-scoped
            caching). False releases them to the hash cache at each turn's end.
        offload_on_release: with `pin_sessions=False`, copy a turn's blocks to the host
            tier when the turn ends (write-through, as a host-tier prefix cache does).
        reuse_prefix: look up cached prefixes at all (False models a stateless server).
        offload_idle: make room by offloading idle sessions to the host when that beats
            recomputing them (False: always drop).
        backup_idle: with a host tier, copy a session's new full blocks to the host when
            its turn ends, while it stays pinned (write-back ahead of need): making room
            then releases its GPU blocks without an offload copy (at once when that
            backup has landed, when it completes otherwise), and its prefix stays
            findable on the host. Costs host-link bandwidth (each
            block is copied once) and reclaimable host memory.
        offload_on_close: with a host tier, write a closed IDLE session's blocks through
            to the host (when it has room), so a client that reconnects after the GPU
            reclaimed them still finds its prefix; `close_session(offload=...)` overrides.
        victim_order: which idle session makes room first (after priority and tenant
            caps): "predicted" = the one most likely to stay idle a while longer, from
            the idle gaps observed so far (`IdleGapModel`; least recently used until enough are
            seen, and on ties), or "lru" = least recently used.
        tenant_max_pinned: per-tenant caps on pinned sessions (a tenant mapped to
            None has no cap); tenants not in it get `tenant_default_max_pinned`.
        tenant_default_max_pinned: the pinned-session cap of tenants not named in
            `tenant_max_pinned` (None: none).
        tenant_max_pinned_blocks, tenant_default_max_pinned_blocks: the same for GPU
            blocks held by a tenant's pinned sessions, checked when a turn is admitted:
            over it the turn makes room from its own tenant's idle sessions, or waits.
        layerwise_restore: the model runner overlaps a restore with the prefill layer by
            layer (each layer waits only for its own copy), so the cost model plans
            splits with that overlap.
        restore_split: plan each restore as load-and-compute (`CostModel.split_restore`):
            copy the front of the host run and compute the back with the new tokens,
            where that ends the prefill sooner (counted in `restores_split` and
            `tokens_split_recomputed`).
        prefetch: bring offloaded sessions likely to return soon back into free GPU
            blocks before they return (`PrefetchConfig`; None: off).
    """

    max_pinned_sessions: int = 64
    high_watermark: float = 0.95
    max_queue: int = 256
    queue_timeout_s: float = 30.0
    idle_ttl_s: float | None = None
    pin_sessions: bool = True
    offload_on_release: bool = False
    reuse_prefix: bool = True
    offload_idle: bool = True
    offload_on_close: bool = True
    backup_idle: bool = False
    victim_order: Literal["predicted", "lru"] = "predicted"
    tenant_max_pinned: Mapping[str, int | None] = field(default_factory=dict)
    tenant_default_max_pinned: int | None = None
    tenant_max_pinned_blocks: Mapping[str, int | None] = field(default_factory=dict)
    tenant_default_max_pinned_blocks: int | None = None
    layerwise_restore: bool = False
    restore_split: bool = False
    prefetch: PrefetchConfig | None = None

    def __post_init__(self) -> None:
        for name in ("max_pinned_sessions", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        for name in (
            "pin_sessions",
            "offload_on_release",
            "reuse_prefix",
            "offload_idle",
            "offload_on_close",
            "backup_idle",
            "layerwise_restore",
            "restore_split",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        # a private read-only copy: mutating the caller's dict cannot bypass validation
        for name in ("tenant_max_pinned", "tenant_max_pinned_blocks"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        if self.prefetch is not None and not isinstance(self.prefetch, PrefetchConfig):
            raise TypeError(f"prefetch must be a PrefetchConfig or None, got {self.prefetch!r}")
        if self.victim_order not in ("predicted", "lru"):
            raise ValueError(
                f"victim_order must be 'predicted' or 'lru', got {self.victim_order!r}"
            )
        if self.max_pinned_sessions < 1:
            raise ValueError(f"max_pinned_sessions must be >= 1, got {self.max_pinned_sessions}")
        if not 0.0 < self.high_watermark <= 1.0:
            raise ValueError(f"high_watermark must be in (0, 1], got {self.high_watermark}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s must be >= 0, got {self.queue_timeout_s}")
        if self.idle_ttl_s is not None and self.idle_ttl_s < 0:
            raise ValueError(f"idle_ttl_s must be >= 0 or None, got {self.idle_ttl_s}")
        for name in ("tenant_max_pinned", "tenant_max_pinned_blocks"):
            for tenant, cap in getattr(self, name).items():
                _check_cap(f"{name}[{tenant!r}]", cap)
        _check_cap("tenant_default_max_pinned", self.tenant_default_max_pinned)
        _check_cap("tenant_default_max_pinned_blocks", self.tenant_default_max_pinned_blocks)

    def tenant_pinned_cap(self, tenant: str) -> int | None:
        """The most sessions `tenant` may have pinned (None: no tenant cap)."""
        caps = self.tenant_max_pinned
        return caps.get(tenant, self.tenant_default_max_pinned)

    def tenant_blocks_cap(self, tenant: str) -> int | None:
        """The most GPU blocks `tenant`'s pinned sessions may hold (None: no cap)."""
        caps = self.tenant_max_pinned_blocks
        return caps.get(tenant, self.tenant_default_max_pinned_blocks)

    @property
    def has_tenant_caps(self) -> bool:
        return bool(
            self.tenant_max_pinned
            or self.tenant_max_pinned_blocks
            or self.tenant_default_max_pinned is not None
            or self.tenant_default_max_pinned_blocks is not None
        )


def _check_cap(name: str, cap: object) -> None:
    if cap is None:
        return
    if isinstance(cap, bool) or not isinstance(cap, int):
        raise TypeError(f"{name} must be an int or None, got {cap!r}")
    if cap < 1:
        raise ValueError(f"{name} must be >= 1, got {cap}")
