"""ResponseRun: one response from a checked request to its stream of events.

Shared by the WebSocket and the HTTP endpoints: render the conversation to tokens,
check it fits, submit it to the engine, and turn the engine's events into Responses API
events (an async iterator, on the server's event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pagedkv.model.tokenizer import ChatTokenizer
from pagedkv.serving.conversation import Item, RenderMemo, render_prompt
from pagedkv.serving.engine import Engine, cache_key_salt
from pagedkv.serving.engine_types import (
    EngineEvent,
    EngineRequest,
    OutputDelta,
    OutputStarted,
    TurnDone,
    TurnFailed,
    TurnStarted,
)
from pagedkv.serving.generation import OutputProgram, OutputSpec
from pagedkv.serving.protocol import (
    MAX_ID_CHARS,
    CreateRequest,
    ProtocolError,
    check_call_outputs,
)
from pagedkv.serving.response_events import ResponseBuilder, new_id

# Messages at least this large are decoded and rendered on a worker thread, so the
# event loop keeps serving other connections (and WebSocket pings) meanwhile; smaller
# ones are cheaper to handle inline than to hand off.
OFF_LOOP_BYTES = 256 * 1024

_T = TypeVar("_T")
refusals_log = logging.getLogger("pagedkv.server.refusals")

ABORT_KEY = "pagedkv.abort_transport"  # in each ASGI scope: see `abort_callback`


async def off_loop(size: int, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """`fn(*args, **kwargs)`, on a worker thread when the message is `OFF_LOOP_BYTES` or
    larger (exceptions propagate either way)."""
    if size < OFF_LOOP_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Protocol limits and defaults of the server.

    Attributes:
        model_name: the served model: `/v1/models` lists it, responses report it, and a
            request naming any other model (and not one of `model_aliases`) gets 404
            `model_not_found`, as the API answers.
        model_aliases: other names accepted for the served model.
        default_max_output_tokens: the output length of a request that sets none
            (small: a CPU default). Reaching it completes the response (the server's
            stop length); a request's own `max_output_tokens` that cuts the output
            off makes it "incomplete", as in the API.
        max_output_tokens_cap: a request asking for more is refused
            (`integer_above_max_value`), never silently cut.
        max_message_bytes: a larger WebSocket message or HTTP body is refused.
        max_connection_age_s: a WebSocket connection older than this is ended, mid-response
            if need be: the running response and every queued request get
            `websocket_connection_limit_reached`, then the connection closes.
        max_queued_responses: `response.create` requests a WebSocket connection may
            have waiting behind its running response; more are refused
            (`too_many_queued_responses`), so a client cannot grow server memory by
            pipelining requests.
        max_stored_responses: responses a connection remembers for
            `previous_response_id` (least recent forgotten first; never a running one).
        max_inflight_responses: responses of one WebSocket connection running at once
            across its lanes (the API's 16); more wait in their lanes' queues.
        max_lanes: distinct named `stream_id` lanes a connection may use (the API's
            32; the default lane does not count): another gets
            `websocket_stream_limit_reached`.
        max_pending_steers: accepted `response.steer` inputs one response may hold
            (waiting to be applied); another gets `too_many_pending_steers`.
        send_timeout_s: a WebSocket send (or an HTTP stream chunk) that the client does
            not take within this long ends the connection: its response is aborted, its
            engine session closed, and its transport aborted rather than drained.
        idle_timeout_s: a WebSocket connection with no message from the client and no
            response running for this long is closed (1001); None: never.
        read_timeout_s: an HTTP request body must arrive in full within this long, else
            408 `request_timeout` (a client cannot hold a request slot by sending its
            body slowly, or never).
    """

    model_name: str = "pagedkv-demo"
    model_aliases: tuple[str, ...] = ()
    default_max_output_tokens: int = 16
    max_output_tokens_cap: int = 1024
    max_message_bytes: int = 8 * 1024 * 1024
    max_connection_age_s: float = 3600.0
    max_queued_responses: int = 32
    max_stored_responses: int = 64
    max_inflight_responses: int = 16
    max_lanes: int = 32
    max_pending_steers: int = 16
    send_timeout_s: float = 20.0
    idle_timeout_s: float | None = 900.0
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "default_max_output_tokens",
            "max_output_tokens_cap",
            "max_message_bytes",
            "max_queued_responses",
            "max_stored_responses",
            "max_inflight_responses",
            "max_lanes",
            "max_pending_steers",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be an int >= 1, got {value!r}")
        if self.default_max_output_tokens > self.max_output_tokens_cap:
            raise ValueError(
                f"ServerConfig.default_max_output_tokens ({self.default_max_output_tokens}) "
                f"exceeds max_output_tokens_cap ({self.max_output_tokens_cap})"
            )
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"ServerConfig.model_name must be a non-empty string, got "
                             f"{self.model_name!r}")  # fmt: skip
        for name in ("send_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.idle_timeout_s is not None and not self.idle_timeout_s > 0:
            raise ValueError(
                f"ServerConfig.idle_timeout_s must be > 0 or None, got {self.idle_timeout_s}"
            )
        if not self.max_connection_age_s > 0:
            raise ValueError(
                f"ServerConfig.max_connection_age_s must be > 0, got {self.max_connection_age_s}"
            )


def log_refusal(transport: str, request_id: str, tenant: str | None, err: ProtocolError) -> None:
    """One structured line per refused request (never a traceback: the input is the
    client's, the refusal is by design)."""
    refusals_log.info(
        "refused transport=%s request_id=%s tenant=%s status=%d code=%s param=%s",
        transport, request_id, tenant or "-", err.status, err.code, err.param or "-",
    )  # fmt: skip


def check_request(config: ServerConfig, req: CreateRequest, items: Sequence[Item]) -> None:
    """The checks that need the server's configuration or the whole conversation: the
    model name, `max_output_tokens` against the cap, call ids of function call outputs.

    Raises:
        ProtocolError: `model_not_found` (404), `integer_above_max_value`, `invalid_value`.
    """
    if req.model is not None and req.model not in (config.model_name, *config.model_aliases):
        raise ProtocolError(
            f"the model {req.model[:MAX_ID_CHARS]!r} does not exist; this server "
            f"serves {config.model_name!r}",
            code="model_not_found",
            param="model",
            status=404,
        )
    cap = config.max_output_tokens_cap
    if req.max_output_tokens is not None and req.max_output_tokens > cap:
        raise ProtocolError(
            f"max_output_tokens is {req.max_output_tokens}; this server allows at most {cap}",
            code="integer_above_max_value",
            param="max_output_tokens",
        )
    check_call_outputs(items)


def render_request(
    tokenizer: ChatTokenizer,
    req: CreateRequest,
    items: Iterable[Item],
    *,
    memo: RenderMemo | None = None,
    scope: bytes = b"",
    max_tokens: int | None = None,
) -> list[int]:
    """The prompt tokens of a checked request over the conversation `items`: what the
    engine is sent (`ResponseRun`), and what the router hashes to find the replica
    holding its prefix (`pagedkv.serving.kv_routing`, with `max_tokens` and the items
    parsed as they are taken: `parse_prompt_fields`), so the two never disagree."""
    return render_prompt(
        tokenizer,
        instructions=req.instructions,
        tools=req.tools,
        items=items,
        generation_prompt=req.generate,
        memo=memo,
        scope=scope,
        max_tokens=max_tokens,
    )


class ResponseRun:
    """One response. The constructor checks and renders (raising `ProtocolError` before
    any event is sent); `events()` runs it.

    After `events()` ends: `item` is the output item (None for a warm-up or a failure),
    `ok` whether it completed, `conversation` the items including the output.
    """

    def __init__(
        self,
        engine: Engine,
        config: ServerConfig,
        req: CreateRequest,
        items: Sequence[Item],
        *,
        session_id: str,
        ephemeral: bool,
        tenant: str | None = None,
    ) -> None:
        self.engine = engine
        self.session_id = session_id
        self.ephemeral = ephemeral
        self.tenant = tenant
        self.cache_key = req.prompt_cache_key
        self.arrival = time.monotonic()
        check_request(config, req, items)
        tool = req.forced_tool()
        max_out = min(
            req.max_output_tokens or config.default_max_output_tokens, config.max_output_tokens_cap
        )
        # Only a limit the client asked for makes a cut-off response "incomplete"; the
        # server's default length is its stop length (like a stop sequence): reaching it
        # completes the response.
        self.client_limit = req.max_output_tokens is not None
        temperature = 1.0 if req.temperature is None else req.temperature
        self.spec: OutputSpec | None = None
        if req.generate:
            if tool is None:
                self.spec = OutputSpec(max_output_tokens=max_out, temperature=temperature)
            else:
                self.spec = OutputSpec(
                    max_output_tokens=max_out,
                    temperature=temperature,
                    call_id=new_id("call", 12),  # rendered into the prompt: keep it short
                    name=tool.name,
                    arg_key=tool.first_string_property() or "input",
                )
        self.items = tuple(items)
        self.tokens = render_request(
            engine.tokenizer,
            req,
            self.items,
            memo=engine.render_memo,
            scope=engine.render_scope(tenant, cache_key_salt(req.prompt_cache_key)),
        )
        reserve = 0  # the output item's tokens: framing, call id, name, key, sampled text
        if self.spec is not None:
            reserve = OutputProgram(self.spec, engine.tokenizer).max_tokens()
        if len(self.tokens) + reserve > engine.max_position:
            raise ProtocolError(
                f"the conversation renders to {len(self.tokens)} tokens; with "
                f"{reserve} reserved for the output it exceeds the model's context of "
                f"{engine.max_position} tokens",
                code="context_length_exceeded",
                param="input",
            )
        self.builder = ResponseBuilder(
            req,
            model=config.model_name,
            max_output_tokens=max_out,
            temperature=temperature,
            function_call=self.spec is not None and self.spec.is_function_call,
        )
        self.item: Item | None = None
        self.ok = False
        self.finished = False  # the engine's last event for it has arrived
        self.error: ProtocolError | None = None  # why it failed
        self.incomplete_reason: str | None = None
        self._notes: list[tuple[str, dict[str, Any]]] = []
        self._steered = False
        self._inbox: asyncio.Queue[EngineEvent | None] | None = None

    @property
    def is_message(self) -> bool:
        """It generates a message (not a function call, not a warm-up)."""
        return self.spec is not None and not self.spec.is_function_call

    def note(self, kind: str, **fields: Any) -> None:
        """Add an event of this response (`response.steer.*`) to its stream, numbered in
        sequence after the events produced so far: `events()` yields it while the
        response runs, `late_notes()` once its stream has ended."""
        self._notes.append((kind, fields))
        if self._inbox is not None and not self.finished:
            self._inbox.put_nowait(None)  # wake `events()`

    def late_notes(self) -> list[dict[str, Any]]:
        """The noted events not yet yielded (after `events()` has ended)."""
        out = [self.builder.event(kind, **fields) for kind, fields in self._notes]
        self._notes.clear()
        return out

    @property
    def backlog(self) -> int:
        """Noted events not yet yielded."""
        return len(self._notes)

    def steer(self) -> None:
        """Ask the engine to end this response's message at the next token boundary
        (asked again right after the submit when the turn is not submitted yet: the
        engine runs commands in order)."""
        self._steered = True
        self.engine.steer(self.session_id, self.response_id)

    @property
    def response_id(self) -> str:
        return self.builder.response_id

    @property
    def conversation(self) -> tuple[Item, ...]:
        """The items of the conversation after this response (with its output)."""
        return self.items if self.item is None else (*self.items, self.item)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The response's events, from `response.created` to `response.completed` (or
        `error` + `response.failed`)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[EngineEvent | None] = asyncio.Queue()  # None: a note
        self._inbox = inbox

        def emit(event: EngineEvent) -> None:  # on the engine thread
            # a closed loop (server shut down) means nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(inbox.put_nowait, event)

        b = self.builder
        for ev in b.created():
            yield ev
        self.engine.submit(
            EngineRequest(
                request_id=b.response_id,
                session_id=self.session_id,
                prompt_tokens=tuple(self.tokens),
                output=self.spec,
                ephemeral=self.ephemeral,
                arrival=self.arrival,
                tenant=self.tenant,
                cache_key=self.cache_key,
            ),
            emit,
        )
        if self._steered:  # steered before the engine had the turn
            self.engine.steer(self.session_id, self.response_id)
        while True:
            if self._notes:
                for ev in self.late_notes():
                    yield ev
            event = await inbox.get()
            if event is None or isinstance(event, TurnStarted):
                continue
            if isinstance(event, OutputStarted):
                spec = self.spec
                assert spec is not None
                for ev in b.output_started(call_id=spec.call_id, name=spec.name):
                    yield ev
            elif isinstance(event, OutputDelta):
                for ev in b.delta(event.text):
                    yield ev
            elif isinstance(event, TurnDone):
                self.item, self.ok, self.finished = event.item, True, True
                # the server's default length completes a response; only a limit the
                # client set, or a steer, makes it incomplete
                reason = event.incomplete_reason
                if reason == "max_output_tokens" and not self.client_limit:
                    reason = None
                self.incomplete_reason = reason
                for ev in b.completed(
                    event.item,
                    input_tokens=event.input_tokens,
                    cached_tokens=event.cached_tokens,
                    output_tokens=event.output_tokens,
                    metrics=event.metrics,
                    incomplete_reason=reason,
                ):
                    yield ev
                return
            elif isinstance(event, TurnFailed):
                self.finished = True
                err = ProtocolError(
                    event.message, code=event.code, status=event.status, type=event.error_type
                )
                self.error = err
                for ev in b.failed(err):
                    yield ev
                return


def abort_callback(send: Any) -> Any:
    """A callable that aborts the transport behind the server's ASGI `send`
    (`transport.abort()`: close at once, unsent data dropped) where the server exposes
    it (uvicorn's protocol objects do); None where it does not. Put in each scope under
    `ABORT_KEY` by the app (`pagedkv.serving.server`), before any middleware wraps
    `send`, so that a client that stops reading cannot keep a connection alive by
    leaving its send buffer full."""
    protocol = getattr(send, "__self__", None)
    transport = getattr(protocol, "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return None
    return transport.abort
