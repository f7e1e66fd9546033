"""The `GET /v1/responses` WebSocket mode: lanes, forks and steering on one connection.

The handshake is authenticated (a refused key gets the HTTP 401 the API sends) and
counted against the connection caps (over one: 429 `rate_limit_exceeded`). The reader
checks each client message. `response.create` goes to its `stream_id` lane: each lane
is its own engine session and runs its requests first in, first out; lanes run side by
side, up to `max_inflight_responses` at once (the rest wait, queued), and at most
`max_lanes` distinct named lanes per connection. Every event of a response carries its
lane's `stream_id`, errors included.

`previous_response_id` resolves against this connection's responses only (state is
connection-local, as with the API's `store=false`). A continuation on the parent's lane
extends that lane's session; one on another lane is a fork: the new lane's session
renders the parent's conversation and the content-hash index serves every full block of
it by reference (shared, refcounted; the partial last block is recomputed), so N forks
of a parent hold one copy of its prefix. A response still running cannot be forked
(`previous_response_in_progress`). A failed continuation on a lane evicts its parent.

`response.steer` queues user messages for a running response: `response.steer.accepted`
at once; a message response is then cut at the next token boundary (`response.incomplete`,
reason "steered") and an automatic successor (same lane, same settings,
`previous_response_id` = the steered response, the queued messages as input) continues
from the same KV blocks; a response that ends in a function call keeps the steer
pending (`response.steer.pending` after `response.completed`), and the next explicit
`response.create` continuing it on its lane gets the queued messages prepended.
Everything that cannot be committed is answered with `response.steer.failed`.

Bad input (malformed JSON, NaN, nesting too deep, a binary frame, an unknown event type,
wrong field types, an unknown `previous_response_id`) gets an `error` event (a bad steer
`response.steer.failed`) and the connection stays usable; an oversized message gets
`message_too_large` and the connection is closed (1009), as the API does.

Slow and dead clients: every send must be taken by the client within
`send_timeout_s`; when it is not, the running responses are dropped, the engine
sessions closed (their blocks released to the hash cache and host tier) and the
transport aborted without waiting for unread data to drain. A connection with nothing
running and nothing received for `idle_timeout_s` is closed (1001). At
`max_connection_age_s` the connection ends even mid-response: every running response
and every queued request gets `websocket_connection_limit_reached`, then it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from pagedkv.serving.auth import Authenticator, AuthError
from pagedkv.serving.conversation import FunctionCall, Item
from pagedkv.serving.engine import Engine
from pagedkv.serving.protocol import (
    MAX_ID_CHARS,
    CreateRequest,
    ProtocolError,
    SteerRequest,
    check_encodable,
    decode_json,
    encode_json,
    parse_create,
    parse_steer,
    valid_stream_id,
)
from pagedkv.serving.quotas import ConnectionQuotas
from pagedkv.serving.response_events import ResponseBuilder, error_event, new_id
from pagedkv.serving.response_run import (
    ABORT_KEY,
    ResponseRun,
    ServerConfig,
    log_refusal,
    off_loop,
)
from pagedkv.serving.server_metrics import ServerMetrics

log = logging.getLogger("pagedkv.server")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009


def _lane(event: dict[str, Any], req: CreateRequest | None) -> dict[str, Any]:
    """The event, tagged with its request's `stream_id` when the client gave one."""
    if req is not None and req.stream_id is not None:
        event["stream_id"] = req.stream_id
    return event


def _evicts_parent(err: ProtocolError | None) -> bool:
    """Whether a continuation that failed with `err` evicts the response it continued,
    as the API does on a continuation error: a refusal of the request itself (4xx), but
    not a passing capacity refusal (429, 5xx), which leaves the chain to retry on."""
    return err is not None and 400 <= err.status < 500 and err.status != 429


def _echoable(value: object) -> bool:
    """Whether a client's value can be sent back as it came (`check_encodable`)."""
    try:
        check_encodable(value)
    except ProtocolError:
        return False
    return True


def _server_error(message: str) -> ProtocolError:
    return ProtocolError(message, code="server_error", status=500, type="server_error")


@dataclass(eq=False)
class Steer:
    """An accepted `response.steer`: its id, the response it steers, the messages it
    queues and the input as the client sent it (echoed if it cannot be committed)."""

    id: str
    previous_response_id: str
    items: tuple[Item, ...]
    raw_input: str | list[Any]


