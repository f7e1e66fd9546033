"""Two `pagedkv serve` replicas behind `pagedkv route`, sharing a real redis-server: a
10-turn agent session over the real `openai` SDK loses its replica (SIGKILL) after turn
5; the client reconnects with its full history and turn 6 is served by the other
replica from the remote tier (>= 90% cached_tokens). Plus the ring's bounded loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_helpers import RedisProcess, free_port

from pagedkv.serving.router import Replica, ReplicaRing, routing_key
from pagedkv.serving.testing import read_response

ROOT = Path(__file__).resolve().parent.parent
PAGEDKV = [sys.executable, "-c", "import sys; from pagedkv.cli.main import main; sys.exit(main())"]
INSTRUCTIONS = "You are a careful agent. Use the tools, then answer briefly. " * 20


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (proc.stdout.read().decode() if proc.stdout else "")[-3000:]
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.2)


def test_the_ring_spreads_a_hot_key_under_its_load_bound() -> None:
    replicas = [Replica(f"http://r{i}") for i in range(4)]
    ring = ReplicaRing(replicas, load_factor=1.25)
    key = routing_key("Bearer hot", {"input": "the same conversation"}, b"s")
    first = ring.pick(key)
    assert first is not None and ring.pick(key) is first  # affinity
    for _ in range(40):  # one hot key opens 40 connections
        r = ring.pick(key)
        assert r is not None
        r.load += 1
    loads = sorted(r.load for r in replicas)
    assert max(loads) <= -(-1.25 * 40 // 4) + 1 and min(loads) > 0, loads
    first.healthy = False
    other = ring.pick(key)
    assert other is not None and other is not first
    assert all(ring.pick(key, exclude=[r]) is not r for r in replicas)
    for r in replicas:
        r.healthy = False
    assert ring.pick(key) is None
    # the conversation key: same for every turn (first item), other tenants differ
    k1 = routing_key("Bearer a", {"input": [{"role": "user", "content": "x"}, "y"]}, b"s")
    k2 = routing_key("Bearer a", {"input": [{"role": "user", "content": "x"}]}, b"s")
    k3 = routing_key("Bearer b", {"input": [{"role": "user", "content": "x"}]}, b"s")
    assert k1 == k2 != k3


class Fleet:
    def __init__(self, tmp: Path, redis_url: str | None, *, replicas: int = 2,
                 router_args: tuple[str, ...] = (),
                 replica_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        secret = tmp / "secret"
        secret.write_bytes(b"fleet-secret")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        remote = [] if redis_url is None else ["--remote-url", redis_url]
        self.ports = [free_port() for _ in range(replicas)]
        self.replicas = []
        for port in self.ports:
            cmd = [*PAGEDKV, "serve", "--model", "tiny", "--port", str(port),
                   "--num-gpu-blocks", "512", "--threads", "1", "--log-level", "warning",
                   *remote, "--hash-secret-file", str(secret),
                   "--max-output-tokens", "8", *replica_args]  # fmt: skip
            self.replicas.append(subprocess.Popen(cmd, cwd=ROOT, env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
        self.port = free_port()
        cmd = [*PAGEDKV, "route", "--port", str(self.port), "--health-interval", "0.2",
               "--log-level", "warning", *router_args]  # fmt: skip
        for port in self.ports:
            cmd += ["--replica", f"http://127.0.0.1:{port}"]
        self.router = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)  # fmt: skip
        for port, proc in zip(self.ports, self.replicas, strict=True):
            wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        wait_http(f"http://127.0.0.1:{self.port}/v1/models", self.router)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.port}/v1/router/stats", timeout=5).json()

    def stop(self) -> str:
        out = []
        for proc in [self.router, *self.replicas]:
            if proc.poll() is None:
                proc.terminate()
            try:
                out.append(proc.communicate(timeout=30)[0].decode())
            except subprocess.TimeoutExpired:
                proc.kill()
                out.append(proc.communicate()[0].decode())
        return "\n".join(out)


def _turn(conn: Any, **request: Any) -> Any:
    conn.response.create(model="tiny", instructions=INSTRUCTIONS, max_output_tokens=8,
                         temperature=0, **request)  # fmt: skip
    events = read_response(conn)
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete"), last
    return last.response


def test_a_session_survives_its_replica_through_the_remote_tier(tmp_path: Path) -> None:
    import openai
    import redis

    server = RedisProcess(tmp_path).start()
    fleet = Fleet(tmp_path, server.url)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.port}/v1", api_key="agent",
                               max_retries=0)  # fmt: skip
        history: list[dict[str, str]] = []
        prev = None
        with client.responses.connect() as conn:
            for turn in range(5):
                msg = {"role": "user", "content": f"tool result {turn}: ok"}
                resp = (
                    _turn(conn, input=[msg], previous_response_id=prev)
                    if prev
                    else _turn(conn, input=[msg])
                )
                prev = resp.id
                history += [msg, {"role": "assistant", "content": resp.output_text}]
            held = resp.usage.input_tokens + resp.usage.output_tokens
            loads = {r["url"]: r["load"] for r in fleet.stats()["replicas"]}
            victim_url = next(u for u, n in loads.items() if n == 1)
            victim = fleet.replicas[
                [f"http://127.0.0.1:{p}" for p in fleet.ports].index(victim_url)
            ]
            # the session's full blocks are written behind after each turn
            keys = redis.Redis.from_url(server.url)
            deadline = time.monotonic() + 10
            while keys.dbsize() < held // 16 - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert keys.dbsize() >= held // 16 - 1, (keys.dbsize(), held)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            with pytest.raises(Exception):  # noqa: B017 - the SDK surfaces the drop its own way
                msg = {"role": "user", "content": "tool result 5: ok"}
                _turn(conn, input=[msg], previous_response_id=prev)
        # the client reconnects with its full history: the other replica serves turn 6
        with client.responses.connect() as conn:
            msg = {"role": "user", "content": "tool result 5: ok"}
            resp = _turn(conn, input=[*history, msg])
            cached = resp.usage.input_tokens_details.cached_tokens
            assert cached >= 0.9 * resp.usage.input_tokens, (cached, resp.usage.input_tokens)
            print(f"turn 6 on the other replica: {cached} of {resp.usage.input_tokens} cached")
            history += [msg, {"role": "assistant", "content": resp.output_text}]
            prev = resp.id
            for turn in range(6, 10):
                msg = {"role": "user", "content": f"tool result {turn}: ok"}
                resp = _turn(conn, input=[msg], previous_response_id=prev)
                prev = resp.id
                assert resp.usage.input_tokens_details.cached_tokens >= resp.usage.input_tokens - 40
        served = {r["url"]: r for r in fleet.stats()["replicas"]}
        assert not served[victim_url]["healthy"]
        keys.close()
    finally:
        out = fleet.stop()
        server.stop()
    assert "Traceback" not in out, out[-4000:]


def test_the_router_answers_bad_input_and_dead_replicas_without_tracebacks(
    tmp_path: Path,
) -> None:
    from websockets.sync.client import connect

    fleet = Fleet(tmp_path, None, replicas=1, router_args=("--max-message-bytes", "4096"))
    base = f"http://127.0.0.1:{fleet.port}"
    try:
        big = httpx.post(base + "/v1/responses", content=b"x" * 10_000, timeout=10)
        assert big.status_code == 413 and big.json()["error"]["code"] == "message_too_large"
        bad = httpx.post(base + "/v1/responses", content=b"{not json", timeout=10)
        assert bad.status_code == 400  # the replica's own answer, passed back
        ok = httpx.post(
            base + "/v1/responses",
            json={"model": "tiny", "input": "hi", "max_output_tokens": 2},
            timeout=30,
        )
        assert ok.status_code == 200 and ok.json()["status"] in ("completed", "incomplete")
        with connect(f"ws://127.0.0.1:{fleet.port}/v1/responses", max_size=None) as ws:
            ws.send(b"\x00binary")  # the replica answers a binary frame with an error
            assert '"error"' in ws.recv(timeout=10)
        with connect(f"ws://127.0.0.1:{fleet.port}/v1/responses", max_size=None) as ws:
            ws.send("x" * 6000)  # over the limit (beyond 2x uvicorn closes with 1009 alone)
            assert "message_too_large" in ws.recv(timeout=10)
        fleet.replicas[0].send_signal(signal.SIGKILL)
        fleet.replicas[0].wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            down = httpx.post(base + "/v1/responses", json={"model": "tiny", "input": "hi"},
                              timeout=10)  # fmt: skip
            if down.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert down.status_code == 503 and down.json()["error"]["code"] == "no_replica"
    finally:
        out = fleet.stop()
    assert "Traceback" not in out, out[-4000:]


def test_api_keys_and_refusals_pass_through_the_router(tmp_path: Path) -> None:
    import json

    import openai
    from websockets.sync.client import connect

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-a", "tenant": "acme"}]}))
    fleet = Fleet(tmp_path, None, replicas=1, replica_args=("--api-keys-file", str(keys)))
    base = f"http://127.0.0.1:{fleet.port}/v1"
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).responses.create(
                model="tiny", input="hi", max_output_tokens=2
            )
        good = openai.OpenAI(base_url=base, api_key="sk-a", max_retries=0)
        resp = good.responses.create(model="tiny", input="hi", max_output_tokens=2)
        assert resp.usage.output_tokens >= 1
        with connect(f"ws://127.0.0.1:{fleet.port}/v1/responses",
                     additional_headers={"Authorization": "Bearer sk-wrong"}) as ws:  # fmt: skip
            ws.send(json.dumps({"type": "response.create", "model": "tiny", "input": "hi"}))
            event = json.loads(ws.recv(timeout=10))
            assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
    finally:
        out = fleet.stop()
    assert "Traceback" not in out, out[-4000:]


def _serve_in_thread(app: Any, port: int) -> Any:
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, thread


def test_router_headers_silent_replicas_and_broken_handshakes(tmp_path: Path) -> None:
    """Fake replicas: one echoes the headers it got and answers WebSocket, one hangs on
    POST and drops every WebSocket upgrade. Hop-by-hop headers, the headers `Connection`
    names and client `X-Forwarded-For` never reach a replica; a silent replica fails the
    request after the read timeout and is marked down; a failed handshake fails over."""
    import asyncio as aio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from websockets.sync.client import connect

    from pagedkv.serving.router import RouterConfig, create_router_app

    async def models(request: Any) -> Any:
        return JSONResponse({"data": [{"id": "fake"}]})

    async def echo(request: Any) -> Any:
        return JSONResponse({"headers": dict(request.headers)})

    async def hang(request: Any) -> Any:
        await aio.sleep(30)
        return JSONResponse({})

    async def ws_ok(ws: Any) -> None:
        await ws.accept()
        await ws.send_text(await ws.receive_text())
        await ws.close()

    async def ws_drop(ws: Any) -> None:
        raise RuntimeError("broken replica")  # the upgrade is answered 500

    good = Starlette(routes=[Route("/v1/models", models), Route("/v1/responses", echo, methods=["POST"]),
                             WebSocketRoute("/v1/responses", ws_ok)])  # fmt: skip
    bad = Starlette(routes=[Route("/v1/models", models), Route("/v1/responses", hang, methods=["POST"]),
                            WebSocketRoute("/v1/responses", ws_drop)])  # fmt: skip
    ports = [free_port(), free_port(), free_port()]
    servers = [_serve_in_thread(good, ports[0]), _serve_in_thread(bad, ports[1])]
    cfg = RouterConfig(read_timeout_s=1.0, health_interval_s=30.0)
    router = create_router_app(
        [f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"], cfg
    )
    servers.append(_serve_in_thread(router, ports[2]))
    base = f"http://127.0.0.1:{ports[2]}"
    try:
        state = router.state.router
        results = set()
        for i in range(12):  # keys spread over both replicas
            resp = httpx.post(base + "/v1/responses", json={"input": f"conv {i}"}, timeout=10,
                              headers={"Connection": "keep-alive, X-Internal", "X-Internal": "s",
                                       "X-Forwarded-For": "6.6.6.6", "Authorization": "Bearer k"})  # fmt: skip
            results.add(resp.status_code)
            if resp.status_code == 200:
                got = resp.json()["headers"]
                assert "x-internal" not in got and "x-forwarded-for" not in got
                assert got["authorization"] == "Bearer k"
                assert len(resp.headers.get_list("date")) == 1
                assert len(resp.headers.get_list("server")) == 1
        assert 502 in results or not state.replicas[1].healthy  # the silent one timed out
        assert not state.replicas[1].healthy
        assert all(r.load == 0 for r in state.replicas)
        state.replicas[1].healthy = True  # back in rotation: its handshakes drop
        for i in range(6):
            with connect(f"ws://127.0.0.1:{ports[2]}/v1/responses") as ws:
                ws.send(json.dumps({"input": f"ws conv {i}"}))
                got = json.loads(ws.recv(timeout=10))
                assert got.get("input") == f"ws conv {i}", got
        # the router's side of a connection ends just after the client's close
        deadline = time.monotonic() + 5.0
        while any(r.load for r in state.replicas) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(r.load == 0 for r in state.replicas)
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(timeout=10)
