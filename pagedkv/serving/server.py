"""The ASGI app (Starlette): Responses API over WebSocket and HTTP, on one engine.

Routes:
    GET  /v1/responses      WebSocket mode (`pagedkv.serving.ws_handler`)
    POST /v1/responses      stateless HTTP, JSON or SSE (`pagedkv.serving.http_handler`)
    GET  /v1/models         the served model
    GET  /v1/engine/stats   non-standard, admin key only: scheduler counters, pool use,
                            sessions by state
    GET  /health            liveness

Run it with uvicorn (`pagedkv serve`), or in-process with `pagedkv.serving.local_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from pagedkv.serving.auth import Authenticator, AuthError
from pagedkv.serving.engine import Engine
from pagedkv.serving.http_handler import auth_error_response, create_response
from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.ws_handler import ResponsesSocket


def create_app(
    engine: Engine,
    config: ServerConfig | None = None,
    *,
    manage_engine: bool = True,
    auth: Authenticator | None = None,
) -> Starlette:
    """The app serving `engine`. With `manage_engine` the app starts the engine thread on
    startup and stops it on shutdown. `auth` maps API keys to tenants (default: every
    bearer token its own tenant, no admin key: see `pagedkv.serving.auth`)."""
    cfg = config or ServerConfig()
    authn = auth if auth is not None else Authenticator()

    async def ws_responses(ws: WebSocket) -> None:
        await ResponsesSocket(ws, engine, cfg, authn).serve()

    async def post_responses(request: Request) -> Response:
        return await create_response(request, engine, cfg, authn)

    async def models(_request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": cfg.model_name, "object": "model", "owned_by": "pagedkv", "created": 0}
                ],
            }
        )

    async def stats(request: Request) -> Response:
        try:
            authn.check_admin(request.headers.get("authorization"))
        except AuthError as err:
            return auth_error_response(err)
        result = await asyncio.wrap_future(engine.call(lambda e: e.stats()))
        return JSONResponse(result)

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop)

    return Starlette(
        routes=[
            WebSocketRoute("/v1/responses", ws_responses),
            Route("/v1/responses", post_responses, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/engine/stats", stats, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
