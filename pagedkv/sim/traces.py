"""Trace files: our JSONL format (`docs/trace_format.md`) and the Mooncake FAST'25 traces.

- `write_trace` / `load_trace`: our format, one request per line, exact round trip.
- `load_mooncake`: `{"timestamp", "input_length", "output_length", "hash_ids"}` lines,
  512 tokens per hash id. Mooncake has no session ids, so conversations are inferred
  (see `load_mooncake`).
- `load_workload`: either format, told apart by the first request line.

Every problem in a file raises `TraceFormatError` (a `ValueError`) carrying the path and
the 1-based line number, with a one-line message. Lines must be in arrival order
(equal times are fine); an earlier time than the line before is an error, not silently
sorted, because line order also decides turn order and follow-up inference.
Paths ending in `.gz` are read and written gzip-compressed.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pagedkv.sim.workload import (
    MAX_BLOCK_KEY,
    Request,
    Workload,
    find_sequence_problems,
    num_blocks_for,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MOONCAKE_TOKENS_PER_BLOCK",
    "TraceFormatError",
    "load_mooncake",
    "load_trace",
    "load_workload",
    "write_trace",
]

FORMAT_NAME = "pagedkv-trace"
FORMAT_VERSION = 1
MOONCAKE_TOKENS_PER_BLOCK = 512

_HEADER_FIELDS = frozenset({"format", "version", "name", "tokens_per_block"})
_REQUEST_FIELDS = frozenset(
    {
        "arrival_s",
        "session_id",
        "tenant",
        "tokens_per_block",
        "block_keys",
        "input_len",
        "output_len",
        "turn_index",
        "reconnect",
        "last_turn",
    }
)

PathLike = str | os.PathLike[str]


class TraceFormatError(ValueError):
    """A trace file is malformed; `str()` is `"path:line: message"` (no line when the
    problem is the whole file)."""

    def __init__(self, path: PathLike, line_number: int | None, message: str) -> None:
        self.path = os.fspath(path)
        self.line_number = line_number
        self.message = message
        where = self.path if line_number is None else f"{self.path}:{line_number}"
        super().__init__(f"{where}: {message}")


# -- reading lines --------------------------------------------------------------------


def _open_text_writer(path: PathLike) -> IO[str]:
    """Open a text file for writing, gzip-compressed when named `*.gz`."""
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=6)
    return open(path, "w", encoding="utf-8")


def _open_binary_reader(path: PathLike) -> io.BufferedIOBase:
    """Open a file for reading bytes, decompressing when named `*.gz`."""
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _json_lines(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; raise on bad JSON."""
    with _open_binary_reader(path) as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TraceFormatError(
                    path,
                    line_number,
                    f"not UTF-8 text: byte {raw[exc.start]:#04x} at column {exc.start + 1}",
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(
                    path, line_number, f"invalid JSON: {exc.msg} (column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise TraceFormatError(
                    path, line_number, f"expected a JSON object, got {_json_type(obj)}"
                )
            yield line_number, obj


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """Typed access to one line's fields; each getter raises `TraceFormatError`."""

    __slots__ = ("line_number", "obj", "path")

    def __init__(self, path: PathLike, line_number: int, obj: dict[str, Any]) -> None:
        self.path = path
        self.line_number = line_number
        self.obj = obj

    def error(self, message: str) -> TraceFormatError:
        return TraceFormatError(self.path, self.line_number, message)

    def _get(self, name: str, expected: str) -> Any:
        if name not in self.obj:
            raise self.error(f"missing field {name!r} ({expected})")
        return self.obj[name]

    def get_int(self, name: str, low: int, default: int | None = None) -> int:
        expected = "a non-negative int" if low == 0 else f"an int >= {low}"
        if default is not None and self.obj.get(name) is None:
            return default
        value = self._get(name, expected)
        if type(value) is not int or value < low:
            raise self.error(f"field {name!r} must be {expected}, got {_short(value)}")
        return value

    def get_time(self, name: str, scale: float) -> float:
        expected = "a finite number >= 0"
        value = self._get(name, expected)
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise self.error(f"field {name!r} must be {expected}, got {_short(value)}")
        return float(value) / scale

    def get_bool(self, name: str) -> bool | None:
        value = self.obj.get(name)
        if value is not None and not isinstance(value, bool):
            raise self.error(f"field {name!r} must be true or false, got {_short(value)}")
        return value

    def get_text(self, name: str, default: str | None) -> str | None:
        value = self.obj.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(f"field {name!r} must be a non-empty string, got {_short(value)}")
        return value

    def get_keys(self, name: str, expected_len: int, length_text: str) -> tuple[int, ...]:
        value = self._get(name, "an array of ints")
        if not isinstance(value, list):
            raise self.error(f"field {name!r} must be an array of ints, got {_short(value)}")
        if value:
            if set(map(type, value)) != {int}:
                bad = next(v for v in value if type(v) is not int)
                raise self.error(f"field {name!r} must hold only ints, got {_short(bad)}")
            low, high = min(value), max(value)
            if low < 0 or high > MAX_BLOCK_KEY:
                raise self.error(
                    f"field {name!r} must hold ints in [0, 2**63 - 1], "
                    f"got {low if low < 0 else high}"
                )
        if len(value) != expected_len:
            raise self.error(
                f"field {name!r} has {len(value)} ids, expected {length_text} = {expected_len}"
            )
        return tuple(value)


def _check_order(fields: _Fields, name: str, prev: tuple[float, int] | None) -> None:
    """Raise unless this line's `name` is no earlier than `prev` = (value, line)."""
    value = fields.obj[name]
    if prev is not None and value < prev[0]:
        raise fields.error(
            f"field {name!r} is {value}, earlier than line {prev[1]}'s {prev[0]}; "
            "lines must be in arrival order"
        )


# -- our format -----------------------------------------------------------------------


def write_trace(workload: Workload, path: PathLike) -> None:
    """Write `workload` in our JSONL format: a header line, then one line per request.

    Every field is written explicitly, so `load_trace(path) == workload`.
    """
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": workload.name,
        "tokens_per_block": workload.tokens_per_block,
    }
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    with _open_text_writer(path) as f:
        f.write(dumps(header) + "\n")
        for r in workload.requests:
            line = {
                "arrival_s": r.arrival_s,
                "session_id": r.session_id,
                "tenant": r.tenant,
                "input_len": r.input_len,
                "output_len": r.output_len,
                "turn_index": r.turn_index,
                "reconnect": r.reconnect,
                "last_turn": r.last_turn,
                "block_keys": r.block_keys,
            }
            f.write(dumps(line) + "\n")


