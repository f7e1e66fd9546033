"""Two engines (replicas) on one real redis-server: what one computed, the other serves
from the remote tier, with the same tokens as a from-scratch decode; a dead store costs
nothing but the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import greedy, reference
from redis_helpers import RedisProcess
from test_engine import Recorder, assert_no_leaks, make_engine, text_prompt

from pagedkv.model.config import LlamaConfig
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.model.tokenizer import ByteTokenizer
from pagedkv.serving.conversation import Message, render_prompt
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import TurnStarted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return init_random(LlamaConfig.tiny(), seed=3)


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


def _replica(model: LlamaModel, url: str) -> Engine:
    return make_engine(
        model, num_gpu_blocks=64, num_host_blocks=64, hash_secret=b"fleet", remote_url=url,
        scheduler={"backup_idle": True},
    )  # fmt: skip


def test_a_session_moves_to_another_replica_through_the_remote_tier(
    model: LlamaModel, redis_server: RedisProcess
) -> None:
    a, b = _replica(model, redis_server.url), _replica(model, redis_server.url)
    ra, rb = Recorder(a), Recorder(b)
    prompt = text_prompt("tell me about paged attention " * 6)
    a.open_session("s")
    first = ra.submit("s", prompt, greedy(8))
    a.run_until_idle()
    done = ra.done(first)
    assert a.remote is not None and b.remote is not None
    assert a.remote.flush()
    written = a.remote.stats.blocks_written
    assert written >= len(prompt) // 16  # backed up at turn end, written behind
    # the client reconnects to replica b with its full history
    assert done.item is not None

    items = [Message("user", "tell me about paged attention " * 6), done.item,
             Message("user", "and then?")]  # fmt: skip
    history = render_prompt(ByteTokenizer(), instructions="Be brief.", tools=(), items=items)
    second = rb.submit("s-on-b", history, greedy(8), ephemeral=True)
    b.run_until_idle()
    started = next(e for e in rb.events[second] if isinstance(e, TurnStarted))
    held = len(prompt) + done.output_tokens
    assert started.cached_tokens >= held // 16 * 16 - 16 and started.cached_tokens > 0.8 * held
    assert rb.done(second).item == reference(model, history, greedy(8))[1]
    assert b.remote.stats.blocks_hit >= started.cached_tokens // 16
    for e in (a, b):
        for sid in list(e._sessions):
            e.close_session(sid)
        e.run_until_idle()
        assert_no_leaks(e)
        e.stop()


def test_a_dead_store_fails_no_request_and_serves_no_wrong_token(
    model: LlamaModel, redis_server: RedisProcess
) -> None:
    a = _replica(model, redis_server.url)
    rec = Recorder(a)
    redis_server.kill()
    a.open_session("s")
    items = [Message("user", "hello " * 30)]
    for turn in range(3):
        prompt = render_prompt(ByteTokenizer(), instructions=None, tools=(), items=items)
        rid = rec.submit("s", prompt, greedy(6))
        a.run_until_idle()
        done = rec.done(rid)  # no failure because of the store
        assert done.item == reference(model, prompt, greedy(6))[1]
        assert done.item is not None
        items += [done.item, Message("user", f"turn {turn}")]
        if turn == 1:
            redis_server.start()  # back (empty); the tier reconnects after its backoff
    assert a.remote is not None
    stats = a.remote.stats
    assert stats.blocks_dropped + stats.read_errors + stats.reads_skipped > 0
    a.close_session("s")
    a.run_until_idle()
    assert_no_leaks(a)
    a.stop()


def test_another_model_of_the_same_shape_never_reads_the_blocks(
    model: LlamaModel, redis_server: RedisProcess
) -> None:
    a = _replica(model, redis_server.url)
    other = init_random(LlamaConfig.tiny(), seed=4)  # same shape, other weights
    b = _replica(other, redis_server.url)
    ra, rb = Recorder(a), Recorder(b)
    prompt = text_prompt("the same words for two models " * 6)
    a.open_session("s")
    first = ra.submit("s", prompt, greedy(4))
    a.run_until_idle()
    ra.done(first)
    assert a.remote is not None and a.remote.flush() and a.remote.stats.blocks_written > 0
    rid = rb.submit("t", prompt, greedy(4), ephemeral=True)
    b.run_until_idle()
    started = next(e for e in rb.events[rid] if isinstance(e, TurnStarted))
    assert started.cached_tokens == 0  # the namespace holds a fingerprint of the weights
    assert rb.done(rid).item == reference(other, prompt, greedy(4))[1]
    for e in (a, b):
        e.stop()
