"""Per-tenant limits and the connection caps of the server.

`TenantLimits` are what one tenant may hold at once: open WebSocket connections,
in-flight HTTP requests, pinned sessions and pinned GPU blocks. The first two are
counted here (`ConnectionQuotas`, on the event loop); the last two are scheduler caps
(`SchedulerConfig.tenant_max_pinned` / `tenant_max_pinned_blocks` and their defaults),
which `scheduler_caps` fills in. Over a cap, a client gets the API's rate-limit error
(HTTP 429, `rate_limit_exceeded`) at once, never a hang.

Limits come from the keys file:

    {"keys": [...],
     "default_limits": {"max_connections": 16, "max_pinned_sessions": 8},
     "tenants": {"acme": {"max_connections": 64, "max_pinned_blocks": 20000}}}

A tenant without an entry gets `default_limits`; a tenant's entry replaces the limits it
names and keeps the default for the others; `null` is "no limit" for that tenant (the
global caps still apply).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pagedkv.serving.auth import TENANT_RE, read_keys_file
from pagedkv.serving.protocol import ProtocolError

__all__ = [
    "ConnectionQuotas",
    "TenantLimits",
    "TenantPolicy",
    "load_policy",
    "quota_error",
    "scheduler_caps",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantLimits:
    """What one tenant may hold at once (None: no per-tenant limit).

    Attributes:
        max_connections: open WebSocket connections.
        max_http_requests: HTTP requests in flight.
        max_pinned_sessions: sessions holding GPU blocks (the scheduler's cap).
        max_pinned_blocks: GPU blocks its pinned sessions hold, checked when a turn is
            admitted (the scheduler makes room from the tenant's own idle sessions).
    """

    max_connections: int | None = None
    max_http_requests: int | None = None
    max_pinned_sessions: int | None = None
    max_pinned_blocks: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"TenantLimits.{f.name} must be an int >= 1 or None, "
                                 f"got {value!r}")  # fmt: skip

    @classmethod
    def from_json(cls, obj: object, where: str) -> TenantLimits:
        """From a keys-file object such as `{"max_connections": 4}`.

        Raises:
            ValueError: not an object, an unknown limit name, or a bad value (naming
                `where`).
        """
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where} must be an object of limits")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in obj if k not in names)
        if unknown:
            raise ValueError(f"{where}: unknown limits {unknown}; expected some of {sorted(names)}")
        try:
            return cls(**dict(obj))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """Limits by tenant, with a default for tenants not named."""

    default: TenantLimits = field(default_factory=TenantLimits)
    tenants: Mapping[str, TenantLimits] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenants", MappingProxyType(dict(self.tenants)))

    def limits(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default)


def load_policy(keys_file: str | Path | None, default: TenantLimits | None = None) -> TenantPolicy:
    """The tenant limits of a keys file: its `default_limits` (each limit given there
    replaces the same one of `default`, the command line's) and `tenants`.

    Raises:
        ValueError: a malformed limits object or tenant name, naming where.
    """
    base = default or TenantLimits()
    if keys_file is None:
        return TenantPolicy(base)
    path = Path(keys_file)
    data = read_keys_file(path)
    raw_default = data.get("default_limits", {})
    given = TenantLimits.from_json(raw_default, f"keys file {path}: default_limits")
    assert isinstance(raw_default, Mapping)
    merged = dataclasses.replace(base, **{k: getattr(given, k) for k in raw_default})
    raw_tenants = data.get("tenants", {})
    if not isinstance(raw_tenants, Mapping):
        raise ValueError(f'keys file {path}: "tenants" must be an object of tenant -> limits')
    tenants: dict[str, TenantLimits] = {}
    for name, limits in raw_tenants.items():
        if not TENANT_RE.match(name):
            raise ValueError(f"keys file {path}: tenant name {name[:64]!r} must be 1-64 "
                             "characters of [A-Za-z0-9_.-]")  # fmt: skip
        own = TenantLimits.from_json(limits, f"keys file {path}: tenants.{name}")
        assert isinstance(limits, Mapping)
        tenants[name] = dataclasses.replace(merged, **{k: getattr(own, k) for k in limits})
    return TenantPolicy(merged, tenants)


def quota_error(message: str, *, code: str = "rate_limit_exceeded") -> ProtocolError:
    """The API's rate-limit error (HTTP 429)."""
    return ProtocolError(message, code=code, status=429, type="requests")


class ConnectionQuotas:
    """Counts open WebSocket connections and in-flight HTTP requests, globally and per
    tenant. Used from the event loop only (no locking).

    Args:
        policy: the per-tenant limits.
        max_connections: open WebSocket connections across all tenants (None: no cap).
        max_http_requests: HTTP requests in flight across all tenants (None: no cap).
    """

    def __init__(
        self,
        policy: TenantPolicy | None = None,
        *,
        max_connections: int | None = None,
        max_http_requests: int | None = None,
    ) -> None:
        for name, value in (("max_connections", max_connections),
                            ("max_http_requests", max_http_requests)):  # fmt: skip
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ConnectionQuotas: {name} must be an int >= 1 or None, "
                                 f"got {value!r}")  # fmt: skip
        self.policy = policy or TenantPolicy()
        self.max_connections = max_connections
        self.max_http_requests = max_http_requests
        self.connections: Counter[str] = Counter()
        self.http_requests: Counter[str] = Counter()

    def _acquire(self, kind: str, counts: Counter[str], tenant: str, cap: int | None,
                 tenant_cap: int | None) -> None:  # fmt: skip
        if cap is not None and counts.total() >= cap:
            raise quota_error(
                f"the server has {counts.total()} open {kind} (limit {cap}); retry later"
            )
        if tenant_cap is not None and counts[tenant] >= tenant_cap:
            raise quota_error(
                f"this API key's tenant has {counts[tenant]} open {kind} (limit "
                f"{tenant_cap}); close one or retry later"
            )
        counts[tenant] += 1

    @staticmethod
    def _release(counts: Counter[str], tenant: str) -> None:
        counts[tenant] -= 1
        if counts[tenant] <= 0:
            del counts[tenant]

    def open_connection(self, tenant: str) -> None:
        """Count a new WebSocket connection of `tenant`.

        Raises:
            ProtocolError: 429 `rate_limit_exceeded`, over the global or tenant cap.
        """
        limits = self.policy.limits(tenant)
        self._acquire("WebSocket connections", self.connections, tenant,
                      self.max_connections, limits.max_connections)  # fmt: skip

    def close_connection(self, tenant: str) -> None:
        self._release(self.connections, tenant)

    def start_http(self, tenant: str) -> None:
        """Count a new HTTP request of `tenant` (raises as `open_connection`)."""
        limits = self.policy.limits(tenant)
        self._acquire("HTTP requests", self.http_requests, tenant,
                      self.max_http_requests, limits.max_http_requests)  # fmt: skip

    def end_http(self, tenant: str) -> None:
        self._release(self.http_requests, tenant)

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections.total(),
            "http_requests": self.http_requests.total(),
            "connections_by_tenant": dict(self.connections),
        }


def scheduler_caps(policy: TenantPolicy) -> dict[str, Any]:
    """The `SchedulerConfig` fields that carry `policy`'s pinned caps."""
    return {
        # a named tenant's None is "no cap", not "the default cap": keep it
        "tenant_max_pinned": {t: lim.max_pinned_sessions for t, lim in policy.tenants.items()},
        "tenant_default_max_pinned": policy.default.max_pinned_sessions,
        "tenant_max_pinned_blocks": {t: lim.max_pinned_blocks for t, lim in policy.tenants.items()},
        "tenant_default_max_pinned_blocks": policy.default.max_pinned_blocks,
    }
