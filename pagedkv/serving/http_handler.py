"""`POST /v1/responses` over plain HTTP: the stateless comparison.

Each request carries the full conversation. It runs in a session opened for it alone
and closed after it (no pinning); only the content-hash cache can serve its prefix,
and a server started with the prefix cache off recomputes everything. There is no
response store, so `previous_response_id` is refused with `previous_response_not_found`.
`stream: true` answers with server-sent events (`event: <type>` / `data: <json>`), else
with the response object as JSON.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pagedkv.serving.auth import Authenticator, AuthError
from pagedkv.serving.engine import Engine
from pagedkv.serving.protocol import CreateRequest, ProtocolError, decode_json, parse_create
from pagedkv.serving.response_events import new_id
from pagedkv.serving.response_run import ResponseRun, ServerConfig, off_loop


def error_response(err: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": err.to_json()}, status_code=err.status)


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


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
    return JSONResponse({"error": err.to_json()}, status_code=err.status)


async def create_response(
    request: Request, engine: Engine, config: ServerConfig, auth: Authenticator
) -> Response:
    try:
        caller = auth.caller(request.headers.get("authorization"))
    except AuthError as err:
        return auth_error_response(err)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > config.max_message_bytes:
        # refuse before reading: the limit must bound memory, not just parsing
        return error_response(
            ProtocolError(
                f"body of {declared} bytes exceeds the limit of {config.max_message_bytes}",
                code="message_too_large",
                status=413,
            )
        )
    try:
        body = await _read_body(request, config.max_message_bytes)
        req = await off_loop(len(body), _parse_body, body)
        if req.previous_response_id is not None:
            raise ProtocolError(
                "this stateless HTTP endpoint keeps no responses; send the full conversation "
                "(or use the WebSocket mode for previous_response_id)",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        session_id = new_id("http")
        run = await off_loop(
            len(body), ResponseRun, engine, config, req, req.items,
            session_id=session_id, ephemeral=True, tenant=caller.tenant,
        )  # fmt: skip
    except ProtocolError as err:
        return error_response(err)

    if req.stream:

        async def stream() -> AsyncIterator[str]:
            finished = False
            try:
                async for event in run.events():
                    yield _sse(event)
                finished = True
            finally:
                if not finished:  # the client went away: drop the turn
                    engine.close_session(session_id)

        return StreamingResponse(stream(), media_type="text/event-stream")

    error: dict[str, Any] | None = None
    try:
        async for event in run.events():
            if event["type"] == "error":
                error = event
    except BaseException:
        engine.close_session(session_id)  # cancelled (the client went away): drop the turn
        raise
    if run.ok:
        return JSONResponse(run.builder.response())
    assert error is not None
    return JSONResponse({"error": error["error"]}, status_code=error["status"])
