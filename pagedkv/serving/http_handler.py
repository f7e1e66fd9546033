"""`POST /v1/responses` over plain HTTP: the stateless comparison.

Each request carries the full conversation. It runs in a session opened for it alone
and closed after it (no pinning); only the content-hash cache can serve its prefix,
and a server started with the prefix cache off recomputes everything. There is no
response store, so `previous_response_id` is refused with `previous_response_not_found`.
`stream: true` answers with server-sent events (`event: <type>` / `data: <json>`), else
with the response object as JSON.

Each request counts against the HTTP quotas while it runs (over one: 429
`rate_limit_exceeded`); its body must arrive within `read_timeout_s` (else 408
`request_timeout`). A stream chunk the client does not take within
`send_timeout_s` ends the request: the turn is dropped and the transport aborted.
Every refusal is logged as one line (`pagedkv.server.refusals`), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedkv.serving.auth import Authenticator, AuthError
from pagedkv.serving.engine import Engine
from pagedkv.serving.protocol import (
    CreateRequest,
    ProtocolError,
    decode_json,
    encode_json,
    parse_create,
)
from pagedkv.serving.quotas import ConnectionQuotas
from pagedkv.serving.response_events import new_id
from pagedkv.serving.response_run import (
    ABORT_KEY,
    ResponseRun,
    ServerConfig,
    log_refusal,
    off_loop,
)
from pagedkv.serving.server_metrics import ServerMetrics

log = logging.getLogger("pagedkv.server")


class JSONReply(JSONResponse):
    """A JSON response written by `encode_json` (never NaN; a body that cannot be
    encoded becomes a 500 `server_error` body, not a crash in the middle of a reply)."""

    def render(self, content: Any) -> bytes:
        try:
            return encode_json(content).encode("utf-8")
        except (ValueError, TypeError, RecursionError) as exc:
            log.error("cannot encode a reply: %s", type(exc).__name__)
            self.status_code = 500
            return encode_json({"error": {"message": "the server could not encode a reply",
                                          "type": "server_error", "param": None,
                                          "code": "server_error"}}).encode()  # fmt: skip


def error_response(err: ProtocolError) -> JSONResponse:
    return JSONReply({"error": err.to_json()}, status_code=err.status)


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {encode_json(event)}\n\n"


class TimedStreamingResponse(StreamingResponse):
    """A streaming response whose every chunk must be taken by the client within
    `send_timeout_s`; when one is not, the stream stops and the transport is aborted
    (unsent data dropped). `on_close(finished)` runs once when the response ends, however
    it ends (`finished`: every chunk was sent)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        *,
        send_timeout_s: float,
        on_close: Callable[[bool], None],
        media_type: str,
    ) -> None:
        super().__init__(content, media_type=media_type)
        self.send_timeout_s = send_timeout_s
        self.on_close = on_close
        self.finished = False
        self._abort: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._abort = scope.get(ABORT_KEY)
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            self.on_close(self.finished)

    async def _timed(self, send: Send, message: Any) -> bool:
        try:
            await asyncio.wait_for(send(message), self.send_timeout_s)
        except TimeoutError:
            log.info("aborting an HTTP stream: a chunk was not taken within %g s",
                     self.send_timeout_s)  # fmt: skip
            if self._abort is not None:
                with contextlib.suppress(Exception):
                    self._abort()
            return False
        return True

    async def stream_response(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}  # fmt: skip
        if not await self._timed(send, start):
            return
        async for chunk in self.body_iterator:
            data = chunk.encode(self.charset) if isinstance(chunk, str) else bytes(chunk)
            if not await self._timed(send, {"type": "http.response.body", "body": data,
                                            "more_body": True}):  # fmt: skip
                return
        if await self._timed(send, {"type": "http.response.body", "body": b"",
                                    "more_body": False}):  # fmt: skip
            self.finished = True