@dataclass(eq=False)
class Queued:
    """A request waiting on (or running in) a lane; `steers` are the accepted steers an
    automatic successor commits (empty for the client's own requests)."""

    req: CreateRequest
    steers: tuple[Steer, ...] = ()


@dataclass(eq=False)
class Lane:
    """One `stream_id` lane of a connection (None: the default lane): its own engine
    session, its queue (first in, first out) and the task that works through it."""

    name: str | None
    session_id: str
    queue: deque[Queued] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None
    current: Queued | None = None  # the request running now
    opened: bool = False  # its engine session is open


@dataclass(eq=False)
class Stored:
    """A response of this connection, for `previous_response_id` and steering: its
    lane, its event builder (steer events continue its sequence numbers), the run while
    it runs (and until its steers are settled), the conversation after it once it has
    completed, the steers waiting for an explicit continuation (a function call), and
    whether its lane has continued from it."""

    lane: Lane
    builder: ResponseBuilder
    run: ResponseRun | None = None
    conversation: tuple[Item, ...] | None = None
    steers: list[Steer] = field(default_factory=list)  # accepted while it runs
    pending: list[Steer] = field(default_factory=list)  # waiting for tool output
    continued: bool = False  # set before its continuation is built (steers then refused)
    kept: int = 0  # steers settled for its automatic successor, not yet committed
    warmup: bool = False  # `generate: false`: nothing to steer

    @property
    def outstanding(self) -> int:
        """Accepted steers of this response not yet committed or failed."""
        return len(self.steers) + len(self.pending) + self.kept


def _steer_json(steer: Steer) -> dict[str, str]:
    return {"id": steer.id, "previous_response_id": steer.previous_response_id}


def _steer_failure(
    code: str, message: str, prev: str, raw_input: Any, steer_id: str | None = None
) -> dict[str, Any]:
    """The fields of `response.steer.failed`: the uncommitted input, echoed back (the
    caller passes one that can be: checked off the loop while parsing), and the error."""
    steer: dict[str, Any] = {"previous_response_id": prev, "input": raw_input}
    if steer_id is not None:
        steer["id"] = steer_id
    error = {"code": code, "message": message, "type": "invalid_request_error"}
    return {"steer": steer, "error": error}


@dataclass(eq=False)
class BadSteer:
    """A `response.steer` that failed validation (answered with `response.steer.failed`)."""

    previous_response_id: str
    raw_input: Any
    error: ProtocolError


