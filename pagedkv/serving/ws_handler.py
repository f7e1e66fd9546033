"""The `GET /v1/responses` WebSocket mode: one connection = one engine session.

The reader checks each client message and queues `response.create` requests; a worker
runs them one at a time, in order (one response in flight per connection). Bad input
(malformed JSON, an unknown event type, wrong field types, an oversized message, a
`previous_response_id` this connection does not know) gets an `error` event and the
connection stays usable. The model runs on the engine thread, so the event loop keeps
answering pings during a long prefill. After `max_connection_age_s` the connection
finishes its in-flight response, answers every request it will not run (queued, or
arriving meanwhile) with `websocket_connection_limit_reached`, and closes.

`previous_response_id` resolves only against this connection's own responses (state is
connection-local, as in the API's `store=false` mode); a reconnecting client re-sends
its full history with no `previous_response_id` and is served from the hash cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from pagedkv.serving.auth import Authenticator, AuthError
from pagedkv.serving.conversation import Item
from pagedkv.serving.engine import Engine
from pagedkv.serving.protocol import CreateRequest, ProtocolError, decode_json, parse_create
from pagedkv.serving.response_events import error_event, new_id
from pagedkv.serving.response_run import ResponseRun, ServerConfig, off_loop

log = logging.getLogger("pagedkv.server")

CLOSE_NORMAL = 1000


def _lane(event: dict[str, Any], req: CreateRequest | None) -> dict[str, Any]:
    """The event, tagged with its request's `stream_id` when the client gave one."""
    if req is not None and req.stream_id is not None:
        event["stream_id"] = req.stream_id
    return event


class ResponsesSocket:
    """Serves one WebSocket connection (see the module docstring)."""

    def __init__(
        self, ws: WebSocket, engine: Engine, config: ServerConfig, auth: Authenticator
    ) -> None:
        self.ws = ws
        self.auth = auth
        self.engine = engine
        self.config = config
        self.session_id = new_id("ws")
        self._requests: asyncio.Queue[CreateRequest] = asyncio.Queue()
        self._responses: OrderedDict[str, tuple[Item, ...]] = OrderedDict()
        self._send_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    async def serve(self) -> None:
        try:
            caller = self.auth.caller(self.ws.headers.get("authorization"))
        except AuthError as err:
            await self._refuse_handshake(err)
            return
        await self.ws.accept()
        self.engine.open_session(self.session_id, tenant=caller.tenant)
        worker = asyncio.create_task(self._worker())
        age = asyncio.create_task(self._age_limit())
        try:
            await self._reader()
        finally:
            worker.cancel()
            age.cancel()
            for task in (worker, age):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.engine.close_session(self.session_id)

    async def _refuse_handshake(self, err: AuthError) -> None:
        """Answer the upgrade with the HTTP error (401 and the API's error body) where
        the server supports denial responses, else close before accepting (403)."""
        log.info("refused WebSocket handshake: %s", err.code)
        if "websocket.http.response" in self.ws.scope.get("extensions", {}):
            body = JSONResponse({"error": err.to_json()}, status_code=err.status)
            await self.ws.send_denial_response(body)
        else:
            await self.ws.close(code=1008)

    # ------------------------------------------------------------------ sending
    async def _send(self, event: dict[str, Any]) -> None:
        if self.ws.client_state != WebSocketState.CONNECTED:
            return
        async with self._send_lock:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    async def _send_error(self, err: ProtocolError, req: CreateRequest | None = None) -> None:
        event = _lane(error_event(err), req)
        if err.stream_id is not None:  # refused while parsing: the lane it asked for
            event["stream_id"] = err.stream_id
        await self._send(event)

    # ------------------------------------------------------------------ reading
    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("text")
            if data is None and message.get("bytes") is not None:
                data = message["bytes"].decode("utf-8", errors="replace")
            if data is None:
                continue
            try:
                # up to 4 UTF-8 bytes per character: large messages go to a thread
                req = await off_loop(4 * len(data), self._parse, data)
            except ProtocolError as err:
                await self._send_error(err)
                continue
            except Exception:  # a parser bug must not kill the connection: report, go on
                log.exception("unexpected error parsing a client message")
                await self._send_error(
                    ProtocolError(
                        "the server could not process this message",
                        code="server_error",
                        status=500,
                        type="server_error",
                    )
                )
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
            await self._requests.put(req)

    def _parse(self, data: str) -> CreateRequest:
        size = len(data.encode("utf-8", errors="surrogatepass"))
        if size > self.config.max_message_bytes:
            raise ProtocolError(
                f"message of {size} bytes exceeds the limit of "
                f"{self.config.max_message_bytes} bytes",
                code="message_too_large",
            )
        event = decode_json(data, "message")
        if not isinstance(event, dict):
            raise ProtocolError(
                f"message must be a JSON object, got {type(event).__name__}",
                code="invalid_type",
            )
        kind = event.get("type")
        if kind != "response.create":
            raise ProtocolError(
                f"unknown client event type {kind!r}; this server accepts 'response.create'",
                code="unknown_event_type",
                param="type",
            )
        try:
            return parse_create(event, websocket=True)
        except ProtocolError as err:
            lane = event.get("stream_id")
            err.stream_id = lane if isinstance(lane, str) else None
            raise

    # ------------------------------------------------------------------ responses
    async def _worker(self) -> None:
        while True:
            req = await self._requests.get()
            if self._closing:
                continue
            self._idle.clear()
            try:
                await self._respond(req)
            except Exception:
                log.exception("response failed on %s", self.session_id)
                await self._send_error(
                    ProtocolError(
                        "internal server error",
                        code="server_error",
                        status=500,
                        type="server_error",
                    ),
                    req,
                )
            finally:
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
                session_id=self.session_id, ephemeral=False,
            )  # fmt: skip
        except ProtocolError as err:
            await self._send_error(err, req)
            return
        async for event in run.events():
            await self._send(_lane(event, req))
        if run.ok:
            self._responses[run.response_id] = run.conversation
            while len(self._responses) > self.config.max_stored_responses:
                self._responses.popitem(last=False)

    # ------------------------------------------------------------------ age limit
    def _limit_error(self) -> ProtocolError:
        return ProtocolError(
            f"connection reached its maximum age of {self.config.max_connection_age_s:g} s; "
            "open a new connection and re-send the full conversation",
            code="websocket_connection_limit_reached",
        )

    async def _age_limit(self) -> None:
        await asyncio.sleep(self.config.max_connection_age_s)
        self._closing = True
        # let the in-flight response finish; every queued request gets its own answer
        dropped: list[CreateRequest | None] = []
        while not self._requests.empty():
            dropped.append(self._requests.get_nowait())
        await self._idle.wait()
        for req in dropped or [None]:
            await self._send_error(self._limit_error(), req)
        with contextlib.suppress(Exception):
            await self.ws.close(CLOSE_NORMAL)