def load_trace(path: PathLike) -> Workload:
    """Read a trace in our JSONL format (`docs/trace_format.md`).

    Raises:
        TraceFormatError: a malformed line or file, with its line number.
        OSError: the file cannot be read.
    """
    name = _stem(path)
    header_tpb: int | None = None
    first_line = True
    prev: tuple[float, int] | None = None
    parsed: list[tuple[int, dict[str, Any]]] = []  # (line, Request kwargs)
    explicit_last: list[bool] = []
    next_turn: dict[str, int] = {}
    for line_number, obj in _json_lines(path):
        fields = _Fields(path, line_number, obj)
        is_first, first_line = first_line, False
        if "format" in obj:
            if not is_first:
                raise fields.error("a header line (with 'format') may only be the first line")
            unknown = sorted(set(obj) - _HEADER_FIELDS)
            if unknown:
                raise fields.error(
                    f"unknown header field {unknown[0]!r} "
                    f"(expected {', '.join(sorted(_HEADER_FIELDS))})"
                )
            if obj["format"] != FORMAT_NAME:
                raise fields.error(
                    f"field 'format' must be {FORMAT_NAME!r}, got {_short(obj['format'])}"
                )
            version = fields.get_int("version", 1)
            if version != FORMAT_VERSION:
                raise fields.error(f"unsupported version {version} (this reader knows 1)")
            name = fields.get_text("name", name) or name
            if "tokens_per_block" in obj:
                header_tpb = fields.get_int("tokens_per_block", 1)
            continue
        unknown = sorted(set(obj) - _REQUEST_FIELDS)
        if unknown:
            raise fields.error(
                f"unknown field {unknown[0]!r} (expected {', '.join(sorted(_REQUEST_FIELDS))})"
            )
        if header_tpb is None:
            if "tokens_per_block" not in obj:
                raise fields.error(
                    "missing field 'tokens_per_block': give it in a header line "
                    "or on the first request line"
                )
            header_tpb = fields.get_int("tokens_per_block", 1)
        elif "tokens_per_block" in obj:
            tpb = fields.get_int("tokens_per_block", 1)
            if tpb != header_tpb:
                raise fields.error(
                    f"field 'tokens_per_block' is {tpb}, but earlier lines say {header_tpb}"
                )
        arrival_s = fields.get_time("arrival_s", 1.0)
        _check_order(fields, "arrival_s", prev)
        prev = (obj["arrival_s"], line_number)
        input_len = fields.get_int("input_len", 1)
        output_len = fields.get_int("output_len", 1)
        keys = fields.get_keys(
            "block_keys",
            num_blocks_for(input_len, header_tpb),
            f"ceil(input_len {input_len} / tokens_per_block {header_tpb})",
        )
        session_id = fields.get_text("session_id", None)
        default_turn = 1 if session_id is None else next_turn.get(session_id, 1)
        turn_index = fields.get_int("turn_index", 1, default=default_turn)
        if session_id is not None:
            next_turn[session_id] = turn_index + 1
        last_turn = fields.get_bool("last_turn")
        explicit_last.append(last_turn is not None)
        kwargs = {
            "arrival_s": arrival_s,
            "session_id": session_id,
            "tenant": fields.get_text("tenant", "default"),
            "block_keys": keys,
            "input_len": input_len,
            "output_len": output_len,
            "turn_index": turn_index,
            "reconnect": bool(fields.get_bool("reconnect")),
            "last_turn": bool(last_turn),
        }
        parsed.append((line_number, kwargs))
    if not parsed:
        raise TraceFormatError(path, None, "no requests in the file")
    assert header_tpb is not None
    # An omitted last_turn is true for the last request of each session in the file.
    last_index = {kw["session_id"]: i for i, (_, kw) in enumerate(parsed)}
    requests: list[Request] = []
    for i, (line_number, kw) in enumerate(parsed):
        if not explicit_last[i]:
            kw["last_turn"] = kw["session_id"] is None or last_index[kw["session_id"]] == i
        try:
            requests.append(Request(**kw))
        except ValueError as exc:
            raise TraceFormatError(path, line_number, str(exc)) from None
    return _workload(path, name, header_tpb, requests, [line for line, _ in parsed])


