"""KV-aware routing, the router's side: which replica holds the longest prefix of a
request's prompt, by the hashes replicas publish (`pagedkv.serving.kv_index`).

For a new session (an HTTP request, or the first message of a WebSocket connection)
the router does what the replica will do: resolve the tenant from `Authorization`
(`pagedkv.serving.auth`, with the digest key derived from the shared hash secret, and
the same keys file if the replicas have one), parse the fields the prompt renders from
(`parse_prompt_fields`: `parse_create`'s parsing of them, the input items one at a
time), render it (`render_request`, the function `ResponseRun` renders with) and hash
it with a `BlockHasher` of the same block size and secret, salted by the tenant and
the `prompt_cache_key`. Only the first `max_probe_blocks` full blocks are rendered and
hashed. One pipelined round trip then asks, for every live replica, its meta key and
SMISMEMBER of those hashes in its set; a replica's score is the number of leading
hashes it holds. A replica whose meta is missing (not publishing, expired) or whose
`compat` / `auth` fingerprints differ from the router's is not scored (and one whose
meta stays missing `missing_meta_warn_s` while it is live is named in one warning).

Everything is bounded and never fails a request. A probe's work is bounded by the
prefix, not the body: items are parsed only until `max_probe_blocks` blocks are
rendered, with the byte tokenizer the text that reaches the bound is cut before it is
encoded, and nothing else of the body is walked (the replica checks the request whole
and refuses what is invalid, whatever the router hashed); bodies over
`max_probe_bytes` are not probed at all (`too_large`), nor is anything while the index
is backed off. The work runs on a few worker threads (`max_inflight` probes at once;
another new session meanwhile is routed by the ring), the whole probe has a deadline
(`timeout_s`), a Redis error backs the index off for `backoff_s`, and any outcome
other than a usable score falls back to consistent hashing (counted by reason).

Not covered: with a merging tokenizer (a checkpoint's BPE) the replica renders
assistant items from the ids it generated (`RenderMemo`), which the router does not
have; its hashes then match up to the first assistant item only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pagedkv.cache.hashing import BlockHasher, as_token_array
from pagedkv.model.tokenizer import ByteTokenizer, ChatTokenizer
from pagedkv.serving.auth import Authenticator, AuthError, auth_fingerprint, auth_secret_for
from pagedkv.serving.engine import cache_key_salt
from pagedkv.serving.kv_index import compat_fingerprint, index_keys
from pagedkv.serving.protocol import ProtocolError, parse_prompt_fields
from pagedkv.serving.response_run import render_request

log = logging.getLogger("pagedkv.serving.kv_routing")


class Loaded(Protocol):
    """What scoring needs of a replica (`pagedkv.serving.router.Replica`)."""

    url: str
    load: int
    healthy: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class KVRoutingConfig:
    """Knobs of KV-aware routing.

    Attributes:
        namespace: the replicas' `--remote-namespace`.
        block_size: the replicas' block size (a replica publishing another is skipped).
        max_probe_blocks: the most blocks of a prompt rendered, hashed and asked for.
        max_probe_bytes: a larger body (HTTP) or first message (WebSocket) is not
            probed: routed by the consistent hash (`too_large`).
        timeout_s: the deadline of one probe (render, hash, Redis round trip).
        redis_timeout_s: socket timeout of the Redis client.
        backoff_s: after a Redis error, the index is left alone this long.
        max_inflight: probes running at once (worker threads).
        missing_meta_warn_s: a live replica with no meta key this long is named in one
            warning (not publishing: no `--remote-url`, another namespace, or an
            `--advertise-url` other than the URL the router knows it by).
    """

    namespace: str = "default"
    block_size: int = 16
    max_probe_blocks: int = 1024
    max_probe_bytes: int = 256 * 1024
    timeout_s: float = 0.25
    redis_timeout_s: float = 0.1
    backoff_s: float = 1.0
    max_inflight: int = 4
    missing_meta_warn_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_probe_blocks", "max_probe_bytes", "max_inflight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVRoutingConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("timeout_s", "redis_timeout_s", "backoff_s", "missing_meta_warn_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"KVRoutingConfig.{name} must be > 0, got {value}")


@dataclass
class KVRoutingStats:
    """Counters of KV-aware routing (monotonic), updated on the router's event loop."""

    probes: int = 0
    routed: int = 0  # new sessions sent where the longest held prefix is
    routed_off_ring: int = 0  # ... to a replica the consistent hash would not have picked
    fallback: int = 0  # new sessions routed by the consistent hash instead
    fallback_by_reason: dict[str, int] = field(default_factory=dict)
    redis_errors: int = 0

    def fell_back(self, reason: str) -> None:
        self.fallback += 1
        self.fallback_by_reason[reason] = self.fallback_by_reason.get(reason, 0) + 1
        if reason == "redis_error":
            self.redis_errors += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "probes": self.probes,
            "routed": self.routed,
            "routed_off_ring": self.routed_off_ring,
            "fallback": self.fallback,
            "fallback_by_reason": dict(self.fallback_by_reason),
            "redis_errors": self.redis_errors,
        }


