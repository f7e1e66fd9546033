"""Quotas with many real connections on loopback: the global and per-tenant connection
caps refuse the handshake with 429 `rate_limit_exceeded` (never a hang), HTTP requests in
flight are capped per tenant (the `openai` SDK raises `RateLimitError`), and the
scheduler's per-tenant pinned cap holds behind the server. Everything is released when
the clients close.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.serving.auth import Authenticator
from pagedkv.serving.quotas import ConnectionQuotas, TenantLimits, TenantPolicy, scheduler_caps
from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.testing import engine_check, read_response, tiny_server, wait_released

KEYS = {"sk-alice": "alice", "sk-bob": "bob"}
POLICY = TenantPolicy(
    TenantLimits(max_connections=6, max_http_requests=1, max_pinned_sessions=2),
    {"bob": TenantLimits(max_connections=20, max_http_requests=4, max_pinned_sessions=None)},
)
GLOBAL_CONNECTIONS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Any, Any, ConnectionQuotas]]:
    quotas = ConnectionQuotas(POLICY, max_connections=GLOBAL_CONNECTIONS, max_http_requests=16)
    sched = SchedulerConfig(max_pinned_sessions=16, **scheduler_caps(POLICY))
    with tiny_server(
        auth=Authenticator.from_keys(KEYS), quotas=quotas, scheduler=sched, step_delay_s=0.02,
        server=ServerConfig(model_name="tiny", idle_timeout_s=None),
    ) as (srv, engine):  # fmt: skip
        yield srv, engine, quotas


def ws(srv: Any, key: str) -> Any:
    return connect(srv.ws_url, additional_headers={"Authorization": f"Bearer {key}"},
                   open_timeout=10)  # fmt: skip


def refused(srv: Any, key: str) -> dict[str, Any]:
    with pytest.raises(InvalidStatus) as err:
        ws(srv, key).close()
    assert err.value.response.status_code == 429
    return dict(json.loads(err.value.response.body)["error"])


def events(conn: Any) -> Iterator[dict[str, Any]]:
    while True:
        yield json.loads(conn.recv(timeout=60))


def turn(conn: Any, text: str, previous: str | None = None) -> dict[str, Any]:
    conn.send(json.dumps({"type": "response.create", "model": "tiny", "input": text,
                          "max_output_tokens": 2, "previous_response_id": previous}))  # fmt: skip
    got = read_response(events(conn))
    assert got[-1]["type"] in ("response.completed", "response.incomplete"), got[-2:]
    return dict(got[-1]["response"])


def settle(engine: Any, quotas: ConnectionQuotas) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if quotas.snapshot()["connections"] == 0 and engine_check(engine)["num_sessions"] == 0:
            return
        time.sleep(0.05)
    pytest.fail(f"not released: {quotas.snapshot()}")


def test_per_tenant_and_global_connection_caps(server: Any) -> None:
    srv, engine, quotas = server
    with ExitStack() as stack:
        alice = [stack.enter_context(ws(srv, "sk-alice")) for _ in range(6)]
        err = refused(srv, "sk-alice")
        assert err["code"] == "rate_limit_exceeded" and "limit 6" in err["message"]
        # bob has his own, larger cap: alice's connections do not count against it
        bob = [stack.enter_context(ws(srv, "sk-bob")) for _ in range(18)]
        # 24 open: the global cap refuses everyone now, bob below his own cap included
        err = refused(srv, "sk-bob")
        assert "the server has 24 open" in err["message"]
        assert quotas.snapshot()["connections_by_tenant"] == {"alice": 6, "bob": 18}
        # every accepted connection works
        assert turn(alice[0], "hello from alice")["status"] in ("completed", "incomplete")
        assert turn(bob[-1], "hello from bob")["status"] in ("completed", "incomplete")
        # closing one frees a slot
        bob.pop().close()
        deadline = time.monotonic() + 5
        while quotas.snapshot()["connections"] != 23 and time.monotonic() < deadline:
            time.sleep(0.02)
        stack.enter_context(ws(srv, "sk-bob"))
    settle(engine, quotas)


def test_an_unknown_key_is_refused_with_401_not_counted(server: Any) -> None:
    srv, _engine, quotas = server
    with pytest.raises(InvalidStatus) as err:
        ws(srv, "sk-nobody").close()
    assert err.value.response.status_code == 401
    assert quotas.snapshot()["connections"] == 0


def test_http_requests_in_flight_are_capped_per_tenant(server: Any) -> None:
    srv, engine, quotas = server
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-alice", max_retries=0)
    done = threading.Event()
    results: list[Any] = []

    def long_request() -> None:
        try:
            results.append(client.responses.create(model="tiny", input="a slow one",
                                                   max_output_tokens=60, temperature=0))  # fmt: skip
        finally:
            done.set()

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 10
    while quotas.snapshot()["http_requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model="tiny", input="a second one", max_output_tokens=2)
    assert err.value.code == "rate_limit_exceeded"
    # another tenant is not affected
    bob = openai.OpenAI(base_url=srv.base_url, api_key="sk-bob", max_retries=0)
    assert bob.responses.create(model="tiny", input="bob", max_output_tokens=2).status
    t.join(60)
    assert done.is_set() and results and results[0].status in ("completed", "incomplete")
    assert quotas.snapshot()["http_requests"] == 0
    settle(engine, quotas)


def test_pinned_sessions_are_capped_per_tenant_behind_the_server(server: Any) -> None:
    srv, engine, quotas = server
    with ExitStack() as stack:
        alice = [stack.enter_context(ws(srv, "sk-alice")) for _ in range(5)]
        bob = [stack.enter_context(ws(srv, "sk-bob")) for _ in range(5)]
        first = [turn(conn, f"conversation {i} " * 8) for i, conn in enumerate(alice + bob)]
        pinned = engine_check(engine)["pinned_by_tenant"]
        assert pinned["alice"] <= 2  # alice's cap; her other sessions were offloaded
        assert pinned["bob"] == 5  # bob has no tenant cap and the global cap is 16
        # alice's offloaded sessions still continue (restored from the host tier)
        second = turn(alice[0], "and a follow-up", first[0]["id"])
        assert second["usage"]["input_tokens_details"]["cached_tokens"] > 0
    settle(engine, quotas)


def test_lanes_count_as_sessions_against_the_tenants_pinned_cap(server: Any) -> None:
    """Sixteen lanes of one connection are sixteen sessions: alice's connection cannot
    pin more than her cap, bob keeps his; a fork of an offloaded lane is served from the
    host tier / hash cache."""
    srv, engine, quotas = server
    lanes = [f"lane{i}" for i in range(16)]
    with ws(srv, "sk-alice") as alice, ws(srv, "sk-bob") as bob:
        for i, lane in enumerate(lanes):
            alice.send(json.dumps({"type": "response.create", "model": "tiny",
                                   "input": f"lane {i} " * 12, "max_output_tokens": 2,
                                   "stream_id": lane}))  # fmt: skip
        bob_first = turn(bob, "bob works meanwhile " * 4)
        done: dict[str, dict[str, Any]] = {}
        for ev in events(alice):
            if ev["type"] in ("response.completed", "response.incomplete"):
                done[ev["stream_id"]] = ev["response"]
            assert ev["type"] not in ("error", "response.failed"), ev
            if len(done) == len(lanes):
                break
        stats = engine_check(engine)
        assert stats["pinned_by_tenant"].get("alice", 0) <= 2, stats["pinned_by_tenant"]
        assert stats["pinned_by_tenant"]["bob"] == 1
        assert stats["num_sessions"] == 17
        # the first lane's session was offloaded long ago: a fork of it still shares it
        parent = done["lane0"]
        held = parent["usage"]["input_tokens"] + parent["usage"]["output_tokens"]
        alice.send(json.dumps({"type": "response.create", "model": "tiny", "input": "fork",
                               "previous_response_id": parent["id"], "stream_id": "fork",
                               "max_output_tokens": 2}))  # fmt: skip
        fork = read_response(events(alice))[-1]["response"]
        assert fork["usage"]["input_tokens_details"]["cached_tokens"] == held // 16 * 16
        assert turn(bob, "and bob goes on", bob_first["id"])["usage"]["input_tokens_details"][
            "cached_tokens"] > 0  # fmt: skip
    settle(engine, quotas)


def test_a_turn_held_by_its_tenants_pinned_cap_gets_429_not_a_hang() -> None:
    sched = SchedulerConfig(max_pinned_sessions=8, tenant_default_max_pinned=1,
                            queue_timeout_s=0.5)  # fmt: skip
    with tiny_server(scheduler=sched, step_delay_s=0.05) as (srv, engine):
        with connect(srv.ws_url) as busy, connect(srv.ws_url) as second:
            busy.send(json.dumps({"type": "response.create", "model": "tiny", "input": "long",
                                  "max_output_tokens": 60, "temperature": 0}))  # fmt: skip
            assert json.loads(busy.recv(timeout=10))["type"] == "response.created"
            time.sleep(0.2)  # admitted: the tenant's one pin slot is taken
            second.send(json.dumps({"type": "response.create", "model": "tiny",
                                    "input": "me too", "max_output_tokens": 2}))  # fmt: skip
            got = read_response(events(second))
            err = next(e for e in got if e["type"] == "error")
            assert (err["status"], err["error"]["code"]) == (429, "rate_limit_exceeded")
            assert err["error"]["type"] == "requests"
            assert got[-1]["type"] == "response.failed"
            assert read_response(events(busy))[-1]["type"] in ("response.completed",
                                                               "response.incomplete")  # fmt: skip
        wait_released(engine)
