"""KV-aware routing under hostile bodies: a probe's work and memory are bounded by the
prefix it hashes (items parsed as they are rendered, the text reaching the bound cut
before it is encoded, nothing else of the body walked), bodies over `max_probe_bytes`
and probes while the index is backed off do no work at all, and what is hashed is
still exactly what the replica renders (`parse_create` + `render_request`)."""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import pytest

import pagedkv.serving.protocol as protocol
from pagedkv.cache.hashing import as_token_array
from pagedkv.model.tokenizer import ByteTokenizer
from pagedkv.serving.auth import Authenticator, auth_secret_for
from pagedkv.serving.conversation import (
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    Item,
    Message,
    render_prompt,
)
from pagedkv.serving.engine import cache_key_salt
from pagedkv.serving.kv_routing import KVRouting, KVRoutingConfig
from pagedkv.serving.protocol import parse_create
from pagedkv.serving.response_run import render_request
from pagedkv.serving.router import Router, routing_key

SECRET = b"fleet-secret"
MB = 1024 * 1024


def _kv(**config: Any) -> KVRouting:
    return KVRouting(KVRoutingConfig(**config), hash_secret=SECRET, client=object())


def _replica_hashes(kv: KVRouting, body: dict[str, Any], authorization: str | None, *,
                    websocket: bool) -> list[bytes]:  # fmt: skip
    """What a replica hashes: the whole request checked and rendered, cut afterwards."""
    req = parse_create(body, websocket=websocket)
    tokens = render_request(kv.tokenizer, req, req.items)
    tenant = Authenticator(secret=auth_secret_for(SECRET) or b"").caller(authorization).tenant
    root = kv.hasher.root(tenant, cache_key_salt(req.prompt_cache_key))
    hashes, _ = kv.hasher.hash_chain(root, as_token_array(tokens))
    return hashes[: kv.config.max_probe_blocks]


TOOLS = [{"type": "function", "name": "grep", "description": "search",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]  # fmt: skip
CONVERSATION = {"instructions": "sys", "tools": TOOLS, "prompt_cache_key": "conv-7",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "a" * 40},
                                                       {"type": "input_text", "text": "ü" * 40}]},
                          {"type": "function_call", "call_id": "c1", "name": "grep",
                           "arguments": '{"q": "' + "x" * 300 + '"}'},
                          {"type": "function_call_output", "call_id": "c1", "output": "ok " * 200},
                          {"role": "assistant", "content": "done " * 30}]}  # fmt: skip
VALID_BODIES: list[tuple[dict[str, Any], bool]] = [
    ({"input": "hello " * 50}, False),
    ({"instructions": "Be brief. " * 30, "input": "héllo wörld ✓ " * 40}, False),
    (CONVERSATION, False),
    ({"type": "response.create", "generate": False, "input": "warm " * 64}, True),
    ({"input": [{"role": "user", "content": "x" * 100}] * 400, "metadata": {"a": "b"}}, False),
    ({"instructions": "y" * 40_000, "input": "tail"}, False),  # the system item reaches it
]


@pytest.mark.parametrize("max_probe_blocks", [1, 3, 64, 1024])
def test_the_probe_hashes_what_the_replica_renders(max_probe_blocks: int) -> None:
    kv = _kv(max_probe_blocks=max_probe_blocks)
    for body, websocket in VALID_BODIES:
        for auth in (None, "Bearer agent"):
            got = kv.request_hashes(body, auth, websocket=websocket)
            want = _replica_hashes(kv, body, auth, websocket=websocket)
            assert isinstance(got, list) and got == want, (body.keys(), auth, len(want))


