"""Engine tests on the tiny model, driven synchronously (`run_until_idle`).

Greedy outputs are checked against a reference that recomputes the whole sequence from
scratch every token (no paging, no cache reuse), so batching, chunked prefill, prefix
reuse, offload/restore and the all-cached path must all give the same tokens.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from engine_helpers import TOK, greedy, reference

from pagedkv.model.llama import LlamaModel
from pagedkv.serving.conversation import FunctionCall, Item, Message, render_prompt
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import (
    EngineEvent,
    EngineRequest,
    OutputDelta,
    OutputStarted,
    TurnDone,
    TurnFailed,
    TurnStarted,
)
from pagedkv.serving.factory import build_engine, build_model
from pagedkv.serving.generation import OutputProgram, OutputSpec


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return build_model("tiny", seed=3)


def make_engine(model: LlamaModel, **config: Any) -> Engine:
    from pagedkv.scheduler.config import SchedulerConfig

    sched = config.pop("scheduler", {})
    base: dict[str, Any] = {"num_gpu_blocks": 128, "num_host_blocks": 128}
    return build_engine(model, **{**base, **config}, scheduler=SchedulerConfig(**sched))


def text_prompt(text: str, *, instructions: str = "Be brief.") -> list[int]:
    return render_prompt(TOK, instructions=instructions, tools=(), items=[Message("user", text)])


class Recorder:
    """Submits requests and keeps each one's events."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events: dict[str, list[EngineEvent]] = {}
        self._n = 0

    def submit(
        self, session: str, tokens: list[int], spec: OutputSpec | None, *, ephemeral: bool = False
    ) -> str:
        self._n += 1
        rid = f"r{self._n}"
        self.events[rid] = []
        req = EngineRequest(
            request_id=rid,
            session_id=session,
            prompt_tokens=tuple(tokens),
            output=spec,
            ephemeral=ephemeral,
        )
        self.engine.submit(req, self.events[rid].append)
        return rid

    def done(self, rid: str) -> TurnDone:
        last = self.events[rid][-1]
        assert isinstance(last, TurnDone), self.events[rid]
        return last

    def failed(self, rid: str) -> TurnFailed:
        last = self.events[rid][-1]
        assert isinstance(last, TurnFailed), self.events[rid]
        return last


def held(engine: Engine, session: str) -> list[int]:
    return engine._sessions[session].held


def assert_no_leaks(engine: Engine) -> None:
    stats = engine.stats()
    assert stats["gpu_blocks"]["in_use"] == 0, stats
    if stats["host_blocks"] is not None:
        assert stats["host_blocks"]["in_use"] == 0, stats
    engine.scheduler.check_invariants()
    engine.cache.check_invariants()


def test_two_sessions_share_steps_and_match_the_reference(model: LlamaModel) -> None:
    engine = make_engine(model)
    rec = Recorder(engine)
    prompts = {"a": text_prompt("first session, short"), "b": text_prompt("second " * 20)}
    rids = {}
    for sid, prompt in prompts.items():
        engine.open_session(sid)
        rids[sid] = rec.submit(sid, prompt, greedy())
    engine.run_until_idle()
    assert engine.num_step_seqs > engine.num_steps  # some steps ran both sessions
    for sid, prompt in prompts.items():
        tokens, item = reference(model, prompt, greedy())
        done = rec.done(rids[sid])
        assert done.item == item
        assert held(engine, sid) == prompt + tokens
        kinds = [type(e) for e in rec.events[rids[sid]]]
        assert kinds[:2] == [TurnStarted, OutputStarted] and kinds[-1] is TurnDone
        deltas = "".join(e.text for e in rec.events[rids[sid]] if isinstance(e, OutputDelta))
        assert isinstance(item, Message) and deltas == item.text
        assert (done.input_tokens, done.cached_tokens) == (len(prompt), 0)
        assert done.metrics["ttft_s"] is not None and done.metrics["ttft_s"] >= 0


