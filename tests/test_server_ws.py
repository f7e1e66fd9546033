"""WebSocket mode with a raw `websockets` client: bad input, ordering, pings, age limit.

Every malformed request gets an `error` event and the connection stays usable; queued
responses run in order; pings are answered while the model works; a connection past its
maximum age is cut mid-response: the running response and each queued request get
`websocket_connection_limit_reached`, then the connection closes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

websockets = pytest.importorskip("websockets")

from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402
from ws_helpers import DONE, completed, create, events  # noqa: E402

from pagedkv.serving.response_run import ServerConfig  # noqa: E402
from pagedkv.serving.testing import (  # noqa: E402
    engine_check,
    read_response,
    tiny_server,
    wait_released,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def by_lane(ws: ClientConnection, n: int) -> dict[str | None, list[dict[str, Any]]]:
    """Events of `n` responses on different lanes, by `stream_id`, each up to its end."""
    lanes: dict[str | None, list[dict[str, Any]]] = {}
    done = 0
    for ev in events(ws):
        lanes.setdefault(ev.get("stream_id"), []).append(ev)
        if ev["type"] in (*DONE, "response.failed"):
            done += 1
            if done == n:
                return lanes
    raise AssertionError("unreachable")


def error_of(ws: ClientConnection, raw: str | None = None, **fields: Any) -> dict[str, Any]:
    if raw is not None:
        ws.send(raw)
    else:
        create(ws, **fields)
    got = read_response(events(ws))
    assert len(got) == 1 and got[0]["type"] == "error", got
    assert set(got[0]["error"]) >= {"type", "code", "message", "param"}
    assert got[0]["status"] == 400
    return got[0]["error"]


def test_bad_input_gets_errors_and_the_connection_stays_usable() -> None:
    config = ServerConfig(model_name="tiny", max_message_bytes=64 * 1024)
    with tiny_server(server=config) as (srv, engine):
        with connect(srv.ws_url) as other:
            foreign = completed(other, input="hello", max_output_tokens=2)["id"]
        with connect(srv.ws_url) as ws:
            assert error_of(ws, "{not json")["code"] == "invalid_json"
            assert error_of(ws, "[1, 2]")["code"] == "invalid_type"
            err = error_of(ws, json.dumps({"type": "response.cancel"}))
            assert (err["code"], err["param"]) == ("unknown_event_type", "type")
            err = error_of(ws, input=5)
            assert (err["code"], err["param"]) == ("invalid_type", "input")
            assert error_of(ws, input="x", tools="all")["param"] == "tools"
            assert error_of(ws, input="x", max_output_tokens="3")["param"] == "max_output_tokens"
            assert error_of(ws, input="x", temperature=9)["code"] == "invalid_value"
            err = error_of(ws, input=[{"type": "message", "role": "robot", "content": "x"}])
            assert err["param"] == "input[0].role"
            err = error_of(ws, input=[{"type": "input_image", "image_url": "x"}])
            assert err["code"] == "unsupported_value"
            assert error_of(ws, input="x" * 5000)["code"] == "context_length_exceeded"
            err = error_of(ws, input="x", previous_response_id=foreign)
            assert (err["code"], err["param"]) == (
                "previous_response_not_found",
                "previous_response_id",
            )
            # regressions from review: deep nesting, lone surrogates, non-finite top_p
            assert error_of(ws, "[" * 20_000 + "]" * 20_000)["code"] == "invalid_json"
            err = error_of(
                ws, '{"type": "response.create", "input": "x", "instructions": "\\ud800"}'
            )
            assert (err["code"], err["param"]) == ("invalid_value", "instructions")
            raw = '{"type": "response.create", "model": "tiny", "input": "x", "top_p": 1e999}'
            assert error_of(ws, raw)["param"] == "top_p"
            first = completed(ws, input="still here?", max_output_tokens=3)
            second = completed(ws, input=[], previous_response_id=first["id"])
            assert second["usage"]["input_tokens_details"]["cached_tokens"] > 0
        stats = wait_released(engine)
        assert stats["gpu_blocks"]["in_use"] == 0


def test_queued_responses_run_in_order_without_interleaving() -> None:
    with tiny_server() as (srv, _engine), connect(srv.ws_url) as ws:
        for i in range(3):
            create(ws, input=f"question {i}", max_output_tokens=4, metadata={"i": str(i)})
        seen = []
        for _ in range(3):
            got = read_response(events(ws))
            ids = {e["response"]["id"] for e in got if "response" in e}
            assert len(ids) == 1 and got[-1]["type"] in DONE
            assert [e["sequence_number"] for e in got] == list(range(len(got)))
            seen.append(got[-1]["response"]["metadata"]["i"])
        assert seen == ["0", "1", "2"]


def test_stream_id_lanes_are_echoed_on_every_event_and_background_is_refused() -> None:
    with tiny_server() as (srv, _engine), connect(srv.ws_url) as ws:
        create(ws, input="lane a", max_output_tokens=3, stream_id="a")
        create(ws, input="lane b", max_output_tokens=3, stream_id="b")
        create(ws, input="no lane", max_output_tokens=3)
        lanes = by_lane(ws, 3)  # the lanes run at once: their events interleave
        assert set(lanes) == {"a", "b", None}
        for lane, got in lanes.items():
            assert got[-1]["type"] in DONE, lane
            assert [e["sequence_number"] for e in got] == list(range(len(got)))
        # errors of a request carry its lane too
        create(ws, previous_response_id="resp_nope", input="x", stream_id="c")
        (ev,) = read_response(events(ws))
        assert ev["type"] == "error" and ev["stream_id"] == "c"
        assert ev["error"]["code"] == "previous_response_not_found"
        create(ws, input="x", background=True, stream_id="d")  # refused while parsing
        (ev,) = read_response(events(ws))
        assert ev["stream_id"] == "d" and ev["error"]["code"] == "unsupported_value"
        assert ev["error"]["param"] == "background"
        assert error_of(ws, input="x", stream_id=7)["param"] == "stream_id"
        assert completed(ws, input="still usable", max_output_tokens=2)["status"] in (
            "completed",
            "incomplete",
        )


def test_pings_are_answered_while_the_model_works() -> None:
    with tiny_server(step_delay_s=0.3) as (srv, _engine), connect(srv.ws_url) as ws:
        create(ws, input="slow model", max_output_tokens=3)
        stream = events(ws)
        assert next(stream)["type"] == "response.created"
        latencies = []
        for _ in range(3):
            start = time.monotonic()
            assert ws.ping().wait(timeout=5.0)
            latencies.append(time.monotonic() - start)
        rest = read_response(stream)
        assert rest[-1]["type"] in DONE
        # each step sleeps 0.3 s in the engine thread; pongs do not wait for it
        assert max(latencies) < 0.25, latencies


def test_pings_are_answered_while_a_conversation_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering (a long conversation's tokens) runs off the event loop: with the renderer
    held, the server still answers pings, then completes once it is released."""
    import threading

    import pagedkv.serving.response_run as response_run

    entered, release = threading.Event(), threading.Event()
    real_render = response_run.render_prompt

    def slow_render(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(timeout=30.0)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(response_run, "render_prompt", slow_render)
    with tiny_server() as (srv, _engine), connect(srv.ws_url) as ws:
        create(ws, input="a long conversation", max_output_tokens=2)
        assert entered.wait(timeout=10.0)  # the renderer is running (and held)
        assert ws.ping().wait(timeout=5.0)  # the event loop is free meanwhile
        release.set()
        got = read_response(events(ws))
        assert got[0]["type"] == "response.created" and got[-1]["type"] in DONE


def test_connection_age_limit_cuts_the_running_response_and_answers_the_queue() -> None:
    config = ServerConfig(model_name="tiny", max_connection_age_s=0.8)
    with tiny_server(server=config, step_delay_s=0.2) as (srv, engine):
        with connect(srv.ws_url) as ws:
            opened = time.monotonic()
            # two lanes run at once; a third request waits behind the first on its lane
            create(ws, input="a response spanning the deadline", max_output_tokens=40,
                   temperature=0, stream_id="long")  # fmt: skip
            create(ws, input="queued behind it", max_output_tokens=2, stream_id="long")
            create(ws, input="another lane, as long", max_output_tokens=40, temperature=0)
            seen = []
            with pytest.raises(ConnectionClosed):
                while True:
                    seen.append(json.loads(ws.recv(timeout=10)))
            closed_after = time.monotonic() - opened
        types = [e["type"] for e in seen]
        assert "response.created" in types and not set(types) & {*DONE, "response.failed"}
        errors = [e for e in seen if e["type"] == "error"]
        # the running response and each queued request are answered, none dropped
        assert [e["error"]["code"] for e in errors] == ["websocket_connection_limit_reached"] * 3
        assert sorted(str(e.get("stream_id")) for e in errors) == ["None", "long", "long"]
        assert closed_after < 4.0  # cut at the deadline, not after its 40 tokens (8 s)
        stats = wait_released(engine)
        assert stats["num_sessions"] == 0 and stats["gpu_blocks"]["in_use"] == 0


def test_server_default_length_completes_the_response() -> None:
    # No max_output_tokens: the server's default length is its stop length, so the
    # response (a text one and a forced function call) ends response.completed.
    with tiny_server() as (srv, _engine), connect(srv.ws_url) as ws:
        create(ws, input="tell me a long story", temperature=0)
        last = read_response(events(ws))[-1]
        assert last["type"] == "response.completed", last
        assert last["response"]["incomplete_details"] is None
        assert last["response"]["output"][0]["status"] == "completed"
        tool = {"type": "function", "name": "ls", "parameters": {"type": "object",
                "properties": {"path": {"type": "string"}}}}  # fmt: skip
        create(ws, input="list files", tools=[tool], tool_choice="required", temperature=0)
        last = read_response(events(ws))[-1]
        assert last["type"] == "response.completed", last
        call = last["response"]["output"][0]
        assert call["type"] == "function_call" and call["status"] == "completed"
        assert set(json.loads(call["arguments"])) == {"path"}


def test_output_cut_by_max_output_tokens_is_incomplete() -> None:
    with tiny_server() as (srv, _engine), connect(srv.ws_url) as ws:
        create(ws, input="tell me a long story", max_output_tokens=2, temperature=0)
        got = read_response(events(ws))
        last = got[-1]
        if last["type"] == "response.incomplete":  # the usual case: 2 characters
            response = last["response"]
            assert response["status"] == "incomplete"
            assert response["incomplete_details"] == {"reason": "max_output_tokens"}
            assert response["output"][0]["status"] == "incomplete"
        else:  # the model chose to stop within 2 characters
            assert last["response"]["status"] == "completed"
            assert last["response"]["incomplete_details"] is None
        usage = last["response"]["usage"]
        assert usage["input_tokens_details"] == {
            "cached_tokens": usage["input_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,
        }


def test_requests_queued_past_the_limit_are_refused_and_the_rest_run() -> None:
    cfg = ServerConfig(model_name="tiny", max_queued_responses=2)
    with tiny_server(server=cfg) as (srv, engine), connect(srv.ws_url) as ws:
        stream = events(ws)
        create(ws, input="request 0 " * 50, max_output_tokens=48, temperature=0)
        # wait until the first one runs (else all six can arrive before it leaves the
        # queue, and only two get in)
        ends, refused = 0, 0
        while next(stream)["type"] != "response.created":
            pass
        for i in range(1, 6):  # two wait, the rest arrive while those are busy
            create(ws, input=f"request {i} " * 50, max_output_tokens=48, temperature=0)
        while ends + refused < 6:
            event = next(stream)
            if event["type"] == "error":
                assert event["error"]["code"] == "too_many_queued_responses", event
                assert "limit 2" in event["error"]["message"]
                refused += 1
            elif event["type"] in DONE:
                ends += 1
        assert refused >= 1 and ends >= 3  # the running one and the two queued
        assert completed(ws, input="still usable")["status"] in ("completed", "incomplete")
        engine_check(engine)