def _parse_body(body: bytes) -> CreateRequest:
    return parse_create(decode_json(body, "body"), websocket=False)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk so that a body without a (truthful)
    Content-Length is refused as soon as it passes `limit`, before it is all in memory.

    Raises:
        ProtocolError: the body is larger than `limit` (413 `message_too_large`).
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(
                f"body of more than {limit} bytes exceeds the limit of {limit}",
                code="message_too_large",
                status=413,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def auth_error_response(err: AuthError) -> JSONResponse:
    return JSONReply({"error": err.to_json()}, status_code=err.status)


async def create_response(
    request: Request,
    engine: Engine,
    config: ServerConfig,
    auth: Authenticator,
    quotas: ConnectionQuotas | None = None,
    metrics: ServerMetrics | None = None,
) -> Response:
    request_id = new_id("req")
    try:
        caller = auth.caller(request.headers.get("authorization"))
    except AuthError as err:
        log.info("refused transport=http request_id=%s tenant=- status=%d code=%s",
                 request_id, err.status, err.code)  # fmt: skip
        return auth_error_response(err)
    tenant = caller.tenant

    def refuse(err: ProtocolError) -> JSONResponse:
        log_refusal("http", request_id, tenant, err)
        if metrics is not None:
            metrics.refused(tenant, "http", err.code)
        return error_response(err)

    if quotas is not None:
        try:
            quotas.start_http(tenant)
        except ProtocolError as err:
            return refuse(err)
    streaming = False
    try:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > config.max_message_bytes:
            # refuse before reading: the limit must bound memory, not just parsing
            return refuse(
                ProtocolError(
                    f"body of {declared} bytes exceeds the limit of {config.max_message_bytes}",
                    code="message_too_large",
                    status=413,
                )
            )
        try:
            try:
                body = await asyncio.wait_for(
                    _read_body(request, config.max_message_bytes), config.read_timeout_s
                )
            except TimeoutError:
                raise ProtocolError(
                    f"the request body did not arrive within {config.read_timeout_s:g} s",
                    code="request_timeout",
                    status=408,
                ) from None
            except ClientDisconnect:
                # the client went away mid-body: nobody to answer, nothing to trace
                log.info("refused transport=http request_id=%s tenant=%s status=499 "
                         "code=client_disconnected", request_id, tenant)  # fmt: skip
                return Response(status_code=499)
            req = await off_loop(len(body), _parse_body, body)
            if req.previous_response_id is not None:
                raise ProtocolError(
                    "this stateless HTTP endpoint keeps no responses; send the full "
                    "conversation (or use the WebSocket mode for previous_response_id)",
                    code="previous_response_not_found",
                    param="previous_response_id",
                )
            session_id = new_id("http")
            run = await off_loop(
                len(body), ResponseRun, engine, config, req, req.items,
                session_id=session_id, ephemeral=True, tenant=tenant,
            )  # fmt: skip
        except ProtocolError as err:
            return refuse(err)
        observer = None if metrics is None else metrics.response(tenant, "http")

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for event in run.events():
                if observer is not None:
                    observer.event(event)
                if event["type"] == "error":
                    log_refusal("http", request_id, tenant, _event_error(event))
                yield event

        if req.stream:

            async def stream() -> AsyncIterator[str]:
                async for event in events():
                    yield _sse(event)

            def on_close(finished: bool) -> None:
                if not finished:  # the client went away or stopped reading: drop the turn
                    engine.close_session(session_id)
                if quotas is not None:
                    quotas.end_http(tenant)

            streaming = True
            return TimedStreamingResponse(stream(), send_timeout_s=config.send_timeout_s,
                                          on_close=on_close, media_type="text/event-stream")  # fmt: skip

        error: dict[str, Any] | None = None
        try:
            async for event in events():
                if event["type"] == "error":
                    error = event
        except BaseException:
            engine.close_session(session_id)  # cancelled (the client went away): drop the turn
            raise
        if run.ok:
            return JSONReply(run.builder.response())
        assert error is not None
        return JSONReply({"error": error["error"]}, status_code=error["status"])
    finally:
        if quotas is not None and not streaming:
            quotas.end_http(tenant)


def _event_error(event: dict[str, Any]) -> ProtocolError:
    err = event.get("error") or {}
    return ProtocolError(str(err.get("message", "")), code=str(err.get("code") or "error"),
                         status=int(event.get("status", 500)), param=err.get("param"))  # fmt: skip