def test_next_turn_extends_the_session_and_reports_it_cached(model: LlamaModel) -> None:
    engine = make_engine(model)
    rec = Recorder(engine)
    engine.open_session("s")
    items: list[Item] = [Message("user", "list the files")]
    tools_prompt = render_prompt(TOK, instructions="x", tools=(), items=items)
    call = greedy(6, call_id="call_1", name="ls", arg_key="path")
    r1 = rec.submit("s", tools_prompt, call)
    engine.run_until_idle()
    item = rec.done(r1).item
    assert isinstance(item, FunctionCall) and item.call_id == "call_1" and item.name == "ls"
    args = json.loads(item.arguments)
    assert list(args) == ["path"] and 1 <= len(args["path"]) <= 6
    items.append(item)
    # the session holds exactly the conversation with the call, rendered item by item
    assert held(engine, "s") == render_prompt(
        TOK, instructions="x", tools=(), items=items, generation_prompt=False
    )
    from pagedkv.serving.conversation import FunctionCallOutput

    items.append(FunctionCallOutput("call_1", "a.txt b.txt"))
    prompt2 = render_prompt(TOK, instructions="x", tools=(), items=items)
    r2 = rec.submit("s", prompt2, greedy())
    engine.run_until_idle()
    done = rec.done(r2)
    assert done.cached_tokens == len(tools_prompt) + rec.done(r1).output_tokens
    assert done.item == reference(model, prompt2, greedy())[1]
    engine.close_session("s")
    engine.run_until_idle()
    assert_no_leaks(engine)


def test_chunked_prefill_matches_the_reference(model: LlamaModel) -> None:
    engine = make_engine(model, prefill_chunk_tokens=24, max_batch_tokens=40)
    rec = Recorder(engine)
    prompt = text_prompt("a long tool output line\n" * 12)
    engine.open_session("s")
    rid = rec.submit("s", prompt, greedy())
    steps = engine.run_until_idle()
    assert steps >= len(prompt) // 24
    assert rec.done(rid).item == reference(model, prompt, greedy())[1]


def test_warm_up_then_generate(model: LlamaModel) -> None:
    engine = make_engine(model)
    rec = Recorder(engine)
    items = [Message("user", "warm me up")]
    warm = render_prompt(TOK, instructions="sys", tools=(), items=items, generation_prompt=False)
    engine.open_session("s")
    r1 = rec.submit("s", warm, None)
    engine.run_until_idle()
    done = rec.done(r1)
    assert done.item is None and done.output_tokens == 0 and held(engine, "s") == warm
    prompt = render_prompt(TOK, instructions="sys", tools=(), items=items)
    r2 = rec.submit("s", prompt, greedy())
    engine.run_until_idle()
    assert rec.done(r2).cached_tokens == len(warm)
    assert rec.done(r2).item == reference(model, prompt, greedy())[1]
    # a repeated warm-up of what the session holds completes without touching the model
    r3 = rec.submit("s", held(engine, "s"), None)
    assert engine.run_until_idle() == 0
    assert rec.done(r3).cached_tokens == len(held(engine, "s"))


def test_a_branch_restarts_the_session_from_the_hash_cache(model: LlamaModel) -> None:
    engine = make_engine(model)
    rec = Recorder(engine)
    engine.open_session("s")
    first = text_prompt("x" * 100)
    rec.submit("s", first, greedy())
    engine.run_until_idle()
    branch = first[:90] + text_prompt("another question")[1:]
    rid = rec.submit("s", branch, greedy())
    engine.run_until_idle()
    done = rec.done(rid)
    assert done.cached_tokens == 90 // 16 * 16  # the full blocks before the branch point
    assert done.item == reference(model, branch, greedy())[1]
    assert held(engine, "s")[: len(branch)] == branch


def test_a_turn_served_entirely_from_cache_still_samples_from_the_model(
    model: LlamaModel,
) -> None:
    # b holds 32 tokens; a computed 64 tokens extending them; b's next turn presents
    # those 64 tokens: every one is a hash-cache hit, but the scheduler always leaves the
    # last block to compute (for the next-token logits), so 48 come from the cache
    engine = make_engine(model)
    rec = Recorder(engine)
    prompt = text_prompt("y" * 60)[:64]
    assert len(prompt) == 64
    for sid in ("a", "b"):
        engine.open_session(sid)
    rec.submit("b", prompt[:32], None)
    rec.submit("a", prompt, None)
    engine.run_until_idle()
    rid = rec.submit("b", prompt, greedy())
    engine.run_until_idle()
    done = rec.done(rid)
    assert done.cached_tokens == 48
    assert done.item == reference(model, prompt, greedy())[1]


