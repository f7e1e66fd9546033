"""The router: one front process for N `pagedkv serve` replicas (`pagedkv route`).

Clients speak to the router exactly as to a replica (`POST /v1/responses`, WebSocket
`GET /v1/responses`, `GET /v1/models`); the router picks a replica and proxies. A
WebSocket connection sticks to its replica for life; when that replica dies the client's
connection is closed (1012, "service restart") and its reconnect is routed to a live
replica, where the shared remote tier (`--remote-url` on every replica) serves the
prefix its old replica wrote.

Routing key: the caller's credential (a keyed hash of the bearer token: replicas map it
to the tenant) and the conversation: `prompt_cache_key` when given, else the request's
`instructions` and first input item, which every turn of one conversation repeats. A
connection is routed on its first message. The key goes to the replica chosen by
consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): walk the
ring from the key's point and take the first live replica whose load (open WebSocket
connections plus HTTP requests in flight) is below `ceil(load_factor * mean load)`, so
a conversation keeps landing where its KV is, and a hot tenant spreads over replicas
instead of piling onto one. Health: every replica's `/v1/models` is polled; a replica
that fails a poll, a connect or a proxied request is out until a poll succeeds.

With KV-aware routing (`kv`, `pagedkv route --remote-url ...`) a new session goes
first to the live replica holding the longest prefix of its prompt, by the block hashes
replicas publish in Redis (`pagedkv.serving.kv_index`, scored by
`pagedkv.serving.kv_routing`), under the same load bound; when no replica holds any of
it, or the index cannot answer in time, the consistent hash decides. A connection's
later messages (`previous_response_id` included: that state is its replica's alone)
follow the connection. With the replicas' hash secret the routing key's secret is
derived from it (`routing_secret`), so the ring's choice is reproducible.

Auth and quotas stay the replicas' own: the router forwards the Authorization header and
passes their answers (401, 429 ...) back unchanged. The router bounds what it buffers
(`max_message_bytes` per message or body) and never shows a client a traceback.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

if TYPE_CHECKING:  # imported where used: a router without KV routing never loads it
    from pagedkv.serving.kv_routing import KVRouting

log = logging.getLogger("pagedkv.serving.router")

_OWN_HEADERS = {"date", "server", "content-encoding"}  # the router's server sets these
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                "upgrade", "te", "trailer", "proxy-authorization", "proxy-connection"}  # fmt: skip


@dataclass(eq=False)
class Replica:
    """One backend: its base URL, health and load."""

    url: str
    healthy: bool = True
    load: int = 0
    served: int = 0  # requests and connections routed to it

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http") + "/v1/responses"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Knobs of the router.

    Attributes:
        load_factor: a replica takes a new key only below `ceil(load_factor * mean)`.
        vnodes: ring points per replica.
        health_interval_s, health_timeout_s: polling of `/v1/models`.
        connect_timeout_s: connecting to a replica.
        read_timeout_s: the longest a replica may stay silent on an HTTP request (headers
            or the next chunk) before the request fails and the replica is marked down.
        max_message_bytes: largest WebSocket message or HTTP body proxied.
    """

    load_factor: float = 1.25
    vnodes: int = 64
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 120.0
    max_message_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.load_factor > 1.0:
            raise ValueError(f"load_factor must be > 1, got {self.load_factor}")
        if self.vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {self.vnodes}")


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(eq=False)
class ReplicaRing:
    """Consistent hashing with bounded loads over replicas (see the module docstring)."""

    replicas: list[Replica]
    load_factor: float = 1.25
    vnodes: int = 64
    _points: list[int] = field(default_factory=list)
    _owners: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("a router needs at least one replica")
        pairs = sorted(
            (_point(f"{r.url}#{v}".encode()), i)
            for i, r in enumerate(self.replicas)
            for v in range(self.vnodes)
        )
        self._points = [p for p, _ in pairs]
        self._owners = [i for _, i in pairs]

    def load_cap(self, live: Sequence[Replica]) -> int:
        """The load bound over the live replicas `live` for one more session: a replica
        takes it only with `load < ceil(load_factor * (total load + 1) / len(live))`."""
        total = sum(r.load for r in live) + 1
        return max(math.ceil(self.load_factor * total / max(len(live), 1)), 1)

    def pick(self, key: bytes, *, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The replica for `key`: the first live one clockwise from its point whose load is
        under the bound; None when no replica is live."""
        live = [r for r in self.replicas if r.healthy and r not in exclude]
        if not live:
            return None
        cap = self.load_cap(live)
        start = bisect.bisect(self._points, _point(key))
        n = len(self._points)
        for step in range(n):
            r = self.replicas[self._owners[(start + step) % n]]
            if r.healthy and r not in exclude and r.load < cap:
                return r
        return min(live, key=lambda r: r.load)  # unreachable with cap >= mean, kept safe


def routing_secret(hash_secret: bytes) -> bytes:
    """The routing-key secret of a router given the replicas' hash secret (without one
    it is random per process): derived, so the ring's choice for a key is reproducible."""
    return hashlib.blake2b(hash_secret, digest_size=16, person=b"pagedkv-route").digest()


