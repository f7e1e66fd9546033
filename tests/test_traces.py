"""Trace files: our JSONL format and the Mooncake loader."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedkv.sim.agent_workload import AgentWorkloadConfig, generate_agent_workload
from pagedkv.sim.traces import (
    TraceFormatError,
    load_mooncake,
    load_trace,
    load_workload,
    write_trace,
)
from pagedkv.sim.workload import Request, Workload

HEADER = {"format": "pagedkv-trace", "version": 1, "tokens_per_block": 4}


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def line(**kw: Any) -> dict[str, Any]:
    """A valid request line of 10 tokens (3 blocks of 4)."""
    return {"arrival_s": 1.0, "input_len": 10, "output_len": 2, "block_keys": [1, 2, 3], **kw}


def mooncake(ts: int, input_len: int, ids: list[int], output_len: int = 5) -> dict[str, Any]:
    return {
        "timestamp": ts,
        "input_length": input_len,
        "output_length": output_len,
        "hash_ids": ids,
    }


def trace_error(path: Path, loader: Any = load_trace) -> TraceFormatError:
    with pytest.raises(TraceFormatError) as info:
        loader(path)
    return info.value


# -- our format: round trip and defaults -----------------------------------------------


def test_round_trip_agent_workload(tmp_path: Path) -> None:
    cfg = AgentWorkloadConfig(
        num_sessions=4, num_tenants=2, turns_per_task=(5, 10), drop_rate=0.2, seed=3
    )
    w = generate_agent_workload(cfg)
    for name in ("agent.jsonl", "agent.jsonl.gz"):
        write_trace(w, tmp_path / name)
        assert load_trace(tmp_path / name) == w
        assert load_workload(tmp_path / name) == w


_requests = st.lists(
    st.tuples(
        st.sampled_from([None, "s1", "s2"]),
        st.sampled_from(["default", "t1"]),
        st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=4),
        st.integers(1, 4),  # tokens in the last block
        st.floats(0, 1e6, allow_nan=False),  # arrival gap
        st.integers(1, 10_000),  # output_len
        st.booleans(),  # reconnect
    ),
    min_size=1,
    max_size=10,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_requests, st.text(min_size=1, max_size=8))
def test_round_trip_is_exact(tmp_path: Path, rows: list[Any], name: str) -> None:
    sessions = {r[0]: (r[1], i) for i, r in enumerate(rows)}  # session -> (tenant, last row)
    requests = []
    t = 0.0
    turns: dict[str, int] = {}
    for i, (sid, tenant, keys, fill, gap, out, reconnect) in enumerate(rows):
        t += gap
        if sid is not None:
            tenant = sessions[sid][0]
            turns[sid] = turns.get(sid, 0) + 1
        requests.append(
            Request(
                arrival_s=t,
                session_id=sid,
                tenant=tenant,
                block_keys=tuple(keys),
                input_len=4 * (len(keys) - 1) + fill,
                output_len=out,
                turn_index=1 if sid is None else turns[sid],
                reconnect=reconnect,
                last_turn=sid is None or sessions[sid][1] == i,
            )
        )
    w = Workload(name=name, tokens_per_block=4, requests=tuple(requests))
    path = tmp_path / "w.jsonl"
    write_trace(w, path)
    assert load_trace(path) == w


def test_optional_fields_take_their_defaults(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tiny.jsonl",
        [
            "",
            line(arrival_s=0, session_id="a", tokens_per_block=4),
            line(tokens_per_block=4),
            line(session_id="a", tokens_per_block=4, reconnect=True),
            "   ",
        ],
    )
    w = load_trace(path)
    assert w.name == "tiny"
    assert w.tokens_per_block == 4
    a1, one_shot, a2 = w.requests
    assert (a1.turn_index, a1.last_turn, a1.reconnect, a1.tenant) == (1, False, False, "default")
    assert a1.arrival_s == 0.0 and isinstance(a1.arrival_s, float)
    assert (one_shot.session_id, one_shot.turn_index, one_shot.last_turn) == (None, 1, True)
    assert (a2.turn_index, a2.last_turn, a2.reconnect) == (2, True, True)


def test_header_gives_name_and_block_size(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [{**HEADER, "name": "mine"}, line()])
    w = load_trace(path)
    assert (w.name, w.tokens_per_block, w.num_requests) == ("mine", 4, 1)


def test_docs_example_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "trace_format.md").read_text()
    example = doc.split("```json")[2].split("```")[0]
    w = load_trace(write_lines(tmp_path / "tiny.jsonl", example.strip().splitlines()))
    assert [(r.session_id, r.turn_index, r.reconnect, r.last_turn) for r in w.requests] == [
        ("s1", 1, False, False),
        (None, 1, False, True),
        ("s1", 2, False, False),
        ("s1", 3, True, True),
    ]
    assert w.ideal_hit_tokens_per_request() == [0, 0, 8, 16]


# -- our format: errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "expected a JSON object, got an array"),
        (line(arrival_s="1"), "field 'arrival_s' must be a finite number >= 0, got '1'"),
        (line(arrival_s=-2), "field 'arrival_s' must be a finite number >= 0, got -2"),
        (line(input_len="12a"), "field 'input_len' must be an int >= 1, got '12a'"),
        (line(input_len=10.0), "field 'input_len' must be an int >= 1, got 10.0"),
        (line(output_len=0), "field 'output_len' must be an int >= 1, got 0"),
        (line(output_len=True), "field 'output_len' must be an int >= 1, got true"),
        (line(turn_index=0), "field 'turn_index' must be an int >= 1, got 0"),
        (line(block_keys=[1, 2]), r"field 'block_keys' has 2 ids, expected ceil\(input_len 10 "),
        (line(block_keys="123"), "field 'block_keys' must be an array of ints, got '123'"),
        (line(block_keys=[1, 2.5, 3]), "field 'block_keys' must hold only ints, got 2.5"),
        (line(block_keys=[1, -2, 3]), r"must hold ints in \[0, 2\*\*63 - 1\], got -2"),
        (line(session_id=5), "field 'session_id' must be a non-empty string, got 5"),
        (line(tenant=""), "field 'tenant' must be a non-empty string, got ''"),
        (line(reconnect="no"), "field 'reconnect' must be true or false, got 'no'"),
        (line(tokens_per_block=8), "field 'tokens_per_block' is 8, but earlier lines say 4"),
        (line(arrival_s=0.5), "field 'arrival_s' is 0.5, earlier than line 2's 1.0"),
        (line(arival_s=3), "unknown field 'arival_s'"),
        (line(turn_index=2), "without a session_id is a one-shot connection"),
        ({"input_len": 10, "output_len": 2, "block_keys": [1, 2, 3]}, "missing field 'arrival_s'"),
        (HEADER, "a header line .* may only be the first line"),
    ],
)
def test_bad_line_names_the_line(tmp_path: Path, bad: Any, message: str) -> None:
    path = write_lines(tmp_path / "t.jsonl", [HEADER, line(), bad, line(arrival_s=9)])
    err = trace_error(path)
    assert err.line_number == 3
    assert err.path == str(path)
    assert str(err).startswith(f"{path}:3: ")
    assert "\n" not in str(err)
    with pytest.raises(ValueError, match=message):
        load_trace(path)


@pytest.mark.parametrize(
    ("lines", "line_number", "message"),
    [
        ([], None, "no requests in the file"),
        ([HEADER], None, "no requests in the file"),
        ([line()], 1, "missing field 'tokens_per_block'"),
        ([{**HEADER, "format": "other"}], 1, "field 'format' must be 'pagedkv-trace'"),
        ([{**HEADER, "version": 2}], 1, "unsupported version 2"),
        ([{**HEADER, "extra": 1}], 1, "unknown header field 'extra'"),
        (
            [HEADER, line(session_id="a", last_turn=True), line(session_id="a")],
            3,
            "session 'a' already ended with a last_turn request",
        ),
        (
            [HEADER, line(session_id="a"), line(session_id="a", turn_index=1)],
            3,
            "turn_index 1 of session 'a' does not increase",
        ),
        (
            [HEADER, line(session_id="a"), line(session_id="a", tenant="b")],
            3,
            "session 'a' changes tenant from 'default' to 'b'",
        ),
    ],
)
def test_bad_file_is_reported(
    tmp_path: Path, lines: list[Any], line_number: int | None, message: str
) -> None:
    path = write_lines(tmp_path / "t.jsonl", lines)
    err = trace_error(path)
    assert err.line_number == line_number
    with pytest.raises(TraceFormatError, match=message):
        load_trace(path)


def test_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(HEADER).encode() + b"\n\xff\xfe\n")
    assert "not UTF-8" in str(trace_error(path))


# -- Mooncake: inference on small files ------------------------------------------------


def test_mooncake_follow_ups_and_forks(tmp_path: Path) -> None:
    rows = [
        mooncake(0, 1800, [0, 1, 2, 3]),  # A: full blocks 0, 1, 2 (block 0: a system prompt)
        mooncake(0, 700, [0, 10]),  # shares A's block 0 only: new conversation
        mooncake(0, 1500, [0, 20, 21]),  # B; not a follow-up of row 2 (block 0 is A's)
        mooncake(1000, 2100, [0, 20, 22, 23, 24]),  # extends B: turn 2
        mooncake(1500, 1800, [0, 20, 25, 26]),  # extends B again: a fork, new session
        mooncake(2500, 2600, [0, 20, 22, 23, 27, 28]),  # extends row 4: B turn 3
        mooncake(3000, 1024, [0, 20]),  # B's full blocks but shorter than B: not a follow-up
        mooncake(3500, 1900, [0, 1, 2, 4]),  # extends A: A turn 2
    ]
    w = load_mooncake(write_lines(tmp_path / "m.jsonl", rows))
    assert w.tokens_per_block == 512
    got = [(r.session_id, r.turn_index, r.reconnect, r.last_turn) for r in w.requests]
    assert got == [
        ("c0", 1, False, False),
        ("c1", 1, False, True),
        ("c2", 1, False, False),
        ("c2", 2, True, False),
        ("c3", 2, True, True),
        ("c2", 3, True, True),
        ("c4", 1, False, True),
        ("c0", 2, True, True),
    ]
    assert [r.arrival_s for r in w.requests] == [0, 0, 0, 1, 1.5, 2.5, 3, 3.5]
    assert all(w.disconnects_after())  # no session ids: every request is its own connection
    assert w.ideal_hit_tokens_per_request() == [0, 512, 512, 1024, 1024, 2048, 1024, 1536]
    assert load_workload(tmp_path / "m.jsonl") == w


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (mooncake(5, 600, [0]), r"field 'hash_ids' has 1 ids, expected ceil\(input_length 600 "),
        (mooncake(5, 600, [0, 1], output_len=0), "field 'output_length' must be an int >= 1"),
        ({**mooncake(5, 600, [0, 1]), "input_length": "12a"}, "field 'input_length' must be"),
        (mooncake(-5, 600, [0, 1]), "field 'timestamp' must be a finite number >= 0, got -5"),
        (mooncake(1, 600, [0, 1]), "field 'timestamp' is 1, earlier than line 1's 2"),
        ({"timestamp": 5, "input_length": 600, "output_length": 1}, "missing field 'hash_ids'"),
    ],
)
def test_mooncake_bad_line(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    path = write_lines(tmp_path / "conversation_trace.jsonl", [mooncake(2, 100, [0]), bad])
    err = trace_error(path, load_mooncake)
    assert err.line_number == 2
    with pytest.raises(TraceFormatError, match=message):
        load_mooncake(path)


def test_mooncake_ignores_extra_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [{**mooncake(0, 100, [7]), "type": "chat"}])
    assert load_mooncake(path).requests[0].block_keys == (7,)


# -- Mooncake: the released traces -----------------------------------------------------


def test_mooncake_conversation_trace_matches_the_readme(traces_dir: Path) -> None:
    path = traces_dir / "mooncake" / "conversation_trace.jsonl"
    start = time.perf_counter()
    w = load_mooncake(path)
    load_s = time.perf_counter() - start
    assert load_s < 3.0  # about 0.3 s on a laptop-class core; loose for slow CI machines
    stats = w.stats()
    assert stats.num_requests == 12_031
    assert stats.total_input_tokens == pytest.approx(145e6, rel=0.01)
    assert stats.total_input_tokens / stats.num_requests == pytest.approx(12_035, abs=1)
    assert stats.duration_s == pytest.approx(3600, rel=0.05)
    assert stats.ideal_hit_ratio == pytest.approx(0.374, abs=0.02)  # README re-count
    # About a third of requests are follow-ups, with a median gap of about 2 minutes.
    follow_ups = sum(r.reconnect for r in w.requests)
    assert follow_ups / stats.num_requests == pytest.approx(1 / 3, abs=0.05)
    last_arrival: dict[str | None, float] = {}
    gaps = []
    for r in w.requests:
        if r.reconnect and r.session_id in last_arrival:
            gaps.append(r.arrival_s - last_arrival[r.session_id])
        last_arrival[r.session_id] = r.arrival_s
    assert statistics.median(gaps) == pytest.approx(120, rel=0.25)
    assert statistics.quantiles(gaps, n=10)[-1] == pytest.approx(480, rel=0.25)
    # Follow-ups carry most of the reusable tokens.
    hits = w.ideal_hit_tokens_per_request()
    follow_up_hits = sum(h for h, r in zip(hits, w.requests, strict=True) if r.reconnect)
    assert follow_up_hits > 0.5 * stats.ideal_hit_tokens


def test_mooncake_synthetic_trace_matches_the_readme(traces_dir: Path) -> None:
    w = load_mooncake(traces_dir / "mooncake" / "synthetic_trace.jsonl")
    assert w.num_requests == 3_993
    assert w.total_input_tokens / w.num_requests == pytest.approx(15_325, abs=1)
    assert w.ideal_hit_ratio() == pytest.approx(0.651, abs=0.02)
