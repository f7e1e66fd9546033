"""SessionScheduler: connection-scoped sessions on a two-tier paged KV cache.

Event driven: no threads, no sleeps. A server (or the simulator) calls `begin_turn`,
`append_tokens`, `mark_computed`, `end_turn`, `close_session`, and `poll()` whenever time
passes or a copy may have finished; the injected clock is the only source of time. All
calls must come from one thread.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from pagedkv.errors import OutOfBlocksError
from pagedkv.hashing import TokenInput, as_token_array
from pagedkv.tiered import Backup, TieredKVCache, TransferResult
from scheduler.config import SchedulerConfig
from scheduler.cost import CostModel
from scheduler.errors import OverCapacityError, SessionError
from scheduler.events import Event, TurnPlan, TurnReady, TurnRefused
from scheduler.eviction import IdleGapModel, IdleSessions, choose_action
from scheduler.metrics import SchedulerMetrics
from scheduler.session import Session, SessionState

S = SessionState


@dataclass(slots=True)
class _Hits:
    pinned: int = 0
    gpu: int = 0
    host: int = 0


@dataclass(frozen=True, slots=True)
class _Need:
    """What starting a turn takes: new GPU blocks, the GPU prefix hits it will take (the
    in-use count grows by the new blocks plus whichever hits are cached at that moment:
    evicting a victim can turn a shared hit into a cached one), and a pin slot or not."""

    blocks: int
    hits: tuple[int, ...]
    slot: bool


class SessionScheduler:
    """Admission, pinning, idle offload/eviction and reconnect for many sessions.

    Invariants (see `check_invariants`): pinned sessions (ACTIVE + IDLE) never exceed
    `max_pinned_sessions` (except ACTIVE ones after the cap was lowered mid-turn); every
    pinned session has its blocks on the GPU; an IDLE session is in the idle LRU; a queued
    session is in exactly one queue; an ACTIVE session is never chosen as a victim.
    """

    def __init__(
        self,
        cache: TieredKVCache,
        config: SchedulerConfig,
        *,
        clock: Callable[[], float],
        cost: CostModel | None = None,
    ) -> None:
        self.cache = cache
        self.config = config
        self.clock = clock
        self.cost = cost or CostModel(block_size=cache.block_size)
        if self.cost.block_size != cache.block_size:
            raise ValueError(
                f"CostModel.block_size={self.cost.block_size} differs from the cache's "
                f"block_size={cache.block_size}"
            )
        self.metrics = SchedulerMetrics()
        self._sessions: dict[object, Session] = {}
        self._queues: dict[int, OrderedDict[object, Session]] = {}
        self._idle = IdleSessions()
        self.idle_gaps = IdleGapModel()  # learned from every turn that follows an idle gap
        self._offloaded: OrderedDict[object, Session] = OrderedDict()  # host-pinned, LRU
        self._waiting: dict[object, _Hits] = {}  # ACTIVE, restore copy in flight
        self._releasing: dict[object, int] = {}  # offloading: GPU blocks freed on completion
        self._backups: dict[object, Session] = {}  # backups in flight: id -> who started it
        # released with their own backup in flight: its GPU sources free when it completes
        self._backup_releasing: set[object] = set()
        self._pinned = 0
        self._pinned_by_tenant: Counter[str] = Counter()
        self._events: deque[Event] = deque()
        self._blocked_by_tenant = False  # set by _make_room: short only of a tenant slot
        self._block_limit = int(config.high_watermark * cache.gpu.pool.num_blocks)

    # ------------------------------------------------------------------ queries
    def session(self, session_id: object) -> Session:
        """The record of an open session.

        Raises:
            SessionError: unknown (or closed) session id.
        """
        s = self._sessions.get(session_id)
        if s is None:
            raise SessionError(f"unknown session id {session_id!r}")
        return s

    def block_ids(self, session_id: object) -> list[int]:
        """The GPU block table of a running session (changes as tokens are appended).

        Raises:
            SessionError: the session has no running turn.
        """
        self._active(session_id, "block_ids")
        return list(self.cache.gpu.table(session_id).block_ids)

    def num_tokens(self, session_id: object) -> int:
        """Tokens in a session's sequence (0 for a new session)."""
        return self._seq_len(self.session(session_id))

    @property
    def num_pinned(self) -> int:
        return self._pinned

    @property
    def num_queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def sessions_by_state(self) -> dict[str, int]:
        counts = Counter(
            S.QUEUED.value if s.is_queued else s.state.value for s in self._sessions.values()
        )
        return {state.value: counts.get(state.value, 0) for state in SessionState}

    # ------------------------------------------------------------------ lifecycle
    def open_session(
        self,
        session_id: object,
        *,
        tenant: str = "default",
        priority: int = 0,
        extra_keys: bytes = b"",
    ) -> Session:
        """Register a new connection's session (no blocks until its first turn).

        `extra_keys` separate caches within a tenant (a LoRA adapter, a model revision).

        Raises:
            SessionError: the id is open, or still has a copy in flight from a session
                closed a moment ago. TypeError: tenant, priority or extra_keys mistyped.
        """
        if session_id in self._sessions:
            raise SessionError(f"session id {session_id!r} is already open")
        if self.cache.location(session_id) is not None:
            raise SessionError(
                f"session id {session_id!r} was closed but its copy is still in flight; "
                "use a fresh id (or poll() until the copy completes)"
            )
        if not isinstance(tenant, str):
            raise TypeError(f"tenant must be a str, got {type(tenant).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {priority!r}")
        if not isinstance(extra_keys, bytes):
            raise TypeError(f"extra_keys must be bytes, got {type(extra_keys).__name__}")
        now = self.clock()
        s = Session(session_id, tenant, priority, now, extra_keys=extra_keys, last_active=now)
        self._sessions[session_id] = s
        return s

    def resume(
        self,
        session_id: object,
        tokens: TokenInput,
        *,
        tenant: str = "default",
        priority: int = 0,
        extra_keys: bytes = b"",
    ) -> TurnPlan | None:
        """Open a session for a client that reconnects with its full token history.

        The longest cached prefix (GPU, then host) is reused; only the rest is computed.
        Returns the plan, or None when the turn waits (a `TurnReady` comes from `poll`).

        Raises:
            As `open_session` and `begin_turn`; on any error the session is not opened.
        """
        self.open_session(session_id, tenant=tenant, priority=priority, extra_keys=extra_keys)
        try:
            return self.begin_turn(session_id, tokens)
        except BaseException:
            del self._sessions[session_id]
            raise

    def begin_turn(self, session_id: object, new_tokens: TokenInput) -> TurnPlan | None:
        """Start a turn with the client's new input tokens (at least one).

        Returns the plan when the turn can run now, None when it waits for room or for a
        host-to-GPU copy (its `TurnReady` or `TurnRefused` then comes from `poll`).

        Raises:
            SessionError: unknown session, or a turn is already running or queued.
            TypeError / ValueError: bad or empty tokens.
            OverCapacityError: the queue is full, or the turn can never fit; the session
                is left as it was.
        """
        s = self.session(session_id)
        if s.state not in (S.NEW, S.IDLE, S.OFFLOADED, S.DROPPED) or s.is_queued:
            state = "queued" if s.is_queued else s.state.value
            raise SessionError(
                f"begin_turn {session_id!r}: session is {state}; "
                "expected new, idle, offloaded or dropped (one turn at a time)"
            )
        # a private copy: the caller may reuse its buffer while the turn waits
        tokens = np.array(as_token_array(new_tokens, what="new_tokens"), copy=True)
        if len(tokens) == 0:
            raise ValueError(f"begin_turn {session_id!r}: new_tokens is empty")
        total = self._seq_len(s) + len(tokens)
        if -(-total // self.cache.block_size) > self._block_limit:
            raise self._refuse(
                s, "too_large", f"{total} tokens need more blocks than the GPU watermark "
                f"allows ({self._block_limit})",
            )  # fmt: skip
        if self.num_queued >= self.config.max_queue and self._queues_ahead(s):
            raise self._refuse(s, "queue_full", f"{self.num_queued} turns already waiting")
        if s.idle_since is not None:  # once per idle period (not again for a retry)
            self.idle_gaps.observe(max(0.0, self.clock() - s.idle_since))
            s.idle_since = None
        s.pending_tokens = tokens
        if not self._queues_ahead(s):
            started = self._try_start(s)
            if started is not None:
                return started if isinstance(started, TurnPlan) else None
            if self.num_queued >= self.config.max_queue:
                s.pending_tokens = None
                raise self._refuse(s, "queue_full", f"{self.num_queued} turns already waiting")
        s.queued_at = self.clock()
        self._queues.setdefault(s.priority, OrderedDict())[session_id] = s
        self.metrics.admission_waits += 1
        self._admit_queued()  # heads blocked only by their tenant's cap do not block it
        return None

    def append_tokens(self, session_id: object, token_ids: TokenInput) -> np.ndarray:
        """Append generated tokens to a running session; returns their int64 slots.

        When the pool is short, idle sessions are dropped (freeing blocks at once; their
        full blocks stay in the hash cache) to make room.

        Raises:
            SessionError: the session has no running turn.
            OutOfBlocksError: no room even after dropping idle sessions; the session is
                unchanged (other idle sessions may have been dropped).
        """
        s = self._active(session_id, "append_tokens")
        gpu = self.cache.gpu
        if isinstance(token_ids, (list, tuple)) and len(token_ids) == 1:  # a decode step
            token = token_ids[0]
            if gpu.table(session_id).num_tokens % self.cache.block_size or gpu.pool.num_available:
                return np.array([gpu.append_token(session_id, token)], dtype=np.int64)
        tokens = as_token_array(token_ids)
        table = self.cache.gpu.table(session_id)
        need = -(-(table.num_tokens + len(tokens)) // self.cache.block_size) - len(table.block_ids)
        if need > 0:
            self._make_room(s, _Need(need, (), False), immediate=True)
        r = self.cache.gpu.append_tokens(session_id, tokens)
        return r.slot_mapping

    def mark_computed(self, session_id: object) -> None:
        """Record that the model wrote K/V for every token of a running session."""
        self._active(session_id, "mark_computed")
        self.cache.gpu.mark_computed(session_id)

    def end_turn(self, session_id: object) -> None:
        """Finish a running turn: the session becomes IDLE and stays pinned (or, with
        `pin_sessions=False`, is released to the hash cache). Waiting turns are admitted
        at the next `poll()` (so a client that closes right after its last turn does not
        cause a wasted offload first).

        Raises:
            SessionError: no running turn, or tokens were appended but never computed.
        """
        s = self._active(session_id, "end_turn")
        table = self.cache.gpu.table(session_id)
        if table.num_computed_tokens != table.num_tokens:
            raise SessionError(
                f"end_turn {session_id!r}: {table.num_tokens - table.num_computed_tokens} "
                "tokens were never computed (call mark_computed after the forward pass)"
            )
        self.metrics.turns_completed += 1
        s.last_active = s.idle_since = self.clock()
        s.num_turns += 1
        if self.config.pin_sessions:
            s.state = S.IDLE
            self._idle.add(s)
            self._backup(s)
            self._enforce_cap()
        else:
            self._unpin(s)
            if self.config.offload_on_release and self.cache.host is not None:
                self._offload(s, reason="release")
            else:
                self._drop(s, reason="release")

    def close_session(self, session_id: object, *, offload: bool | None = None) -> None:
        """Close a session in any state; everything it held is released (its full blocks
        stay in the hash caches). Safe while a turn runs or a copy is in flight.

        With a host tier, an IDLE session's full blocks are first written through to the
        host (a `backup`) when `offload` (default: `config.offload_on_close`) and the
        host has room: a dropped connection that comes back after the GPU reclaimed them
        is then served from the host instead of recomputing. Pass `offload=False` when
        the client is known to be gone for good.

        Raises:
            SessionError: unknown session id.
        """
        s = self.session(session_id)
        write_through = self.config.offload_on_close if offload is None else offload
        self._queues.get(s.priority, OrderedDict()).pop(session_id, None)
        self._idle.remove(s)
        self._offloaded.pop(session_id, None)
        self._waiting.pop(session_id, None)
        self._releasing.pop(session_id, None)
        if s.is_pinned:
            self._unpin(s)
        if (
            write_through
            and s.state == S.IDLE
            and self.cache.host is not None
            and not self.cache.is_pending(Backup(session_id))  # one is on its way already
        ):
            # only full blocks are findable by hash, so a backup of them is all a later
            # reconnect can use; the copy holds its sources and completes on its own. With
            # no host room, or an engine that refuses, the session is just released
            with contextlib.suppress(OutOfBlocksError, RuntimeError, ValueError):
                self.cache.backup(session_id)
        if self.cache.location(session_id) is not None:
            self.cache.free(session_id)
        s.state = S.CLOSED
        s.history = s.pending_tokens = None
        s.queued_at = None
        del self._sessions[session_id]
        self._admit_queued()

    def set_max_pinned_sessions(self, cap: int) -> None:
        """Change the pinned-session cap at run time. Lowering it evicts idle sessions
        (lowest priority, least recently active first) down to the cap; ACTIVE sessions
        are never evicted, so the count can stay above a lowered cap until their turns end.

        Raises:
            ValueError / TypeError: cap is not an int >= 1.
        """
        self.config = replace(self.config, max_pinned_sessions=cap)
        self._enforce_cap()
        self._admit_queued()

    # ------------------------------------------------------------------ time
    def poll(self) -> list[Event]:
        """Advance: commit finished copies, refuse timed-out turns, offload sessions idle
        past the TTL, admit waiting turns. Returns the events since the last poll."""
        for result in self.cache.poll():
            self._on_transfer(result)
        now = self.clock()
        for queue in self._queues.values():  # FIFO: the oldest waiters are at the front
            for s in list(queue.values()):
                assert s.queued_at is not None
                if now - s.queued_at <= self.config.queue_timeout_s:
                    break
                del queue[s.session_id]
                err = self._refuse(s, "timeout", f"waited {now - s.queued_at:.3f}s")
                s.queued_at = None
                s.pending_tokens = None
                self._events.append(TurnRefused(s.session_id, err))
        ttl = self.config.idle_ttl_s
        if ttl is not None and self.cache.host is not None:
            while (idle := self._idle.oldest()) is not None and now - idle.last_active >= ttl:
                self._evict(idle)
        self._admit_queued()
        events = list(self._events)
        self._events.clear()
        return events

    def next_deadline(self) -> float | None:
        """The next time `poll` has timed work to do (a queue timeout or an idle TTL)."""
        times = []
        for queue in self._queues.values():
            head = next(iter(queue.values()), None)
            if head is not None and head.queued_at is not None:
                times.append(head.queued_at + self.config.queue_timeout_s)
        oldest = self._idle.oldest()
        if self.config.idle_ttl_s is not None and self.cache.host is not None and oldest:
            times.append(oldest.last_active + self.config.idle_ttl_s)
        return min(times, default=None)

    # ------------------------------------------------------------------ starting turns
    def _seq_len(self, s: Session) -> int:
        loc = self.cache.location(s.session_id)
        if loc in ("gpu", "restoring", "offloading"):
            return self.cache.gpu.table(s.session_id).num_tokens
        if loc == "host":
            assert self.cache.host is not None
            return self.cache.host.table(s.session_id).num_tokens
        return 0 if s.history is None else len(s.history)

    def _queues_ahead(self, s: Session) -> bool:
        """Whether turns of equal or higher priority already wait (FIFO fairness)."""
        return any(len(q) for p, q in self._queues.items() if p >= s.priority)

    def _try_start(self, s: Session) -> TurnPlan | bool | None:
        """Start `s`'s pending turn if room allows: a plan (ready), True (waiting on a
        copy), or None (no room yet: it stays or goes in the queue)."""
        assert s.pending_tokens is not None
        tokens = s.pending_tokens
        bs = self.cache.block_size
        loc = self.cache.location(s.session_id)
        if loc in ("offloading", "restoring"):
            return None  # wait for the copy to finish first
        if s.state == S.IDLE:
            table = self.cache.gpu.table(s.session_id)
            need = -(-(table.num_tokens + len(tokens)) // bs) - len(table.block_ids)
            if not self._make_room(s, _Need(need, (), False)):
                return None
            self._idle.remove(s)
            s.state = S.ACTIVE
            return self._ready(s, _Hits(pinned=table.num_tokens))
        if s.state == S.OFFLOADED:
            assert self.cache.host is not None
            h = self.cache.host.table(s.session_id)
            restore_hits = self._gpu_hits(h.root, h.tokens, h.hashes)
            need = -(-(h.num_tokens + len(tokens)) // bs) - len(restore_hits)
            if not self._make_room(s, _Need(need, tuple(restore_hits), True)):
                return None
            try:
                plan = self.cache.restore(s.session_id, extra_tokens=tokens)
            except OutOfBlocksError:
                return None
            s.pending_tokens = None  # appended (and their blocks reserved) by restore
            self._offloaded.pop(s.session_id, None)
            hits = _Hits(gpu=plan.num_gpu_cached_tokens)
        else:  # NEW or DROPPED
            history = tokens if s.history is None else np.concatenate((s.history, tokens))
            max_cached = len(history) - 1 if self.config.reuse_prefix else 0
            probe = self.cache.probe_prefix(history, tenant=s.tenant, extra_keys=s.extra_keys)
            gpu_hits = probe.gpu_hits[: max_cached // bs]
            need = -(-len(history) // bs) - len(gpu_hits)
            if not self._make_room(s, _Need(need, tuple(gpu_hits), True)):
                return None
            try:
                plan = self.cache.begin_sequence(
                    s.session_id,
                    history,
                    tenant=s.tenant,
                    extra_keys=s.extra_keys,
                    max_cached_tokens=max_cached,
                    probe=probe,
                )
            except OutOfBlocksError:
                return None
            s.history = None
            s.pending_tokens = None  # the new tokens are in the sequence already
            hits = _Hits(gpu=plan.num_gpu_cached_tokens)
        self._pin(s)
        s.state = S.ACTIVE
        if plan.pending:
            self._waiting[s.session_id] = hits
            return True
        return self._ready(s, hits)

    def _gpu_hits(self, root: bytes, tokens: np.ndarray, hashes: list[bytes]) -> list[int]:
        """The GPU blocks holding the longest cached prefix of this chain."""
        contents = self.cache.gpu.hasher.chain_contents(root, tokens, hashes)
        return self.cache.gpu.pool.match_chain(hashes, contents, len(hashes))

    def _ready(self, s: Session, hits: _Hits) -> TurnPlan:
        """Build the plan of a turn whose blocks are all on the GPU (after any restore)."""
        table = self.cache.gpu.table(s.session_id)
        if hits.pinned == 0:  # whatever is computed beyond the GPU hits came from the host
            hits.host = table.num_computed_tokens - hits.gpu
        if s.pending_tokens is not None:  # an IDLE session: append the new input now
            pending, s.pending_tokens = s.pending_tokens, None
            r = self.cache.gpu.append_tokens(
                s.session_id, pending, max_cached_tokens=len(pending) - 1
            )
            hits.gpu += r.num_cached_tokens
        start = table.num_computed_tokens
        plan = TurnPlan(
            session_id=s.session_id,
            num_tokens=table.num_tokens,
            compute_start=start,
            slot_mapping=self.cache.gpu.slot_mapping(s.session_id, start, table.num_tokens),
            block_ids=list(table.block_ids),
            hit_pinned=hits.pinned,
            hit_gpu=hits.gpu,
            hit_host=hits.host,
        )
        m = self.metrics
        m.turns_started += 1
        m.tokens_prompt += plan.num_tokens
        m.tokens_hit_pinned += hits.pinned
        m.tokens_hit_gpu += hits.gpu
        m.tokens_hit_host += hits.host
        m.tokens_computed += plan.num_computed
        return plan

    # ------------------------------------------------------------------ making room
    def _make_room(self, s: Session, need: _Need, *, immediate: bool = False) -> bool:
        """Evict idle sessions until `s` has a pin slot (if needed) and its blocks fit
        (available blocks and the watermark). True when room exists now.

        Blocks that in-flight offloads will release count as coming (no further victims
        are taken for them) unless `immediate`, where victims are dropped rather than
        offloaded so their blocks are free at once.
        """
        pool = self.cache.gpu.pool
        tenant_cap = self.config.tenant_max_pinned.get(s.tenant)
        self._blocked_by_tenant = False

        def short() -> tuple[int, bool, bool]:
            num_cached_hits = pool.count_cached(need.hits)
            # cached hits are counted as available but will be taken, not reused
            blocks = need.blocks - (pool.num_available - num_cached_hits)
            if not immediate:
                growth = need.blocks + num_cached_hits
                blocks = max(blocks, pool.num_in_use + growth - self._block_limit)
            slot = need.slot and self._pinned >= self.config.max_pinned_sessions
            tenant_slot = (
                need.slot
                and tenant_cap is not None
                and self._pinned_by_tenant[s.tenant] >= tenant_cap
            )
            return blocks, slot, tenant_slot

        def backup_coming() -> int:
            """GPU blocks that only in-flight backups of released sessions hold (and no
            hit of this turn will take back)."""
            if not self._backup_releasing:
                return 0
            held = Counter(
                b for sid in self._backup_releasing for b in self.cache.backup_sources(sid)
            )
            hits = set(need.hits)
            return sum(1 for b, n in held.items() if pool.refcount(b) == n and b not in hits)

        caps = self.config.tenant_max_pinned
        while True:
            blocks, slot, tenant_slot = short()
            if blocks <= 0 and not slot and not tenant_slot:
                return True
            coming = 0 if immediate else sum(self._releasing.values()) + backup_coming()
            if blocks <= coming and not slot and not tenant_slot:
                return False  # in-flight offloads will free enough: wait for them
            over_cap = {t: n > caps[t] for t, n in self._pinned_by_tenant.items() if t in caps}

            pick = partial(
                self._idle.pick_victim,
                max_priority=s.priority,
                exclude=s.session_id,
                # at its tenant's cap, a session makes room from its own tenant only
                tenant=s.tenant if tenant_slot else None,
                over_cap=over_cap,
                score=self._victim_score(),
            )
            # blocks a backup in flight holds are not free at once: when they are needed
            # now, prefer other victims, else finish that backup first
            victim = pick(skip=self._backup_in_flight if immediate else None)
            if victim is None and immediate:
                victim = pick()
                if victim is not None and not self._finish_backup(victim):
                    victim = None
            if victim is None:
                self._blocked_by_tenant = tenant_slot
                return False
            self._evict(victim, allow_offload=not immediate, protect=s.session_id)

    def _enforce_cap(self) -> None:
        """Evict idle sessions while more are pinned than the cap allows (after the cap
        was lowered while turns ran)."""
        cap = self.config.max_pinned_sessions
        while self._pinned > cap:
            victim = self._idle.pick_victim(
                max_priority=math.inf, exclude=None, tenant=None, over_cap={},
                score=self._victim_score(),
            )  # fmt: skip
            if victim is None:
                return
            self._evict(victim)

    def _victim_score(self) -> Callable[[Session], float | None] | None:
        """How `pick_victim` ranks idle sessions: the chance each stays idle a while."""
        if self.config.victim_order == "lru":
            return None
        now, stays_idle = self.clock(), self.idle_gaps.stays_idle
        return lambda v: stays_idle(now - v.last_active)

    def _backup_in_flight(self, s: Session) -> bool:
        """Whether a backup that `s` itself started is still copying (a closed session
        with the same id may have left one of its own)."""
        return self._backups.get(s.session_id) is s and self.cache.is_pending(Backup(s.session_id))

    def _finish_backup(self, s: Session) -> bool:
        """Block until `s`'s backup copy completes and commit it (False when the engine
        cannot wait, as a simulated one)."""
        try:
            r = self.cache.wait(Backup(s.session_id))
        except RuntimeError:
            return False
        if r is not None:
            self._on_transfer(r, follow_up=False)  # its blocks are wanted free now
        return True

    def _backed_up(self, s: Session) -> bool:
        """Whether the host holds (or a backup in flight is copying) every full block of
        an IDLE session, so that releasing its GPU copy loses at most its partial block."""
        if self.cache.host is None or not self.config.backup_idle:
            return False
        n = self.cache.gpu.table(s.session_id).num_cacheable_blocks
        if n == 0:
            return False
        if self._backup_in_flight(s):  # covers what was full when it started
            return s.backup_tokens >= n * self.cache.block_size
        table = self.cache.gpu.table(s.session_id)
        contents = self.cache.gpu.hasher.chain_contents(table.root, table.tokens, table.hashes)
        return len(self.cache.host.pool.match_chain(table.hashes[:n], contents, n)) == n

    def _evict(self, s: Session, *, allow_offload: bool = True, protect: object = None) -> None:
        """Take an IDLE session off the GPU: release it when its full blocks are already on
        the host (written back), else offload it (when the cost model prefers a restore
        over a recompute and the host has or can make room) or drop it. Host room is never
        made by dropping `protect` (the offloaded session asking for room)."""
        table = self.cache.gpu.table(s.session_id)
        num_blocks = len(table.block_ids)
        if self._backed_up(s):
            # no copy to wait for: its next turn finds the blocks on the host by hash;
            # only the partial last block is recomputed
            if self._backup_in_flight(s):  # its blocks free once the backup completes
                self._backup_releasing.add(s.session_id)
            self._idle.remove(s)
            self._unpin(s)
            self._drop(s, reason="backed_up")
            return
        offload = (
            allow_offload
            and self.cache.host is not None
            and choose_action(
                num_blocks=num_blocks,
                offload_enabled=self.config.offload_idle,
                cost=self.cost,
            )
            == "offload"
        )
        self._idle.remove(s)
        self._unpin(s)
        if offload:
            self._make_host_room(num_blocks, protect=protect)
            assert self.cache.host is not None
            offload = self.cache.host.pool.num_available >= num_blocks
        if offload:
            self._offload(s, reason="offload")
        else:
            self._drop(s, reason="drop")

    def _make_host_room(self, num_blocks: int, *, protect: object = None) -> None:
        """Drop offloaded sessions (lowest priority, oldest first; never `protect`) until
        the host has `num_blocks` available."""
        host = self.cache.host
        assert host is not None
        while host.pool.num_available < num_blocks:
            candidates = [v for v in self._offloaded.values() if v.session_id != protect]
            if not candidates:
                return
            victim = min(candidates, key=lambda v: v.priority)
            del self._offloaded[victim.session_id]
            victim.history = host.table(victim.session_id).tokens.copy()
            self.cache.drop_offloaded(victim.session_id)
            victim.state = S.DROPPED
            self.metrics.sessions_dropped += 1

    def _offload(self, s: Session, *, reason: str) -> None:
        """Start offloading a session that was just unpinned; fall back to a drop when the
        host refuses (no room, or an engine error: the cache rolled itself back)."""
        table = self.cache.gpu.table(s.session_id)
        pool = self.cache.gpu.pool
        exclusive = sum(1 for b in table.block_ids if pool.refcount(b) == 1)
        try:
            self.cache.offload(s.session_id)
        except (OutOfBlocksError, RuntimeError, ValueError):
            self._drop(s, reason=reason)
            return
        s.state = S.OFFLOADED
        s.evicted_by = reason
        if self.cache.location(s.session_id) == "host":  # nothing to copy: done already
            self._offload_done(s)
        else:
            self._releasing[s.session_id] = exclusive

    def _backup(self, s: Session) -> None:
        """Write an IDLE session's new full blocks back to the host (`backup_idle`). Best
        effort: with no host room it is skipped; while an earlier backup of the id is in
        flight, a follow-up starts when that one completes (see `_on_transfer`)."""
        if (
            not self.config.backup_idle
            or self.cache.host is None
            or self.cache.is_pending(Backup(s.session_id))
        ):
            return
        covers = self.cache.gpu.table(s.session_id).num_cacheable_blocks * self.cache.block_size
        try:
            handle = self.cache.backup(s.session_id)
        except (OutOfBlocksError, RuntimeError, ValueError):
            return
        if handle is not None:
            self._backups[s.session_id] = s
            s.backup_tokens = covers

    def _offload_done(self, s: Session) -> None:
        self.metrics.sessions_offloaded += 1
        if s.evicted_by == "release":  # write-through: keep only the host cache
            assert self.cache.host is not None
            s.history = self.cache.host.table(s.session_id).tokens.copy()
            self.cache.drop_offloaded(s.session_id)
            s.state = S.DROPPED
        elif s.state == S.OFFLOADED:
            self._offloaded[s.session_id] = s

    def _drop(self, s: Session, *, reason: str) -> None:
        table = self.cache.gpu.table(s.session_id)
        s.history = table.tokens.copy()
        if reason != "backed_up":  # those blocks live on in the host tier
            self.metrics.blocks_dropped += len(table.block_ids)
        self.cache.free(s.session_id)
        s.state = S.DROPPED
        s.evicted_by = reason
        if reason == "backed_up":
            self.metrics.sessions_released_backed_up += 1
        elif reason != "release":
            self.metrics.sessions_dropped += 1

    def _pin(self, s: Session) -> None:
        self._pinned += 1
        self._pinned_by_tenant[s.tenant] += 1

    def _unpin(self, s: Session) -> None:
        self._pinned -= 1
        self._pinned_by_tenant[s.tenant] -= 1

    # ------------------------------------------------------------------ queue
    def _admit_queued(self) -> None:
        """Admit waiting turns: priority order, FIFO within a priority. The first turn
        that does not fit stops admission (no overtaking, so nobody starves), except a
        turn held back only by its own tenant's pinned cap: it keeps its place among its
        tenant's turns while other tenants' turns behind it go ahead."""
        for priority in sorted(self._queues, reverse=True):
            queue = self._queues[priority]
            blocked_tenants: set[str] = set()
            for s in list(queue.values()):
                if s.tenant in blocked_tenants:
                    continue
                started = self._try_start(s)
                if started is None:
                    if self._blocked_by_tenant:
                        blocked_tenants.add(s.tenant)
                        continue
                    return
                del queue[s.session_id]
                s.queued_at = None
                if isinstance(started, TurnPlan):
                    self._events.append(TurnReady(s.session_id, started))

    def _refuse(self, s: Session, reason: str, detail: str) -> OverCapacityError:
        self.metrics.admission_refusals += 1
        return OverCapacityError(
            f"session {s.session_id!r}: over capacity ({reason}): {detail}",
            session_id=s.session_id,
            reason=reason,
            detail=f"over capacity ({reason}): {detail}",
        )

    # ------------------------------------------------------------------ transfers
    def _on_transfer(self, r: TransferResult, *, follow_up: bool = True) -> None:
        s = self._sessions.get(r.seq_id)
        if not r.ok:
            self.metrics.transfer_failures += 1
        moved_bytes = r.num_blocks_copied * self.cost.bytes_per_block
        if r.direction == "offload":
            self.metrics.blocks_offloaded += r.num_blocks_copied
            self.metrics.bytes_offloaded += moved_bytes
            if r.backup:
                self.metrics.blocks_backed_up += r.num_blocks_copied
                assert isinstance(r.seq_id, Backup)
                sid = r.seq_id.seq_id
                self._backup_releasing.discard(sid)
                owner = self._backups.pop(sid, None)
                if owner is not None and not r.ok:
                    owner.backup_tokens = min(owner.backup_tokens, r.valid_tokens)
                if (
                    follow_up
                    and owner is not None
                    and owner is self._sessions.get(sid)
                    and owner.state == S.IDLE
                ):
                    self._backup(owner)  # blocks its later turns filled meanwhile, if any
                return
            if s is None:
                return  # closed meanwhile: the cache released everything
            self._releasing.pop(s.session_id, None)
            if r.ok:
                self._offload_done(s)
            elif self.cache.location(s.session_id) == "gpu":
                self._drop(s, reason="drop")  # the GPU copy is intact: release it instead
            return
        self.metrics.blocks_restored += r.num_blocks_copied
        self.metrics.bytes_restored += moved_bytes
        hits = self._waiting.pop(r.seq_id, None)
        if s is None or hits is None:
            return
        self._events.append(TurnReady(s.session_id, self._ready(s, hits)))

    # ------------------------------------------------------------------ helpers
    def _active(self, session_id: object, what: str) -> Session:
        s = self.session(session_id)
        if s.state != S.ACTIVE or session_id in self._waiting:
            raise SessionError(
                f"{what} {session_id!r}: session is {s.state.value}"
                f"{' (restoring)' if session_id in self._waiting else ''}; expected a running turn"
            )
        return s

    def check_invariants(self) -> None:
        """Scheduler and cache invariants; raises AssertionError with the numbers."""
        self.cache.check_invariants(deep=False)
        pinned = [s for s in self._sessions.values() if s.is_pinned]
        assert len(pinned) == self._pinned, f"pinned {len(pinned)} != counter {self._pinned}"
        num_active = sum(s.state == S.ACTIVE for s in self._sessions.values())
        assert self._pinned <= max(self.config.max_pinned_sessions, num_active), (
            f"pinned {self._pinned} > cap {self.config.max_pinned_sessions}"
        )
        for s in self._sessions.values():
            loc = self.cache.location(s.session_id)
            if s.state == S.IDLE:
                assert loc == "gpu" and s.session_id in self._idle, (s.session_id, loc)
            if s.state == S.ACTIVE:
                assert loc in ("gpu", "restoring"), (s.session_id, loc)
                assert (loc == "restoring") == (s.session_id in self._waiting), s.session_id
            if s.state == S.DROPPED:
                assert loc is None and s.history is not None, (s.session_id, loc)
            if s.state == S.OFFLOADED:
                assert loc in ("host", "offloading"), (s.session_id, loc)
                assert (loc == "offloading") == (s.session_id in self._releasing), s.session_id
                assert (loc == "host") == (s.session_id in self._offloaded), s.session_id
            in_queues = sum(s.session_id in q for q in self._queues.values())
            assert in_queues == int(s.is_queued), (s.session_id, in_queues)
        assert len(self._idle) == sum(s.state == S.IDLE for s in self._sessions.values())
        for session_id in (*self._backup_releasing, *self._backups):
            assert self.cache.is_pending(Backup(session_id)), session_id


__all__ = ["Event", "SessionScheduler", "TurnPlan", "TurnReady", "TurnRefused"]
