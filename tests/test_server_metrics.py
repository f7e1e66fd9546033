"""The Prometheus `/metrics` endpoint: admin key only; requests, errors by code, TTFT and
inter-token histograms, cached-token ratio, engine gauges; tenant labels bounded."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from pagedkv.serving.auth import Authenticator
from pagedkv.serving.server_metrics import ServerMetrics
from pagedkv.serving.testing import read_response, tiny_server

KEYS = {"sk-alice": "alice", "sk-bob": "bob"}
PROMPT = "A long shared system prompt for the agent, repeated to fill blocks. " * 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_reports_requests_errors_latency_and_engine_state() -> None:
    auth = Authenticator.from_keys(KEYS, admin_keys=("sk-admin",))
    with tiny_server(auth=auth) as (srv, _engine):
        url = f"http://127.0.0.1:{srv.port}/metrics"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer sk-alice"}).status_code == 401
        with connect(srv.ws_url, additional_headers={"Authorization": "Bearer sk-alice"}) as ws:
            for _ in range(2):  # the second turn is served from the cache
                ws.send(json.dumps({"type": "response.create", "model": "tiny", "input": PROMPT,
                                    "max_output_tokens": 6, "temperature": 0}))  # fmt: skip
                got = read_response(json.loads(ws.recv(timeout=60)) for _ in range(10_000))
                assert got[-1]["type"] in ("response.completed", "response.incomplete")
            ws.send(json.dumps({"type": "response.create", "model": "gpt-9", "input": "x"}))
            assert json.loads(ws.recv(timeout=60))["error"]["code"] == "model_not_found"
            bob = openai.OpenAI(base_url=srv.base_url, api_key="sk-bob", max_retries=0)
            bob.responses.create(model="tiny", input="hi", max_output_tokens=2)
            r = httpx.get(url, headers={"Authorization": "Bearer sk-admin"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            found = samples(r.text)
            assert value(found, "pagedkv_open_connections") == 1
            assert value(found, "pagedkv_pinned_sessions") == 1  # alice's connection
        ws_done = sum(
            value(found, "pagedkv_requests_total", tenant="alice", transport="ws", status=s)
            for s in ("completed", "incomplete")
        )
        assert ws_done == 2
        http_done = sum(
            value(found, "pagedkv_requests_total", tenant="bob", transport="http", status=s)
            for s in ("completed", "incomplete")
        )
        assert http_done == 1
        assert value(found, "pagedkv_errors_total", tenant="alice", transport="ws",
                     code="model_not_found") == 1  # fmt: skip
        assert value(found, "pagedkv_ttft_seconds_count", transport="ws") == 2
        assert value(found, "pagedkv_inter_token_seconds_count", transport="ws") >= 2
        assert value(found, "pagedkv_cached_token_ratio_count", transport="ws") == 2
        assert value(found, "pagedkv_cached_tokens_total", tenant="alice") > 0
        assert value(found, "pagedkv_cached_tokens_total", tenant="bob") == 0
        inp = value(found, "pagedkv_input_tokens_total", tenant="alice")
        assert inp >= 2 * len(PROMPT) // 8
        assert value(found, "pagedkv_gpu_blocks_in_use") > 0
        assert value(found, "pagedkv_gpu_blocks_total") == 256
        assert ("pagedkv_offload_bytes_total", ()) in found


def test_metrics_is_closed_without_an_admin_key() -> None:
    with tiny_server() as (srv, _engine):
        r = httpx.get(f"http://127.0.0.1:{srv.port}/metrics",
                      headers={"Authorization": "Bearer anything"})  # fmt: skip
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "admin_key_required"


def finished(m: ServerMetrics, tenant: str) -> None:
    obs = m.response(tenant, "ws")
    obs.event({"type": "response.completed", "response": {
        "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}},
        "metrics": {"ttft_ms": 12.0}}})  # fmt: skip


def tenant_values(m: ServerMetrics, family: str) -> set[str | None]:
    return {dict(labels).get("tenant") for (name, labels) in samples(m.render().decode())
            if name == family}  # fmt: skip


def test_tenant_labels_are_bounded_and_cannot_be_squatted() -> None:
    m = ServerMetrics(max_tenants=4)
    for i in range(40):  # refusals from 40 fresh tokens: no label slot taken
        m.refused(f"key-{i:04d}", "ws", "invalid_json")
        m.refused(f"key-{i:04d}", "ws", f"made-up-code-{i}")
    assert tenant_values(m, "pagedkv_errors_total") == {"other"}
    codes = {dict(labels).get("code") for (name, labels) in samples(m.render().decode())
             if name == "pagedkv_errors_total"}  # fmt: skip
    assert codes == {"invalid_json", "other"}
    for i in range(10):  # tenants that finish responses take the slots, up to 4
        finished(m, f"real-{i}")
    assert tenant_values(m, "pagedkv_requests_total") == {
        "real-0", "real-1", "real-2", "real-3", "other"
    }  # fmt: skip
    m.refused("real-1", "ws", "invalid_json")  # a labelled tenant's refusals are its own
    assert value(samples(m.render().decode()), "pagedkv_errors_total", tenant="real-1",
                 transport="ws", code="invalid_json") == 1  # fmt: skip


def test_with_keys_only_configured_tenants_get_labels() -> None:
    m = ServerMetrics(known_tenants={"alice", "bob"})
    for t in ("alice", "mallory", "key-abc", "bob"):
        finished(m, t)
    assert tenant_values(m, "pagedkv_requests_total") == {"alice", "bob", "other"}


def test_each_app_has_its_own_registry() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.connection_opened()
    assert value(samples(a.render().decode()), "pagedkv_open_connections") == 1
    assert value(samples(b.render().decode()), "pagedkv_open_connections") == 0


def test_remote_tier_counters_are_exported() -> None:
    m = ServerMetrics()
    m.update({"remote": {"blocks_written": 7, "blocks_dropped": 2, "blocks_hit": 5,
                         "read_errors": 1, "write_errors": 3}})  # fmt: skip
    got = samples(m.render().decode())
    assert value(got, "pagedkv_remote_blocks_total", event="written") == 7
    assert value(got, "pagedkv_remote_blocks_total", event="dropped") == 2
    assert value(got, "pagedkv_remote_blocks_total", event="hit") == 5
    assert value(got, "pagedkv_remote_errors_total", op="read") == 1
    assert value(got, "pagedkv_remote_errors_total", op="write") == 3
