"""SessionScheduler: connection-scoped sessions on a two-tier paged KV cache.

Event driven: no threads, no sleeps. A server (or the simulator) calls `begin_turn`,
`append_tokens`, `mark_computed`, `end_turn`, `close_session`, and `poll()` whenever time
passes or a copy may have finished; the injected clock is the only source of time. All
calls must come from one thread.
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from dataclasses import replace

import numpy as np

from pagedkv.cache.errors import OutOfBlocksError
from pagedkv.cache.hashing import TokenInput, as_token_array
from pagedkv.scheduler.errors import OverCapacityError, SessionError
from pagedkv.scheduler.events import Event, TurnPlan, TurnReady, TurnRefused
from pagedkv.scheduler.residency import Hits, Need, Residency
from pagedkv.scheduler.session import Session, SessionState
from pagedkv.tiers.results import Backup
from pagedkv.tiers.transfer import TransferHandle

S = SessionState


class SessionScheduler(Residency):
    """Admission, pinning, idle offload/eviction and reconnect for many sessions.

    Invariants (see `check_invariants`): pinned sessions (ACTIVE + IDLE) never exceed
    `max_pinned_sessions` (except ACTIVE ones after the cap was lowered mid-turn); every
    pinned session has its blocks on the GPU; an IDLE session is in the idle LRU; a queued
    session is in exactly one queue; an ACTIVE session is never chosen as a victim.

    Built as `SessionScheduler(cache, config, *, clock, cost=None)`; the residency half
    (pins, eviction, offload, backups, copy completion) is `Residency`.
    """

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
        parked = session_id in self._parked
        if s.state not in (S.NEW, S.IDLE, S.OFFLOADED, S.DROPPED) or s.is_queued or parked:
            state = "queued" if s.is_queued or parked else s.state.value
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
        s.pending_tokens, s.chain = tokens, None
        if not self._queues_ahead(s):
            started = self._try_start(s)
            if started is not None:
                return started if isinstance(started, TurnPlan) else None
            if self._blocked_by_tenant:
                self._tenant_held.add(session_id)
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
        self._check_committed(session_id, "append_tokens")
        gpu = self.cache.gpu
        if isinstance(token_ids, (list, tuple)) and len(token_ids) == 1:  # a decode step
            token = token_ids[0]
            if gpu.table(session_id).num_tokens % self.cache.block_size or gpu.pool.num_available:
                return np.array([gpu.append_token(session_id, token)], dtype=np.int64)
        tokens = as_token_array(token_ids)
        table = self.cache.gpu.table(session_id)
        need = -(-(table.num_tokens + len(tokens)) // self.cache.block_size) - len(table.block_ids)
        if need > 0:
            self._make_room(s, Need(need, (), False), immediate=True)
        r = self.cache.gpu.append_tokens(session_id, tokens)
        return r.slot_mapping

    def mark_computed(self, session_id: object) -> None:
        """Record that the model wrote K/V for every token of a running session.

        Raises:
            SessionError: no running turn, or its layer-wise restore is not committed yet
                (`commit_restore` first: the copy may have failed).
        """
        self._active(session_id, "mark_computed")
        self._check_committed(session_id, "mark_computed")
        self.cache.gpu.mark_computed(session_id)

    def commit_restore(self, session_id: object) -> int:
        """Commit the layer-wise restore a turn's plan came with (`TurnPlan.restore`),
        once the forward that waited on it per layer has been issued: waits for the copy
        if it is still in flight. Returns the leading tokens now valid in the cache:
        the plan's `compute_start` when every block moved. Fewer means the copy failed:
        what that forward computed for this session read bad K/V and must be discarded,
        and the positions from the returned count on computed again (their slots stay
        reserved); the turn's metrics move the lost tokens from host hits to computed.

        Raises:
            SessionError: unknown session, or it has no uncommitted restore.
        """
        s = self.session(session_id)
        planned = self._restoring_plans.get(session_id)
        if planned is None or s.state != S.ACTIVE:
            raise SessionError(f"commit_restore {session_id!r}: no layer-wise restore to commit")
        if session_id not in self._restore_done:
            result = self.cache.wait(session_id)
            assert result is not None, "a handed-out restore is pending or committed"
            self._on_transfer(result)
        valid = self._restore_done.pop(session_id)
        del self._restoring_plans[session_id]
        if valid < planned:  # the tokens the copy did not bring are computed instead
            self.metrics.restores_layerwise_failed += 1
            self.metrics.tokens_hit_host -= planned - valid
            self.metrics.tokens_computed += planned - valid
        return min(valid, planned)

    def _check_committed(self, session_id: object, what: str) -> None:
        if session_id in self._restoring_plans:
            raise SessionError(
                f"{what} {session_id!r}: its layer-wise restore is not committed; call "
                "commit_restore after the forward"
            )

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
        self._prefetching.pop(session_id, None)
        self._dropped.pop(session_id, None)
        self._waiting.pop(session_id, None)
        self._restoring_plans.pop(session_id, None)
        self._restore_done.pop(session_id, None)
        self._parked.pop(session_id, None)
        self._parked_since.pop(session_id, None)
        self._prefetch_wasted_by(s)  # closed before it came back to its prefetch
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
        self._tenant_held.discard(session_id)
        del self._sessions[session_id]
        # events not yet delivered for it (a turn admitted meanwhile) are void now
        if any(ev.session_id == session_id for ev in self._events):
            kept = [ev for ev in self._events if ev.session_id != session_id]
            self._events.clear()
            self._events.extend(kept)
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
                if s.session_id in self._tenant_held:
                    self._tenant_held.discard(s.session_id)
                    err = self._refuse(
                        s, "tenant_quota", f"waited {now - s.queued_at:.3f}s for one of "
                        "this tenant's pinned sessions to finish (its cap is reached)",
                    )  # fmt: skip
                else:
                    err = self._refuse(s, "timeout", f"waited {now - s.queued_at:.3f}s")
                s.queued_at = None
                s.pending_tokens = None
                self._events.append(TurnRefused(s.session_id, err))
        ttl = self.config.idle_ttl_s
        if ttl is not None and self.cache.host is not None:
            while (idle := self._idle.oldest()) is not None and now - idle.last_active >= ttl:
                self._evict(idle)
        self._admit_queued()
        self._prefetch()
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
        if loc == "restoring" and self._prefetching.get(s.session_id) is s:
            self._parked[s.session_id] = s  # started when its prefetch lands
            self._parked_since.setdefault(s.session_id, self.clock())
            return True
        if loc in ("offloading", "restoring"):
            return None  # wait for the copy to finish first
        if s.state == S.IDLE:
            table = self.cache.gpu.table(s.session_id)
            need = -(-(table.num_tokens + len(tokens)) // bs) - len(table.block_ids)
            if not self._make_room(s, Need(need, (), False)):
                return None
            hits = self._resume_hits(s)  # a prefetch's blocks count as host hits
            self._idle.remove(s)
            self._returned(s)
            s.state = S.ACTIVE
            # a prefetched session may hold a tail to compute (a partial block)
            return self._ready(s, hits)
        if s.state == S.OFFLOADED:
            assert self.cache.host is not None
            h = self.cache.host.table(s.session_id)
            restore_hits = self._gpu_hits(h.root, h.tokens, h.hashes)
            need = -(-(h.num_tokens + len(tokens)) // bs) - len(restore_hits)
            if not self._make_room(s, Need(need, tuple(restore_hits), True)):
                return None
            max_restore = None
            if self.config.restore_split:
                num_host = len(h.block_ids) - len(restore_hits)
                j = self._split_plan(len(restore_hits) * bs, num_host, len(tokens), count=False)
                max_restore = j if j < num_host else None
            try:
                plan = self.cache.restore(
                    s.session_id,
                    extra_tokens=tokens,
                    max_restore_blocks=max_restore,
                    layerwise=self.config.layerwise_restore,
                )
            except (OutOfBlocksError, RuntimeError):  # no room, or the engine refused
                return None  # (rolled back); it waits and is tried again
            if max_restore is not None:  # the host run's last block may be partial
                self._count_split(h.num_tokens - (len(restore_hits) + max_restore) * bs)
            s.pending_tokens = None  # appended (and their blocks reserved) by restore
            self._offloaded.pop(s.session_id, None)
            hits = Hits(gpu=plan.num_gpu_cached_tokens)
        else:  # NEW or DROPPED
            history = tokens if s.history is None else np.concatenate((s.history, tokens))
            max_cached = len(history) - 1 if self.config.reuse_prefix else 0
            kept = s.chain
            if kept is not None and kept[0] is s.pending_tokens and kept[1] is s.history:
                probe = self.cache.reprobe(kept[2])  # a retry: the chain is the same
            else:
                probe = self.cache.probe_prefix(history, tenant=s.tenant, extra_keys=s.extra_keys)
                s.chain = (s.pending_tokens, s.history, probe)
            gpu_hits = probe.gpu_hits[: max_cached // bs]
            need = -(-len(history) // bs) - len(gpu_hits)
            if not self._make_room(s, Need(need, tuple(gpu_hits), True)):
                return None
            try:
                plan = self.cache.begin_sequence(
                    s.session_id,
                    history,
                    tenant=s.tenant,
                    extra_keys=s.extra_keys,
                    max_cached_tokens=max_cached,
                    probe=probe,
                    split=self._split_plan if self.config.restore_split else None,
                    layerwise=self.config.layerwise_restore,
                )
            except (OutOfBlocksError, RuntimeError):  # no room, or the engine refused
                return None
            s.history = s.chain = None
            s.pending_tokens = None  # the new tokens are in the sequence already
            hits = Hits(gpu=plan.num_gpu_cached_tokens)
        self._returned(s)
        self._pin(s)
        s.state = S.ACTIVE
        if plan.pending:
            handle = self.cache.pending_transfer(s.session_id)
            if handle is not None and handle.num_layers:
                # the runner waits per layer: hand the plan out while the copy runs
                self._restoring_plans[s.session_id] = plan.compute_start
                self.metrics.restores_layerwise += 1
                return self._ready(s, hits, start=plan.compute_start, restore=handle)
            self._waiting[s.session_id] = hits
            return True
        return self._ready(s, hits)

    def _start_parked(self, s: Session, *, ok: bool) -> None:
        """The prefetch a turn was parked on ended: start the turn as a foreground turn
        whose copy just landed (it makes room for itself; the prefetch was used), or,
        when the copy failed or no room can be made now, release the copy and start it
        the usual way; a turn that must wait goes to the front of its queue with its
        arrival time (it was admitted before the turns queued behind it)."""
        since = self._parked_since.pop(s.session_id, self.clock())
        if ok and s.pending_tokens is not None:
            table = self.cache.gpu.table(s.session_id)
            bs = self.cache.block_size
            need = -(-(table.num_tokens + len(s.pending_tokens)) // bs) - len(table.block_ids)
            if self._make_room(s, Need(need, (), True)):
                s.history = None
                s.backup_tokens = table.num_cacheable_blocks * bs
                hits = self._resume_hits(s)  # the prefetched blocks are host hits
                self._returned(s)
                self._pin(s)
                s.state = S.ACTIVE
                self._events.append(TurnReady(s.session_id, self._ready(s, hits)))
                return
        self._prefetch_landed(s, ok=False)  # released (host copy kept) or dropped
        started = self._try_start(s)
        if isinstance(started, TurnPlan):
            self._events.append(TurnReady(s.session_id, started))
        elif started is None:
            if self._blocked_by_tenant:
                self._tenant_held.add(s.session_id)
            s.queued_at = since
            queue = self._queues.setdefault(s.priority, OrderedDict())
            queue[s.session_id] = s
            queue.move_to_end(s.session_id, last=False)
            self.metrics.admission_waits += 1

    def _split_plan(
        self, cached_tokens: int, num_blocks: int, num_after: int, *, count: bool = True
    ) -> int:
        """How many of `num_blocks` host blocks (after `cached_tokens` on the GPU, before
        `num_after` more tokens) to copy; the rest is computed (`CostModel.split_restore`).

        The extra computation is always charged (`compute_weight=1`): charging it only
        while other turns run (0 on an idle GPU) made 37 splits on the default agent
        simulation at a quarter of the peak, computed 2% more tokens and left every
        TTFT percentile as it was."""
        j, _end = self.cost.split_restore(
            num_blocks, cached_tokens, num_after, layerwise=self.config.layerwise_restore
        )
        if count and j < num_blocks:  # host hits found by hash: full blocks
            self._count_split((num_blocks - j) * self.cache.block_size)
        return j

    def _count_split(self, num_recomputed_tokens: int) -> None:
        """Count a split restore that leaves `num_recomputed_tokens` host-resident tokens
        to compute."""
        self.metrics.restores_split += 1
        self.metrics.tokens_split_recomputed += num_recomputed_tokens

    def _gpu_hits(self, root: bytes, tokens: np.ndarray, hashes: list[bytes]) -> list[int]:
        """The GPU blocks holding the longest cached prefix of this chain."""
        contents = self.cache.gpu.hasher.chain_contents(root, tokens, hashes)
        return self.cache.gpu.pool.match_chain(hashes, contents, len(hashes))

    def _ready(
        self,
        s: Session,
        hits: Hits,
        *,
        start: int | None = None,
        restore: TransferHandle | None = None,
    ) -> TurnPlan:
        """Build the plan of a turn whose blocks are all on the GPU (after any restore),
        or, with `restore`, whose first `start` tokens are being copied layer by layer."""
        table = self.cache.gpu.table(s.session_id)
        if hits.pinned == 0:  # whatever is computed beyond the GPU hits came from the host
            hits.host = (table.num_computed_tokens if start is None else start) - hits.gpu
        if s.pending_tokens is not None:  # an IDLE session: append the new input now
            pending, s.pending_tokens = s.pending_tokens, None
            r = self.cache.gpu.append_tokens(
                s.session_id, pending, max_cached_tokens=len(pending) - 1
            )
            hits.gpu += r.num_cached_tokens
        if start is None:
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
            restore=restore,
        )
        m = self.metrics
        m.turns_started += 1
        m.tokens_prompt += plan.num_tokens
        m.tokens_hit_pinned += hits.pinned
        m.tokens_hit_gpu += hits.gpu
        m.tokens_hit_host += hits.host
        m.tokens_computed += plan.num_computed
        return plan

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
                        self._tenant_held.add(s.session_id)
                        blocked_tenants.add(s.tenant)
                        continue
                    self._tenant_held.discard(s.session_id)
                    return
                self._tenant_held.discard(s.session_id)
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
                sid = s.session_id
                in_flight = sid in self._waiting or (
                    sid in self._restoring_plans and sid not in self._restore_done
                )
                assert (loc == "restoring") == in_flight, sid
                assert not (sid in self._waiting and sid in self._restoring_plans), sid
            if s.state == S.DROPPED:
                prefetching = s.session_id in self._prefetching
                assert (loc is None or (loc == "restoring" and prefetching)) and (
                    s.history is not None
                ), (s.session_id, loc)
            if s.state == S.OFFLOADED:
                prefetching = s.session_id in self._prefetching
                assert loc in ("host", "offloading") or (loc == "restoring" and prefetching), (
                    s.session_id,
                    loc,
                )
                assert (loc == "offloading") == (s.session_id in self._releasing), s.session_id
                assert (loc == "host") == (s.session_id in self._offloaded), s.session_id
            in_queues = sum(s.session_id in q for q in self._queues.values())
            assert in_queues == int(s.is_queued), (s.session_id, in_queues)
        assert len(self._idle) == sum(s.state == S.IDLE for s in self._sessions.values())
        for session_id, s in self._parked.items():  # a turn waits on its own prefetch
            assert self._prefetching.get(session_id) is s and s.pending_tokens is not None
        for session_id in (*self._backup_releasing, *self._backups):
            assert self.cache.is_pending(Backup(session_id)), session_id


__all__ = ["Event", "SessionScheduler", "TurnPlan", "TurnReady", "TurnRefused"]
