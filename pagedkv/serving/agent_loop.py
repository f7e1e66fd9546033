"""A synthetic coding-agent loop over the Responses API, timed turn by turn.

The agent has a long system prompt and three tools. Turn 1 sends the task; every later
turn sends the previous function call's output (a synthetic tool result of a chosen
length). Two ways to drive it, with the same conversation content:

- `run_websocket`: one `client.responses.connect()` connection, each turn sending only
  the new tool output with `previous_response_id` (the server keeps the session
  pinned: only the new tokens are prefilled);
- `run_http`: stateless `POST /v1/responses` (SSE), each turn re-sending the whole
  history.

TTFT is measured by the client, from sending the request to the first output event
(`response.output_item.added`). The byte tokenizer makes one ASCII character one
token, so lengths are in tokens.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedkv.model.config import LlamaConfig

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
        "description": "Run the test suite and return its output.",
        "parameters": {"type": "object", "properties": {"selector": {"type": "string"}}},
    },
    {
        "type": "function",
        "name": "apply_patch",
        "description": "Apply a unified diff to the repository.",
        "parameters": {"type": "object", "properties": {"diff": {"type": "string"}}},
    },
]

_WORDS_TEXT = (
    "def return self import class assert error test file line value None True False "
    "parser header token buffer index length offset result config session block cache "
    "request response handler queue thread lock state update apply patch diff"
)
_WORDS = _WORDS_TEXT.split(" ")


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentLoopSpec:
    """The shape of one agent session.

    Attributes:
        turns: model calls in the session.
        system_tokens: length of the system prompt (instructions).
        tool_min_tokens, tool_max_tokens: each tool output's length, uniform in this range.
        max_output_tokens: cap of each model call's output.
        seed: content and lengths (the same seed gives the same conversation inputs).
        model: the `model` field sent (None: the first model the server's
            `/v1/models` lists).
    """

    turns: int = 30
    system_tokens: int = 3000
    tool_min_tokens: int = 100
    tool_max_tokens: int = 1000
    max_output_tokens: int = 16
    seed: int = 0
    model: str | None = None

    def __post_init__(self) -> None:
        if self.turns < 2:
            raise ValueError(f"AgentLoopSpec.turns must be >= 2, got {self.turns}")
        if not 1 <= self.tool_min_tokens <= self.tool_max_tokens:
            raise ValueError(
                "AgentLoopSpec: need 1 <= tool_min_tokens <= tool_max_tokens, got "
                f"{self.tool_min_tokens}, {self.tool_max_tokens}"
            )


@dataclass(frozen=True, slots=True)
class TurnTiming:
    """One turn as the client saw it (milliseconds; tokens from the response usage)."""

    turn: int
    input_tokens: int
    cached_tokens: int
    ttft_ms: float
    server_ttft_ms: float | None
    total_ms: float


class AgentLoopError(RuntimeError):
    """The server refused or failed a turn of the agent loop (the message says how)."""


def synthetic_text(num_tokens: int, rng: random.Random) -> str:
    """Code-like ASCII text of exactly `num_tokens` characters (= byte tokens)."""
    words: list[str] = []
    size = 0
    while size < num_tokens:
        word = rng.choice(_WORDS)
        words.append(word + ("\n" if rng.random() < 0.12 else " "))
        size += len(words[-1])
    return "".join(words)[:num_tokens]


class _Script:
    """The conversation inputs of one session, identical for both transports."""

    def __init__(self, spec: AgentLoopSpec, session: int = 0) -> None:
        shared = random.Random(spec.seed)  # the system prompt is shared by every session
        self.system = synthetic_text(spec.system_tokens, shared)
        rng = random.Random(spec.seed * 1000 + session + 1)
        self.task = f"Session {session}: the test suite fails; find and fix the bug."
        self.tool_outputs = [
            synthetic_text(rng.randint(spec.tool_min_tokens, spec.tool_max_tokens), rng)
            for _ in range(spec.turns - 1)
        ]
        # the last turn answers in text; the others must call a tool
        self.tool_choice = ["required"] * (spec.turns - 1) + ["auto"]


def _timing(turn: int, t_send: float, t_first: float | None, response: Any) -> TurnTiming:
    now = time.perf_counter()
    usage = response.usage
    metrics = getattr(response, "metrics", None) or {}
    return TurnTiming(
        turn=turn,
        input_tokens=usage.input_tokens,
        cached_tokens=usage.input_tokens_details.cached_tokens,
        ttft_ms=((t_first if t_first is not None else now) - t_send) * 1000.0,
        server_ttft_ms=metrics.get("ttft_ms") if isinstance(metrics, dict) else None,
        total_ms=(now - t_send) * 1000.0,
    )


def _read(events: Any) -> tuple[float | None, Any]:
    """Consume one response's events: (time of the first output event, response)."""
    t_first = None
    for event in events:
        kind = event.type
        if kind == "response.output_item.added" and t_first is None:
            t_first = time.perf_counter()
        elif kind in ("response.completed", "response.incomplete"):
            return t_first, event.response
        elif kind in ("error", "response.failed"):
            error = getattr(event, "error", None) or getattr(event, "response", None)
            error = getattr(error, "error", error)  # response.failed: response.error
            code, message = getattr(error, "code", None), getattr(error, "message", None)
            detail = f"{code}: {message}" if message else str(event)
            raise AgentLoopError(f"agent loop: the server answered {kind} ({detail})")
    raise AgentLoopError("agent loop: the event stream ended early")