def best_replica(
    replicas: Sequence[Loaded], held: dict[str, int], cap: int, preferred: Loaded | None
) -> tuple[Loaded | None, str]:
    """The replica to send a new session to by held prefix, and why: `(replica, "ok")`,
    or `(None, "no_hit")` when no live replica holds a block of it, `(None,
    "over_bound")` when every one that does is at the load bound (`load >= cap`: the
    rule of the consistent hash, so a hot prefix spreads too). Ties go to `preferred`
    (the consistent hash's pick), else to the least loaded."""
    holders = [r for r in replicas if r.healthy and held.get(r.url, 0) > 0]
    if not holders:
        return None, "no_hit"
    eligible = [r for r in holders if r.load < cap]
    if not eligible:
        return None, "over_bound"
    best = max(held[r.url] for r in eligible)
    tied = [r for r in eligible if held[r.url] == best]
    if preferred is not None and preferred in tied:
        return preferred, "ok"
    return min(tied, key=lambda r: r.load), "ok"


class KVRouting:
    """Scores replicas by the longest held prefix of a request (module docstring).

    Args:
        config: the knobs.
        hash_secret: the replicas' block-hash secret (1-64 bytes).
        tokenizer: the replicas' tokenizer (default: the built-in byte tokenizer).
        auth: resolves tenants (default: no keys, digests keyed like the replicas').
        client: a sync `redis.Redis` (default: one from `remote_url`).
        remote_url: the store the replicas publish in (with no `client`).
        clock: seconds, monotonic (tests).
    """

    def __init__(
        self,
        config: KVRoutingConfig,
        *,
        hash_secret: bytes,
        tokenizer: ChatTokenizer | None = None,
        auth: Authenticator | None = None,
        client: Any = None,
        remote_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self.hasher = BlockHasher(block_size=config.block_size, secret=hash_secret)
        self.tokenizer: ChatTokenizer = tokenizer or ByteTokenizer()
        self.auth = auth if auth is not None else Authenticator(
            secret=auth_secret_for(hash_secret) or b""
        )  # fmt: skip
        self.compat = compat_fingerprint(self.tokenizer, self.hasher)
        self.auth_fp = auth_fingerprint(self.auth)
        if client is None:
            import redis

            if remote_url is None:
                raise ValueError("KVRouting needs a redis client or a remote_url")
            t = config.redis_timeout_s
            client = redis.Redis.from_url(remote_url, socket_timeout=t,
                                          socket_connect_timeout=t, retry_on_timeout=False)  # fmt: skip
        self.client = client
        self.stats = KVRoutingStats()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            config.max_inflight, thread_name_prefix="pagedkv-kv-route"
        )
        self._inflight = 0  # on the event loop
        self._down_until = 0.0
        self._warned: set[tuple[str, str]] = set()
        self._missing_since: dict[str, float] = {}  # replica URL -> first seen without meta

    # ------------------------------------------------------------------ worker thread
    def request_hashes(
        self, body: object, authorization: str | None, *, websocket: bool
    ) -> list[bytes] | str:
        """The chain hashes of the first `max_probe_blocks` full blocks of the request's
        prompt, as its replica will compute them (for a request the replica accepts);
        or why there are none: "unparsed", "unauthenticated", "invalid" (the replica
        will refuse it), "continuation" (a `previous_response_id`: connection state,
        which only the connection's own replica has), "short" (not one full block).

        Its work is bounded by the probed prefix: input items are parsed only until
        `max_probe_blocks` blocks are rendered, and nothing else of the body is read
        (see the module docstring)."""
        if not isinstance(body, dict):
            return "unparsed"
        try:
            caller = self.auth.caller(authorization)
        except AuthError:
            return "unauthenticated"
        try:
            req, items = parse_prompt_fields(body, websocket=websocket)
        except (ProtocolError, RecursionError):
            return "invalid"
        if req.previous_response_id is not None:
            return "continuation"
        bs = self.config.block_size
        try:
            tokens = render_request(self.tokenizer, req, items,
                                    max_tokens=self.config.max_probe_blocks * bs)  # fmt: skip
        # an item the parser refuses, text the tokenizer refuses, tool parameters too
        # deep to encode: the replica refuses the request too
        except (ProtocolError, TypeError, ValueError, RecursionError):
            return "invalid"
        root = self.hasher.root(caller.tenant, cache_key_salt(req.prompt_cache_key))
        hashes, _ = self.hasher.hash_chain(root, as_token_array(tokens))
        return hashes if hashes else "short"

    def held_prefixes(self, replicas: Sequence[str], hashes: Sequence[bytes]) -> dict[str, int]:
        """For each replica URL, how many leading `hashes` its published set holds, in
        one pipelined round trip; replicas without a compatible meta are left out.

        Raises:
            Exception: whatever the Redis client raises.
        """
        pipe = self.client.pipeline(transaction=False)
        for url in replicas:
            set_key, meta_key = index_keys(self.config.namespace, url)
            pipe.get(meta_key)
            pipe.smismember(set_key, list(hashes))
        result = pipe.execute()
        out: dict[str, int] = {}
        for i, url in enumerate(replicas):
            meta, members = result[2 * i], result[2 * i + 1]
            if meta is None:
                self._meta_missing(url)
                continue
            self._missing_since.pop(url, None)
            if not self._compatible(url, meta):
                continue
            n = 0
            for member in members:
                if not member:
                    break
                n += 1
            out[url] = n
        return out

    def _compatible(self, url: str, raw: bytes) -> bool:
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict):
            return self._mismatch(url, "meta", "an unreadable meta key")
        if meta.get("compat") != self.compat:
            return self._mismatch(url, "compat", "another tokenizer, block size or hash secret")
        if meta.get("auth", "open") != self.auth_fp:
            return self._mismatch(url, "auth", "other API keys (give the router the replicas' "
                                  "--api-keys-file)")  # fmt: skip
        return True

    def _meta_missing(self, url: str) -> None:
        now = self._clock()
        since = self._missing_since.setdefault(url, now)
        if now - since >= self.config.missing_meta_warn_s and (url, "missing") not in self._warned:
            self._warned.add((url, "missing"))
            _, meta_key = index_keys(self.config.namespace, url)
            log.warning("router: replica %s is live but has published no block index for "
                        "%.0f s (no key %s), so it is routed by the consistent hash only: "
                        "does it run with the router's --remote-url and --remote-namespace, "
                        "and with --advertise-url %s?", url, now - since,
                        meta_key.decode(errors="replace"), url)  # fmt: skip

    def _mismatch(self, url: str, what: str, why: str) -> bool:
        if (url, what) not in self._warned:
            self._warned.add((url, what))
            log.warning("router: replica %s publishes its blocks under %s; not routing to it "
                        "by held prefix", url, why)  # fmt: skip
        return False

    def _probe(
        self, body: object, authorization: str | None, websocket: bool, replicas: list[str]
    ) -> tuple[str, dict[str, int]]:
        hashes = self.request_hashes(body, authorization, websocket=websocket)
        if isinstance(hashes, str):
            return hashes, {}
        if self._clock() < self._down_until:  # backed off while this one rendered
            return "redis_backoff", {}
        try:
            return "ok", self.held_prefixes(replicas, hashes)
        except Exception as exc:  # any client failure is Redis's
            self._down_until = self._clock() + self.config.backoff_s
            log.warning("router: the block index did not answer (%s: %s); routing by the "
                        "consistent hash for %g s", type(exc).__name__, str(exc)[:200],
                        self.config.backoff_s)  # fmt: skip
            return "redis_error", {}

    # ------------------------------------------------------------------ event loop
    async def held(
        self,
        body: object,
        authorization: str | None,
        *,
        websocket: bool,
        replicas: list[str],
        size: int,
    ) -> tuple[str, dict[str, int]]:
        """`("ok", held prefix blocks by replica URL)`, or `(reason, {})` when the
        request cannot be scored (see `request_hashes`; also "too_large" for a body of
        `size` bytes over `max_probe_bytes`, "redis_backoff", "busy", "timeout",
        "redis_error", "error"). Never raises, never takes longer than `timeout_s`; the
        first three are decided here, before any work on the body."""
        if size > self.config.max_probe_bytes:
            return "too_large", {}
        if self._clock() < self._down_until:
            return "redis_backoff", {}
        if self._inflight >= self.config.max_inflight:
            return "busy", {}
        loop = asyncio.get_running_loop()
        self._inflight += 1
        try:
            fut = loop.run_in_executor(self._pool, self._probe, body, authorization,
                                       websocket, replicas)  # fmt: skip
        except RuntimeError:  # the pool is shut down (the router is stopping)
            self._inflight -= 1
            return "error", {}
        fut.add_done_callback(self._probe_done)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.config.timeout_s)
        except asyncio.TimeoutError:
            return "timeout", {}
        except Exception as exc:  # a bug: never the request's failure
            log.error("router: KV probe failed: %s: %s", type(exc).__name__, str(exc)[:200])
            return "error", {}

    def _probe_done(self, fut: asyncio.Future[Any]) -> None:
        self._inflight -= 1
        if not fut.cancelled():
            fut.exception()  # retrieved: never "exception was never retrieved"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.client.close()