class ResponsesSocket:
    """Serves one WebSocket connection (see the module docstring)."""

    def __init__(
        self,
        ws: WebSocket,
        engine: Engine,
        config: ServerConfig,
        auth: Authenticator,
        quotas: ConnectionQuotas | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.ws = ws
        self.auth = auth
        self.engine = engine
        self.config = config
        self.quotas = quotas if quotas is not None else ConnectionQuotas()
        self.metrics = metrics
        self.session_id = new_id("ws")
        self.tenant: str | None = None
        self._lanes: dict[str | None, Lane] = {}
        self._lane_names: set[str] = set()  # distinct named lanes ever used (the API's cap)
        self._responses: OrderedDict[str, Stored] = OrderedDict()
        self._inflight = asyncio.Semaphore(config.max_inflight_responses)
        self._num_queued = 0  # requests waiting in lane queues (not yet running)
        self._num_running = 0
        self._send_lock = asyncio.Lock()
        self._closing = False  # past the age limit or closing: run nothing more
        self._dead = False  # the transport is gone or aborted: send nothing more
        self._last_activity = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        return self._num_queued == 0 and self._num_running == 0

    async def serve(self) -> None:
        try:
            caller = self.auth.caller(self.ws.headers.get("authorization"))
        except AuthError as err:
            log.info("refused transport=ws request_id=- tenant=- status=%d code=%s",
                     err.status, err.code)  # fmt: skip
            await self._refuse_handshake(err.status, err.to_json())
            return
        self.tenant = caller.tenant
        try:
            self.quotas.open_connection(caller.tenant)
        except ProtocolError as err:
            log_refusal("ws", self.session_id, caller.tenant, err)
            if self.metrics is not None:
                self.metrics.refused(caller.tenant, "ws", err.code)
            await self._refuse_handshake(err.status, err.to_json())
            return
        try:
            await self._serve_accepted()
        finally:
            self.quotas.close_connection(caller.tenant)

    async def _serve_accepted(self) -> None:
        await self.ws.accept()
        if self.metrics is not None:
            self.metrics.connection_opened()
        self._tasks = [
            asyncio.create_task(self._age_limit()),
            asyncio.create_task(self._idle_watch()),
        ]
        self._reader_task = asyncio.create_task(self._reader())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        finally:
            await self._stop_lanes()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.metrics is not None:
                self.metrics.connection_closed()

    async def _stop_lanes(self) -> list[CreateRequest]:
        """Stop every lane's worker and close its engine session (running turns are
        dropped); returns the requests that were running or queued, in lane order."""
        dropped: list[CreateRequest] = []
        workers = [lane.worker for lane in self._lanes.values() if lane.worker is not None]
        for lane in self._lanes.values():
            if lane.current is not None:
                dropped.append(lane.current.req)
            dropped.extend(queued.req for queued in lane.queue)
            lane.queue.clear()
        for worker in workers:
            if worker is not asyncio.current_task():
                worker.cancel()
        for worker in workers:
            if worker is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker
        for lane in self._lanes.values():
            if lane.opened:
                self.engine.close_session(lane.session_id)
                lane.opened = False
        self._num_queued = self._num_running = 0
        return dropped

    async def _refuse_handshake(self, status: int, error: dict[str, Any]) -> None:
        """Answer the upgrade with the HTTP error (401, 429 and the API's error body)
        where the server supports denial responses, else close before accepting."""
        if "websocket.http.response" in self.ws.scope.get("extensions", {}):
            await self.ws.send_denial_response(JSONResponse({"error": error}, status_code=status))
        else:
            await self.ws.close(code=1008 if status == 401 else 1013)

    # ------------------------------------------------------------------ sending
    def _abort(self, reason: str, detail: str) -> None:
        """The client does not take what is sent: stop everything for this connection
        and abort the transport (unsent data is discarded, not drained). `reason` is a
        metrics label ("send_timeout", "close_timeout"), `detail` the log text."""
        if self._dead:
            return
        self._dead = True
        self._closing = True
        log.info("aborting connection session=%s tenant=%s reason=%s: %s", self.session_id,
                 self.tenant, reason, detail)  # fmt: skip
        if self.metrics is not None:
            self.metrics.aborted(reason)
        abort = self.ws.scope.get(ABORT_KEY)
        if abort is not None:
            with contextlib.suppress(Exception):
                abort()
        current = asyncio.current_task()
        for lane in self._lanes.values():
            if lane.worker is not None and lane.worker is not current:
                lane.worker.cancel()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._reader_task is not None and self._reader_task is not current:
            self._reader_task.cancel()

    async def _send(self, event: dict[str, Any]) -> bool:
        """Send one event; False when the connection is gone (or was just aborted for a
        send the client did not take in time)."""
        if self._dead or self.ws.client_state != WebSocketState.CONNECTED:
            return False
        try:
            text = encode_json(event)
        except (ValueError, TypeError, RecursionError) as exc:  # a server bug, not input
            log.error("cannot encode a %s event: %s", event.get("type"), type(exc).__name__)
            text = encode_json(error_event(_server_error("the server could not encode a reply")))
        async with self._send_lock:
            try:
                await asyncio.wait_for(self.ws.send_text(text), self.config.send_timeout_s)
            except TimeoutError:
                self._abort(
                    "send_timeout", f"a send was not taken within {self.config.send_timeout_s:g} s"
                )
                return False
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._dead = True
                return False
        return True

    async def _send_error(self, err: ProtocolError, req: CreateRequest | None = None) -> None:
        event = _lane(error_event(err), req)
        if err.stream_id is not None:  # refused while parsing: the lane it asked for
            event["stream_id"] = err.stream_id
        log_refusal("ws", self.session_id, self.tenant, err)
        if self.metrics is not None:
            self.metrics.refused(self.tenant, "ws", err.code)
        await self._send(event)

    async def _close(self, code: int, reason: str = "") -> None:
        """Close (with the send timeout: a client that reads nothing is aborted)."""
        if self._dead:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self.ws.close(code, reason), self.config.send_timeout_s)
        except TimeoutError:
            self._abort("close_timeout", "the close frame was not taken in time")
        except Exception:  # already closed by the peer
            self._dead = True

    # ------------------------------------------------------------------ reading
    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            self._last_activity = time.monotonic()
            data = message.get("text")
            if data is None:
                if message.get("bytes") is not None:
                    await self._send_error(
                        ProtocolError(
                            "binary frames are not accepted; send each client event as a "
                            "JSON text frame",
                            code="invalid_message",
                        )
                    )
                continue
            if len(data) > self.config.max_message_bytes or (
                4 * len(data) > self.config.max_message_bytes
                and len(data.encode("utf-8", errors="surrogatepass"))
                > self.config.max_message_bytes
            ):
                size = len(data.encode("utf-8", errors="surrogatepass"))
                await self._send_error(
                    ProtocolError(
                        f"message of {size} bytes exceeds the limit of "
                        f"{self.config.max_message_bytes} bytes",
                        code="message_too_large",
                    )
                )
                await self._close(CLOSE_TOO_BIG, "message too large")
                return
            try:
                # up to 4 UTF-8 bytes per character: large messages go to a thread
                req = await off_loop(4 * len(data), self._parse, data)
            except ProtocolError as err:
                await self._send_error(err)
                continue
            except Exception as exc:  # a parser bug must not kill the connection
                log.error("unexpected %s parsing a message on %s", type(exc).__name__,
                          self.session_id)  # fmt: skip
                log.debug("parser failure", exc_info=True)
                await self._send_error(_server_error("the server could not process this message"))
                continue
            if isinstance(req, CreateRequest):
                await self._enqueue(req)
            else:
                await self._steer(req)

    async def _enqueue(self, req: CreateRequest) -> None:
        """Put a checked request on its lane (a new lane within the API's cap)."""
        if self._closing:  # past the age limit: answer it, do not run it
            await self._send_error(self._limit_error(), req)
            return
        if self._num_queued >= self.config.max_queued_responses:
            await self._send_error(
                ProtocolError(
                    f"{self._num_queued} responses are already queued on this connection "
                    f"(limit {self.config.max_queued_responses}); wait for one to finish",
                    code="too_many_queued_responses",
                    status=429,
                ),
                req,
            )
            return
        lane = self._lanes.get(req.stream_id)
        if lane is None:
            name = req.stream_id
            if name is not None and name not in self._lane_names:
                if len(self._lane_names) >= self.config.max_lanes:
                    await self._send_error(
                        ProtocolError(
                            "This WebSocket connection has reached its maximum number of "
                            f"distinct stream IDs ({self.config.max_lanes}). Reuse an existing "
                            "stream_id or open a new WebSocket connection.",
                            code="websocket_stream_limit_reached",
                            param="stream_id",
                        ),
                        req,
                    )
                    return
                self._lane_names.add(name)
            lane = Lane(name, self.session_id if name is None else f"{self.session_id}.{name}")
            self._lanes[name] = lane
        self._put(lane, Queued(req))

    def _put(self, lane: Lane, queued: Queued, *, first: bool = False) -> None:
        """Queue on `lane` (`first`: ahead of the rest, for an automatic successor) and
        start its worker if it has none."""
        if first:
            lane.queue.appendleft(queued)
        else:
            lane.queue.append(queued)
        self._num_queued += 1
        if lane.worker is None:
            lane.worker = asyncio.create_task(self._lane_worker(lane))

    def _parse(self, data: str) -> CreateRequest | SteerRequest | BadSteer:
        event = decode_json(data, "message")
        if not isinstance(event, dict):
            raise ProtocolError(
                f"message must be a JSON object, got {type(event).__name__}",
                code="invalid_type",
            )
        kind = event.get("type")
        if kind == "response.steer":
            try:
                return parse_steer(event)
            except ProtocolError as err:
                # echoed in the refusal: only what encodes (checked here, on the parsing
                # thread for large messages), else ""
                prev, raw = event.get("previous_response_id"), event.get("input")
                if not (isinstance(prev, str) and 1 <= len(prev) <= MAX_ID_CHARS
                        and _echoable(prev)):  # fmt: skip
                    prev = ""
                if not (isinstance(raw, str | list) and _echoable(raw)):
                    raw = ""
                return BadSteer(prev, raw, err)
        if kind != "response.create":
            shown = kind[:64] if isinstance(kind, str) else kind
            raise ProtocolError(
                f"unknown client event type {shown!r}; this server accepts "
                "'response.create' and 'response.steer'",
                code="unknown_event_type",
                param="type",
            )
        try:
            return parse_create(event, websocket=True)
        except ProtocolError as err:
            lane = event.get("stream_id")
            if err.code != "invalid_stream_id":
                err.stream_id = lane if valid_stream_id(lane) else None
            raise

    # ------------------------------------------------------------------ responses
    async def _lane_worker(self, lane: Lane) -> None:
        """Run a lane's requests one after another; up to `max_inflight_responses` of
        the connection's lanes run at once (the rest wait here, queued)."""
        try:
            while lane.queue and not self._closing:
                async with self._inflight:
                    if not lane.queue or self._closing:
                        break
                    queued = lane.queue.popleft()
                    req = queued.req
                    self._num_queued -= 1
                    self._num_running += 1
                    lane.current = queued
                    try:
                        await self._respond(lane, queued)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.error("response failed on %s: %s", lane.session_id,
                                  type(exc).__name__)  # fmt: skip
                        log.debug("response failure", exc_info=True)
                        await self._send_error(_server_error("internal server error"), req)
                    finally:
                        lane.current = None
                        self._num_running -= 1
                        self._last_activity = time.monotonic()
        finally:
            if lane.worker is asyncio.current_task():
                lane.worker = None

    def _parent(self, req: CreateRequest) -> Stored | None:
        """The completed response `req` continues (None without `previous_response_id`).

        Raises:
            ProtocolError: `previous_response_not_found` (not one of this connection's
                responses, or evicted), `previous_response_in_progress` (still running).
        """
        prev = req.previous_response_id
        if prev is None:
            return None
        stored = self._responses.get(prev)
        if stored is None:
            raise ProtocolError(
                f"Previous response with id {prev!r} not found.",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        if stored.conversation is None:
            raise ProtocolError(
                f"Previous response with id {prev!r} is still in progress; fork or continue "
                "from it once it has completed.",
                code="previous_response_in_progress",
                param="previous_response_id",
            )
        self._responses.move_to_end(prev)
        return stored

    async def _respond(self, lane: Lane, queued: Queued) -> None:
        req = queued.req
        try:
            parent = self._parent(req)
        except ProtocolError as err:
            await self._refused(lane, queued, err, None)
            return
        same_lane = parent is not None and parent.lane is lane
        # an explicit continuation of a function call that has steers waiting: they are
        # prepended to its input, in the order they were submitted; from here on the
        # parent takes no new steer (`continued`), so none can slip past this request
        taken = tuple(parent.pending) if same_lane and parent and not queued.steers else ()
        steers = queued.steers or taken
        was_continued = parent.continued if parent is not None else False
        if same_lane and parent is not None:
            parent.continued = True
        items: tuple[Item, ...] = (
            *(parent.conversation or () if parent else ()),
            *(item for steer in steers for item in steer.items),
            *req.items,
        )
        try:
            if not lane.opened:
                self.engine.open_session(lane.session_id, tenant=self.tenant)
                lane.opened = True
            # the whole conversation is rendered (it grows every turn): on a worker thread
            run = await asyncio.to_thread(
                ResponseRun, self.engine, self.config, req, items,
                session_id=lane.session_id, ephemeral=False, tenant=self.tenant,
            )  # fmt: skip
        except ProtocolError as err:
            if same_lane and parent is not None:
                parent.continued = was_continued  # nothing continued it: steerable again
            # a refused automatic successor does not evict the response it follows
            await self._refused(lane, queued, err, parent if same_lane and not queued.steers
                                else None)  # fmt: skip
            return
        if taken and parent is not None:  # committed by this response's response.created
            parent.pending = [s for s in parent.pending if s not in taken]
        if queued.steers and parent is not None:
            parent.kept = max(parent.kept - len(queued.steers), 0)
        stored = Stored(lane, run.builder, run=run, warmup=run.spec is None)
        self._store(run.response_id, stored)
        observer = None if self.metrics is None else self.metrics.response(self.tenant, "ws")
        async for event in run.events():
            if observer is not None:
                observer.event(event)
            if not await self._send(_lane(event, req)):
                self._evict(run.response_id)
                return  # gone: serve() closes the engine sessions, dropping the turn
        if run.ok:
            stored.conversation = run.conversation
        successor = await self._settle_steers(lane, stored, run)
        stored.run = None
        if not run.ok:
            self._evict(run.response_id)
            if same_lane and parent is not None and _evicts_parent(run.error):
                await self._fail_pending(parent, "its continuation failed")
                self._evict(req.previous_response_id)
        elif successor:
            # the automatic successor: same lane, same settings, the queued messages
            follow = dataclasses.replace(
                req, items=(), previous_response_id=run.response_id, generate=True
            )
            self._put(lane, Queued(follow, tuple(successor)), first=True)

    async def _refused(
        self, lane: Lane, queued: Queued, err: ProtocolError, parent: Stored | None
    ) -> None:
        """A request refused before `response.created`: the error, and for an automatic
        successor `response.steer.failed` for each steer it would have committed; a
        refused continuation on its parent's lane evicts the parent, as the API does."""
        await self._send_error(err, queued.req)
        for steer in queued.steers:
            target = self._responses.get(steer.previous_response_id)
            if target is not None:
                target.kept = max(target.kept - 1, 0)
            await self._steer_event(
                target,
                "response.steer.failed",
                _steer_failure("successor_creation_failed",
                               f"the successor response could not be created: {err.message}",
                               steer.previous_response_id, steer.raw_input, steer.id),
                lane=lane,
            )  # fmt: skip
        if parent is not None and _evicts_parent(err):
            await self._fail_pending(parent, f"its continuation was refused: {err.message}")
            self._evict(queued.req.previous_response_id)

    async def _settle_steers(self, lane: Lane, stored: Stored, run: ResponseRun) -> list[Steer]:
        """After a response's last event: send the steer events noted while it ran, and
        settle each steer accepted for it (a steer can still arrive while these are
        sent). Returns the steers an automatic successor commits."""
        successor: list[Steer] = []
        call = run.item if isinstance(run.item, FunctionCall) else None
        while True:
            steers, stored.steers = stored.steers, []
            for steer in steers:
                if not run.ok:
                    run.note("response.steer.failed", **_steer_failure(
                        "response_not_active", "the response failed before the steer could "
                        "be applied", steer.previous_response_id, steer.raw_input, steer.id,
                    ))  # fmt: skip
                elif call is not None:
                    stored.pending.append(steer)
                    run.note("response.steer.pending", **self._pending_fields(steer, call))
                else:
                    successor.append(steer)
                    stored.kept += 1
            notes = run.late_notes()
            if not notes and not stored.steers:
                return successor
            for event in notes:
                if not await self._send(_lane(event, run.builder.req)):
                    return []

    @staticmethod
    def _pending_fields(steer: Steer, call: FunctionCall) -> dict[str, Any]:
        required = {"type": "function_call_output", "call_id": call.call_id, "name": call.name}
        return {"steer": _steer_json(steer), "reason": "waiting_for_required_input",
                "required_input": [required]}  # fmt: skip

    async def _fail_pending(self, stored: Stored, why: str) -> None:
        """Answer the steers waiting on `stored` with `successor_creation_failed`."""
        pending, stored.pending = stored.pending, []
        for steer in pending:
            await self._steer_event(stored, "response.steer.failed", _steer_failure(
                "successor_creation_failed", f"the steer could not be committed: {why}",
                steer.previous_response_id, steer.raw_input, steer.id,
            ))  # fmt: skip

    # ------------------------------------------------------------------ steering
    async def _steer_event(
        self,
        stored: Stored | None,
        kind: str,
        fields: dict[str, Any],
        *,
        lane: Lane | None = None,
    ) -> None:
        """Send a `response.steer.*` event in the target's stream: noted into it while
        it runs (its sequence numbers stay in order), sent with its next number after,
        numbered 0 without a target; tagged with the target's lane."""
        if stored is not None and stored.run is not None:
            stored.run.note(kind, **fields)
            return
        if stored is not None:
            event = stored.builder.event(kind, **fields)
            lane = stored.lane
        else:
            event = {"type": kind, "sequence_number": 0, **fields}
        if lane is not None and lane.name is not None:
            event["stream_id"] = lane.name
        if kind == "response.steer.failed":
            error = fields["error"]
            log_refusal("ws", self.session_id, self.tenant,
                        ProtocolError(error["message"], code=error["code"]))  # fmt: skip
            if self.metrics is not None:
                self.metrics.refused(self.tenant, "ws", error["code"])
        await self._send(event)

    async def _steer(self, msg: SteerRequest | BadSteer) -> None:
        """Handle `response.steer` (see the module docstring). Every check and the
        bookkeeping happen before the first await, so a response that finishes or is
        continued meanwhile sees the steer."""
        if self._closing:
            return  # past the age limit: the connection is ending
        prev = msg.previous_response_id
        stored = self._responses.get(prev) if prev else None
        # a client that floods steers at a running response waits for its events to go
        # out (bounded by the send timeout) instead of growing them without bound
        while stored is not None and stored.run is not None and stored.run.backlog > 32:
            await asyncio.sleep(0.005)
            if self._dead:
                return
            stored = self._responses.get(prev)

        async def fail(code: str, message: str, target: Stored | None = stored) -> None:
            await self._steer_event(target, "response.steer.failed",
                                    _steer_failure(code, message, prev, msg.raw_input))  # fmt: skip

        if isinstance(msg, BadSteer):
            await fail("invalid_input", msg.error.message)
            return
        if stored is None:
            await fail("response_not_found",
                       f"Response with id {prev!r} is not available on this connection.", None)  # fmt: skip
            return
        run = stored.run
        if stored.warmup:
            await fail("steering_not_supported",
                       "a warm-up (generate: false) produces no output and cannot be steered")  # fmt: skip
            return
        last = stored.conversation[-1] if stored.conversation else None
        if run is None and (not isinstance(last, FunctionCall) or stored.continued):
            await fail("response_already_completed",
                       f"Response {prev!r} has completed and is no longer accepting "
                       "steering input.")  # fmt: skip
            return
        total = sum(r.outstanding for r in self._responses.values())
        if stored.outstanding >= self.config.max_pending_steers or (
            total >= 2 * self.config.max_pending_steers
        ):
            await fail("too_many_pending_steers",
                       f"{stored.outstanding} steers are pending for response {prev!r} and "
                       f"{total} on this connection (limits {self.config.max_pending_steers} "
                       f"and {2 * self.config.max_pending_steers})")  # fmt: skip
            return
        steer = Steer(new_id("steer"), prev, msg.items, msg.raw_input)
        if run is not None:
            stored.steers.append(steer)
            if run.is_message and not run.finished:
                run.steer()  # cut at the next token boundary; the successor follows
            await self._steer_event(
                stored, "response.steer.accepted", {"steer": _steer_json(steer)}
            )
            return
        # a completed function call waiting for its output: pending at once
        assert isinstance(last, FunctionCall)
        stored.pending.append(steer)
        await self._steer_event(stored, "response.steer.accepted", {"steer": _steer_json(steer)})
        await self._steer_event(stored, "response.steer.pending", self._pending_fields(steer, last))

    def _store(self, response_id: str, stored: Stored) -> None:
        self._responses[response_id] = stored
        excess = len(self._responses) - self.config.max_stored_responses
        for old in list(self._responses)[: max(excess, 0)]:
            kept = self._responses[old]
            # never a running one, nor one with steers waiting for a continuation
            if kept.conversation is not None and kept.run is None and not kept.outstanding:
                del self._responses[old]

    def _evict(self, response_id: str | None) -> None:
        if response_id is not None:
            self._responses.pop(response_id, None)

    # ------------------------------------------------------------------ limits
    def _limit_error(self) -> ProtocolError:
        age = self.config.max_connection_age_s
        shown = f"{age / 60:g} minutes" if age >= 60 else f"{age:g} seconds"
        return ProtocolError(
            f"Responses websocket connection limit reached ({shown}). Create a new "
            "websocket connection to continue.",
            code="websocket_connection_limit_reached",
        )

    async def _age_limit(self) -> None:
        await asyncio.sleep(self.config.max_connection_age_s)
        self._closing = True
        # running responses end now too: stop every lane, answer each running and
        # queued request with the limit error, then close
        dropped: list[CreateRequest | None] = [*await self._stop_lanes()]
        for req in dropped or [None]:
            await self._send_error(self._limit_error(), req)
        await self._close(CLOSE_NORMAL)

    async def _idle_watch(self) -> None:
        timeout = self.config.idle_timeout_s
        if timeout is None:
            return
        while True:
            await asyncio.sleep(max(self._last_activity + timeout - time.monotonic(), 0.01))
            if not self.idle:  # a response is running or queued
                self._last_activity = time.monotonic()
                continue
            if time.monotonic() - self._last_activity >= timeout:
                log.info("closing idle connection session=%s tenant=%s", self.session_id,
                         self.tenant)  # fmt: skip
                await self._close(CLOSE_GOING_AWAY, "idle timeout")
                if self._reader_task is not None:
                    self._reader_task.cancel()
                return