def _output_input(call: Any, output: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call.call_id, "output": output}


def _client(base_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600.0)


def _model(client: Any, spec: AgentLoopSpec) -> str:
    """The model to name: the spec's, else the first one the server lists."""
    if spec.model is not None:
        return spec.model
    models = client.models.list().data
    if not models:
        raise AgentLoopError("agent loop: the server lists no models")
    return str(models[0].id)


def run_websocket(base_url: str, spec: AgentLoopSpec, session: int = 0) -> list[TurnTiming]:
    """The session over one WebSocket, chained by `previous_response_id`."""
    script = _Script(spec, session)
    timings: list[TurnTiming] = []
    client = _client(base_url)
    model = _model(client, spec)
    with client.responses.connect() as conn:
        previous = None
        new_input: Any = script.task
        for turn in range(spec.turns):
            t_send = time.perf_counter()
            conn.response.create(
                model=model,
                instructions=script.system,
                tools=TOOLS,
                tool_choice=script.tool_choice[turn],
                input=new_input,
                previous_response_id=None if previous is None else previous.id,
                store=False,
                max_output_tokens=spec.max_output_tokens,
                temperature=0.0,
            )
            t_first, previous = _read(conn)
            timings.append(_timing(turn + 1, t_send, t_first, previous))
            if turn + 1 < spec.turns:
                new_input = [_output_input(previous.output[0], script.tool_outputs[turn])]
    return timings


def run_http(base_url: str, spec: AgentLoopSpec, session: int = 0) -> list[TurnTiming]:
    """The session over stateless HTTP (SSE), re-sending the whole history each turn."""
    from openai import APIStatusError

    script = _Script(spec, session)
    client = _client(base_url)
    model = _model(client, spec)
    history: list[Any] = [{"role": "user", "content": script.task}]
    timings: list[TurnTiming] = []
    for turn in range(spec.turns):
        t_send = time.perf_counter()
        try:
            stream = client.responses.create(
                model=model,
                instructions=script.system,
                tools=TOOLS,
                tool_choice=script.tool_choice[turn],
                input=history,
                store=False,
                max_output_tokens=spec.max_output_tokens,
                temperature=0.0,
                stream=True,
            )
        except APIStatusError as err:  # refused before streaming (a 4xx)
            raise AgentLoopError(f"agent loop: the server answered HTTP {err.status_code}: "
                                 f"{err.message}") from None  # fmt: skip
        t_first, response = _read(stream)
        timings.append(_timing(turn + 1, t_send, t_first, response))
        if turn + 1 < spec.turns:
            call = response.output[0]
            history.append(
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                }
            )
            history.append(_output_input(call, script.tool_outputs[turn]))
    return timings