class _Counted(list):  # type: ignore[type-arg]
    """A list that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Any:
        _Counted.walks += 1
        return super().__iter__()


def test_a_probe_parses_items_only_up_to_the_prefix_and_walks_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kv = _kv()
    budget = kv.config.max_probe_blocks * kv.config.block_size
    parsed = [0]
    real = protocol.parse_item

    def counting(obj: object, index: int) -> Item:
        parsed[0] += 1
        return real(obj, index)

    monkeypatch.setattr(protocol, "parse_item", counting)
    # 200k tiny items (8 MB of JSON): each renders to 9 tokens; only the prefix is parsed
    tiny = {"input": [{"role": "user", "content": "a"}] * 200_000}
    hashes = kv.request_hashes(tiny, None, websocket=False)
    assert isinstance(hashes, list) and len(hashes) == kv.config.max_probe_blocks
    assert parsed[0] <= budget // 9 + 2, parsed[0]  # parse_create parsed all 200000
    # nested lists in a field the prompt does not render from are never walked
    # (check_encodable walked every one of them)
    _Counted.walks = 0
    deep = {"input": "hi " * 300, "x": [_Counted([_Counted([1])]) for _ in range(1000)]}
    assert isinstance(kv.request_hashes(deep, None, websocket=False), list)
    assert _Counted.walks == 0
    # a bad item past the prefix is the replica's to refuse; one inside it is "invalid"
    late = {"input": [{"role": "user", "content": "a" * 100}] * 400 + [{"type": "bogus"}]}
    assert isinstance(kv.request_hashes(late, None, websocket=False), list)
    early = {"input": [{"type": "bogus"}, {"role": "user", "content": "a" * 100}]}
    assert kv.request_hashes(early, None, websocket=False) == "invalid"
    too_deep = {"tools": [{"type": "function", "name": "f", "parameters": {}}], "input": "x"}
    nested: dict[str, Any] = too_deep["tools"][0]["parameters"]
    for _ in range(100_000):  # json.dumps of the system item recurses past the limit
        nested["p"] = {}
        nested = nested["p"]
    assert kv.request_hashes(too_deep, None, websocket=False) == "invalid"


class _RecordingTokenizer(ByteTokenizer):
    """The byte tokenizer, recording the longest text it was asked to encode."""

    __slots__ = ()
    longest = 0

    def encode(self, text: str) -> list[int]:
        _RecordingTokenizer.longest = max(_RecordingTokenizer.longest, len(text))
        return super().encode(text)


@pytest.mark.parametrize("max_tokens", [1, 15, 16, 17, 100, 1000])
def test_the_text_reaching_the_bound_is_cut_before_it_is_encoded(max_tokens: int) -> None:
    tok = _RecordingTokenizer()
    big = "é✓x" * 300_000  # 1, 2, 3 bytes per character
    cases: list[tuple[str | None, list[FunctionTool], list[Item]]] = [
        (None, [], [Message("user", big)]),
        ("instr " + big, [], [Message("user", "after")]),
        ("i", [FunctionTool("t", "d" * 5000, {"type": "object"})], [Message("user", "x")]),
        (None, [], [Message("user", "short"), FunctionCall("c1", "f", big)]),
        (None, [], [FunctionCall("c1", "f", "{}"), FunctionCallOutput("c1", big)]),
    ]
    for instructions, tools, items in cases:
        _RecordingTokenizer.longest = 0
        cut = render_prompt(tok, instructions=instructions, tools=tools, items=items,
                            max_tokens=max_tokens)  # fmt: skip
        assert _RecordingTokenizer.longest <= max(max_tokens, 64), _RecordingTokenizer.longest
        whole = render_prompt(ByteTokenizer(), instructions=instructions, tools=tools,
                              items=items)  # fmt: skip
        assert cut == whole[:max_tokens]


def test_a_probe_of_a_large_string_allocates_little_beyond_the_body() -> None:
    kv = _kv()
    body = {"input": "x" * (8 * MB - 100)}
    tracemalloc.start()
    try:
        hashes = kv.request_hashes(body, None, websocket=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(hashes, list) and len(hashes) == kv.config.max_probe_blocks
    assert hashes == _replica_hashes(kv, body, None, websocket=False)
    assert peak < 4 * MB, peak  # encoding the whole string took 16x its size


def test_large_bodies_and_a_backed_off_index_are_not_probed() -> None:
    kv = _kv(max_probe_bytes=1000)
    calls = [0]

    def never(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        raise AssertionError("probed")

    kv.request_hashes = never  # type: ignore[method-assign]

    async def main() -> None:
        body = {"input": "x" * 2000}
        assert await kv.held(body, None, websocket=False, replicas=["http://a"],
                             size=2010) == ("too_large", {})  # fmt: skip
        kv._down_until = kv._clock() + 60.0  # a Redis error a moment ago
        assert await kv.held({"input": "x"}, None, websocket=False, replicas=["http://a"],
                             size=20) == ("redis_backoff", {})  # fmt: skip
        # the router counts the fallback by reason and routes by the ring
        router = Router(["http://127.0.0.1:9", "http://127.0.0.1:10"], kv=kv, secret=b"s")
        try:
            key = routing_key(None, body, b"s")
            got = await router.choose(key, body, None, websocket=False, size=2010, tried=[])
            assert got is router.ring.pick(key)
            assert kv.stats.fallback_by_reason == {"too_large": 1}
        finally:
            await router.client.aclose()

    asyncio.run(main())
    assert calls[0] == 0 and kv._inflight == 0
    kv.close()


def test_kv_routing_config_checks_its_new_knobs() -> None:
    with pytest.raises(ValueError, match="max_probe_bytes"):
        KVRoutingConfig(max_probe_bytes=0)
    with pytest.raises(ValueError, match="missing_meta_warn_s"):
        KVRoutingConfig(missing_meta_warn_s=0)
