"""The real `openai` SDK over a real socket: lanes, forks and steering.

Four conversations interleaved on four lanes of one connection produce, lane by lane,
exactly the events (types, text, `cached_tokens`) that four separate connections
produce; a fork's `cached_tokens` is its parent's full-block prefix; the SDK's
`conn.response.steer` gets `response.steer.accepted`, then the steered response's
`response.incomplete` and its successor, `response.steer.pending` for a function call,
and `response.steer.failed` for a steer with no target.
"""

from __future__ import annotations

from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

from pagedkv.serving.testing import tiny_server, wait_released  # noqa: E402

DONE = ("response.completed", "response.incomplete", "response.failed")
LANES = ["alpha", "beta", "gamma", "delta"]
TURNS = 3
BLOCK = 16
TOOLS = [{"type": "function", "name": "grep", "parameters": {"type": "object",
          "properties": {"pattern": {"type": "string"}}}}]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def client_for(srv: Any) -> Any:
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)


def prompt(lane: str, turn: int) -> str:
    return f"{lane} turn {turn}: " + "explain the cache " * (3 + turn)


def summary(events: list[Any]) -> tuple[list[str], str, int]:
    """What must match: the event types, the text, the cached tokens."""
    last = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return [e.type for e in events], text, last.usage.input_tokens_details.cached_tokens


def test_four_lanes_on_one_connection_match_four_connections() -> None:
    lanes_seen: dict[str, list[tuple[list[str], str, int]]] = {lane: [] for lane in LANES}
    with tiny_server() as (srv, engine):
        with client_for(srv).responses.connect() as conn:
            previous: dict[str, str | None] = dict.fromkeys(LANES)
            for turn in range(TURNS):
                for lane in LANES:
                    conn.response.create(model="tiny", input=prompt(lane, turn), store=False,
                                         previous_response_id=previous[lane], temperature=0,
                                         max_output_tokens=6, stream_id=lane)  # fmt: skip
                got: dict[str, list[Any]] = {lane: [] for lane in LANES}
                ended = 0
                for event in conn:
                    lane = event.stream_id
                    got[lane].append(event)
                    ended += event.type in DONE
                    if ended == len(LANES):
                        break
                for lane in LANES:
                    numbers = [e.sequence_number for e in got[lane]]
                    assert numbers == list(range(len(numbers)))
                    lanes_seen[lane].append(summary(got[lane]))
                    previous[lane] = got[lane][-1].response.id
        wait_released(engine)
    separate: dict[str, list[tuple[list[str], str, int]]] = {lane: [] for lane in LANES}
    with tiny_server() as (srv, engine):  # a fresh cache: nothing shared with the run above
        for lane in LANES:
            with client_for(srv).responses.connect() as conn:
                prev = None
                for turn in range(TURNS):
                    conn.response.create(model="tiny", input=prompt(lane, turn), store=False,
                                         previous_response_id=prev, temperature=0,
                                         max_output_tokens=6)  # fmt: skip
                    events = []
                    for event in conn:
                        events.append(event)
                        if event.type in DONE:
                            break
                    assert all(getattr(e, "stream_id", None) is None for e in events)
                    separate[lane].append(summary(events))
                    prev = events[-1].response.id
        wait_released(engine)
    for lane in LANES:
        assert lanes_seen[lane] == separate[lane], lane
        assert all(cached > 0 for _, _, cached in lanes_seen[lane][1:])


def read_until(conn: Any, *kinds: str) -> list[Any]:
    out = []
    for event in conn:
        out.append(event)
        if event.type in kinds:
            return out
    raise AssertionError("the connection closed")


def test_fork_cached_tokens_and_steering_through_the_sdk() -> None:
    with tiny_server(step_delay_s=0.03) as (srv, engine):
        with client_for(srv).responses.connect() as conn:
            conn.response.create(model="tiny", input="shared context " * 15, store=False,
                                 max_output_tokens=4, stream_id="main")  # fmt: skip
            parent = read_until(conn, *DONE)[-1].response
            held = parent.usage.input_tokens + parent.usage.output_tokens
            conn.response.create(model="tiny", input="a branch", store=False,
                                 previous_response_id=parent.id, max_output_tokens=2,
                                 stream_id="branch")  # fmt: skip
            fork = read_until(conn, *DONE)[-1].response
            assert fork.previous_response_id == parent.id
            assert fork.usage.input_tokens_details.cached_tokens == held // BLOCK * BLOCK

            # a steered message: accepted, cut "steered", continued by a successor
            conn.response.create(model="tiny", input="a long answer please", store=False,
                                 previous_response_id=parent.id, max_output_tokens=200,
                                 stream_id="main")  # fmt: skip
            first = read_until(conn, "response.output_text.delta")
            target = first[0].response.id
            conn.response.steer(input="shorter", previous_response_id=target)
            got = read_until(conn, "response.incomplete")
            accepted = [e for e in got if e.type == "response.steer.accepted"]
            assert len(accepted) == 1
            assert isinstance(accepted[0], openai.types.responses.ResponseSteerAcceptedEvent)
            assert accepted[0].steer.previous_response_id == target
            assert accepted[0].stream_id == "main"
            steered = got[-1].response
            assert steered.incomplete_details.reason == "steered"
            successor = read_until(conn, *DONE)
            assert successor[0].type == "response.created"
            assert successor[-1].response.previous_response_id == target
            cached = successor[-1].response.usage.input_tokens_details.cached_tokens
            assert cached == steered.usage.input_tokens + steered.usage.output_tokens

            # a function call: the steer stays pending until the tool output comes back
            conn.response.create(model="tiny", input="find it", tools=TOOLS,
                                 tool_choice="required", store=False, max_output_tokens=30,
                                 stream_id="tools")  # fmt: skip
            created = read_until(conn, "response.output_item.added")[0].response
            conn.response.steer(input="look in tests/ too", previous_response_id=created.id)
            got = read_until(conn, *DONE)
            assert "response.steer.accepted" in [e.type for e in got]
            pending = read_until(conn, "response.steer.pending")[-1]
            assert isinstance(pending, openai.types.responses.ResponseSteerPendingEvent)
            call = got[-1].response.output[0]
            assert pending.required_input[0].call_id == call.call_id
            conn.response.create(model="tiny", tools=TOOLS, store=False, max_output_tokens=2,
                                 previous_response_id=created.id, stream_id="tools",
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": "src/a.py:3"}])  # fmt: skip
            after = read_until(conn, *DONE)
            assert after[0].type == "response.created"  # the steer's commit point
            assert after[-1].response.previous_response_id == created.id

            # no such response: failed, with no steer id
            conn.response.steer(input="hello", previous_response_id="resp_missing")
            failed = read_until(conn, "response.steer.failed")[-1]
            assert isinstance(failed, openai.types.responses.ResponseSteerFailedEvent)
            assert failed.error.code == "response_not_found" and failed.steer.id is None
        wait_released(engine)
