"""The `GET /v1/responses` WebSocket mode: one connection = one engine session.

The handshake is authenticated (a refused key gets the HTTP 401 the API sends) and
counted against the connection caps (over one: 429 `rate_limit_exceeded`). The reader
checks each client message and queues `response.create` requests; a worker runs them
one at a time, in order (one response in flight per connection). Bad input (malformed
JSON, NaN, nesting too deep, a binary frame, an unknown event type, wrong field types, a
`previous_response_id` this connection does not know) gets an `error` event and the
connection stays usable; an oversized message gets `message_too_large` and the
connection is closed (1009), as the API does.

Slow and dead clients: every send must be taken by the client within
`send_timeout_s`; when it is not, the in-flight response is dropped, the engine session
closed (its blocks released to the hash cache and host tier) and the transport aborted
without waiting for unread data to drain. A connection with nothing running and nothing
received for `idle_timeout_s` is closed (1001). At `max_connection_age_s` the connection
ends even mid-response: the running response and every queued request get
`websocket_connection_limit_reached`, then the connection closes.

`previous_response_id` resolves only against this connection's own responses (state is
connection-local, as in the API's `store=false` mode); a reconnecting client re-sends
its full history with no `previous_response_id` and is served from the hash cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from pagedkv.serving.auth import Authenticator, AuthError
from pagedkv.serving.conversation import Item
from pagedkv.serving.engine import Engine
from pagedkv.serving.protocol import (
    CreateRequest,
    ProtocolError,
    decode_json,
    encode_json,
    parse_create,
)
from pagedkv.serving.quotas import ConnectionQuotas
from pagedkv.serving.response_events import error_event, new_id
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


def _server_error(message: str) -> ProtocolError:
    return ProtocolError(message, code="server_error", status=500, type="server_error")


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
        self._requests: asyncio.Queue[CreateRequest] = asyncio.Queue()
        self._responses: OrderedDict[str, tuple[Item, ...]] = OrderedDict()
        self._send_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False  # past the age limit or closing: run nothing more
        self._dead = False  # the transport is gone or aborted: send nothing more
        self._current: CreateRequest | None = None  # the response running now
        self._last_activity = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self._reader_task: asyncio.Task[None] | None = None

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
            await self._serve_accepted(caller.tenant)
        finally:
            self.quotas.close_connection(caller.tenant)

    async def _serve_accepted(self, tenant: str) -> None:
        await self.ws.accept()
        self.engine.open_session(self.session_id, tenant=tenant)
        if self.metrics is not None:
            self.metrics.connection_opened()
        self._tasks = [
            asyncio.create_task(self._worker()),
            asyncio.create_task(self._age_limit()),
            asyncio.create_task(self._idle_watch()),
        ]
        self._reader_task = asyncio.create_task(self._reader())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.engine.close_session(self.session_id)
            if self.metrics is not None:
                self.metrics.connection_closed()

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
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
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
            if self._closing:  # past the age limit: answer it, do not run it
                await self._send_error(self._limit_error(), req)
                continue
            if self._requests.qsize() >= self.config.max_queued_responses:
                await self._send_error(
                    ProtocolError(
                        f"{self._requests.qsize()} responses are already queued on this "
                        f"connection (limit {self.config.max_queued_responses}); wait for "
                        "one to finish",
                        code="too_many_queued_responses",
                        status=429,
                    ),
                    req,
                )
                continue
            self._idle.clear()
            await self._requests.put(req)

    def _parse(self, data: str) -> CreateRequest:
        event = decode_json(data, "message")
        if not isinstance(event, dict):
            raise ProtocolError(
                f"message must be a JSON object, got {type(event).__name__}",
                code="invalid_type",
            )
        kind = event.get("type")
        if kind != "response.create":
            shown = kind[:64] if isinstance(kind, str) else kind
            raise ProtocolError(
                f"unknown client event type {shown!r}; this server accepts 'response.create'",
                code="unknown_event_type",
                param="type",
            )
        try:
            return parse_create(event, websocket=True)
        except ProtocolError as err:
            lane = event.get("stream_id")
            err.stream_id = (
                lane if isinstance(lane, str) and 0 < len(lane) <= 256 and lane.isprintable()
                else None
            )  # fmt: skip
            raise

    # ------------------------------------------------------------------ responses
    async def _worker(self) -> None:
        while True:
            req = await self._requests.get()
            if self._closing:
                continue
            self._idle.clear()
            self._current = req
            try:
                await self._respond(req)
            except Exception as exc:
                log.error("response failed on %s: %s", self.session_id, type(exc).__name__)
                log.debug("response failure", exc_info=True)
                await self._send_error(_server_error("internal server error"), req)
            finally:
                self._current = None
                self._last_activity = time.monotonic()
                if self._requests.empty():
                    self._idle.set()

    def _items_for(self, req: CreateRequest) -> tuple[Item, ...]:
        prev = req.previous_response_id
        if prev is None:
            return req.items
        base = self._responses.get(prev)
        if base is None:
            raise ProtocolError(
                f"previous response with id {prev!r} not found on this connection; send the "
                "full conversation with previous_response_id null",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        self._responses.move_to_end(prev)
        return (*base, *req.items)

    async def _respond(self, req: CreateRequest) -> None:
        try:
            items = self._items_for(req)
            # the whole conversation is rendered (it grows every turn): on a worker thread
            run = await asyncio.to_thread(
                ResponseRun, self.engine, self.config, req, items,
                session_id=self.session_id, ephemeral=False, tenant=self.tenant,
            )  # fmt: skip
        except ProtocolError as err:
            await self._send_error(err, req)
            return
        observer = None if self.metrics is None else self.metrics.response(self.tenant, "ws")
        async for event in run.events():
            if observer is not None:
                observer.event(event)
            if not await self._send(_lane(event, req)):
                return  # gone: serve() closes the engine session, dropping the turn
        if run.ok:
            self._responses[run.response_id] = run.conversation
            while len(self._responses) > self.config.max_stored_responses:
                self._responses.popitem(last=False)

    # ------------------------------------------------------------------ limits
    def _limit_error(self) -> ProtocolError:
        return ProtocolError(
            f"connection reached its maximum age of {self.config.max_connection_age_s:g} s; "
            "open a new connection and re-send the full conversation",
            code="websocket_connection_limit_reached",
        )

    async def _age_limit(self) -> None:
        await asyncio.sleep(self.config.max_connection_age_s)
        self._closing = True
        # the running response ends now too: stop the worker, answer it and every
        # queued request with the limit error, then close
        running = self._current
        worker = self._tasks[0]
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker
        self.engine.close_session(self.session_id)  # drops the running turn
        dropped: list[CreateRequest | None] = [running] if running is not None else []
        while not self._requests.empty():
            dropped.append(self._requests.get_nowait())
        for req in dropped or [None]:
            await self._send_error(self._limit_error(), req)
        await self._close(CLOSE_NORMAL)

    async def _idle_watch(self) -> None:
        timeout = self.config.idle_timeout_s
        if timeout is None:
            return
        while True:
            await asyncio.sleep(max(self._last_activity + timeout - time.monotonic(), 0.01))
            if not self._idle.is_set():  # a response is running or queued
                self._last_activity = time.monotonic()
                continue
            if time.monotonic() - self._last_activity >= timeout:
                log.info("closing idle connection session=%s tenant=%s", self.session_id,
                         self.tenant)  # fmt: skip
                await self._close(CLOSE_GOING_AWAY, "idle timeout")
                if self._reader_task is not None:
                    self._reader_task.cancel()
                return