def test_admission_refusal_is_an_over_capacity_failure(model: LlamaModel) -> None:
    engine = make_engine(model, scheduler={"max_pinned_sessions": 1, "max_queue": 0})
    rec = Recorder(engine)
    for sid in ("a", "b"):
        engine.open_session(sid)
    ra = rec.submit("a", text_prompt("one"), greedy())
    rb = rec.submit("b", text_prompt("two"), greedy())
    engine.run_until_idle()
    rec.done(ra)
    failed = rec.failed(rb)
    assert (failed.code, failed.status) == ("over_capacity", 503)
    assert failed.message.startswith("over capacity (queue_full)"), failed.message
    # the refused session is usable: now that a is idle it can be evicted for b
    rb2 = rec.submit("b", text_prompt("two"), greedy())
    engine.run_until_idle()
    assert rec.done(rb2).item is not None


def test_queue_timeout_is_an_over_capacity_failure(model: LlamaModel) -> None:
    engine = make_engine(
        model, scheduler={"max_pinned_sessions": 1, "max_queue": 4, "queue_timeout_s": 0.0}
    )
    rec = Recorder(engine)
    for sid in ("a", "b"):
        engine.open_session(sid)
    ra = rec.submit("a", text_prompt("one"), greedy(16))
    rb = rec.submit("b", text_prompt("two"), greedy())
    engine.run_until_idle()
    rec.done(ra)
    assert rec.failed(rb).code == "over_capacity"
    assert "timeout" in rec.failed(rb).message


def test_evicted_sessions_come_back_with_the_same_outputs(model: LlamaModel) -> None:
    # 4 sessions, 2 pinned at most, a small host tier: later turns find their prefix
    # pinned, offloaded to the host, or dropped to the hash cache; outputs never change
    engine = make_engine(
        model, num_gpu_blocks=48, num_host_blocks=24, scheduler={"max_pinned_sessions": 2}
    )
    rec = Recorder(engine)
    sessions = [f"s{i}" for i in range(4)]
    convs: dict[str, list[Item]] = {sid: [Message("user", f"{sid} " * 20)] for sid in sessions}
    for sid in sessions:
        engine.open_session(sid)
    for turn in range(3):
        rids = {}
        for sid in sessions:
            prompt = render_prompt(TOK, instructions=None, tools=(), items=convs[sid])
            rids[sid] = (rec.submit(sid, prompt, greedy(4)), prompt)
            engine.run_until_idle()
        for sid, (rid, prompt) in rids.items():
            done = rec.done(rid)
            assert done.item == reference(model, prompt, greedy(4))[1], (turn, sid)
            assert done.item is not None
            convs[sid] += [done.item, Message("user", f"turn {turn} " * 5)]
    metrics = engine.scheduler.metrics
    assert (
        metrics.sessions_offloaded + metrics.sessions_dropped + metrics.sessions_released_backed_up
        > 0
    )
    for sid in sessions:
        engine.close_session(sid)
    engine.run_until_idle()
    assert_no_leaks(engine)


def test_closing_mid_turn_releases_everything(model: LlamaModel) -> None:
    engine = make_engine(model, prefill_chunk_tokens=16, max_batch_tokens=16)
    rec = Recorder(engine)
    engine.open_session("s")
    rid = rec.submit("s", text_prompt("z" * 200), greedy())
    assert engine.run_until_idle(max_steps=3) == 3
    engine.close_session("s")
    engine.run_until_idle()
    assert not any(isinstance(e, (TurnDone, TurnFailed)) for e in rec.events[rid])
    assert engine.stats()["num_sessions"] == 0
    assert_no_leaks(engine)


def test_stateless_requests_leave_no_session_behind(model: LlamaModel) -> None:
    engine = make_engine(model)
    rec = Recorder(engine)
    prompt = text_prompt("stateless " * 10)
    r1 = rec.submit("h1", prompt, greedy(), ephemeral=True)
    engine.run_until_idle()
    r2 = rec.submit("h2", prompt, greedy(), ephemeral=True)
    engine.run_until_idle()
    assert rec.done(r1).cached_tokens == 0
    assert rec.done(r2).cached_tokens == (len(prompt) - 1) // 16 * 16  # the hash cache
    assert rec.done(r1).item == rec.done(r2).item
    assert engine.stats()["num_sessions"] == 0
    assert_no_leaks(engine)


