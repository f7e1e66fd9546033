"""Prometheus metrics of the server (`GET /metrics`, `prometheus-client`).

Each app has its own `CollectorRegistry`, so several servers in one process (tests, an
embedding server) never mix their series. Families:

    pagedkv_requests_total{tenant,transport,status}     finished responses by status
    pagedkv_errors_total{tenant,transport,code}          refused or failed requests
    pagedkv_ttft_seconds{transport}                       time to first output token
    pagedkv_inter_token_seconds{transport}                time between output deltas
    pagedkv_input_tokens_total{tenant}                    prompt tokens
    pagedkv_cached_tokens_total{tenant}                   prompt tokens served from cache
    pagedkv_cached_token_ratio{transport}                 cached / input, per response
    pagedkv_open_connections                              WebSocket connections open
    pagedkv_connection_aborts_total{reason}               transports aborted (slow clients)
    pagedkv_pinned_sessions, pagedkv_queue_depth,
    pagedkv_gpu_blocks_in_use, pagedkv_host_blocks_in_use,
    pagedkv_gpu_blocks_total, pagedkv_host_blocks_total   engine state, read at scrape time
    pagedkv_offload_bytes_total, pagedkv_restore_bytes_total   host-tier traffic

Label values are bounded so a client cannot grow the series without limit, nor take
the label slots of real tenants: with a keys file, the configured tenants get their own
`tenant` label and anyone else is "other"; without one (every bearer token is a tenant,
so a client could mint tenants at will), a tenant gets one of `max_tenants` label slots
only once a response of its own has finished, and refusals alone never take a slot.
Error codes are the server's own; a code it does not know is counted as "other".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ResponseObserver", "ServerMetrics"]

OTHER = "other"
TRANSPORTS = ("ws", "http")
ABORT_REASONS = ("send_timeout", "close_timeout")
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
_DELTA_EVENTS = ("response.output_text.delta", "response.function_call_arguments.delta")
_FINAL_EVENTS = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
}
# the codes this server sends; anything else is labelled "other"
KNOWN_CODES = frozenset(
    {
        "invalid_json", "invalid_type", "invalid_value", "unsupported_value",
        "unknown_event_type", "invalid_message", "message_too_large", "model_not_found",
        "integer_above_max_value", "previous_response_not_found", "context_length_exceeded",
        "too_many_queued_responses", "rate_limit_exceeded", "over_capacity",
        "websocket_connection_limit_reached", "server_error", "session_not_found",
        "response_already_in_flight", "invalid_api_key", "missing_api_key",
        "admin_key_required", "request_timeout",
    }
)  # fmt: skip


class _EngineCollector(Collector):
    """Engine gauges from the last `engine.stats()` snapshot (`ServerMetrics.update`)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None

    def collect(self) -> Any:
        s = self.stats
        if s is None:
            return
        gauges = {
            "pagedkv_pinned_sessions": ("sessions holding GPU blocks", s.get("num_pinned")),
            "pagedkv_queue_depth": ("turns waiting for admission", s.get("num_waiting")),
            "pagedkv_running_turns": ("turns admitted and running", s.get("num_running")),
            "pagedkv_engine_sessions": ("open engine sessions", s.get("num_sessions")),
        }
        for kind in ("gpu", "host"):
            pool = s.get(f"{kind}_blocks")
            if pool is None:
                continue
            gauges[f"pagedkv_{kind}_blocks_in_use"] = (f"{kind} blocks in use", pool["in_use"])
            gauges[f"pagedkv_{kind}_blocks_cached"] = (
                f"{kind} blocks held only by the prefix cache",
                pool["cached"],
            )
            gauges[f"pagedkv_{kind}_blocks_total"] = (f"{kind} blocks in the pool", pool["total"])
        for name, (doc, value) in gauges.items():
            if value is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(value))
                yield g
        sched = s.get("scheduler", {})
        for name, key, doc in (
            ("pagedkv_offload_bytes", "bytes_offloaded", "bytes copied GPU -> host"),
            ("pagedkv_restore_bytes", "bytes_restored", "bytes copied host -> GPU"),
        ):
            if key in sched:
                c = CounterMetricFamily(name, doc)
                c.add_metric([], float(sched[key]))
                yield c
        remote = s.get("remote")
        if remote:  # the remote tier's counters, one family with an `event` label
            c = CounterMetricFamily(
                "pagedkv_remote_blocks",
                "remote-tier blocks by event (queued, written, dropped, hit, missed, corrupt)",
                labels=["event"],
            )
            for event in ("queued", "written", "dropped", "hit", "missed", "corrupt"):
                c.add_metric([event], float(remote.get(f"blocks_{event}", 0)))
            yield c
            c = CounterMetricFamily("pagedkv_remote_errors", "failed remote-tier calls",
                                    labels=["op"])  # fmt: skip
            c.add_metric(["read"], float(remote.get("read_errors", 0)))
            c.add_metric(["write"], float(remote.get("write_errors", 0)))
            yield c