def _workload(
    path: PathLike, name: str, tpb: int, requests: list[Request], lines: list[int]
) -> Workload:
    for index, message in find_sequence_problems(requests, tpb):
        raise TraceFormatError(path, lines[index], message)
    return Workload(name=name, tokens_per_block=tpb, requests=tuple(requests))


def _stem(path: PathLike) -> str:
    p = Path(os.fspath(path))
    while p.suffix in (".gz", ".jsonl", ".json"):
        p = p.with_suffix("")
    return p.name or "trace"


# -- Mooncake -------------------------------------------------------------------------


def load_mooncake(path: PathLike, *, name: str | None = None) -> Workload:
    """Read a Mooncake FAST'25 trace (`timestamp` ms, `input_length`, `output_length`,
    `hash_ids` at 512 tokens per id); other fields are ignored.

    `len(hash_ids)` must equal `ceil(input_length / 512)` (the last id may cover a
    partial block; both released files satisfy this on every line).

    Conversations are inferred, since the traces carry no session ids. Request R is a
    follow-up of an earlier request P when P's full-block ids are a prefix of R's ids,
    `R.input_length > P.input_length`, and P's conversation introduced the last of those
    full blocks (P's prefix is not merely shared content such as a common system prompt,
    which every request of `conversation_trace` starts with). Among candidates the one
    with the longest prefix wins, ties to the latest. R then gets P's session id (or a
    new one if P already has a follow-up: a fork), `turn_index` P's + 1 and
    `reconnect=True` (a server without session ids sees each follow-up arrive on a new
    connection). Otherwise R opens a new conversation. Session ids are `"c<n>"`; the
    tenant is `"default"`. O(total hash ids) time.

    Raises:
        TraceFormatError: a malformed line or file, with its line number.
        OSError: the file cannot be read.
    """
    tpb = MOONCAKE_TOKENS_PER_BLOCK
    arrivals: list[float] = []
    input_lens: list[int] = []
    output_lens: list[int] = []
    all_keys: list[tuple[int, ...]] = []
    lines: list[int] = []
    prev: tuple[float, int] | None = None
    for line_number, obj in _json_lines(path):
        fields = _Fields(path, line_number, obj)
        arrival_s = fields.get_time("timestamp", 1000.0)
        _check_order(fields, "timestamp", prev)
        prev = (obj["timestamp"], line_number)
        input_len = fields.get_int("input_length", 1)
        output_lens.append(fields.get_int("output_length", 1))
        all_keys.append(
            fields.get_keys(
                "hash_ids",
                num_blocks_for(input_len, tpb),
                f"ceil(input_length {input_len} / {tpb})",
            )
        )
        arrivals.append(arrival_s)
        input_lens.append(input_len)
        lines.append(line_number)
    if not arrivals:
        raise TraceFormatError(path, None, "no requests in the file")

    sessions, turns, followups = _infer_conversations(all_keys, input_lens, tpb)
    last_of = {s: i for i, s in enumerate(sessions)}
    requests = [
        Request(
            arrival_s=arrivals[i],
            session_id=f"c{sessions[i]}",
            tenant="default",
            block_keys=all_keys[i],
            input_len=input_lens[i],
            output_len=output_lens[i],
            turn_index=turns[i],
            reconnect=followups[i],
            last_turn=last_of[sessions[i]] == i,
        )
        for i in range(len(arrivals))
    ]
    return _workload(path, name or _stem(path), tpb, requests, lines)