def routing_key(authorization: str | None, body: Any, secret: bytes) -> bytes:
    """The key a request is routed by: its credential (keyed hash) and conversation."""
    cred = hashlib.blake2b((authorization or "").encode("utf-8", "replace"), key=secret,
                           digest_size=16).digest()  # fmt: skip
    conv: Any = None
    if isinstance(body, dict):
        cache_key = body.get("prompt_cache_key")
        if isinstance(cache_key, str):
            conv = ["k", cache_key]
        else:
            items = body.get("input")
            first = items[0] if isinstance(items, list) and items else items
            conv = ["c", body.get("instructions"), first]
    try:
        text = json.dumps(conv, sort_keys=True, default=str)[:65536]
    except (TypeError, ValueError, RecursionError):
        text = ""
    return cred + text.encode("utf-8", "replace")


def _error(status: int, code: str, message: str) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"type": kind, "code": code, "message": message,
                                   "param": None}}, status_code=status)  # fmt: skip


class Router:
    """The proxy state: the ring, one HTTP client, the health task, and with `kv` the
    held-prefix scoring of new sessions (`pagedkv.serving.kv_routing`)."""

    def __init__(
        self,
        urls: Sequence[str],
        config: RouterConfig | None = None,
        *,
        kv: KVRouting | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.config = cfg = config or RouterConfig()
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.ring = ReplicaRing(self.replicas, cfg.load_factor, cfg.vnodes)
        self.secret = secret if secret is not None else os.urandom(16)
        self.kv = kv
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._health: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ health
    async def check(self, r: Replica) -> None:
        try:
            resp = await self.client.get(r.url + "/v1/models", timeout=self.config.health_timeout_s,
                                         headers={"authorization": "Bearer router-health"})  # fmt: skip
            ok = resp.status_code in (200, 401)  # alive (a keyed replica refuses our probe)
        except httpx.HTTPError:
            ok = False
        if ok != r.healthy:
            log.warning("router: replica %s is %s", r.url, "back" if ok else "down")
        r.healthy = ok

    async def health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(r) for r in self.replicas))
            await asyncio.sleep(self.config.health_interval_s)

    def down(self, r: Replica, why: str) -> None:
        if r.healthy:
            log.warning("router: replica %s is down (%s)", r.url, why)
        r.healthy = False

    async def start(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))
        self._health = asyncio.create_task(self.health_loop())

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        await self.client.aclose()
        if self.kv is not None:
            self.kv.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"replicas": [{"url": r.url, "healthy": r.healthy, "load": r.load,
                                             "served": r.served} for r in self.replicas]}  # fmt: skip
        out["kv"] = None if self.kv is None else self.kv.stats.as_dict()
        return out

    async def choose(
        self,
        key: bytes,
        body: Any,
        authorization: str | None,
        *,
        websocket: bool,
        size: int,
        tried: Sequence[Replica],
    ) -> Replica | None:
        """The replica for a new session: with KV-aware routing the live one holding the
        longest prefix of its prompt (under the load bound), else (and for a retry after
        a failed connect) the consistent hash's pick; None when none is live. `size` is
        the body's (or first message's) length in bytes.

        The choice is made after the last await: a caller that counts the session in
        the replica's load before its own next await (as both transports do, before
        connecting) keeps every concurrent choice under the load bound."""
        if self.kv is None or tried:
            return self.ring.pick(key, exclude=tried)
        from pagedkv.serving.kv_routing import best_replica

        live = [r for r in self.replicas if r.healthy]
        if not live:
            return None
        kv = self.kv
        kv.stats.probes += 1
        outcome, held = await kv.held(body, authorization, websocket=websocket,
                                      replicas=[r.url for r in live], size=size)  # fmt: skip
        ring_pick = self.ring.pick(key)  # loads and health may have moved meanwhile
        if outcome != "ok":
            kv.stats.fell_back(outcome)
            return ring_pick
        live = [r for r in self.replicas if r.healthy]
        choice, why = best_replica(live, held, self.ring.load_cap(live), ring_pick)
        if choice is None:
            kv.stats.fell_back(why)
            return ring_pick
        kv.stats.routed += 1
        if choice is not ring_pick:
            kv.stats.routed_off_ring += 1
        assert isinstance(choice, Replica)
        return choice

    # ------------------------------------------------------------------ HTTP
    async def models(self, request: Request) -> Response:
        for r in self.replicas:
            if not r.healthy:
                continue
            try:
                resp = await self.client.get(
                    r.url + "/v1/models", headers=_forward(request.headers)
                )
            except httpx.HTTPError:
                self.down(r, "models request failed")
                continue
            return Response(resp.content, resp.status_code,
                            media_type=resp.headers.get("content-type"))  # fmt: skip
        return _error(503, "no_replica", "no replica is available")

    async def responses(self, request: Request) -> Response:
        try:
            body = await _read_body(request, self.config.max_message_bytes)
        except ClientDisconnect:
            return Response(status_code=499)
        except ValueError as err:
            return _error(413, "message_too_large", str(err))
        try:
            parsed: Any = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None  # the replica answers the bad body itself
        authorization = request.headers.get("authorization")
        key = routing_key(authorization, parsed, self.secret)
        tried: list[Replica] = []
        while True:
            r = await self.choose(key, parsed, authorization, websocket=False, size=len(body),
                                  tried=tried)  # fmt: skip
            if r is None:
                return _error(503, "no_replica", "no replica is available")
            tried.append(r)
            r.load += 1  # before the connect's await: concurrent choices see it
            r.served += 1
            try:
                upstream = await self.client.send(
                    self.client.build_request(
                        "POST",
                        r.url + "/v1/responses",
                        content=body,
                        headers=_forward(request.headers),
                    ),
                    stream=True,
                )
            except httpx.ConnectError:  # nothing reached it: safe to try the next one
                r.load -= 1
                self.down(r, "connect failed")
                continue
            except httpx.HTTPError as err:  # incl. a replica silent past read_timeout_s
                r.load -= 1
                self.down(r, type(err).__name__)
                return _error(502, "replica_failed", "the replica failed to answer")
            except BaseException:  # cancelled (the client left, the router stops)
                r.load -= 1
                raise
            out = StreamingResponse(self._relay(upstream, r), status_code=upstream.status_code)
            out.raw_headers = [  # every value kept (set-cookie ...); ours: date, server
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in upstream.headers.multi_items()
                if k.lower() not in _HOP_HEADERS | _OWN_HEADERS
            ]
            return out

    async def _relay(self, upstream: httpx.Response, r: Replica) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError:
            self.down(r, "stream broke")
        finally:
            r.load -= 1
            await upstream.aclose()

    # ------------------------------------------------------------------ WebSocket
    async def websocket(self, ws: WebSocket) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        await ws.accept()
        try:
            first = await ws.receive()
        except WebSocketDisconnect:
            return
        if first.get("type") == "websocket.disconnect":
            return
        text, data = first.get("text"), first.get("bytes")
        size = len(text.encode("utf-8", "surrogatepass")) if text is not None else len(data or b"")
        if size > self.config.max_message_bytes:
            await _ws_error(ws, "message_too_large", "the message is too large", close=1009)
            return
        try:
            event: Any = json.loads(text) if text is not None else None
        except (ValueError, RecursionError):
            event = None
        parsed = event
        if isinstance(parsed, dict) and isinstance(parsed.get("response"), dict):
            parsed = parsed["response"]  # `response.create` carries the request inside
        authorization = ws.headers.get("authorization")
        key = routing_key(authorization, parsed, self.secret)
        tried: list[Replica] = []
        headers = [(k, v) for k, v in ws.headers.items() if k.lower() == "authorization"]
        # the replica parses the event itself as the request (its fields at the top)
        body = event if isinstance(event, dict) and event.get("type") == "response.create" else None
        while True:
            r = await self.choose(key, body, authorization, websocket=True, size=size,
                                  tried=tried)  # fmt: skip
            if r is None:
                await _ws_error(ws, "no_replica", "no replica is available", close=1013)
                return
            tried.append(r)
            # counted before the handshake's await, so connections opened meanwhile see
            # it (a slow handshake must not let them all pick this replica)
            r.load += 1
            try:
                upstream = await connect(r.ws_url, additional_headers=headers,
                                         max_size=2 * self.config.max_message_bytes,
                                         open_timeout=self.config.connect_timeout_s,
                                         ping_interval=None)  # fmt: skip
            except InvalidStatus as err:
                r.load -= 1
                status = err.response.status_code
                if status >= 500:  # the replica's own failure: try the next one
                    self.down(r, f"handshake answered {status}")
                    continue
                # the replica refused the caller (auth, quota): its answer is the answer
                code = "invalid_api_key" if status == 401 else "refused"
                await _ws_error(ws, code, f"the server refused the connection ({status})",
                                close=1008)  # fmt: skip
                return
            except (OSError, EOFError, asyncio.TimeoutError, ConnectionClosed,
                    InvalidHandshake) as err:  # fmt: skip
                r.load -= 1
                self.down(r, type(err).__name__)  # dropped or garbled handshake: next one
                continue
            except BaseException:  # cancelled (the client left, the router stops)
                r.load -= 1
                raise
            break
        r.served += 1
        try:
            await upstream.send(text if text is not None else (data or b""))
            await self._pump(ws, upstream, r)
        finally:
            r.load -= 1
            await upstream.close()

    async def _pump(self, ws: WebSocket, upstream: Any, r: Replica) -> None:
        from websockets.exceptions import ConnectionClosed

        async def client_to_replica() -> None:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                payload = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
                size = (len(payload.encode("utf-8", "surrogatepass")) if isinstance(payload, str)
                        else len(payload or b""))  # fmt: skip
                if size > self.config.max_message_bytes:
                    await _ws_error(ws, "message_too_large", "the message is too large",
                                    close=1009)  # fmt: skip
                    return
                await upstream.send(payload)

        async def replica_to_client() -> str:
            try:
                async for message in upstream:
                    if isinstance(message, str):
                        await ws.send_text(message)
                    else:
                        await ws.send_bytes(message)
            except ConnectionClosed as err:
                return "lost" if err.rcvd is None else "closed"
            return "closed"

        up = asyncio.create_task(client_to_replica())
        down = asyncio.create_task(replica_to_client())
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if down in done:
            how = "closed"
            with contextlib.suppress(Exception):
                how = down.result()
            code = upstream.close_code or 1000
            if how == "lost":  # the replica went away without a close: it died
                self.down(r, "connection lost")
                code = 1012
            with contextlib.suppress(Exception):
                await ws.close(code if 1000 <= code < 5000 and code not in (1005, 1006) else 1012)
        else:
            with contextlib.suppress(Exception):
                up.result()


