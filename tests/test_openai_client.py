"""The real `openai` SDK against the local server: WebSocket mode and plain HTTP.

A multi-turn tool-calling loop chained by `previous_response_id`; a reconnect that
re-sends the full history; warm-up with `generate: false`; the stateless HTTP endpoint
(JSON and SSE).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

from pagedkv.serving.testing import engine_check, read_response, tiny_server  # noqa: E402

SYSTEM = "You are a coding agent. Read files and run tests until they pass. " * 4
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
    {
        "type": "function",
        "name": "run_tests",
        "description": "Run the test suite.",
        "parameters": {"type": "object", "properties": {"selector": {"type": "string"}}},
    },
]

MESSAGE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
CALL_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tiny_server() as (srv, engine):
        yield srv, engine
    torch.set_num_threads(threads)


@pytest.fixture
def client(server: Any) -> Any:
    srv, _engine = server
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)


def squeeze(kinds: list[str]) -> list[str]:
    """Event types with runs of the same type collapsed (the deltas)."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def check_events(events: list[Any], *, function_call: bool) -> Any:
    """Order, sequence numbers and well-formed items; returns the completed response."""
    kinds = [e.type for e in events]
    expected = CALL_EVENTS if function_call else MESSAGE_EVENTS
    # the last event is response.incomplete when max_output_tokens cut the item off
    assert squeeze(kinds)[:-1] == expected[:-1], kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response = events[-1].response
    assert response.status in ("completed", "incomplete") and len(response.output) == 1
    item = response.output[0]
    assert events[2].item.id == item.id == events[-2].item.id
    if function_call:
        assert item.type == "function_call" and item.call_id.startswith("call_")
        assert item.name in {t["name"] for t in TOOLS}
        args = json.loads(item.arguments)
        assert isinstance(args, dict) and all(isinstance(v, str) for v in args.values())
        streamed = "".join(e.delta for e in events if e.type.endswith("arguments.delta"))
        assert streamed == item.arguments == events[-3].arguments
    else:
        assert item.type == "message" and item.role == "assistant"
        text = item.content[0].text
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert streamed == text == events[-4].text and text
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 <= usage.input_tokens_details.cached_tokens < usage.input_tokens
    return response


def as_input(item: Any) -> dict[str, Any]:
    """An SDK output item as an input item to send back (the fields the API echoes)."""
    data = item.model_dump(exclude_none=True)
    keep = {"type", "id", "call_id", "name", "arguments", "role", "content", "status"}
    return {k: v for k, v in data.items() if k in keep}


def tool_output(call: Any, turn: int) -> dict[str, Any]:
    text = f"turn {turn}: " + "FAILED test_parse_header - AssertionError\n" * (3 + turn)
    return {"type": "function_call_output", "call_id": call.call_id, "output": text}


def test_tool_loop_chained_by_previous_response_id(client: Any, server: Any) -> None:
    _srv, engine = server
    previous = None
    new_input: Any = "The tests fail; fix the parser."
    with client.responses.connect() as conn:
        for turn in range(4):
            final = turn == 3
            conn.response.create(
                model="tiny",
                instructions=SYSTEM,
                tools=TOOLS,
                tool_choice="auto" if final else ("required" if turn % 2 == 0 else
                                                  {"type": "function", "name": "run_tests"}),
                input=new_input,
                previous_response_id=previous.id if previous else None,
                store=False,
                max_output_tokens=8,
            )  # fmt: skip
            response = check_events(read_response(conn), function_call=not final)
            cached = response.usage.input_tokens_details.cached_tokens
            if previous is None:
                assert cached == 0
            else:  # every token of the previous turns, prompt and output, is cached
                assert cached == previous.usage.input_tokens + previous.usage.output_tokens
                assert response.previous_response_id == previous.id
            if turn == 1:
                assert response.output[0].name == "run_tests"
            assert response.metrics["ttft_ms"] > 0
            if not final:
                new_input = [tool_output(response.output[0], turn)]
            previous = response
    stats = engine_check(engine)
    assert stats["scheduler"]["tokens_hit_pinned"] > 0


def test_reconnect_with_full_history_is_served_from_the_hash_cache(client: Any) -> None:
    history: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "input_text", "text": "Fix the failing tests."}]}
    ]
    previous = None
    with client.responses.connect() as conn:
        for turn in range(3):
            conn.response.create(
                model="tiny", instructions=SYSTEM, tools=TOOLS, tool_choice="required",
                input=history if previous is None else history[-1:],
                previous_response_id=None if previous is None else previous.id,
                store=False, max_output_tokens=8,
            )  # fmt: skip
            previous = check_events(read_response(conn), function_call=True)
            history += [as_input(previous.output[0]), tool_output(previous.output[0], turn)]
        # the next turn is sent, then the socket drops before any answer is read
        conn.response.create(
            model="tiny", instructions=SYSTEM, tools=TOOLS, tool_choice="required",
            input=history[-1:], previous_response_id=previous.id, store=False,
        )  # fmt: skip
    last_prompt = previous.usage.input_tokens
    with client.responses.connect() as conn:
        conn.response.create(
            model="tiny", instructions=SYSTEM, tools=TOOLS, tool_choice="auto",
            input=history, store=False, max_output_tokens=8,
        )  # fmt: skip
        response = check_events(read_response(conn), function_call=False)
    cached = response.usage.input_tokens_details.cached_tokens
    assert cached >= 0.9 * last_prompt, (cached, last_prompt)
    assert cached >= 0.9 * (last_prompt + previous.usage.output_tokens)


def test_warm_up_with_generate_false_then_chain(client: Any) -> None:
    with client.responses.connect() as conn:
        conn.response.create(
            model="tiny", instructions=SYSTEM, tools=TOOLS, generate=False, store=False,
            input=[{"role": "user", "content": "Look at src/parser.py first."}],
        )  # fmt: skip
        events = read_response(conn)
        assert [e.type for e in events] == [
            "response.created",
            "response.in_progress",
            "response.completed",
        ]
        warm = events[-1].response
        assert warm.output == [] and warm.usage.output_tokens == 0
        conn.response.create(
            model="tiny", instructions=SYSTEM, tools=TOOLS, tool_choice="required",
            previous_response_id=warm.id, input=[], store=False, max_output_tokens=8,
        )  # fmt: skip
        response = check_events(read_response(conn), function_call=True)
    cached = response.usage.input_tokens_details.cached_tokens
    assert cached == warm.usage.input_tokens


def test_http_json_and_sse_are_stateless(client: Any) -> None:
    kwargs: dict[str, Any] = {
        "model": "tiny",
        "instructions": SYSTEM,
        "input": "Summarise the failures in one line.",
        "max_output_tokens": 6,
    }
    first = client.responses.create(**kwargs)
    assert first.status in ("completed", "incomplete") and first.output[0].type == "message"
    assert first.output_text and first.usage.output_tokens >= 1
    stream = client.responses.create(**kwargs, stream=True)
    events = list(stream)
    check_events(events, function_call=False)
    # the prefix cache serves a repeated prompt's full blocks (no pinning)
    second = events[-1].response
    prompt = second.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens == (prompt - 1) // 16 * 16
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**kwargs, previous_response_id=first.id)
    assert info.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**{**kwargs, "tool_choice": "required"})
    assert info.value.code == "invalid_value"
