"""SchedulerConfig: the admission, pinning and eviction knobs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal


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
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        # a private read-only copy: mutating the caller's dict cannot bypass validation
        for name in ("tenant_max_pinned", "tenant_max_pinned_blocks"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
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
