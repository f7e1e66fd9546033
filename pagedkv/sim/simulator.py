"""Replay a workload against the real scheduler on a virtual clock and a metadata-only pool.

One `replay` runs one policy: a `SessionScheduler` over a `TieredKVCache` of plain
`BlockPool`s (no tensors) and a `SimulatedTransferEngine`, driven by the workload's
arrivals. The time model (docs/simulator.md):

- A turn is *submitted* at its arrival, or when its session's previous turn ends if that
  is later (a client sends the next call only after the previous answer).
- It may wait for admission (the scheduler's queue) and for a host-to-GPU copy; it is
  *ready* when the scheduler hands out its `TurnPlan`.
- Its prefill (`CostModel.prefill_s(num_computed, compute_start)`) runs on one GPU
  timeline, first come first served, so recomputation delays everybody behind it.
- Time to first token = end of prefill - submission.
- Decode (`output_len / decode_tokens_per_s`) overlaps other work; the turn ends (and
  the session's connection closes, when the workload says it does) when decode ends.
- Generated tokens are not appended: the next turn's prompt contains them, so its new
  tokens are `next prompt - current sequence` (exactly what `Workload.ideal_hit_ratio`
  assumes), and the output's K/V is computed with the next prompt.
- A turn's K/V is marked computed when its plan is handed out: a later request that
  shares those blocks also prefills later on the FIFO timeline, so sharing early is
  never faster than the GPU could have been.

Events are processed in time order: decode ends, then finished copies and deadlines
(`poll`), then arrivals. The clock jumps from event to event.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.scheduler.errors import OverCapacityError
from pagedkv.scheduler.scheduler import Event, SessionScheduler, TurnPlan, TurnReady
from pagedkv.sim.cluster import ClusterSpec, Router, SimRemoteStore, SimRemoteTier
from pagedkv.sim.policies import HardwareProfile, Policy, SimSettings, scheduler_config
from pagedkv.sim.tokens import PromptTokens
from pagedkv.sim.workload import Workload
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import Direction, SimulatedTransferEngine, TransferHandle

__all__ = ["PolicyRun", "TurnRecords", "replay"]

_SECRET = b"pagedkv-simulator"  # fixed: hashes (and so any collision) are reproducible
_EPS_S = 1e-6  # a queue timeout fires strictly after its deadline
NOT_RUN, DONE, REFUSED = 0, 1, 2


class _Clock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _RecordingEngine(SimulatedTransferEngine):
    """A simulated engine that reports each batch's completion time to the event loop."""

    def __init__(self, *, on_submit: Callable[[float], None], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._on_submit = on_submit

    def submit(
        self,
        direction: Direction,
        src_ids: list[int],
        dst_ids: list[int],
        *,
        layered: bool = False,
    ) -> TransferHandle:
        handle = super().submit(direction, src_ids, dst_ids)  # layer-wise timing is modelled
        if handle.ready_at is not None and src_ids:
            self._on_submit(handle.ready_at)
        return handle

    def hold_until(self, t: float) -> None:
        """No restore starts before `t` (what comes in over the network lands first)."""
        self._link_free_at["restore"] = max(self._link_free_at["restore"], t)


@dataclass(eq=False)
class TurnRecords:
    """Per-request outcome of one replay (arrays indexed like `workload.requests`).

    `status`: 0 never ran (a bug, reported as unfinished), 1 done, 2 refused. Times are
    virtual seconds; NaN where the turn did not get that far.
    """

    turn_index: np.ndarray  # int32 [n]
    input_len: np.ndarray  # int64 [n]: the request's prompt length
    status: np.ndarray  # int8 [n]
    submit_s: np.ndarray  # float64 [n]
    admit_s: np.ndarray  # left the admission queue (= submit_s when it never waited)
    ready_s: np.ndarray  # plan handed out (after any restore copy)
    prefill_start_s: np.ndarray  # its prefill started on the GPU timeline
    first_token_s: np.ndarray  # its prefill ended
    prompt_tokens: np.ndarray  # int64 [n]
    computed: np.ndarray
    hit_pinned: np.ndarray
    hit_gpu: np.ndarray
    hit_host: np.ndarray
    replica: np.ndarray  # int16 [n]: the replica that served it (-1: none)

    @classmethod
    def empty(cls, workload: Workload) -> TurnRecords:
        n = workload.num_requests

        def nan() -> np.ndarray:
            return np.full(n, np.nan)

        def zeros() -> np.ndarray:
            return np.zeros(n, dtype=np.int64)

        return cls(
            turn_index=np.fromiter((r.turn_index for r in workload.requests), np.int32, n),
            input_len=np.fromiter((r.input_len for r in workload.requests), np.int64, n),
            status=np.zeros(n, dtype=np.int8),
            submit_s=nan(),
            admit_s=nan(),
            ready_s=nan(),
            prefill_start_s=nan(),
            first_token_s=nan(),
            prompt_tokens=zeros(),
            computed=zeros(),
            hit_pinned=zeros(),
            hit_gpu=zeros(),
            hit_host=zeros(),
            replica=np.full(n, -1, dtype=np.int16),
        )

    @property
    def ttft_s(self) -> np.ndarray:
        """Modelled time to first token per request (NaN unless done)."""
        out: np.ndarray = self.first_token_s - self.submit_s
        return out


@dataclass(eq=False)
class PolicyRun:
    """Everything one policy's replay measured."""

    policy: Policy
    gpu_blocks: int
    host_blocks: int
    block_size: int
    bytes_per_block: int
    max_pinned_sessions: int
    idle_ttl_s: float | None
    metrics: dict[str, int]
    turns: TurnRecords
    refusals: dict[str, int]
    peak_gpu_in_use: int = 0
    peak_host_in_use: int = 0
    peak_pinned: int = 0
    end_gpu_in_use: int = 0
    end_host_in_use: int = 0
    end_sessions_open: int = 0
    sim_end_s: float = 0.0
    wall_s: float = 0.0
    invariant_checks: int = 0
    # a cluster replay (`cluster.ClusterSpec`): its routing, and per replica what it did
    routing: str | None = None
    replicas: list[dict[str, float]] = field(default_factory=list)
    remote: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Conn:
    """One workload session's current connection (a scheduler session while open)."""

    key: str
    sched_id: str | None = None
    num_opened: int = 0
    seq_len: int = 0  # tokens the server holds for it (the last completed prompt)
    held: int = -1  # the request whose prompt those tokens are (-1: none)
    busy: bool = False  # a turn is submitted and has not ended
    backlog: deque[int] = field(default_factory=deque)
    node: _Node | None = None  # the replica its open connection is on


class _Node:
    """One replica: its scheduler over its own tiers, and its own prefill timeline."""

    def __init__(
        self,
        index: int,
        replay: _Replay,
        policy: Policy,
        settings: SimSettings,
        profile: HardwareProfile,
        *,
        gpu_blocks: int,
        remote: SimRemoteStore | None,
    ) -> None:
        tpb = replay.workload.tokens_per_block
        self.index = index
        self.clock = replay.clock
        self.cost = profile.cost_model(tpb)
        hasher = BlockHasher(block_size=tpb, secret=_SECRET)
        self.use_host = use_host = policy.host_tier and settings.host_blocks > 0
        host = BlockManager(BlockPool(settings.host_blocks, name="host"), hasher)
        self.engine = engine = _RecordingEngine(
            bytes_per_block=self.cost.bytes_per_block,
            bandwidth_bytes_per_s=self.cost.host_link_bytes_per_s,
            latency_s=10e-6,
            clock=self.clock,
            on_submit=lambda t: heapq.heappush(replay.xfer_times, t),
        )
        gpu = BlockManager(BlockPool(gpu_blocks, name="gpu"), hasher)
        self.remote = (
            SimRemoteTier(remote, self, host_blocks=settings.host_blocks)
            if remote is not None and use_host
            else None
        )
        cache = TieredKVCache(
            gpu,
            host if use_host else None,
            engine if use_host else None,
            remote=self.remote,  # type: ignore[arg-type]  # the metadata-only stand-in
        )
        self.config = scheduler_config(policy, settings)
        self.sched = SessionScheduler(cache, self.config, clock=self.clock, cost=self.cost)
        self.gpu_pool = gpu.pool
        self.host_pool = host.pool if use_host else None
        self.queued: dict[str, int] = {}  # scheduler id -> request, while in the queue
        # scheduler id -> (admitted at, copy start, copy end, blocks) of the restore a
        # turn waits on
        self.restore_of: dict[str, tuple[float, float, float, int]] = {}
        self.gpu_free_s = 0.0  # when the prefill timeline is next free
        self.num_open = 0  # connections open on it (the router's load)
        self.num_requests = 0
        self.num_computed = 0
        self.busy_s = 0.0  # prefill seconds
        self.peak_gpu_in_use = self.peak_host_in_use = self.peak_pinned = 0

    def note_restore(self, sid: str) -> None:
        """Remember the restore copy a just-admitted turn waits on (for the layer-wise
        timing)."""
        handle = self.sched.cache.pending_transfer(sid)
        if handle is None or handle.direction != "restore" or handle.ready_at is None:
            return
        n = handle.num_blocks
        end = handle.ready_at
        self.restore_of[sid] = (self.clock.now, end - self.engine.duration(n), end, n)

    def block_engine(self, until_s: float) -> None:
        """The engine thread is blocked until `until_s` (a synchronous remote read): no
        prefill starts and no copy is submitted before it."""
        self.gpu_free_s = max(self.gpu_free_s, until_s)
        self.engine.hold_until(until_s)

    def note_peaks(self) -> None:
        self.peak_gpu_in_use = max(self.peak_gpu_in_use, self.gpu_pool.num_in_use)
        if self.host_pool is not None:
            self.peak_host_in_use = max(self.peak_host_in_use, self.host_pool.num_in_use)
        self.peak_pinned = max(self.peak_pinned, self.sched.num_pinned)

    def held_blocks(self, hashes: list[bytes], contents: list[bytes]) -> int:
        """Blocks of a chain's prefix this replica holds (GPU, then host), for routing."""
        cache = self.sched.cache
        n = len(cache.gpu.pool.match_chain(hashes, contents, len(hashes)))
        if self.host_pool is not None:
            match = self.host_pool.match
            while n < len(hashes) and match(hashes[n], contents[n]) is not None:
                n += 1
        return n


class _Replay:
    def __init__(
        self,
        workload: Workload,
        tokens: PromptTokens,
        policy: Policy,
        settings: SimSettings,
        profile: HardwareProfile,
        *,
        gpu_blocks: int,
        check_every: int,
        on_progress: Callable[[int], None] | None,
        cluster: ClusterSpec | None = None,
    ) -> None:
        self.workload = workload
        self.requests = workload.requests
        self.tokens = tokens
        self.clock = _Clock()
        self.decode_tps = profile.decode_tokens_per_s
        self.xfer_times: list[float] = []  # heap of copy completion times
        store = None
        if cluster is not None and cluster.routing.remote:
            store = SimRemoteStore(
                cluster.remote,
                bytes_per_block=profile.kv_bytes_per_token * workload.tokens_per_block,
                clock=self.clock,
            )
        self.store = store
        self.nodes = [
            _Node(k, self, policy, settings, profile, gpu_blocks=gpu_blocks, remote=store)
            for k in range(1 if cluster is None else cluster.replicas)
        ]
        self.router = Router(cluster, self.nodes) if cluster is not None else None
        self.cluster = cluster
        config = self.nodes[0].config
        use_host = self.nodes[0].use_host
        self.run = PolicyRun(
            policy=policy,
            gpu_blocks=gpu_blocks,
            host_blocks=settings.host_blocks if use_host else 0,
            block_size=workload.tokens_per_block,
            bytes_per_block=self.nodes[0].cost.bytes_per_block,
            max_pinned_sessions=config.max_pinned_sessions,
            idle_ttl_s=config.idle_ttl_s if use_host else None,
            metrics={},
            turns=TurnRecords.empty(workload),
            refusals={},
            routing=None if cluster is None else cluster.routing.name,
        )
        self.rec = self.run.turns
        self.best_of_both = policy.infinite_gpu and policy.pin_sessions
        # the ideal's cheap filter: a turn whose prefix seen earlier (in arrival order)
        # is no longer than what its session holds is not probed
        self.servable = workload.turn_ideal().servable if self.best_of_both else None
        self.disconnect = workload.disconnects_after()
        self.conns: dict[str, _Conn] = {}
        self.running: dict[str, tuple[int, _Conn]] = {}  # scheduler id -> (request, conn)
        self.decode_heap: list[tuple[float, int, int]] = []  # (end, request, request)
        self.refusals: Counter[str] = Counter()
        self.policy = policy
        self.check_every = check_every
        self.on_progress = on_progress
        self.num_finished = 0

    # ------------------------------------------------------------------ main loop
    def replay(self) -> PolicyRun:
        t0 = time.perf_counter()
        clock, reqs, nodes = self.clock, self.requests, self.nodes
        arrivals = [r.arrival_s for r in reqs]
        n, nxt, steps = len(reqs), 0, 0
        decode_heap, xfer_times = self.decode_heap, self.xfer_times
        run = self.run
        while True:
            now = clock.now
            t = arrivals[nxt] if nxt < n else math.inf
            if decode_heap and decode_heap[0][0] < t:
                t = decode_heap[0][0]
            if xfer_times and xfer_times[0] < t:
                t = xfer_times[0]
            for node in nodes:
                deadline = node.sched.next_deadline()
                if deadline is not None:
                    t = min(t, deadline if deadline > now else now + _EPS_S)
            if t == math.inf:
                break
            if t > now:
                clock.now = now = t
            while xfer_times and xfer_times[0] <= now:
                heapq.heappop(xfer_times)
            while decode_heap and decode_heap[0][0] <= now:
                self._end_turn(heapq.heappop(decode_heap)[2])
            for node in nodes:
                self._handle(node.sched.poll())
            if nxt < n and arrivals[nxt] <= now:
                while nxt < n and arrivals[nxt] <= now:
                    self._arrive(nxt)
                    nxt += 1
                for node in nodes:
                    self._handle(node.sched.poll())
            for node in nodes:
                if node.queued:
                    self._note_admissions(node)
                node.note_peaks()
            steps += 1
            if self.check_every and steps % self.check_every == 0:
                for node in nodes:
                    node.sched.check_invariants()
                run.invariant_checks += 1
        if self.check_every:
            for node in nodes:
                node.sched.check_invariants()
            run.invariant_checks += 1
        metrics: Counter[str] = Counter()
        for node in nodes:
            metrics.update(node.sched.metrics.as_dict())
        run.metrics = dict(metrics)
        run.refusals = dict(sorted(self.refusals.items()))
        run.peak_gpu_in_use = max(node.peak_gpu_in_use for node in nodes)
        run.peak_host_in_use = max(node.peak_host_in_use for node in nodes)
        run.peak_pinned = max(node.peak_pinned for node in nodes)
        run.end_gpu_in_use = sum(node.gpu_pool.num_in_use for node in nodes)
        run.end_host_in_use = sum(
            node.host_pool.num_in_use for node in nodes if node.host_pool is not None
        )
        run.end_sessions_open = sum(sum(node.sched.sessions_by_state().values()) for node in nodes)
        if self.cluster is not None:
            run.replicas = [
                {
                    "requests": node.num_requests,
                    "computed_tokens": node.num_computed,
                    "prefill_s": round(node.busy_s, 6),
                    "peak_gpu_blocks": node.peak_gpu_in_use,
                    "remote_blocks_read": node.remote.blocks_read if node.remote else 0,
                }
                for node in nodes
            ]
            if self.store is not None:
                run.remote = self.store.stats(nodes)
            assert self.router is not None
            run.remote.update(self.router.counts)
        run.sim_end_s = clock.now
        run.wall_s = time.perf_counter() - t0
        if self.on_progress is not None and self.num_finished % 256:
            self.on_progress(self.num_finished % 256)  # the rest since the last report
        return run

    # ------------------------------------------------------------------ turns
    def _arrive(self, i: int) -> None:
        r = self.requests[i]
        key = r.session_id if r.session_id is not None else f"#{i}"
        conn = self.conns.get(key)
        if conn is None:
            conn = self.conns[key] = _Conn(key)
        if conn.busy:
            conn.backlog.append(i)  # the previous turn has not ended yet
        else:
            self._start(i, conn)

    def _start(self, i: int, conn: _Conn) -> None:
        r = self.requests[i]
        self.rec.submit_s[i] = self.clock.now
        if conn.sched_id is not None and (
            r.reconnect
            or r.input_len <= conn.seq_len
            # a rewritten history (compaction, an edit, a rewind): the session holds KV of
            # tokens this prompt no longer has. Like the engine, close it (its full blocks
            # stay in the hash cache) and resume: only the common prefix of full blocks
            # is reused, everything from the divergence is computed again
            or not self.tokens.shares_prefix(conn.held, i, conn.seq_len)
            # the ideal takes the longer of its own KV and what the cache has
            or (self.best_of_both and self._cache_beats_session(i, conn))
        ):
            self._close(conn)  # a new connection re-sends the full history
        sid = conn.sched_id
        try:
            if sid is None:
                prompt = self.tokens.tokens(i, 0, r.input_len)
                node = self.nodes[0] if self.router is None else self.router.pick(r, prompt)
                conn.num_opened += 1
                sid = f"{conn.key}~{conn.num_opened}"
                plan = node.sched.resume(sid, prompt, tenant=r.tenant)
                conn.sched_id, conn.seq_len, conn.node = sid, 0, node
                node.num_open += 1
            else:
                assert conn.node is not None
                node = conn.node
                plan = node.sched.begin_turn(sid, self.tokens.tokens(i, conn.seq_len, r.input_len))
        except OverCapacityError as err:
            self._refused(i, conn, err.reason)
            return
        conn.busy = True
        self.running[sid] = (i, conn)
        if plan is not None:
            self._ready(i, conn, plan)
            return
        if node.sched.session(sid).is_queued:
            node.queued[sid] = i
        else:
            self.rec.admit_s[i] = self.clock.now  # admitted; waiting for a restore copy
            node.note_restore(sid)

    def _cache_beats_session(self, i: int, conn: _Conn) -> bool:
        """Whether request `i` finds a longer servable prefix in the GPU cache than the
        tokens its pinned session holds."""
        assert self.servable is not None and conn.node is not None
        held = conn.seq_len
        if self.servable[i] <= held:
            return False
        r = self.requests[i]
        tpb = self.workload.tokens_per_block
        probe = conn.node.sched.cache.probe_prefix(
            self.tokens.tokens(i, 0, r.input_len), tenant=r.tenant
        )
        return min(len(probe.gpu_hits), (r.input_len - 1) // tpb) * tpb > held

    def _ready(self, i: int, conn: _Conn, plan: TurnPlan) -> None:
        now = self.clock.now
        rec = self.rec
        node = conn.node
        assert node is not None
        node.sched.mark_computed(plan.session_id)
        if math.isnan(rec.admit_s[i]):
            rec.admit_s[i] = now
        cost = node.cost
        took = cost.prefill_s(plan.num_computed, plan.compute_start)
        start = max(now, node.gpu_free_s)
        end = start + took
        restore = node.restore_of.pop(plan.session_id, None)  # type: ignore[call-overload]
        layered = restore is not None and self.policy.layerwise
        first_layer = now
        if layered:
            _admitted, copy_start, copy_end, _n = restore
            first_layer = copy_start + (copy_end - copy_start) / cost.num_layers
            start = max(node.gpu_free_s, first_layer)
            end = cost.layerwise_end_s(
                gpu_start_s=start, copy_start_s=copy_start, copy_end_s=copy_end, prefill_s=took
            )
        node.gpu_free_s = end
        node.busy_s += took
        node.num_requests += 1
        node.num_computed += plan.num_computed
        # ready when its first layer landed (layer-wise), so `start - ready` is the wait
        # behind other prefills and `ready - admit` the restore's own wait
        rec.ready_s[i] = min(now, first_layer) if layered else now
        rec.prefill_start_s[i] = start
        rec.first_token_s[i] = end
        rec.prompt_tokens[i] = plan.num_tokens
        rec.computed[i] = plan.num_computed
        rec.hit_pinned[i] = plan.hit_pinned
        rec.hit_gpu[i] = plan.hit_gpu
        rec.hit_host[i] = plan.hit_host
        rec.replica[i] = node.index
        conn.seq_len, conn.held = plan.num_tokens, i
        decode_end = end + self.requests[i].output_len / self.decode_tps
        heapq.heappush(self.decode_heap, (decode_end, i, i))

    def _end_turn(self, i: int) -> None:
        sid = self.requests[i].session_id
        conn = self.conns[sid if sid is not None else f"#{i}"]
        assert conn.sched_id is not None and conn.node is not None
        conn.node.sched.end_turn(conn.sched_id)
        del self.running[conn.sched_id]
        self.rec.status[i] = DONE
        self._after_turn(i, conn)

    def _refused(self, i: int, conn: _Conn, reason: str) -> None:
        self.rec.status[i] = REFUSED
        self.refusals[reason] += 1
        self._after_turn(i, conn)

    def _after_turn(self, i: int, conn: _Conn) -> None:
        conn.busy = False
        self.num_finished += 1
        if self.on_progress is not None and self.num_finished % 256 == 0:
            self.on_progress(256)
        if self.disconnect[i] and conn.sched_id is not None:
            self._close(conn)
        if self.requests[i].last_turn:
            assert not conn.backlog, f"requests follow the last turn of {conn.key!r}"
            del self.conns[conn.key]
        elif conn.backlog:
            self._start(conn.backlog.popleft(), conn)

    def _close(self, conn: _Conn) -> None:
        assert conn.sched_id is not None and conn.node is not None
        conn.node.sched.close_session(conn.sched_id)
        conn.node.num_open -= 1
        conn.sched_id, conn.seq_len, conn.held, conn.node = None, 0, -1, None

    def _handle(self, events: list[Event]) -> None:
        for ev in events:
            i, conn = self.running[ev.session_id]  # type: ignore[index]
            assert conn.node is not None
            conn.node.queued.pop(ev.session_id, None)  # type: ignore[call-overload]
            if isinstance(ev, TurnReady):
                self._ready(i, conn, ev.plan)
            else:
                del self.running[ev.session_id]  # type: ignore[arg-type]
                self._refused(i, conn, ev.error.reason)

    def _note_admissions(self, node: _Node) -> None:
        """Stamp the admission time of turns that left the queue to wait for a copy."""
        if node.sched.num_queued == len(node.queued):
            return  # every turn we queued is still queued (leaving it is how they differ)
        now = self.clock.now
        for sid, i in list(node.queued.items()):
            if not node.sched.session(sid).is_queued:
                del node.queued[sid]
                self.rec.admit_s[i] = now
                node.note_restore(sid)


def replay(
    workload: Workload,
    policy: Policy,
    settings: SimSettings,
    profile: HardwareProfile,
    *,
    tokens: PromptTokens | None = None,
    gpu_blocks: int | None = None,
    check_every: int = 0,
    on_progress: Callable[[int], None] | None = None,
    cluster: ClusterSpec | None = None,
) -> PolicyRun:
    """Replay `workload` under one policy and return what it measured.

    Args:
        tokens: the workload's synthesised tokens (built when None; pass one to share
            it between policies).
        gpu_blocks: GPU pool size; default `settings.gpu_blocks` (the ideal policy
            needs a bigger pool, see `policies.ideal_gpu_blocks`).
        check_every: run `check_invariants()` every this many event steps (0: never;
            tests only, it is O(pool size)).
        on_progress: called with the number of requests finished since the last call.
        cluster: replay on `cluster.replicas` replicas, each running `policy` with the
            memory of `settings` (and `gpu_blocks`) and its own prefill timeline, behind
            `cluster.routing`, sharing `cluster.remote` when the routing has a remote
            tier (None: one server).
    """
    return _Replay(
        workload,
        tokens if tokens is not None else PromptTokens(workload),
        policy,
        settings,
        profile,
        gpu_blocks=settings.gpu_blocks if gpu_blocks is None else gpu_blocks,
        check_every=check_every,
        on_progress=on_progress,
        cluster=cluster,
    ).replay()