def _forward(headers: Any) -> list[tuple[str, str]]:
    """The client's headers a replica gets: no hop-by-hop ones (nor those `Connection`
    names), and no `X-Forwarded-*` / `Forwarded` a client could use to pose as another
    address."""
    named = {t.strip().lower() for v in headers.getlist("connection") for t in v.split(",")}
    return [
        (k, v)
        for k, v in headers.items()
        if k.lower() not in _HOP_HEADERS
        and k.lower() not in named
        and not k.lower().startswith("x-forwarded-")
        and k.lower() != "forwarded"
    ]


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _ws_error(ws: WebSocket, code: str, message: str, *, close: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps({"type": "error", "error": {
            "type": "invalid_request_error" if close == 1008 else "server_error",
            "code": code, "message": message, "param": None}}))  # fmt: skip
        await ws.close(close)


def create_router_app(
    urls: Sequence[str],
    config: RouterConfig | None = None,
    *,
    kv: KVRouting | None = None,
    secret: bytes | None = None,
) -> Starlette:
    """The router as an ASGI app (`app.state.router`); `kv` turns on KV-aware routing,
    `secret` keys the routing key (default: random; see `routing_secret`)."""
    router = Router(urls, config, kv=kv, secret=secret)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        yield
        await router.stop()

    async def stats(request: Request) -> Response:
        # replica addresses are the operator's business: loopback callers only
        if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
            return _error(404, "not_found", "not found")
        return JSONResponse(router.stats())

    app = Starlette(
        routes=[
            Route("/v1/responses", router.responses, methods=["POST"]),
            WebSocketRoute("/v1/responses", router.websocket),
            Route("/v1/models", router.models, methods=["GET"]),
            Route("/v1/router/stats", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.router = router
    return app