def test_prefix_cache_off_recomputes_stateless_requests(model: LlamaModel) -> None:
    engine = make_engine(model, scheduler={"reuse_prefix": False})
    rec = Recorder(engine)
    prompt = text_prompt("stateless " * 10)
    rec.submit("h1", prompt, greedy(), ephemeral=True)
    engine.run_until_idle()
    r2 = rec.submit("h2", prompt, greedy(), ephemeral=True)
    engine.run_until_idle()
    assert rec.done(r2).cached_tokens == 0


def test_unknown_session_and_second_turn_in_flight_fail(model: LlamaModel) -> None:
    engine = make_engine(model)
    rec = Recorder(engine)
    r0 = rec.submit("nope", text_prompt("hi"), greedy())
    engine.open_session("s")
    r1 = rec.submit("s", text_prompt("hi"), greedy())
    r2 = rec.submit("s", text_prompt("hi"), greedy())
    engine.run_until_idle()
    assert rec.failed(r0).code == "session_not_found"
    assert rec.failed(r2).code == "response_already_in_flight"
    rec.done(r1)


@pytest.mark.parametrize(
    "spec",
    [
        greedy(5),
        greedy(7, call_id="call_x", name="lookup", arg_key="path"),
        greedy(3, call_id="call_\u00e9", name="n\u00e4me", arg_key="\u00e9\n\u2028" * 40),
    ],
    ids=["text", "call", "call-non-ascii-key"],
)
def test_max_tokens_bounds_what_the_item_appends(spec: OutputSpec) -> None:
    # Sampling never stops early here, so the item runs to its limit: the reserve the
    # server checks against the context must be exactly what is appended.
    program = OutputProgram(spec, TOK)
    appended = 0
    while not program.done:
        token = None if program.allowed() is None else ord("a")
        appended += len(program.advance(token).tokens)
    assert appended == program.max_tokens()


def test_a_turn_growing_past_the_context_fails_alone(model: LlamaModel) -> None:
    engine = make_engine(model, num_gpu_blocks=256)
    rec = Recorder(engine)
    for sid in ("long", "ok"):
        engine.open_session(sid)
    limit = model.config.max_position
    prompt = text_prompt("x" * (limit - 40))
    assert limit - 20 < len(prompt) + 30 < limit + 40  # the output would cross the context
    r_long = rec.submit("long", prompt, greedy(60))
    r_ok = rec.submit("ok", text_prompt("fine"), greedy(30))
    engine.run_until_idle()
    failed = rec.failed(r_long)
    assert (failed.code, failed.status) == ("context_length_exceeded", 400)
    assert rec.done(r_ok).item is not None  # the other session's turn was not failed
    engine.close_session("long")
    engine.close_session("ok")
    engine.run_until_idle()
    assert_no_leaks(engine)


def test_a_bug_starting_or_admitting_a_turn_fails_that_turn_only(
    model: LlamaModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(model)
    rec = Recorder(engine)
    engine.open_session("s")
    real_begin, real_poll = engine.scheduler.begin_turn, engine.scheduler.poll

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(engine.scheduler, "begin_turn", broken)
    r1 = rec.submit("s", text_prompt("one"), greedy())
    engine.run_until_idle()
    assert (rec.failed(r1).code, rec.failed(r1).status) == ("server_error", 500)
    monkeypatch.setattr(engine.scheduler, "begin_turn", real_begin)
    monkeypatch.setattr(engine.scheduler, "poll", broken)
    r2 = rec.submit("s", text_prompt("two"), greedy())  # admitted at once: no poll needed
    engine.run_until_idle(max_steps=50)
    monkeypatch.setattr(engine.scheduler, "poll", real_poll)
    engine.run_until_idle()
    assert rec.done(r2).item is not None  # the session works after both bugs
    engine.close_session("s")
    engine.run_until_idle()
    assert_no_leaks(engine)
