"""A Hypothesis fuzzer of `response.create` bodies and raw frames against a real server.

Messages: create bodies with fields of every JSON type (NaN and Infinity included, deep
nesting, long strings), raw text, nesting far past the parser's limits, messages just
under and over the size limit, binary frames and frames that are not UTF-8. Every message
gets a terminal event or an `error` event; the connection stays open except after a
message over the size limit (`message_too_large`, then 1009); the server keeps serving
another client throughout; after everyone closes the engine holds zero sessions and the
pool invariants hold.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.testing import TERMINAL, engine_check, tiny_server

LIMIT = 32 * 1024

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
texts = st.sampled_from(["hello", "list the files", "", "\u2603 snow", "x" * 300]) | st.text(
    max_size=40
)
message_item = st.fixed_dictionaries(
    {"type": st.just("message"), "role": st.sampled_from(["user", "assistant", "system", "robot"]),
     "content": texts | json_values},
)  # fmt: skip
call_item = st.fixed_dictionaries(
    {"type": st.just("function_call"), "call_id": st.sampled_from(["c1", "c2", ""]),
     "name": st.sampled_from(["ls", "", "a b"]), "arguments": st.sampled_from(["{}", "nope"])},
)  # fmt: skip
output_item = st.fixed_dictionaries(
    {"type": st.just("function_call_output"), "call_id": st.sampled_from(["c1", "c2", "zz"]),
     "output": texts | json_values},
)  # fmt: skip
tool = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "web_search"]), "name": st.sampled_from(["ls", "cat", ""]),
     "parameters": st.just({"type": "object"}) | json_values},
)  # fmt: skip
create_fields = {
    "model": st.sampled_from(["tiny", "tiny", "gpt-9"]) | json_scalars,
    "input": texts | st.lists(message_item | call_item | output_item, max_size=4) | json_values,
    "instructions": texts | json_scalars,
    "tools": st.lists(tool, max_size=3) | json_values,
    "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
    "max_output_tokens": st.integers(min_value=-2, max_value=12) | json_scalars,
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | json_scalars,
    "top_p": st.floats(min_value=0, max_value=1) | json_scalars,
    "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=600), max_size=18)
    | json_values,
    "previous_response_id": st.none() | st.text(max_size=300),
    "stream_id": st.none() | st.text(max_size=40),
    "store": st.booleans() | json_scalars,
    "generate": st.booleans() | json_scalars,
}


@st.composite
def create_bodies(draw: st.DrawFn) -> str:
    keys = draw(st.sets(st.sampled_from(sorted(create_fields)), max_size=6))
    body: dict[str, Any] = {
        "type": draw(st.sampled_from(["response.create"] * 5 + ["response.cancel"]))
    }
    body["model"], body["input"], body["max_output_tokens"] = "tiny", "hi", 2
    for k in keys:
        body[k] = draw(create_fields[k])
    return json.dumps(body, allow_nan=True)  # NaN/Infinity as Python writes them


deep = st.integers(min_value=65, max_value=9000).map(
    lambda n: '{"type": "response.create", "input": "x", "extra": ' + "[" * n + "]" * n + "}"
)
sized = st.sampled_from([LIMIT - 200, LIMIT + 1, 4 * LIMIT]).map(
    lambda n: '{"type": "response.create", "input": "' + "y" * n + '"}'
)
messages = st.one_of(
    create_bodies(),
    create_bodies(),
    create_bodies(),
    st.text(max_size=80),
    deep,
    sized,
    st.binary(max_size=64),
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Any, Any]]:
    torch.set_num_threads(1)
    config = ServerConfig(
        model_name="tiny",
        max_message_bytes=LIMIT,
        default_max_output_tokens=4,
        max_output_tokens_cap=8,
    )
    with tiny_server(server=config) as (srv, engine):
        yield srv, engine


class Conn:
    """One fuzzed connection, reopened after the server closes it (as it must after a
    message over the size limit)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self._stack = ExitStack()

    def get(self) -> ClientConnection:
        if self.ws is None:
            self.ws = self._stack.enter_context(connect(self.url, max_size=None))
        return self.ws

    def drop(self) -> None:
        self._stack.close()
        self.ws = None


def answer(ws: ClientConnection) -> list[dict[str, Any]]:
    """Events up to the message's terminal event or its lone error."""
    got: list[dict[str, Any]] = []
    started = False
    while True:
        text = ws.recv(timeout=60)
        assert isinstance(text, str), "the server sent a binary frame"
        ev = json.loads(text, parse_constant=_not_json)
        got.append(ev)
        if ev["type"] == "response.created":
            started = True
        if ev["type"] in TERMINAL or (ev["type"] == "error" and not started):
            return got


def _not_json(name: str) -> Any:
    raise AssertionError(f"the server sent {name}")


def steady_turn(url: str) -> None:
    with connect(url) as ws:
        ws.send(
            '{"type": "response.create", "model": "tiny", "input": "ok?", "max_output_tokens": 2}'
        )
        assert answer(ws)[-1]["type"] in ("response.completed", "response.incomplete")


def test_fuzzed_messages_always_get_an_answer_and_leave_nothing_held(server: Any) -> None:
    srv, engine = server
    outcomes: list[str] = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(batch=st.lists(messages, min_size=1, max_size=4))
    def fuzz(batch: list[str | bytes]) -> None:
        if len(outcomes) % 40 == 39:  # another client is served while the fuzzing goes on
            steady_turn(srv.ws_url)
        conn = Conn(srv.ws_url)
        try:
            for msg in batch:
                ws = conn.get()
                size = len(msg.encode() if isinstance(msg, str) else msg)
                ws.send(msg)
                last = answer(ws)[-1]
                outcomes.append(last["type"] if last["type"] != "error" else last["error"]["code"])
                if last["type"] == "error":
                    err = last["error"]
                    assert set(err) >= {"type", "code", "message", "param"}
                    assert isinstance(err["message"], str) and len(err["message"]) < 2000
                    assert last["status"] in (400, 404, 413, 429, 503), last
                if size > LIMIT:
                    assert last["error"]["code"] == "message_too_large"
                    with pytest.raises(ConnectionClosed) as closed:
                        ws.recv(timeout=30)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
                    conn.drop()
        finally:
            conn.drop()

    fuzz()
    # the fuzzer reached both sides: responses that ran, and refusals of several kinds
    kinds = collections.Counter(outcomes)
    assert kinds["response.completed"] + kinds["response.incomplete"] > 0, kinds
    assert {"invalid_json", "invalid_type", "invalid_value", "message_too_large"} <= set(kinds)
    steady_turn(srv.ws_url)  # the server still serves
    deadline = time.monotonic() + 10
    while engine_check(engine)["num_sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine_check(engine)  # scheduler and cache invariants checked on the engine thread
    assert stats["num_sessions"] == 0 and stats["gpu_blocks"]["in_use"] == 0
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
