"""KV-aware routing: replicas publish the block hashes they hold in Redis, the router
sends a new session to the replica holding the longest prefix of its prompt.

Units: `BlockPool.held_keys` (order, bound), the publisher (diff, cap, expiry, resync)
and the router's lookup on a real redis-server, the scoring rule. End to end: two
`pagedkv serve` replicas, the router and redis-server on loopback: a new connection
whose routing key the consistent hash sends to B, but whose prompt A holds, goes to A
and is served from its cache; a deleted set is republished; a dead replica's set
expires and routing falls back; Redis down falls back with a counter; hostile bodies
route without tracebacks."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_helpers import RedisProcess
from test_router import INSTRUCTIONS, Fleet

from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.model.tokenizer import ByteTokenizer
from pagedkv.serving.auth import Authenticator, auth_fingerprint, auth_secret_for
from pagedkv.serving.kv_index import (
    HeldIndexPublisher,
    PublishConfig,
    compat_fingerprint,
    index_keys,
)
from pagedkv.serving.kv_routing import KVRouting, KVRoutingConfig, best_replica
from pagedkv.serving.router import Replica, ReplicaRing, routing_key, routing_secret

SECRET = b"fleet-secret"  # what `Fleet` writes to its secret file


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


def test_held_keys_puts_blocks_in_use_first_then_the_most_recently_cached() -> None:
    pool = BlockPool(8)
    ids = pool.allocate(6)
    for i, block_id in enumerate(ids):
        assert pool.register(block_id, f"h{i}".encode(), b"c")
    pool.release([ids[0]])  # cached first: least recently used
    pool.release([ids[1]])
    assert pool.held_keys(100) == [f"h{i}".encode() for i in range(6)]  # all: any order
    assert set(pool.held_keys(4)) == {b"h2", b"h3", b"h4", b"h5"}  # in use beats cached
    assert pool.held_keys(5)[-1] == b"h1"  # then the most recently released
    assert pool.held_keys(0) == []
    with pytest.raises(ValueError, match="limit"):
        pool.held_keys(-1)
    pool.check_invariants()  # read only


def test_best_replica_takes_the_longest_held_prefix_under_the_load_bound() -> None:
    a, b, c = Replica("http://a"), Replica("http://b"), Replica("http://c")
    assert best_replica([a, b, c], {}, 2, a) == (None, "no_hit")
    assert best_replica([a, b, c], {"http://a": 0, "http://b": 0}, 2, a) == (None, "no_hit")
    assert best_replica([a, b, c], {"http://a": 3, "http://b": 7}, 2, a) == (b, "ok")
    b.load = 2  # at the bound: skipped, the next longest wins
    assert best_replica([a, b, c], {"http://a": 3, "http://b": 7}, 2, None) == (a, "ok")
    a.load = 2
    assert best_replica([a, b, c], {"http://a": 3, "http://b": 7}, 2, c) == (None, "over_bound")
    a.load = b.load = 0
    b.healthy = False  # a dead replica's set is not trusted
    assert best_replica([a, b, c], {"http://b": 7}, 2, a) == (None, "no_hit")
    b.healthy = True
    # ties go to the consistent hash's pick, else to the least loaded
    assert best_replica([a, b, c], {"http://a": 4, "http://b": 4}, 5, b) == (b, "ok")
    a.load = 1
    assert best_replica([a, b, c], {"http://a": 4, "http://b": 4}, 5, c) == (b, "ok")


def _meta(hasher: BlockHasher) -> dict[str, Any]:
    auth = Authenticator(secret=auth_secret_for(SECRET) or b"")
    return {"block_size": 16, "compat": compat_fingerprint(ByteTokenizer(), hasher),
            "auth": auth_fingerprint(auth)}  # fmt: skip


def test_the_publisher_keeps_a_bounded_set_in_step_and_heals_it(
    redis_server: RedisProcess,
) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    hasher = BlockHasher(block_size=16, secret=SECRET)
    pub = HeldIndexPublisher(
        redis.Redis.from_url(redis_server.url), namespace="ns", replica="http://a/",
        meta=_meta(hasher), config=PublishConfig(interval_s=0.1, ttl_s=0.6, max_hashes=5),
    )  # fmt: skip
    set_key, meta_key = index_keys("ns", "http://a")
    assert pub.set_key == set_key
    hashes = [bytes([i]) * 16 for i in range(10)]
    assert pub.publish(hashes + hashes[:3])  # duplicates dropped, then cut to the cap
    assert client.smembers(set_key) == set(hashes[:5])
    meta = json.loads(client.get(meta_key))
    assert meta["num_hashes"] == 5 and meta["max_hashes"] == 5 and meta["block_size"] == 16
    assert 0 < client.pttl(set_key) <= 600
    assert pub.publish(hashes[3:8])  # a diff: 3 removed, 3 added
    assert client.smembers(set_key) == set(hashes[3:8])
    assert pub.stats.resyncs == 1 and pub.stats.hashes_removed == 3
    client.delete(set_key)  # lost (flushed, expired): the next publish rewrites it
    assert pub.publish(hashes[3:8])
    assert client.smembers(set_key) == set(hashes[3:8]) and pub.stats.resyncs == 2
    time.sleep(0.8)  # nobody refreshed it: gone by itself
    assert not client.exists(set_key) and not client.exists(meta_key)
    assert pub.publish(hashes[:2])
    redis_server.kill()
    assert not pub.publish(hashes[:3])  # counted, never raised
    assert pub.stats.errors == 1
    redis_server.start()
    assert pub.publish(hashes[:3])  # rewritten whole after the failure
    assert client.smembers(set_key) == set(hashes[:3])
    # the engine thread's side: a due snapshot is handed over, the thread publishes it
    assert pub.due() and not pub.due()
    pub.offer(hashes[:4])
    deadline = time.monotonic() + 5
    while client.scard(set_key) != 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.scard(set_key) == 4
    pub.close()  # a clean stop leaves nothing stale
    assert not client.exists(set_key) and not client.exists(meta_key)
    client.close()


def test_the_router_reads_held_prefixes_in_one_round_trip(redis_server: RedisProcess) -> None:
    import redis

    hasher = BlockHasher(block_size=16, secret=SECRET)
    kv = KVRouting(KVRoutingConfig(namespace="ns"), hash_secret=SECRET,
                   remote_url=redis_server.url)  # fmt: skip
    body = {"model": "tiny", "instructions": INSTRUCTIONS, "input": "hello"}
    hashes = kv.request_hashes(body, "Bearer agent", websocket=False)
    assert isinstance(hashes, list) and len(hashes) > 20
    # the same chain the replica computes: tenant of the bearer token, rendered prompt
    other = kv.request_hashes({**body, "input": "other"}, "Bearer agent", websocket=False)
    assert isinstance(other, list) and other[:20] == hashes[:20] and other[-1] != hashes[-1]
    assert kv.request_hashes(body, "Bearer someone-else", websocket=False) != hashes
    assert kv.request_hashes({**body, "prompt_cache_key": "k"}, "Bearer agent",
                             websocket=False) != hashes  # fmt: skip
    assert kv.request_hashes([1], None, websocket=False) == "unparsed"
    assert kv.request_hashes(body, "Basic x", websocket=False) == "unauthenticated"
    assert kv.request_hashes({"input": 5}, None, websocket=False) == "invalid"
    cont = {**body, "previous_response_id": "resp_1"}
    assert kv.request_hashes(cont, None, websocket=True) == "continuation"
    assert kv.request_hashes({"input": []}, None, websocket=False) == "short"
    huge = {"input": [{"role": "user", "content": "x" * 100}] * 20_000}
    capped = kv.request_hashes(huge, None, websocket=False)
    assert isinstance(capped, list) and len(capped) == kv.config.max_probe_blocks
    assert isinstance(other, list)
    meta = json.dumps(_meta(hasher))
    wrong = json.dumps({**_meta(hasher), "compat": "0" * 32})
    client = redis.Redis.from_url(redis_server.url)
    for url, held, m in (("http://a", hashes[:12], meta), ("http://b", hashes[:3] + hashes[5:9], meta),
                         ("http://c", hashes, wrong)):  # fmt: skip
        set_key, meta_key = index_keys("ns", url)
        client.sadd(set_key, *held)
        client.set(meta_key, m)
    got = kv.held_prefixes(["http://a", "http://b", "http://c", "http://d"], hashes)
    assert got == {"http://a": 12, "http://b": 3}  # c: another compat; d: publishes nothing
    client.close()
    kv.close()


def test_an_engine_publishes_what_its_pools_hold(redis_server: RedisProcess) -> None:
    import redis
    from engine_helpers import greedy
    from test_engine import Recorder, make_engine, text_prompt

    from pagedkv.model.config import LlamaConfig
    from pagedkv.model.llama import init_random
    from pagedkv.serving.kv_index import snapshot_held

    model = init_random(LlamaConfig.tiny(), seed=3)
    engine = make_engine(model, num_gpu_blocks=64, num_host_blocks=64, hash_secret=SECRET,
                         remote_url=redis_server.url, advertise_url="http://replica-x/",
                         publish_interval_s=0.1, publish_max_hashes=12)  # fmt: skip
    rec = Recorder(engine)
    rid = rec.submit("s", text_prompt("paged attention " * 20), greedy(4), ephemeral=True)
    engine.run_until_idle()
    rec.done(rid)
    client = redis.Redis.from_url(redis_server.url)
    set_key, meta_key = index_keys("default", "http://replica-x")
    engine.start()
    try:
        held = engine.call(lambda e: snapshot_held(e.cache, 12)).result(timeout=10)
        assert len(held) >= 12  # the prompt filled more blocks than the cap
        _wait("the engine publishes", lambda: client.scard(set_key) == 12, timeout=10)
        assert client.smembers(set_key) == set(list(dict.fromkeys(held))[:12])
        meta = json.loads(client.get(meta_key))
        router = KVRouting(KVRoutingConfig(), hash_secret=SECRET, client=client)
        assert meta["compat"] == router.compat and meta["block_size"] == 16
        assert meta["auth"] == router.auth_fp  # both "open": no keys on either side
        stats = engine.call(lambda e: e.stats()).result(timeout=10)
        assert stats["kv_index"]["publishes"] >= 1 and stats["kv_index"]["errors"] == 0
    finally:
        engine.stop()
    assert not client.exists(set_key) and not client.exists(meta_key)  # a clean stop
    client.close()


# ---------------------------------------------------------------------- end to end
def _ws_turn(ws: Any, **fields: Any) -> dict[str, Any]:
    ws.send(json.dumps({"type": "response.create", "model": "tiny", "instructions": INSTRUCTIONS,
                        "max_output_tokens": 8, "temperature": 0, **fields}))  # fmt: skip
    while True:
        event = json.loads(ws.recv(timeout=60))
        if event["type"] in ("response.completed", "response.incomplete"):
            return dict(event["response"])
        assert event["type"] not in ("error", "response.failed"), event


def _served(fleet: Fleet) -> dict[str, int]:
    return {r["url"]: r["served"] for r in fleet.stats()["replicas"]}


def _wait(what: str, cond: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_new_session_goes_where_its_prefix_is(tmp_path: Path) -> None:
    import redis
    from websockets.sync.client import connect

    server = RedisProcess(tmp_path).start()
    fleet = Fleet(tmp_path, server.url,
                  router_args=("--remote-url", server.url, "--hash-secret-file",
                               str(tmp_path / "secret"), "--kv-timeout", "1"),
                  replica_args=("--kv-publish-interval", "0.3"))  # fmt: skip
    urls = [f"http://127.0.0.1:{p}" for p in fleet.ports]
    base = f"http://127.0.0.1:{fleet.port}"
    auth = {"Authorization": "Bearer agent"}
    store = redis.Redis.from_url(server.url)
    try:
        # 1. a conversation on one replica (A), four turns on one connection
        first = {"role": "user", "content": "tool result 0: ok"}
        history: list[dict[str, Any]] = [first]
        with connect(f"ws://127.0.0.1:{fleet.port}/v1/responses", additional_headers=auth,
                     max_size=None) as ws:  # fmt: skip
            resp = _ws_turn(ws, input=[first])
            for turn in range(1, 4):
                history.append(
                    {"role": "assistant", "content": resp["output"][0]["content"][0]["text"]}
                )
                msg = {"role": "user", "content": f"tool result {turn}: ok"}
                history.append(msg)
                resp = _ws_turn(ws, input=[msg], previous_response_id=resp["id"])
        history.append({"role": "assistant", "content": resp["output"][0]["content"][0]["text"]})
        held = resp["usage"]["input_tokens"] + resp["usage"]["output_tokens"]
        served = _served(fleet)
        a = next(u for u in urls if served[u] == 1)
        b = next(u for u in urls if u != a)
        a_set, a_meta = index_keys("default", a)
        _wait("A publishes the conversation", lambda: store.scard(a_set) >= held // 16 - 1)
        assert store.exists(index_keys("default", b)[1])  # B publishes too (nothing of it)

        # 2. a new connection: its routing key goes to B on the ring, its prompt is A's
        ring = ReplicaRing([Replica(u) for u in urls], 1.25, 64)
        secret = routing_secret(SECRET)
        for i in range(200):
            variant = {**first, "id": f"msg_{i}"}  # the replica ignores the id: same tokens
            body = {"instructions": INSTRUCTIONS,
                    "input": [variant, *history[1:], {"role": "user", "content": "next"}]}  # fmt: skip
            pick = ring.pick(routing_key("Bearer agent", body, secret))
            if pick is not None and pick.url == b:
                break
        else:
            pytest.fail("no variant hashes to B")
        before = _served(fleet)
        with connect(f"ws://127.0.0.1:{fleet.port}/v1/responses", additional_headers=auth,
                     max_size=None) as ws:  # fmt: skip
            resp = _ws_turn(ws, **body)
        after = _served(fleet)
        assert after[a] == before[a] + 1 and after[b] == before[b], (before, after)
        usage = resp["usage"]
        cached = usage["input_tokens_details"]["cached_tokens"]
        assert cached >= 0.9 * usage["input_tokens"], usage
        kv = fleet.stats()["kv"]
        assert kv["routed"] >= 1 and kv["routed_off_ring"] >= 1, kv
        print(f"new connection on A (the ring said B): {cached} of {usage['input_tokens']} cached")
        # the same over HTTP
        resp_http = httpx.post(base + "/v1/responses", headers=auth, timeout=60,
                               json={"model": "tiny", "max_output_tokens": 4, **body})  # fmt: skip
        assert resp_http.status_code == 200, resp_http.text
        assert _served(fleet)[a] == after[a] + 1

        # 3. hostile bodies: routed (or refused by the replica) without tracebacks
        many = [{"role": "user", "content": "y" * 50}] * 30_000  # rendering stops early
        hostile: list[bytes] = [
            b"[" * 100_000,  # nesting the parser refuses
            b'{"input": "x", "d": ' + b"[" * 80 + b"]" * 80 + b"}",  # past MAX_JSON_DEPTH
            json.dumps({"input": {"a": "b"}, "tools": "x"}).encode(),
            json.dumps({"model": "tiny", "input": many, "max_output_tokens": 1}).encode(),
            json.dumps({"model": "tiny", "input": "z" * 2_000_000}).encode(),
        ]
        for content in hostile:
            t0 = time.monotonic()
            r = httpx.post(base + "/v1/responses", content=content, timeout=60, headers=auth)
            assert r.status_code < 500 and "error" in r.json(), (r.status_code, r.text[:200])
            assert time.monotonic() - t0 < 30
        r = httpx.post(base + "/v1/responses", json={"input": "hi"}, timeout=30,
                       headers={"Authorization": "Bearer " + "k" * 5000})  # fmt: skip
        assert r.status_code == 401
        reasons = fleet.stats()["kv"]["fallback_by_reason"]
        assert reasons.get("unparsed", 0) >= 1 and reasons.get("invalid", 0) >= 1, reasons
        assert reasons.get("unauthenticated", 0) >= 1, reasons

        # 4. a lost set is republished whole
        store.delete(a_set, a_meta)
        _wait("A republishes", lambda: store.scard(a_set) >= held // 16 - 1, timeout=10)

        # 5. A dies: its set expires (5 x 0.3 s, at least 2 s), routing falls back to B
        victim = fleet.replicas[urls.index(a)]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        _wait("A's set expires", lambda: not store.exists(a_set) and not store.exists(a_meta),
              timeout=10)  # fmt: skip
        fallback = fleet.stats()["kv"]["fallback"]
        resp_http = httpx.post(base + "/v1/responses", headers=auth, timeout=60,
                               json={"model": "tiny", "max_output_tokens": 4, **body})  # fmt: skip
        assert resp_http.status_code == 200, resp_http.text
        stats = fleet.stats()
        assert stats["kv"]["fallback"] == fallback + 1, stats["kv"]
        assert {r["url"]: r["served"] for r in stats["replicas"]}[b] > after[b]

        # 6. Redis down: routed by the ring, counted, the request still served
        server.kill()
        for _ in range(2):
            r = httpx.post(base + "/v1/responses", headers=auth, timeout=60,
                           json={"model": "tiny", "input": "Redis is down", "max_output_tokens": 2})  # fmt: skip
            assert r.status_code == 200, r.text
        kv = fleet.stats()["kv"]
        assert kv["redis_errors"] >= 1, kv
        assert kv["fallback_by_reason"].get("redis_backoff", 0) >= 1, kv
        print("router kv stats:", kv)
    finally:
        store.close()
        out = fleet.stop()
        server.stop()
    assert "Traceback" not in out, out[-4000:]
