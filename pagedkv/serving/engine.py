"""Engine: the model on scheduler-managed KV blocks, with continuous batching.

One thread owns the scheduler, the model and the KV stores (the scheduler is single
threaded by design). Connections talk to it through a command queue (`open_session`,
`submit`, `close_session`, `call`) and receive per-request events through the callback
they pass with `submit`, called on the engine thread (the server forwards them to its
event loop with `call_soon_threadsafe`).

Each step: poll the scheduler (admissions, refusals, finished copies), gather every
decoding sequence's next tokens and as many prefill chunks as the token budget allows
into one `ForwardBatch`, run the model once, then sample, append the sampled tokens and
finish the turns whose output item is complete.

A session's tokens between turns are exactly the rendered conversation so far. A new
turn presents the full rendered conversation; the engine sends the scheduler only what
extends the tokens the session holds. If the conversation does not extend them (a
client branched from an older response, or changed its instructions), the session is
closed and a fresh one resumes with the whole conversation, served from the hash cache.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.errors import OutOfBlocksError
from pagedkv.cache.hashing import BlockHasher
from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.model.protocol import PagedModel
from pagedkv.model.tokenizer import ByteTokenizer, ChatTokenizer
from pagedkv.scheduler.cost import CostModel
from pagedkv.scheduler.errors import OverCapacityError, SessionError
from pagedkv.scheduler.scheduler import SessionScheduler, TurnPlan, TurnReady, TurnRefused
from pagedkv.serving.conversation import RenderMemo
from pagedkv.serving.engine_types import (
    EngineConfig,
    EngineRequest,
    EventSink,
    OutputDelta,
    OutputStarted,
    TurnDone,
    TurnFailed,
    TurnStarted,
)
from pagedkv.serving.generation import (
    CharMasks,
    OutputProgram,
    Step,
    TokenProgram,
    make_program,
    sample_rows,
)
from pagedkv.serving.kv_index import (
    HeldIndexPublisher,
    PublishConfig,
    compat_fingerprint,
    snapshot_held,
)
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.remote import RedisStore, RemoteKVTier
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import CopyTransferEngine, TransferHandle

log = logging.getLogger("pagedkv.engine")


@dataclass(eq=False)
class _Session:
    """The engine's view of one client session.

    `held` is the token list the scheduler holds for it (all computed) between turns;
    `key` is its current scheduler session id (a new one after a reset).
    """

    session_id: str
    ephemeral: bool
    key: tuple[str, int]
    tenant: str
    held: list[int] = field(default_factory=list)
    job: _Job | None = None
    extra_keys: bytes = b""  # the sub-salt of its current `cache_key`


@dataclass(eq=False)
class _Job:
    """One running turn: tokens still to compute, and the output program."""

    req: EngineRequest
    session: _Session
    emit: EventSink
    program: OutputProgram | TokenProgram | None
    phase: str = "waiting"  # waiting -> prefill -> decode -> closing
    pos: int = 0  # tokens of the sequence whose K/V is written
    pending: list[int] = field(default_factory=list)  # appended, not yet computed
    cached_tokens: int = 0
    steered: bool = False  # a steer asked to end its message at the next token boundary
    restore: TransferHandle | None = None  # a layer-wise restore its next step waits on
    restore_end_s: float = 0.0  # when the cost model expects that copy to end
    t_admitted: float = 0.0
    t_first: float | None = None


class _LayerWaits:
    """One `ForwardBatch.wait_layer` for the layer-wise restores of a step's sequences;
    remembers which layers the model waited for (a model that skips one read it early)."""

    def __init__(self, handles: list[TransferHandle]) -> None:
        self.handles = handles
        self.waited: set[int] = set()

    def __call__(self, layer: int) -> None:
        for handle in self.handles:
            handle.wait_layer(layer)
        self.waited.add(layer)


def _log_failure(what: str) -> None:
    """One ERROR line for a failure inside the engine (in an `except` block), the
    traceback only at DEBUG: requests can reach these paths, and a client must not be
    able to fill the log with tracebacks."""
    exc = sys.exc_info()[1]
    log.error("%s: %s: %s", what, type(exc).__name__, str(exc)[:200])
    log.debug("%s", what, exc_info=True)


def cache_key_salt(cache_key: str | None) -> bytes:
    """The `extra_keys` of a `prompt_cache_key` (empty without one)."""
    if cache_key is None:
        return b""
    return b"prompt_cache_key\x00" + cache_key.encode("utf-8", "surrogatepass")


def model_fingerprint(model: object) -> str:
    """A short fingerprint of a model's weights: the names, shapes and dtypes of every
    parameter and, for each, its first and last 256 values (cheap at any size, different
    for two checkpoints or seeds of one architecture)."""
    module = getattr(model, "hf", model)  # a PagedCausalLM wraps the transformers model
    named = getattr(module, "named_parameters", None)
    h = xxhash.xxh3_128()
    if callable(named):
        for name, param in named():
            flat = param.detach().reshape(-1)
            h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            for part in (flat[:256], flat[-256:]):
                h.update(part.float().cpu().numpy().tobytes())
    else:
        h.update(repr(getattr(model, "config", type(model))).encode())
    return h.hexdigest()[:16]


def _publisher(
    config: EngineConfig, hasher: BlockHasher, tokenizer: ChatTokenizer, fingerprint: str
) -> HeldIndexPublisher:
    """The held-hash publisher of an engine with a remote store and an advertise URL."""
    import redis

    assert config.remote_url is not None and config.advertise_url is not None
    # its own client: the publisher thread's slow calls never hold the remote tier's
    client = redis.Redis.from_url(config.remote_url, socket_timeout=2.0,
                                  socket_connect_timeout=max(config.remote_timeout_s, 0.5))  # fmt: skip
    meta = {"block_size": config.block_size, "compat": compat_fingerprint(tokenizer, hasher),
            "auth": "open", "fingerprint": fingerprint}  # fmt: skip
    return HeldIndexPublisher(
        client,
        namespace=config.remote_namespace,
        replica=config.advertise_url,
        meta=meta,
        config=PublishConfig(
            interval_s=config.publish_interval_s, max_hashes=config.publish_max_hashes
        ),
    )


def _cost_model(model: PagedModel, block_bytes: int, block_size: int, device: str) -> CostModel:
    cfg = model.config
    cuda = torch.device(device).type == "cuda"
    return CostModel(
        num_params=float(cfg.num_params),
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        gpu_flops=400e12 if cuda else 2e10,
        host_link_bytes_per_s=25e9 if cuda else 5e9,
        bytes_per_block=block_bytes,
        block_size=block_size,
    )


class Engine:
    """Runs turns of many sessions on one model with continuous batching.

    Thread safety: every public method may be called from any thread; the work happens
    on the engine thread (`start()`), in command order. Event callbacks run on the
    engine thread and must not block.

    Invariants (on the engine thread, between steps): a session has at most one job; a
    job is either waiting for admission (in `_waiting`) or running (in `_running`); a
    running job's `pos` equals its scheduler table's computed tokens.
    """

    def __init__(
        self,
        model: PagedModel,
        config: EngineConfig | None = None,
        *,
        tokenizer: ChatTokenizer | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer: ChatTokenizer = tokenizer or ByteTokenizer()
        # a merging tokenizer: remember the ids generated items were generated as
        self.render_memo = None if self.tokenizer.exact_render else RenderMemo()
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current
            self.device = torch.device("cuda", torch.cuda.current_device())
        if model.device != self.device:
            raise ValueError(f"Engine: model is on {model.device}, config.device is {self.device}")
        bs = config.block_size
        spec = model.config.kv_spec(bs)
        self.kv_store = KVStore(spec, config.num_gpu_blocks, device=self.device)
        hasher = BlockHasher(block_size=bs, secret=config.hash_secret)
        gpu = BlockManager(BlockPool(config.num_gpu_blocks, name="gpu"), hasher)
        host = None
        transfer = None
        if config.num_host_blocks:
            self.host_store: KVStore | None = KVStore(spec, config.num_host_blocks, device="cpu")
            host = BlockManager(BlockPool(config.num_host_blocks, name="host"), hasher)
            transfer = CopyTransferEngine(self.kv_store, self.host_store)
        else:
            self.host_store = None
        self.remote: RemoteKVTier | None = None
        self.fingerprint = model_fingerprint(model) if config.remote_url is not None else ""
        if config.remote_url is not None:
            assert self.host_store is not None
            assert config.hash_secret is not None
            self.remote = RemoteKVTier(
                RedisStore(config.remote_url, timeout_s=config.remote_timeout_s,
                           connect_timeout_s=config.remote_timeout_s),
                self.host_store,
                # blocks are KV of these weights: another model (or revision) of the same
                # shape must never read them
                namespace=f"{config.remote_namespace}:{self.fingerprint}",
                secret=config.hash_secret,
                ttl_s=config.remote_ttl_s,
                read_deadline_s=2.5 * config.remote_timeout_s,
            )  # fmt: skip
        self.cache = TieredKVCache(gpu, host, transfer, remote=self.remote)
        self.publisher: HeldIndexPublisher | None = None
        if config.remote_url is not None and config.advertise_url is not None:
            self.publisher = _publisher(config, hasher, self.tokenizer, self.fingerprint)
        self.scheduler = SessionScheduler(
            self.cache,
            config.scheduler,
            clock=time.monotonic,
            cost=_cost_model(model, spec.bytes_per_block, bs, config.device),
        )
        self.max_position = model.config.max_position
        self._masks = CharMasks(self.tokenizer)
        self._generator = torch.Generator().manual_seed(config.seed)
        self._sessions: dict[str, _Session] = {}
        self._waiting: dict[tuple[str, int], _Job] = {}
        self._running: list[_Job] = []
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._key_counter = 0
        self.num_steps = 0
        self.num_step_tokens = 0
        self.num_step_seqs = 0

    # ------------------------------------------------------------------ public API
    def start(self) -> Engine:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pagedkv-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every session and stop the engine thread (and the remote tier's writer,
        after it sent what is queued)."""
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout)
            self._thread = None
        transfer = self.cache.engine
        if isinstance(transfer, CopyTransferEngine):
            transfer.synchronize()  # no copy may still write into the stores after this
        if self.publisher is not None:
            self.publisher.close()
        if self.remote is not None:
            self.remote.close()

    def open_session(self, session_id: str, *, tenant: str | None = None) -> None:
        """Open a client session (one per WebSocket connection) of `tenant` (default:
        `EngineConfig.tenant`). Its hash chains are salted by the tenant: it can reuse
        only that tenant's cached blocks."""
        self._commands.put(("open", (session_id, tenant)))

    def close_session(self, session_id: str) -> None:
        """Close a session; its running or waiting turn is dropped without events, its
        blocks are released to the hash cache. Unknown ids are ignored."""
        self._commands.put(("close", session_id))

    def submit(self, request: EngineRequest, emit: EventSink) -> None:
        """Queue a turn; `emit` receives its events on the engine thread, ending with
        exactly one `TurnDone` or `TurnFailed` (none if the session closes first)."""
        self._commands.put(("submit", (request, emit)))

    def steer(self, session_id: str, request_id: str) -> None:
        """Ask the running turn `request_id` of `session_id` to end its message at the
        next token boundary (its `TurnDone` then has `incomplete_reason` "steered";
        everything it generated stays computed in the session, for the successor). A
        function call, a finished turn or an unknown id is left alone."""
        self._commands.put(("steer", (session_id, request_id)))

    def call(self, fn: Callable[[Engine], Any]) -> Future[Any]:
        """Run `fn(engine)` on the engine thread between steps; its result (or
        exception) comes back in the future. For stats and checks."""
        fut: Future[Any] = Future()
        self._commands.put(("call", (fn, fut)))
        return fut

    def stats(self) -> dict[str, Any]:
        """Counters, pool use and sessions by state (on the engine thread)."""
        gpu = self.cache.gpu.pool
        host = self.cache.host.pool if self.cache.host is not None else None
        return {
            "scheduler": self.scheduler.metrics.as_dict(),
            "sessions_by_state": self.scheduler.sessions_by_state(),
            "num_sessions": len(self._sessions),
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "num_pinned": self.scheduler.num_pinned,
            "pinned_by_tenant": self.scheduler.pinned_by_tenant(),
            "gpu_blocks": {
                "total": gpu.num_blocks,
                "in_use": gpu.num_in_use,
                "cached": gpu.num_cached,
            },
            "host_blocks": None
            if host is None
            else {"total": host.num_blocks, "in_use": host.num_in_use, "cached": host.num_cached},
            "remote": None if self.remote is None else self.remote.stats.as_dict(),
            "kv_index": None if self.publisher is None else self.publisher.stats.as_dict(),
            "steps": self.num_steps,
            "mean_batch_tokens": self.num_step_tokens / max(self.num_steps, 1),
            "mean_batch_seqs": self.num_step_seqs / max(self.num_steps, 1),
        }

    def render_scope(self, tenant: str | None, extra_keys: bytes = b"") -> bytes:
        """The `RenderMemo` scope of a tenant's turns under one cache key (its
        `cache_key_salt`): what a tenant generated is remembered for that tenant only."""
        name = (tenant or self.config.tenant).encode("utf-8", "surrogatepass")
        return name + b"\x00" + extra_keys

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Drive the engine on the calling thread until no turn has work left, or
        `max_steps` forward steps ran (for tests and single-threaded use). Waiting turns
        are polled until admitted or refused. Returns the number of steps run.

        Raises:
            RuntimeError: the engine thread is running.
        """
        if self._thread is not None:
            raise RuntimeError("Engine.run_until_idle: the engine thread is running")
        start = self.num_steps
        while True:
            self._drain_commands(None)
            self._poll()
            if not self._running and not self._waiting:
                return self.num_steps - start
            if self.num_steps - start >= max_steps:
                return self.num_steps - start
            if any(job.pending for job in self._running):
                self._safe_step()
            else:
                time.sleep(0.001)  # only waiting turns: let the clock move

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            busy = any(job.pending for job in self._running)
            timeout = None if busy else (0.01 if self._waiting else 0.2)
            if not self._drain_commands(timeout):
                break
            self._poll()
            if self.publisher is not None and self.publisher.due():
                self._publish_held()
            if any(job.pending for job in self._running):
                self._safe_step()
        for session_id in list(self._sessions):
            self._close(session_id)

    def _publish_held(self) -> None:
        """Snapshot the held hashes for the publisher thread (between steps: the
        pools are this thread's)."""
        assert self.publisher is not None
        try:
            self.publisher.offer(snapshot_held(self.cache, self.config.publish_max_hashes))
        except Exception:
            _log_failure("kv index snapshot failed")

    def _safe_step(self) -> None:
        try:
            self._step()
        except Exception:  # a bug or a device error: fail the batch, keep serving
            _log_failure("engine step failed")
            for job in list(self._running):
                self._fail(job, "server_error", "internal error in the engine step", 500)

    def _drain_commands(self, timeout: float | None) -> bool:
        """Run queued commands; wait up to `timeout` for the first (None: do not wait).
        Returns False on stop."""
        try:
            cmd = (
                self._commands.get_nowait()
                if timeout is None
                else self._commands.get(timeout=timeout)
            )
        except queue.Empty:
            return True
        while True:
            kind, arg = cmd
            if kind == "stop":
                return False
            try:
                self._run_command(kind, arg)
            except Exception:
                _log_failure(f"engine command {kind} failed")
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _run_command(self, kind: str, arg: Any) -> None:
        if kind == "open":
            session_id, tenant = arg
            self._open(session_id, ephemeral=False, tenant=tenant)
        elif kind == "close":
            self._close(arg)
        elif kind == "submit":
            req, emit = arg
            try:
                self._submit(req, emit)
            except Exception:  # a bug: end this turn with an error, never leave it hanging
                _log_failure("engine submit failed")
                s = self._sessions.get(req.session_id)
                if s is not None and s.job is not None and s.job.req is req:
                    self._fail(s.job, "server_error", "internal error starting the turn", 500)
                else:
                    emit(
                        TurnFailed(
                            req.request_id, "server_error", "internal error starting the turn",
                            500, "server_error",
                        )
                    )  # fmt: skip
        elif kind == "steer":
            session_id, request_id = arg
            s = self._sessions.get(session_id)
            if s is not None and s.job is not None and s.job.req.request_id == request_id:
                s.job.steered = True
        elif kind == "call":
            fn, fut = arg
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self))
                except Exception as exc:
                    fut.set_exception(exc)

    # ------------------------------------------------------------------ sessions
    def _new_key(self, session_id: str) -> tuple[str, int]:
        self._key_counter += 1
        return (session_id, self._key_counter)

    def _open(self, session_id: str, *, ephemeral: bool, tenant: str | None) -> _Session:
        if session_id in self._sessions:
            raise SessionError(f"engine session {session_id!r} is already open")
        s = _Session(session_id, ephemeral, self._new_key(session_id), tenant or self.config.tenant)
        self.scheduler.open_session(s.key, tenant=s.tenant)
        self._sessions[session_id] = s
        return s

    def _close(self, session_id: str) -> None:
        s = self._sessions.pop(session_id, None)
        if s is None:
            return
        if s.job is not None:
            self._drop_job(s.job)
        self.scheduler.close_session(s.key)

    def _reset(self, s: _Session) -> None:
        """Replace the session's scheduler session by a fresh one (blocks released to
        the hash cache, so the next turn's resume finds them)."""
        self.scheduler.close_session(s.key)
        s.key = self._new_key(s.session_id)
        s.held = []
        self.scheduler.open_session(s.key, tenant=s.tenant, extra_keys=s.extra_keys)

    def _drop_job(self, job: _Job) -> None:
        self._waiting.pop(job.session.key, None)
        if job in self._running:
            self._running.remove(job)
        job.session.job = None

    # ------------------------------------------------------------------ turns
    def _submit(self, req: EngineRequest, emit: EventSink) -> None:
        s = self._sessions.get(req.session_id)
        if s is None:
            if not req.ephemeral:
                emit(
                    TurnFailed(
                        req.request_id,
                        "session_not_found",
                        f"no open session {req.session_id!r}",
                        400,
                        "invalid_request_error",
                    )
                )
                return
            s = self._open(req.session_id, ephemeral=True, tenant=req.tenant)
        if s.job is not None:
            emit(
                TurnFailed(
                    req.request_id,
                    "response_already_in_flight",
                    "a response is already running for this session",
                    400,
                    "invalid_request_error",
                )
            )
            return
        target = list(req.prompt_tokens)
        extra = cache_key_salt(req.cache_key)
        if extra != s.extra_keys:  # another prompt_cache_key: another hash chain
            s.extra_keys = extra
            self._reset(s)
        if s.held and target[: len(s.held)] != s.held:
            self._reset(s)  # the conversation does not extend what the session holds
        new = target[len(s.held) :]
        if not new and req.output is not None:
            self._reset(s)  # nothing new but logits are needed: resume it whole
            new = target
        program = None if req.output is None else make_program(req.output, self.tokenizer)
        job = _Job(req, s, emit, program)
        s.job = job
        if not new:  # a warm-up of what the session already holds
            job.cached_tokens = len(target)
            self._finish(job, admitted=False)
            return
        try:
            plan = self.scheduler.begin_turn(s.key, new)
        except OverCapacityError as exc:
            self._fail(
                job,
                "over_capacity",
                exc.detail,
                400 if exc.reason == "too_large" else 503,
                reset=False,
            )
            return
        if plan is None:
            self._waiting[s.key] = job
        else:
            self._admit(job, plan)

    def _poll(self) -> None:
        try:
            self._poll_scheduler()
        except Exception:  # a bug: fail the waiting turns, keep the engine thread alive
            _log_failure("engine poll failed")
            for job in list(self._waiting.values()):
                self._fail(job, "server_error", "internal error while admitting", 500)

    def _poll_scheduler(self) -> None:
        for event in self.scheduler.poll():
            key = event.session_id  # our scheduler ids are the sessions' keys
            job = self._waiting.pop(key, None) if isinstance(key, tuple) else None
            if job is None:
                continue
            if isinstance(event, TurnReady):
                self._admit(job, event.plan)
            elif isinstance(event, TurnRefused) and event.error.reason == "tenant_quota":
                # the tenant's own pinned cap, not the server: the API's rate-limit error
                self._fail(job, "rate_limit_exceeded", event.error.detail, 429, reset=False,
                           error_type="requests")  # fmt: skip
            elif isinstance(event, TurnRefused):
                self._fail(job, "over_capacity", event.error.detail, 503, reset=False)

    def _admit(self, job: _Job, plan: TurnPlan) -> None:
        table = self.cache.gpu.table(job.session.key)
        if table.num_tokens != len(job.req.prompt_tokens):
            self._fail(
                job,
                "server_error",
                f"session holds {table.num_tokens} tokens after admission, expected "
                f"{len(job.req.prompt_tokens)}",
                500,
            )
            return
        job.t_admitted = time.monotonic()
        job.cached_tokens = plan.compute_start
        job.phase = "prefill"
        self._running.append(job)
        job.emit(TurnStarted(job.req.request_id, len(job.req.prompt_tokens), plan.compute_start))
        if plan.restore is not None:
            # the cached prefix is still being copied in, layer by layer: the first step
            # computes from the plan's start, waiting for each layer of it (`_step`)
            job.restore = plan.restore
            job.restore_end_s = time.monotonic() + self.scheduler.cost.transfer_s(
                plan.restore.num_blocks
            )
            job.pos = plan.compute_start
            job.pending = table.tokens[job.pos : table.num_tokens].tolist()
        else:
            self._sync(job, needs_logits=job.program is not None)
        if not job.pending:  # a warm-up served entirely from cache
            self._finish(job)

    def _sync(self, job: _Job, *, needs_logits: bool) -> None:
        """Set `pos`/`pending` from the scheduler's table (the source of truth: an append
        may have been served partly from the hash cache). The scheduler always leaves at
        least one token of a turn to compute, so logits are always available."""
        table = self.cache.gpu.table(job.session.key)
        job.pos = table.num_computed_tokens
        job.pending = table.tokens[job.pos : table.num_tokens].tolist()
        assert job.pending or not needs_logits, "the scheduler left no token to compute"

    def _step(self) -> None:
        if self.config.step_delay_s:
            time.sleep(self.config.step_delay_s)
        cfg = self.config
        budget = cfg.max_batch_tokens
        decoding, now = False, 0.0
        restoring = [j for j in self._running if j.restore is not None]
        if restoring:
            # a restore that already finished is committed now: a failed one is computed
            # again from its valid prefix instead of running a step over bad K/V
            self._commit_restores([j for j in restoring if j.restore and j.restore.done()])
            decoding = any(j.pending and j.phase != "prefill" for j in self._running)
            now = time.monotonic()
        order = [j for j in self._running if j.phase != "prefill"]
        order += [j for j in self._running if j.phase == "prefill"]
        picked: list[tuple[_Job, int]] = []
        chunks: list[SeqChunk] = []
        for job in order:
            if not job.pending:
                continue
            n = len(job.pending)
            if job.phase == "prefill":
                n = min(n, cfg.prefill_chunk_tokens, budget)
                if n <= 0:
                    continue
            if job.restore is not None and decoding and not self._restore_due(job, n, now):
                continue  # the step would wait on its copy: the decodes go first
            table = self.cache.gpu.table(job.session.key)
            chunks.append(SeqChunk(table.block_ids, job.pos, job.pending[:n]))
            picked.append((job, n))
            budget -= n
        restores = [job.restore for job, _ in picked if job.restore is not None]
        waits = _LayerWaits(restores) if restores else None
        batch = build_forward_batch(
            chunks, block_size=cfg.block_size, device=self.device, wait_layer=waits
        )
        logits = self.model(batch, self.kv_store)  # [B, vocab]
        self.num_steps += 1
        self.num_step_tokens += batch.num_tokens
        self.num_step_seqs += batch.num_seqs
        redo: set[int] = set()
        if waits is not None:
            complete = waits.waited >= set(range(self.kv_store.spec.num_layers))
            if not complete:
                self._no_layer_waits()
            redo = self._commit_restores([job for job, _ in picked], redo_all=not complete)
        to_sample: dict[str, list[tuple[int, _Job]]] = {}
        for row, (job, n) in enumerate(picked):
            if id(job) in redo:
                continue  # its restore failed: this step read bad K/V; computed again
            job.pos += n
            del job.pending[:n]
            if job.pending:
                continue  # more prefill chunks to come
            self.scheduler.mark_computed(job.session.key)
            if job.phase == "closing" or job.program is None:
                self._finish(job)
                continue
            job.phase = "decode"
            if job.steered and job.program.can_cut:
                self._apply(job, job.program.cut())  # steered: end the message here
                continue
            mask = job.program.allowed()
            if mask is None:
                self._apply(job, job.program.advance(None))
            else:
                to_sample.setdefault(mask, []).append((row, job))
        for mask, entries in to_sample.items():
            rows = [row for row, _ in entries]
            temps = [job.req.output.temperature for _, job in entries]  # type: ignore[union-attr]
            ids = None if mask == "all" else self._masks.ids(mask, logits.device)
            tokens = sample_rows(logits, rows, ids, temps, self._generator)
            for (_, job), token in zip(entries, tokens, strict=True):
                assert job.program is not None
                self._apply(job, job.program.advance(token))

    def _restore_due(self, job: _Job, num_tokens: int, now: float) -> bool:
        """Whether a job whose prefix is still being copied in joins a step with decodes:
        once what is left of its copy (as the cost model expects it) takes no longer
        than the step's compute of its tokens, so the layer waits stall the decodes in
        that step little (before, they would wait for most of the copy)."""
        if job.restore is None or job.restore.done():
            return True
        left = job.restore_end_s - now
        return left <= self.scheduler.cost.prefill_s(num_tokens, job.pos)

    def _no_layer_waits(self) -> None:
        """The model ran a step without waiting for every layer's copy (it does not call
        `ForwardBatch.wait_layer`): it may have read blocks still being copied in. That
        step is computed again, and restores are whole from now on."""
        log.warning(
            "%s does not call ForwardBatch.wait_layer for every layer; layer-wise "
            "restores are off for this engine (set SchedulerConfig.layerwise_restore=False)",
            type(self.model).__name__,
        )
        self.scheduler.config = dataclasses.replace(self.scheduler.config, layerwise_restore=False)

    def _commit_restores(self, jobs: list[_Job], *, redo_all: bool = False) -> set[int]:
        """Commit the layer-wise restores of `jobs` (after the step that waited on them,
        or before a step when they are done). Returns the ids of the jobs to compute
        again: those whose copy failed (from the first position it did not make valid),
        and with `redo_all` every one (the model did not wait per layer)."""
        redo: set[int] = set()
        for job in jobs:
            if job.restore is None:
                continue
            job.restore = None
            valid = self.scheduler.commit_restore(job.session.key)
            if redo_all or valid < job.pos:  # with redo_all its step read K/V too early
                valid = min(valid, job.pos)
                table = self.cache.gpu.table(job.session.key)
                job.pos = valid
                job.pending = table.tokens[valid : table.num_tokens].tolist()
                job.cached_tokens = min(job.cached_tokens, valid)
                redo.add(id(job))
        return redo

    def _apply(self, job: _Job, step: Step) -> None:
        """Append a decided step's tokens to the session and emit its delta."""
        if job.t_first is None:
            job.t_first = time.monotonic()
            job.emit(OutputStarted(job.req.request_id, job.t_first - job.req.arrival))
        held = self.cache.gpu.table(job.session.key).num_tokens
        if held + len(step.tokens) > self.max_position:
            # Callers reserve room for the whole item before submitting; this is the last
            # guard, so one turn past the context fails alone instead of the batch.
            self._fail(
                job,
                "context_length_exceeded",
                f"the response would grow the conversation to {held + len(step.tokens)} "
                f"tokens, past the model's context of {self.max_position}",
                400,
                error_type="invalid_request_error",
            )
            return
        if step.delta:
            job.emit(OutputDelta(job.req.request_id, step.delta))
        try:
            self.scheduler.append_tokens(job.session.key, step.tokens)
        except OutOfBlocksError as exc:
            self._fail(job, "over_capacity", f"out of KV blocks while decoding: {exc}", 503)
            return
        if step.done:
            job.phase = "closing"
        self._sync(job, needs_logits=not step.done)
        if step.done and not job.pending:
            self._finish(job)

    def _finish(self, job: _Job, *, admitted: bool = True) -> None:
        s = job.session
        now = time.monotonic()
        if admitted:
            table = self.cache.gpu.table(s.key)
            held = table.tokens.tolist()
            self.scheduler.end_turn(s.key)
            s.held = held
        self._drop_job(job)
        if s.ephemeral:
            self._close(s.session_id)
        prompt = len(job.req.prompt_tokens)
        program = job.program
        if self.render_memo is not None and isinstance(program, OutputProgram):
            item = program.item()
            header = self.tokenizer.render_generation_prompt("assistant")
            scope = self.render_scope(s.tenant, s.extra_keys)
            self.render_memo.put(scope, item, [*header, *program.appended])
        arrival = job.req.arrival
        metrics = {
            "ttft_s": None if job.t_first is None else job.t_first - arrival,
            "queue_s": max(job.t_admitted - arrival, 0.0) if admitted else 0.0,
            "total_s": now - arrival,
            "prefill_tokens": prompt - job.cached_tokens,
        }
        job.emit(
            TurnDone(
                job.req.request_id,
                None if program is None else program.item(),
                prompt,
                job.cached_tokens,
                0 if program is None else program.num_tokens,
                metrics,
                None
                if program is None
                else "steered"
                if program.steered
                else "max_output_tokens"
                if program.hit_limit
                else None,
                () if program is None else program.output_ids,
            )
        )

    def _fail(
        self,
        job: _Job,
        code: str,
        message: str,
        status: int,
        *,
        reset: bool = True,
        error_type: str | None = None,
    ) -> None:
        """End a job with an error. `reset` replaces a session whose turn was cut short
        (its table holds uncomputed tokens) by a fresh one."""
        s = job.session
        self._drop_job(job)
        if s.ephemeral:
            self._close(s.session_id)
        elif reset and s.session_id in self._sessions:
            self._reset(s)
        etype = error_type or ("server_error" if status >= 500 else "invalid_request_error")
        job.emit(TurnFailed(job.req.request_id, code, message, status, etype))
