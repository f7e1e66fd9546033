"""WebSocket lanes, forks and steering with a raw `websockets` client.

Lanes of one connection run side by side, each its own session; a fork onto another
lane shares the parent's full blocks (its `cached_tokens` is the parent's full-block
prefix); a steered message ends "incomplete"/"steered" and its automatic successor
continues from every token already computed; a steered function call keeps the steer
pending until the client's continuation, which gets it prepended; every steer that
cannot be committed is answered with `response.steer.failed`. After the connection
closes the engine holds nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

websockets = pytest.importorskip("websockets")

from websockets.sync.client import ClientConnection, connect  # noqa: E402
from ws_helpers import DONE, completed, create, events, recv  # noqa: E402

from pagedkv.serving.response_run import ServerConfig  # noqa: E402
from pagedkv.serving.testing import (  # noqa: E402
    engine_check,
    read_response,
    tiny_server,
    wait_released,
)

BLOCK = 16  # EngineConfig's default block size
TOOL = {"type": "function", "name": "ls", "parameters": {"type": "object",
        "properties": {"path": {"type": "string"}}}}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def steer(ws: ClientConnection, previous_response_id: Any, input: Any, **extra: Any) -> None:
    ws.send(json.dumps({"type": "response.steer", "previous_response_id": previous_response_id,
                        "input": input, **extra}))  # fmt: skip


def held(response: dict[str, Any]) -> int:
    """Tokens the session holds after `response`: its prompt and every output token."""
    usage = response["usage"]
    return int(usage["input_tokens"] + usage["output_tokens"])


def cached(response: dict[str, Any]) -> int:
    return int(response["usage"]["input_tokens_details"]["cached_tokens"])


def until(ws: ClientConnection, *kinds: str) -> list[dict[str, Any]]:
    """Events up to and including the first of one of the types `kinds`."""
    out = []
    for ev in events(ws):
        out.append(ev)
        if ev["type"] in kinds:
            return out
    raise AssertionError("unreachable")


def test_lanes_run_side_by_side_each_in_order() -> None:
    with tiny_server(step_delay_s=0.02) as (srv, engine):
        with connect(srv.ws_url) as ws:
            for lane in ("a", "b"):
                create(
                    ws, input=f"lane {lane}", max_output_tokens=12, temperature=0, stream_id=lane
                )
            create(ws, input="second on a", max_output_tokens=2, stream_id="a", metadata={"n": "2"})
            seen: list[dict[str, Any]] = []
            ends = 0
            while ends < 3:
                ev = recv(ws)
                seen.append(ev)
                ends += ev["type"] in DONE
            deltas = [e["stream_id"] for e in seen if e["type"] == "response.output_text.delta"]
            first_end = next(i for i, e in enumerate(seen) if e["type"] in DONE)
            # both lanes were producing output before either finished
            assert {"a", "b"} <= {e.get("stream_id") for e in seen[:first_end]
                                  if e["type"] == "response.output_text.delta"}  # fmt: skip
            assert len(deltas) >= 2
            a_ends = [e["response"]["metadata"].get("n") for e in seen
                      if e["type"] in DONE and e["stream_id"] == "a"]  # fmt: skip
            assert a_ends == [None, "2"]  # in order on its lane
            # each lane is its own engine session while the connection is open
            assert engine_check(engine)["num_sessions"] == 2
        assert wait_released(engine)["gpu_blocks"]["in_use"] == 0


def test_a_fork_shares_the_parents_full_blocks_and_forks_cost_one_prefix() -> None:
    with tiny_server() as (srv, engine):
        with connect(srv.ws_url) as ws:
            parent = completed(ws, input="the shared context " * 12, max_output_tokens=5,
                               temperature=0, stream_id="root")  # fmt: skip
            before = engine_check(engine)["gpu_blocks"]["in_use"]
            forks = []
            for i in range(4):
                forks.append(completed(ws, input=f"plan {i}", previous_response_id=parent["id"],
                                       max_output_tokens=3, stream_id=f"fork{i}"))  # fmt: skip
            full = held(parent) // BLOCK * BLOCK
            # every full block of the parent's tokens is shared; its partial one recomputed
            assert cached(forks[0]) == full
            for fork in forks:
                assert fork["previous_response_id"] == parent["id"]
                # later forks also share the block the first fork completed with the
                # start of its own message ("<|im_start|>user\nplan "), which they repeat
                assert full <= cached(fork) < held(parent) + len("_user\nplan ")
                assert cached(fork) % BLOCK == 0
            stats = engine_check(engine)
            assert stats["num_sessions"] == 5
            # four forks hold one copy of the prefix: a few blocks of their own each
            own = (held(forks[0]) - cached(forks[0])) // BLOCK + 2
            assert stats["gpu_blocks"]["in_use"] <= before + 4 * own, (stats, before, own)
            # a continuation on the parent's own lane extends its session: everything cached
            same = completed(ws, input="go on", previous_response_id=parent["id"],
                             max_output_tokens=2, stream_id="root")  # fmt: skip
            assert cached(same) == held(parent)
        assert wait_released(engine)["gpu_blocks"]["in_use"] == 0


def test_a_running_response_cannot_be_forked_and_errors_evict_as_the_api() -> None:
    with tiny_server(step_delay_s=0.02) as (srv, engine):
        with connect(srv.ws_url) as ws:
            create(ws, input="long", max_output_tokens=30, stream_id="a")
            created = recv(ws)
            assert created["type"] == "response.created"
            running = created["response"]["id"]
            create(ws, input="fork it now", previous_response_id=running, stream_id="b")
            err = next(e for e in events(ws) if e["type"] == "error")
            assert err["error"]["code"] == "previous_response_in_progress"
            assert err["stream_id"] == "b" and err["error"]["param"] == "previous_response_id"
            until(ws, "response.completed")
            # a refused fork on another lane keeps the parent
            create(ws, input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}],
                   previous_response_id=running, stream_id="b")  # fmt: skip
            assert read_response(events(ws))[0]["error"]["code"] == "invalid_value"
            assert completed(ws, input="fork", previous_response_id=running, stream_id="b",
                             max_output_tokens=2)["previous_response_id"] == running  # fmt: skip
            # a refused continuation on the parent's lane evicts it, as the API does
            create(ws, input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}],
                   previous_response_id=running, stream_id="a")  # fmt: skip
            assert read_response(events(ws))[0]["error"]["code"] == "invalid_value"
            create(ws, input="again", previous_response_id=running, stream_id="a")
            (gone,) = read_response(events(ws))
            assert gone["error"]["code"] == "previous_response_not_found"
            assert gone["stream_id"] == "a"
        wait_released(engine)


def test_a_steered_message_ends_steered_and_its_successor_reuses_every_token() -> None:
    with tiny_server(step_delay_s=0.03) as (srv, engine):
        with connect(srv.ws_url) as ws:
            create(ws, input="write a long essay", max_output_tokens=200, temperature=0,
                   stream_id="s", metadata={"k": "v"}, instructions="be brief")  # fmt: skip
            first = until(ws, "response.output_text.delta")
            rid = first[0]["response"]["id"]
            steer(ws, rid, "stop and answer in one word")
            got = until(ws, "response.incomplete")
            accepted = [e for e in got if e["type"] == "response.steer.accepted"]
            assert len(accepted) == 1 and accepted[0]["stream_id"] == "s"
            steer_id = accepted[0]["steer"]["id"]
            assert steer_id.startswith("steer_") and len(steer_id) == 38
            assert accepted[0]["steer"]["previous_response_id"] == rid
            stream = first + got
            assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
            steered = got[-1]["response"]
            assert steered["status"] == "incomplete"
            assert steered["incomplete_details"] == {"reason": "steered"}
            text = "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta")
            assert steered["output"][0]["content"][0]["text"] == text
            assert len(text) < 200  # cut, not run to its limit
            # the automatic successor: same lane and settings, continuing from the steered one
            succ = read_response(events(ws))
            assert succ[0]["type"] == "response.created" and succ[-1]["type"] in DONE
            assert all(e["stream_id"] == "s" for e in succ)
            final = succ[-1]["response"]
            assert final["previous_response_id"] == rid
            assert (final["instructions"], final["metadata"]) == ("be brief", {"k": "v"})
            assert final["max_output_tokens"] == 200 and final["temperature"] == 0
            assert cached(final) == held(steered)  # nothing computed twice
            # the successor is a normal response: it can be continued from
            after = completed(ws, input="thanks", previous_response_id=final["id"],
                              instructions="be brief", max_output_tokens=2, stream_id="s")  # fmt: skip
            assert cached(after) == held(final)
        assert wait_released(engine)["gpu_blocks"]["in_use"] == 0


def test_a_steered_function_call_keeps_the_steer_pending_for_the_continuation() -> None:
    def run(ws: ClientConnection, *, steered: bool) -> dict[str, Any]:
        create(ws, input="list the files", tools=[TOOL], tool_choice="required",
               max_output_tokens=40, temperature=0, stream_id="t")  # fmt: skip
        first = until(ws, "response.output_item.added")
        rid = first[0]["response"]["id"]
        if steered:
            steer(ws, rid, [{"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "only python files"}]}])  # fmt: skip
        got = until(ws, *DONE)
        call = got[-1]["response"]["output"][0]
        if steered:
            assert [e["type"] for e in got].count("response.steer.accepted") == 1
            pending = recv(ws)
            assert pending["type"] == "response.steer.pending"
            assert pending["reason"] == "waiting_for_required_input"
            assert pending["required_input"] == [{"type": "function_call_output",
                "call_id": call["call_id"], "name": "ls"}]  # fmt: skip
            assert pending["stream_id"] == "t"
            assert pending["sequence_number"] == got[-1]["sequence_number"] + 1
            prefix: list[dict[str, Any]] = []
        else:  # the control: the client puts the same message first itself
            prefix = [{"role": "user", "content": "only python files"}]
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "a.py"}
        after = completed(ws, input=[*prefix, output], previous_response_id=rid, tools=[TOOL],
                          max_output_tokens=2, stream_id="t")  # fmt: skip
        assert cached(after) == held(got[-1]["response"])  # the lane's session, extended
        return after

    with tiny_server(step_delay_s=0.02) as (srv, engine):
        with connect(srv.ws_url) as ws:
            with_steer = run(ws, steered=True)
        with connect(srv.ws_url) as ws:
            control = run(ws, steered=False)
        # the queued message was prepended: the same prompt as the manual control
        assert with_steer["usage"]["input_tokens"] == control["usage"]["input_tokens"]
        assert cached(with_steer) == cached(control)
        wait_released(engine)


def test_steers_that_cannot_be_committed_fail_with_the_apis_codes() -> None:
    config = ServerConfig(model_name="tiny", max_pending_steers=2)
    with tiny_server(server=config, step_delay_s=0.02) as (srv, engine):
        with connect(srv.ws_url) as ws:

            def failed() -> dict[str, Any]:
                ev = recv(ws)
                assert ev["type"] == "response.steer.failed", ev
                assert ev["error"]["type"] == "invalid_request_error"
                return ev

            steer(ws, "resp_nope", "hi")
            ev = failed()
            assert ev["error"]["code"] == "response_not_found" and "id" not in ev["steer"]
            assert ev["steer"] == {"previous_response_id": "resp_nope", "input": "hi"}
            done = completed(ws, input="short", max_output_tokens=2, stream_id="x")
            for bad in (
                {"input": ""},
                {"input": []},
                {"input": [{"role": "assistant", "content": "x"}]},
                {"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]},
                {"input": [{"role": "user", "content": "x", "name": "n"}]},
                {"input": "x", "stream_id": "x"},
                {"input": 5},
                {"input": "x\ud800"},
            ):
                extra = {k: v for k, v in bad.items() if k != "input"}
                steer(ws, done["id"], bad["input"], **extra)
                ev = failed()
                assert ev["error"]["code"] == "invalid_input", (bad, ev)
                assert "id" not in ev["steer"] and ev["stream_id"] == "x"
            steer(ws, done["id"], "too late")
            assert failed()["error"]["code"] == "response_already_completed"
            create(ws, input="warm", generate=False)
            warm = read_response(events(ws))
            steer(ws, warm[-1]["response"]["id"], "x")
            assert failed()["error"]["code"] == "steering_not_supported"
            # an id that is not text, an input over the size limit: refused, never a 500
            ws.send('{"type": "response.steer", "previous_response_id": "resp_\\ud800", '
                    '"input": "x"}')  # fmt: skip
            ev = failed()
            assert ev["error"]["code"] == "invalid_input"
            assert ev["steer"]["previous_response_id"] == ""
            steer(ws, done["id"], "x" * (256 * 1024 + 1))
            assert failed()["error"]["code"] == "invalid_input"
            # a function call waits for its output: steers pend, up to the limit
            call = completed(ws, input="ls", tools=[TOOL], tool_choice="required",
                             max_output_tokens=3)  # fmt: skip
            for i in range(2):
                steer(ws, call["id"], f"note {i}")
                assert recv(ws)["type"] == "response.steer.accepted"
                assert recv(ws)["type"] == "response.steer.pending"
            steer(ws, call["id"], "one too many")
            assert failed()["error"]["code"] == "too_many_pending_steers"
            # a continuation that is refused fails the steers it would have committed
            create(ws, input=[{"type": "function_call_output", "call_id": "wrong", "output": "x"}],
                   previous_response_id=call["id"])  # fmt: skip
            got = [recv(ws) for _ in range(3)]
            assert got[0]["type"] == "error"
            assert [e["error"]["code"] for e in got[1:]] == ["successor_creation_failed"] * 2
            assert [e["steer"]["input"] for e in got[1:]] == ["note 0", "note 1"]
            assert completed(ws, input="still usable", max_output_tokens=2)["status"] in (
                "completed", "incomplete")  # fmt: skip
        wait_released(engine)


def test_a_steer_racing_the_continuation_is_committed_or_refused_never_lost() -> None:
    with tiny_server() as (srv, engine):
        with connect(srv.ws_url) as ws:
            plain = None  # what a continuation adds without a steer
            for round_ in range(4):
                call = completed(ws, input="ls", tools=[TOOL], tool_choice="required",
                                 max_output_tokens=3, temperature=0)  # fmt: skip
                output = {"type": "function_call_output", "call_id": call["output"][0]["call_id"],
                          "output": "a.py"}  # fmt: skip
                create(ws, input=[output], previous_response_id=call["id"], tools=[TOOL],
                       max_output_tokens=2)  # fmt: skip
                if round_ == 0:
                    plain = until(ws, *DONE)[-1]["response"]["usage"]["input_tokens"] - held(call)
                    continue
                steer(ws, call["id"], "and b.py")  # right behind it: the continuation is running
                got = until(ws, *DONE)
                kinds = [e["type"] for e in got]
                failed = [e for e in got if e["type"] == "response.steer.failed"]
                if "response.steer.accepted" in kinds:  # taken by the continuation: prepended
                    assert not failed
                    assert plain is not None and "response.steer.pending" in kinds
                    added = got[-1]["response"]["usage"]["input_tokens"] - held(call)
                    assert added > plain  # the steer's message was prepended
                else:
                    assert [e["error"]["code"] for e in failed] == ["response_already_completed"]
        wait_released(engine)


def test_a_flood_of_steers_at_a_running_response_is_answered_in_its_sequence() -> None:
    with tiny_server(step_delay_s=0.02) as (srv, engine):
        with connect(srv.ws_url) as ws:
            create(ws, input="a long answer", max_output_tokens=120, temperature=0,
                   stream_id="busy")  # fmt: skip
            first = until(ws, "response.output_text.delta")
            rid = first[0]["response"]["id"]
            for i in range(80):  # bad input: answered one by one, nothing steered
                steer(ws, rid, [{"role": "assistant", "content": f"no {i}"}])
            got = first + until(ws, *DONE)
            failed = [e for e in got if e["type"] == "response.steer.failed"]
            assert len(failed) == 80
            assert {e["error"]["code"] for e in failed} == {"invalid_input"}
            assert {e["stream_id"] for e in got} == {"busy"}
            # numbered in the target's own stream, in order, with its other events
            assert [e["sequence_number"] for e in got] == list(range(len(got)))
            assert (got[-1]["response"]["incomplete_details"] or {}).get("reason") != "steered"
        wait_released(engine)


def test_lane_ids_and_the_lane_and_in_flight_limits() -> None:
    config = ServerConfig(model_name="tiny", max_lanes=2, max_inflight_responses=2)
    with tiny_server(server=config, step_delay_s=0.02) as (srv, engine):
        with connect(srv.ws_url) as ws:
            for bad in ("", "a b", "x" * 257, "lane/1"):
                create(ws, input="x", stream_id=bad)
                (err,) = read_response(events(ws))
                assert (err["error"]["code"], err["error"]["param"]) == (
                    "invalid_stream_id", "stream_id")  # fmt: skip
            # three lanes at once with two in flight: the third waits, queued, not refused
            for lane in ("a", "b", None):
                create(ws, input=f"lane {lane}", max_output_tokens=6, temperature=0,
                       **({} if lane is None else {"stream_id": lane}))  # fmt: skip
            seen: list[dict[str, Any]] = []
            while sum(e["type"] in DONE for e in seen) < 3:
                seen.append(recv(ws))
                running = {e.get("stream_id") for e in seen if e["type"] == "response.created"}
                ended = {e.get("stream_id") for e in seen if e["type"] in DONE}
                assert len(running - ended) <= 2, seen[-1]
            # the default lane does not count against max_lanes; a third named one does
            create(ws, input="x", stream_id="c")
            (err,) = read_response(events(ws))
            assert err["error"]["code"] == "websocket_stream_limit_reached"
            assert (err["stream_id"], err["error"]["param"]) == ("c", "stream_id")
            assert completed(ws, input="reuse", stream_id="a", max_output_tokens=2)
        wait_released(engine)