class ServerMetrics:
    """The server's Prometheus series (see the module docstring).

    Args:
        known_tenants: the configured tenants (a keys file's): only these get their own
            label. None: labels are handed out as described in the module docstring.
        max_tenants: without `known_tenants`, distinct `tenant` label values before the
            rest share "other".
    """

    def __init__(
        self, *, known_tenants: Iterable[str] | None = None, max_tenants: int = 32
    ) -> None:
        if not isinstance(max_tenants, int) or max_tenants < 0:
            raise ValueError(f"max_tenants must be an int >= 0, got {max_tenants!r}")
        self.max_tenants = max_tenants
        self.known_tenants = None if known_tenants is None else frozenset(known_tenants)
        self._tenants: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pagedkv_requests", "finished responses",
                                ["tenant", "transport", "status"], registry=r)  # fmt: skip
        self.errors = Counter("pagedkv_errors", "refused or failed requests by error code",
                              ["tenant", "transport", "code"], registry=r)  # fmt: skip
        self.ttft = Histogram("pagedkv_ttft_seconds", "time to first output token",
                              ["transport"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.inter_token = Histogram("pagedkv_inter_token_seconds",
                                     "time between output deltas of one response",
                                     ["transport"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.input_tokens = Counter("pagedkv_input_tokens", "prompt tokens",
                                    ["tenant"], registry=r)  # fmt: skip
        self.cached_tokens = Counter("pagedkv_cached_tokens",
                                     "prompt tokens served from the KV cache",
                                     ["tenant"], registry=r)  # fmt: skip
        self.cached_ratio = Histogram("pagedkv_cached_token_ratio",
                                      "cached / input tokens of each finished response",
                                      ["transport"], buckets=_RATIO_BUCKETS, registry=r)  # fmt: skip
        self.open_connections = Gauge("pagedkv_open_connections",
                                      "WebSocket connections open", registry=r)  # fmt: skip
        self.aborts = Counter("pagedkv_connection_aborts",
                              "transports aborted because the client did not read",
                              ["reason"], registry=r)  # fmt: skip
        self._engine = _EngineCollector()
        r.register(self._engine)

    # ------------------------------------------------------------------ labels
    def tenant_label(self, tenant: str | None, *, admit: bool = False) -> str:
        """The `tenant` label of `tenant`; `admit`: it finished a response, so it may take
        a free label slot (without `known_tenants`)."""
        t = tenant or "-"
        if self.known_tenants is not None:
            return t if t in self.known_tenants else OTHER
        if t in self._tenants:
            return t
        if admit and len(self._tenants) < self.max_tenants:
            self._tenants.add(t)
            return t
        return OTHER

    @staticmethod
    def _transport(transport: str) -> str:
        return transport if transport in TRANSPORTS else OTHER

    # ------------------------------------------------------------------ events
    def connection_opened(self) -> None:
        self.open_connections.inc()

    def connection_closed(self) -> None:
        self.open_connections.dec()

    def aborted(self, reason: str) -> None:
        self.aborts.labels(reason if reason in ABORT_REASONS else OTHER).inc()

    def refused(self, tenant: str | None, transport: str, code: str) -> None:
        """A request refused before it ran (or an error event sent on its own)."""
        self.errors.labels(
            self.tenant_label(tenant),
            self._transport(transport),
            code if code in KNOWN_CODES else OTHER,
        ).inc()

    def response(self, tenant: str | None, transport: str) -> ResponseObserver:
        """An observer for the events of one response."""
        return ResponseObserver(self, tenant, self._transport(transport))

    # ------------------------------------------------------------------ scraping
    def update(self, stats: dict[str, Any] | None) -> None:
        """The engine snapshot the next scrape reports (None: no engine gauges)."""
        self._engine.stats = stats

    def render(self) -> bytes:
        """The text exposition format of every series."""
        return generate_latest(self.registry)


class ResponseObserver:
    """Turns one response's events into observations: TTFT and the cached ratio from
    the finished response's `usage` and `metrics`, inter-token gaps from the deltas as
    they are sent, requests by final status, errors by code."""

    __slots__ = ("_last_delta", "_m", "_tenant", "_transport")

    def __init__(self, metrics: ServerMetrics, tenant: str | None, transport: str) -> None:
        self._m = metrics
        self._tenant = tenant
        self._transport = transport
        self._last_delta: float | None = None

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        m = self._m
        if kind in _DELTA_EVENTS:
            now = time.monotonic()
            if self._last_delta is not None:
                m.inter_token.labels(self._transport).observe(now - self._last_delta)
            self._last_delta = now
            return
        if kind == "error":
            code = event.get("error", {}).get("code") or "server_error"
            m.refused(self._tenant, self._transport, code)
            return
        status = _FINAL_EVENTS.get(kind) if isinstance(kind, str) else None
        if status is None:
            return
        tenant = m.tenant_label(self._tenant, admit=status != "failed")
        m.requests.labels(tenant, self._transport, status).inc()
        response = event.get("response") or {}
        usage = response.get("usage")
        if usage:
            inp = int(usage.get("input_tokens") or 0)
            cached = int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0)
            m.input_tokens.labels(tenant).inc(inp)
            m.cached_tokens.labels(tenant).inc(cached)
            if inp > 0:
                m.cached_ratio.labels(self._transport).observe(cached / inp)
        ttft_ms = (response.get("metrics") or {}).get("ttft_ms")
        if isinstance(ttft_ms, int | float):
            m.ttft.labels(self._transport).observe(ttft_ms / 1000.0)
