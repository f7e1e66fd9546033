"""Publishing the held-block index: a resync (the set rewritten whole) is atomic for
readers; a replica on a wildcard host without `--advertise-url` publishes nothing and
says so; a router names, once, a live replica that publishes no index."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
from redis_helpers import RedisProcess

from pagedkv.cli import serve as cli_serve
from pagedkv.serving.kv_index import HeldIndexPublisher, PublishConfig, index_keys
from pagedkv.serving.kv_routing import KVRouting, KVRoutingConfig

SECRET = b"fleet-secret"


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = RedisProcess(tmp_path, maxmemory="256mb").start()
    yield server
    server.stop()


def test_a_resync_never_shows_readers_an_empty_or_partial_set(
    redis_server: RedisProcess,
) -> None:
    import redis

    pub = HeldIndexPublisher(redis.Redis.from_url(redis_server.url), namespace="ns",
                             replica="http://a", meta={"compat": "x"},
                             config=PublishConfig(resync_s=1e-9))  # every publish resyncs  # fmt: skip
    keys = [os.urandom(16) for _ in range(65536)]
    probe = keys[:1024]  # a session's leading blocks, all held throughout
    assert pub.publish(keys)
    reader = redis.Redis.from_url(redis_server.url)
    set_key, _ = index_keys("ns", "http://a")
    stop = threading.Event()
    seen: list[int] = []

    def poll() -> None:
        while not stop.is_set():
            members = reader.smismember(set_key, probe)
            seen.append(next((i for i, m in enumerate(members) if not m), len(members)))

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for _ in range(20):
            assert pub.publish(keys)
    finally:
        stop.set()
        thread.join()
    assert pub.stats.resyncs == 21
    assert len(seen) > 0
    short = [n for n in seen if n < len(probe)]
    assert not short, (
        f"{len(short)} of {len(seen)} reads saw a partial set: {sorted(set(short))[:8]}"
    )
    reader.close()
    pub.close()


def _serve_args(*extra: str) -> object:
    parser = cli_serve.argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", "--model", "tiny", "--port", "8123", *extra])


def test_a_wildcard_host_without_an_advertise_url_publishes_nothing_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGEDKV_HASH_SECRET", SECRET.decode())
    remote = ("--remote-url", "redis://127.0.0.1:1/0")
    cases = {
        ("--host", "0.0.0.0", *remote): None,
        ("--host", "::", *remote): None,
        ("--host", "[::]", *remote): None,
        ("--host", "0.0.0.0", *remote, "--advertise-url", "http://10.0.0.7:8123"):
            "http://10.0.0.7:8123",
        ("--host", "127.0.0.1", *remote): "http://127.0.0.1:8123",
        ("--host", "::1", *remote): "http://[::1]:8123",
        ("--host", "replica-3.internal", *remote): "http://replica-3.internal:8123",
        ("--host", "0.0.0.0"): None,  # no store: nothing to publish, nothing to say
        ("--host", "127.0.0.1", *remote, "--kv-publish-interval", "0"): None,
    }  # fmt: skip
    for argv, want in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pagedkv.cli.serve"):
            got = cli_serve.advertise_url_from_args(_serve_args(*argv))  # type: ignore[arg-type]
        assert got == want, (argv, got)
        warned = [r.getMessage() for r in caplog.records if r.name == "pagedkv.cli.serve"]
        wildcard = want is None and "--remote-url" in argv and "--kv-publish-interval" not in argv
        assert len(warned) == (1 if wildcard else 0), (argv, warned)
        if wildcard:
            assert "--advertise-url" in warned[0] and "not publishing" in warned[0]
    # and the engine the options describe publishes nothing
    args = _serve_args("--host", "0.0.0.0", *remote, "--num-gpu-blocks", "16")
    model = cli_serve.build_model_from_args(args)  # type: ignore[arg-type]
    config = cli_serve.engine_config_from_args(args, model)  # type: ignore[arg-type]
    assert config.remote_url == remote[1] and config.advertise_url is None


def test_the_router_names_a_live_replica_that_publishes_no_index_once(
    redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    kv = KVRouting(KVRoutingConfig(namespace="ns", missing_meta_warn_s=30.0),
                   hash_secret=SECRET, remote_url=redis_server.url, clock=lambda: now[0])  # fmt: skip
    hashes = kv.request_hashes({"input": "x" * 200}, None, websocket=False)
    assert isinstance(hashes, list)
    with caplog.at_level(logging.WARNING, logger="pagedkv.serving.kv_routing"):
        for step in (0.0, 10.0, 29.0, 31.0, 60.0, 600.0):  # probes over ten minutes
            now[0] = 100.0 + step
            assert kv.held_prefixes(["http://0.0.0.0:8001"], hashes) == {}
    warned = [
        r.getMessage() for r in caplog.records if "published no block index" in r.getMessage()
    ]
    assert len(warned) == 1, warned
    assert "http://0.0.0.0:8001" in warned[0] and "--advertise-url" in warned[0]
    kv.close()
