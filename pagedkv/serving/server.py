"""The ASGI app (Starlette): Responses API over WebSocket and HTTP, on one engine.

Routes:
    GET  /v1/responses      WebSocket mode (`pagedkv.serving.ws_handler`)
    POST /v1/responses      stateless HTTP, JSON or SSE (`pagedkv.serving.http_handler`)
    GET  /v1/models         the served model
    GET  /v1/engine/stats   non-standard, admin key only: scheduler counters, pool use,
                            sessions by state
    GET  /metrics           Prometheus text format, admin key only
                            (`pagedkv.serving.server_metrics`)
    GET  /health            liveness

Run it with uvicorn (`pagedkv serve`), or in-process with `pagedkv.serving.local_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from pagedkv.serving.auth import Authenticator, AuthError
from pagedkv.serving.engine import Engine
from pagedkv.serving.http_handler import JSONReply, auth_error_response, create_response
from pagedkv.serving.quotas import ConnectionQuotas
from pagedkv.serving.response_run import ABORT_KEY, ServerConfig, abort_callback
from pagedkv.serving.server_metrics import ServerMetrics
from pagedkv.serving.ws_handler import ResponsesSocket

STATS_TIMEOUT_S = 5.0  # a scrape waits this long for the engine thread's snapshot


class PagedKVApp(Starlette):
    """The Starlette app, which also puts `ABORT_KEY` in each HTTP and WebSocket scope:
    taken from the server's own `send` before any middleware wraps it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[ABORT_KEY] = abort_callback(send)
        await super().__call__(scope, receive, send)


def create_app(
    engine: Engine,
    config: ServerConfig | None = None,
    *,
    manage_engine: bool = True,
    auth: Authenticator | None = None,
    quotas: ConnectionQuotas | None = None,
    metrics: ServerMetrics | None = None,
) -> PagedKVApp:
    """The app serving `engine`. With `manage_engine` the app starts the engine thread on
    startup and stops it on shutdown. `auth` maps API keys to tenants (default: every
    bearer token its own tenant, no admin key: see `pagedkv.serving.auth`); `quotas`
    caps connections and HTTP requests (default: no caps); `metrics` holds the
    Prometheus series (default: a new registry; `app.state.metrics`)."""
    cfg = config or ServerConfig()
    authn = auth if auth is not None else Authenticator()
    quota = quotas if quotas is not None else ConnectionQuotas()
    meter = metrics
    if meter is None:
        meter = ServerMetrics(known_tenants=authn.tenants if authn.requires_keys else None)

    async def ws_responses(ws: WebSocket) -> None:
        await ResponsesSocket(ws, engine, cfg, authn, quota, meter).serve()

    async def post_responses(request: Request) -> Response:
        return await create_response(request, engine, cfg, authn, quota, meter)

    async def engine_stats() -> dict[str, object] | None:
        fut = asyncio.wrap_future(engine.call(lambda e: e.stats()))
        try:
            return await asyncio.wait_for(fut, STATS_TIMEOUT_S)
        except TimeoutError:
            return None

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
        result = await engine_stats()
        if result is None:
            return JSONResponse(
                {"error": {"message": "the engine did not answer in time", "type": "server_error",
                           "param": None, "code": "server_error"}},
                status_code=503,
            )  # fmt: skip
        result["connections"] = quota.snapshot()
        return JSONResponse(result)

    async def prometheus(request: Request) -> Response:
        try:
            authn.check_admin(request.headers.get("authorization"))
        except AuthError as err:
            return auth_error_response(err)
        meter.update(await engine_stats())
        return Response(meter.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

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

    async def http_error(_request: Request, exc: Exception) -> Response:
        # unknown routes and methods get the API's JSON error body, not plain text
        status = getattr(exc, "status_code", 500)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "server_error")
        detail = getattr(exc, "detail", None) or "error"
        body = {"message": str(detail), "type": "invalid_request_error", "param": None,
                "code": code}  # fmt: skip
        return JSONReply({"error": body}, status_code=status)

    app = PagedKVApp(
        exception_handlers={HTTPException: http_error},
        routes=[
            WebSocketRoute("/v1/responses", ws_responses),
            Route("/v1/responses", post_responses, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/engine/stats", stats, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.metrics = meter
    app.state.quotas = quota
    return app