def _infer_conversations(
    all_keys: list[tuple[int, ...]], input_lens: list[int], tpb: int
) -> tuple[list[int], list[int], list[bool]]:
    """Per request: conversation number, turn index, is-follow-up (see `load_mooncake`).

    A trie over full-block id chains: `children[(node, id)] -> node`. Each node records
    the conversation that created it and the latest request of that conversation whose
    full blocks end there (the only requests that may be extended).
    """
    children: dict[tuple[int, int], int] = {}
    creator: list[int] = [-1]  # node -> conversation that inserted it; node 0 is the root
    ends_here: dict[int, int] = {}  # node -> latest request whose full blocks end at it
    has_followup: set[int] = set()
    sessions: list[int] = []
    turns: list[int] = []
    followups: list[bool] = []
    num_sessions = 0
    for i, keys in enumerate(all_keys):
        input_len = input_lens[i]
        num_full = input_len // tpb
        node, parent = 0, -1
        for key in keys[:num_full]:
            child = children.get((node, key))
            if child is None:
                break
            node = child
            p = ends_here.get(node, -1)
            if p >= 0 and input_lens[p] < input_len:
                parent = p
        if parent >= 0 and parent not in has_followup:
            session = sessions[parent]
        else:
            session = num_sessions
            num_sessions += 1
        if parent >= 0:
            has_followup.add(parent)
        sessions.append(session)
        turns.append(turns[parent] + 1 if parent >= 0 else 1)
        followups.append(parent >= 0)
        node = 0
        for key in keys[:num_full]:
            child = children.get((node, key))
            if child is None:
                child = children[(node, key)] = len(creator)
                creator.append(session)
            node = child
        if num_full and creator[node] == session:
            ends_here[node] = i  # only a request whose conversation owns its last block
    return sessions, turns, followups


def load_workload(path: PathLike) -> Workload:
    """Load either format: Mooncake when the first line has `hash_ids`, else ours."""
    for _, obj in _json_lines(path):
        if "hash_ids" in obj:
            return load_mooncake(path)
        break
    return load_trace(path)