def run_concurrent(
    run: Callable[[str, AgentLoopSpec, int], list[TurnTiming]],
    base_url: str,
    spec: AgentLoopSpec,
    num_sessions: int,
) -> list[list[TurnTiming]]:
    """`num_sessions` sessions at once, one thread each; per-session timings.

    Raises:
        AgentLoopError: a session failed (the first error, with its session).
    """
    results: list[list[TurnTiming] | None] = [None] * num_sessions
    errors: list[tuple[int, BaseException]] = []

    def worker(i: int) -> None:
        try:
            results[i] = run(base_url, spec, i)
        except BaseException as exc:
            errors.append((i, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(num_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        i, exc = errors[0]
        raise AgentLoopError(f"session {i} failed: {exc}") from exc
    return [r for r in results if r is not None]


def median_by_turn(sessions: Sequence[Sequence[TurnTiming]]) -> list[TurnTiming]:
    """Per turn, the median over sessions of every field."""
    out = []
    for turn in range(len(sessions[0])):
        rows = [s[turn] for s in sessions]
        server = [r.server_ttft_ms for r in rows if r.server_ttft_ms is not None]
        out.append(
            TurnTiming(
                turn=rows[0].turn,
                input_tokens=int(statistics.median(r.input_tokens for r in rows)),
                cached_tokens=int(statistics.median(r.cached_tokens for r in rows)),
                ttft_ms=statistics.median(r.ttft_ms for r in rows),
                server_ttft_ms=statistics.median(server) if server else None,
                total_ms=statistics.median(r.total_ms for r in rows),
            )
        )
    return out


def format_table(columns: dict[str, Sequence[TurnTiming]], *, width: int = 22) -> str:
    """Turns side by side: the context (prompt tokens of the first column), then cached
    tokens and client TTFT for each column."""
    names = list(columns)
    num_turns = len(columns[names[0]])
    lines = [
        f"{'':>4} {'':>8} |" + "|".join(f" {name[:width]:^{width}} " for name in names),
        f"{'turn':>4} {'context':>8} |"
        + "|".join(f" {'cached':>8} {'TTFT ms':>{width - 9}} " for _ in names),
    ]
    lines.append("-" * len(lines[1]))
    for i in range(num_turns):
        first = columns[names[0]][i]
        cells = "|".join(
            f" {columns[n][i].cached_tokens:>8} {columns[n][i].ttft_ms:>{width - 9}.1f} "
            for n in names
        )
        lines.append(f"{first.turn:>4} {first.input_tokens:>8} |{cells}")
    return "\n".join(lines)


def prefill_flops(cfg: LlamaConfig, new_tokens: int, context: int) -> float:
    """FLOPs to prefill `new_tokens` after `context` cached ones: 2 per weight of the
    transformer layers per token (the embedding is a lookup; the LM head runs for the
    last token only), plus attention (QK^T and PV: 4 x layers x query width per new token
    per key, each new token seeing the context and, on average, half of the new
    tokens)."""
    embedding = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else embedding
    layers = cfg.num_params - embedding - head
    dense = 2.0 * layers * new_tokens + 2.0 * embedding * (new_tokens > 0)
    keys = context + new_tokens / 2.0
    attention = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * new_tokens * keys
    return dense + attention


def flop_growth(cfg: LlamaConfig, timings: Sequence[TurnTiming], *, first: int = 2) -> float:
    """Prefill FLOPs of the last turn over those of turn `first`, for the new tokens each
    actually computed (prompt less cached): the floor under `growth` for a cache that
    recomputes nothing, set by attention over the longer context."""

    def flops(t: TurnTiming) -> float:
        return prefill_flops(cfg, max(t.input_tokens - t.cached_tokens, 1), t.cached_tokens)

    return flops(timings[-1]) / flops(timings[first - 1])


def growth(timings: Sequence[TurnTiming], *, first: int = 2) -> float:
    """TTFT of the last turn over TTFT of turn `first` (1-based)."""
    return timings[-1].ttft_ms / max(timings[first - 1].ttft_ms, 1e-9)
