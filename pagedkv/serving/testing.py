"""Helpers for tests and examples: a tiny-model server in-process, and event collection.

For example:

    with tiny_server(scheduler=SchedulerConfig(max_pinned_sessions=2)) as (server, engine):
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pagedkv.serving.auth import Authenticator
from pagedkv.serving.engine import Engine
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.serving.local_server import HEADER_TIMEOUT_S, LocalServer
from pagedkv.serving.quotas import ConnectionQuotas
from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.server import create_app
from pagedkv.serving.server_metrics import ServerMetrics

TERMINAL = ("response.completed", "response.incomplete", "response.failed")


@contextlib.contextmanager
def tiny_server(
    *,
    server: ServerConfig | None = None,
    preset: str = "tiny",
    auth: Authenticator | None = None,
    quotas: ConnectionQuotas | None = None,
    metrics: ServerMetrics | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    **engine_config: Any,
) -> Iterator[tuple[LocalServer, Engine]]:
    """A LocalServer on the `preset` model (random weights, seed 0) and its engine;
    `auth`, `quotas` and `metrics` as in `create_app`; `header_timeout_s` as in
    `LocalServer`."""
    model = build_model(preset)
    config: dict[str, Any] = {"num_gpu_blocks": 256, "num_host_blocks": 256, **engine_config}
    engine = build_engine(model, **config)
    cfg = server or ServerConfig(model_name=preset)
    app = create_app(engine, cfg, auth=auth, quotas=quotas, metrics=metrics)
    with LocalServer(app, header_timeout_s=header_timeout_s) as srv:
        yield srv, engine


def read_response(events: Iterable[Any]) -> list[Any]:
    """Events of one response from an event iterator (SDK objects or dicts), up to
    `response.completed` / `response.failed`, or a lone `error` sent before any
    `response.created`."""
    out: list[Any] = []
    started = False
    for ev in events:
        kind = ev["type"] if isinstance(ev, dict) else ev.type
        out.append(ev)
        if kind == "response.created":
            started = True
        if kind in TERMINAL or (kind == "error" and not started):
            return out
    raise RuntimeError(f"the event stream ended after {len(out)} events without a response end")


def engine_check(engine: Engine) -> dict[str, Any]:
    """Scheduler and cache invariants (raises on a broken one), then the engine stats;
    run on the engine thread."""

    def check(e: Engine) -> dict[str, Any]:
        e.scheduler.check_invariants()
        e.cache.check_invariants()
        return e.stats()

    return dict(engine.call(check).result(timeout=30))


def wait_released(engine: Engine, timeout: float = 10.0) -> dict[str, Any]:
    """`engine_check` once the engine holds no session and no GPU block is in use
    (closing a connection releases its session a moment after the client sees the
    close, and its offload to the host tier holds the blocks until the copy is done);
    raises after `timeout` if a session is still open."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_check(engine)
        idle = stats["num_sessions"] == 0 and stats["gpu_blocks"]["in_use"] == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if stats["num_sessions"]:
        raise AssertionError(f"the engine still holds {stats['num_sessions']} sessions")
    return stats
