"""Where each session's blocks live, and moving them: the residency half of the scheduler.

`Residency` holds the pin counts, the idle LRU, the offloaded LRU and the copies in
flight, and implements making room (victim choice under the pinned cap, the tenant caps
and the GPU watermark), eviction (release when backed up, offload when a restore is
cheaper than a recompute, else drop), host-tier room, idle write-back (`backup_idle`)
and the completion of every copy. `SessionScheduler` adds sessions, turns and the
admission queue on top. Single-threaded, like the scheduler.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from pagedkv.cache.block_table import BlockTable
from pagedkv.cache.errors import OutOfBlocksError
from pagedkv.scheduler.config import PrefetchConfig, SchedulerConfig
from pagedkv.scheduler.cost import CostModel
from pagedkv.scheduler.events import Event, TurnPlan, TurnReady
from pagedkv.scheduler.eviction import IdleGapModel, IdleSessions, choose_action
from pagedkv.scheduler.metrics import SchedulerMetrics
from pagedkv.scheduler.session import Session, SessionState
from pagedkv.tiers.results import Backup, TransferResult
from pagedkv.tiers.tiered import TieredKVCache

S = SessionState
_PREFETCH_SCAN = 256  # offloaded sessions (latest first) a prefetch decision looks at
_PREFETCH_TRIES = 4  # candidates (likeliest first) a prefetch decision checks the room of


@dataclass(slots=True)
class Hits:
    pinned: int = 0
    gpu: int = 0
    host: int = 0


@dataclass(frozen=True, slots=True)
class Need:
    """What starting a turn takes: new GPU blocks, the GPU prefix hits it will take (the
    in-use count grows by the new blocks plus whichever hits are cached at that moment:
    evicting a victim can turn a shared hit into a cached one), and a pin slot or not."""

    blocks: int
    hits: tuple[int, ...]
    slot: bool


def _within_share(tenant: str, over_cap: Mapping[str, bool], victim: Session) -> bool:
    """True (skip it) for a victim of another tenant that is not over its share."""
    return victim.tenant != tenant and not over_cap.get(victim.tenant, False)


def _either(
    a: Callable[[Session], bool] | None, b: Callable[[Session], bool] | None
) -> Callable[[Session], bool] | None:
    """A skip predicate true where either is (None: no predicate)."""
    if a is None or b is None:
        return a or b
    return lambda v: a(v) or b(v)


class Residency(ABC):
    """Pinning, eviction, offload, backup and copy completion for a `SessionScheduler`.

    Invariants are checked by `SessionScheduler.check_invariants`: `_pinned` counts the
    ACTIVE and IDLE sessions; every IDLE session is in `_idle`; `_releasing` holds exactly
    the offloads in flight, `_offloaded` exactly the sessions resting on the host.
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
        self._waiting: dict[object, Hits] = {}  # ACTIVE, restore copy in flight
        # ACTIVE with a layer-wise restore in flight and its plan handed out: id -> the
        # plan's compute_start; `_restore_done` holds the valid tokens once committed
        self._restoring_plans: dict[object, int] = {}
        self._restore_done: dict[object, int] = {}
        # turns that arrived while their own session was being prefetched: they start
        # when the copy lands (not from the admission queue, where they would block
        # every turn behind them for the rest of the copy)
        self._parked: dict[object, Session] = {}
        self._parked_since: dict[object, float] = {}  # when each parked turn arrived
        self._releasing: dict[object, int] = {}  # offloading: GPU blocks freed on completion
        self._backups: dict[object, Session] = {}  # backups in flight: id -> who started it
        # released with their own backup in flight: its GPU sources free when it completes
        self._backup_releasing: set[object] = set()
        self._pinned = 0
        self._pinned_by_tenant: Counter[str] = Counter()
        self._pinned_ids: dict[str, dict[object, Session]] = {}  # tenant -> pinned sessions
        self._events: deque[Event] = deque()
        self._blocked_by_tenant = False  # set by _make_room: short only of a tenant slot
        # queued sessions whose last admission try was held back only by their tenant's
        # cap: a timeout of theirs is the tenant's quota, not the server's capacity
        self._tenant_held: set[object] = set()
        self._block_limit = int(config.high_watermark * cache.gpu.pool.num_blocks)
        # sessions a prefetch is restoring (no turn of theirs waits on it)
        self._prefetching: dict[object, Session] = {}
        # DROPPED sessions with a history, latest last: prefetch candidates with the
        # offloaded ones (stale entries are skipped and removed when read)
        self._dropped: OrderedDict[object, Session] = OrderedDict()

    @abstractmethod
    def _ready(self, s: Session, hits: Hits) -> TurnPlan:
        """The plan of a turn whose blocks are now all on the GPU (`SessionScheduler`)."""

    @abstractmethod
    def _start_parked(self, s: Session, *, ok: bool) -> None:
        """Start the turn parked on `s`'s prefetch, whose copy just ended (`ok`: every
        block moved) (`SessionScheduler`)."""

    # ------------------------------------------------------------------ making room
    def _make_room(self, s: Session, need: Need, *, immediate: bool = False) -> bool:
        """Evict idle sessions until `s` has a pin slot (if needed) and its blocks fit
        (available blocks and the watermark). True when room exists now.

        Blocks that in-flight offloads will release count as coming (no further victims
        are taken for them) unless `immediate`, where victims are dropped rather than
        offloaded so their blocks are free at once.
        """
        pool = self.cache.gpu.pool
        tenant_cap = self.config.tenant_pinned_cap(s.tenant)
        blocks_cap = self.config.tenant_blocks_cap(s.tenant)
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
            if blocks_cap is not None and not tenant_slot:
                held = self.tenant_gpu_blocks(s.tenant)
                tenant_slot = held > 0 and held + need.blocks > blocks_cap
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

        while True:
            blocks, slot, tenant_slot = short()
            if blocks <= 0 and not slot and not tenant_slot:
                return True
            coming = 0 if immediate else sum(self._releasing.values()) + backup_coming()
            if blocks <= coming and not slot and not tenant_slot:
                return False  # in-flight offloads will free enough: wait for them
            over_cap = self._over_share(s.tenant)
            # a tenant at or over its fair share of the pin slots, taking a slot, may
            # push out only sessions of tenants over theirs (its own included): it
            # cannot shrink another tenant below its share
            guard: Callable[[Session], bool] | None = None
            if (
                slot
                and not tenant_slot
                and self._pinned_by_tenant[s.tenant] >= self._fair_share(s.tenant)
            ):
                guard = partial(_within_share, s.tenant, over_cap)

            pick = partial(
                self._idle.pick_victim,
                max_priority=s.priority,
                exclude=s.session_id,
                # at its tenant's cap, a session makes room from its own tenant only
                tenant=s.tenant if tenant_slot else None,
                over_cap=over_cap,
                score=self._victim_score(),
                now=self.clock(),
            )
            # blocks a backup in flight holds are not free at once: when they are needed
            # now, prefer other victims, else finish that backup first. (A prefetched
            # session that has not returned is evictable by anyone: `guard` spares it not)
            skip_backup = self._backup_in_flight if immediate else None
            victim = pick(skip=_either(guard, skip_backup), skip_prefetched=skip_backup)
            if victim is None and immediate:
                victim = pick(skip=guard)
                if victim is not None and not self._finish_backup(victim):
                    victim = None
            if victim is None and immediate and self._finish_prefetches():
                continue  # what a prefetch held is an (evictable) idle session now
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
                score=self._victim_score(), now=self.clock(),
            )  # fmt: skip
            if victim is None:
                return
            self._evict(victim)

    def _victim_score(self) -> Callable[[Session], float | None] | None:
        """How `pick_victim` ranks idle sessions: the chance each stays idle a while."""
        if self.config.victim_order == "lru":
            return None
        now, stays_idle = self.clock(), self.idle_gaps.stays_idle
        # (prefetched sessions that have not returned are ranked apart: `IdleSessions`)
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

    def _finish_prefetches(self) -> bool:
        """Block until the prefetch copies in flight complete and commit them (their
        blocks are wanted now). False when there is none, or the engine cannot wait."""
        done = False
        for session_id in list(self._prefetching):
            try:
                r = self.cache.wait(session_id)
            except RuntimeError:  # a simulated engine: advance the clock instead
                return done
            if r is not None:
                self._on_transfer(r)
                done = True
        return done

    def _backed_up(self, s: Session) -> bool:
        """Whether the host holds (or a backup in flight is copying) every full block of
        an IDLE session, so that releasing its GPU copy loses at most its partial block."""
        if self.cache.host is None or not (self.config.backup_idle or s.prefetched_blocks):
            return False  # (a prefetched session's blocks came from the host: look there)
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
            self._rest_dropped(victim, host.table(victim.session_id))
            self.cache.drop_offloaded(victim.session_id)
            victim.state = S.DROPPED
            self.metrics.sessions_dropped += 1

    def _offload(self, s: Session, *, reason: str) -> None:
        """Start offloading a session that was just unpinned; fall back to a drop when the
        host refuses (no room, or an engine error: the cache rolled itself back)."""
        self._prefetch_wasted_by(s)  # offloaded again before it returned
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
            self._rest_dropped(s, self.cache.host.table(s.session_id))
            self.cache.drop_offloaded(s.session_id)
            s.state = S.DROPPED
        elif s.state == S.OFFLOADED:
            self._offloaded[s.session_id] = s

    def _returned(self, s: Session) -> None:
        """`s` starts a turn: the blocks a prefetch brought back for it were used, its
        wasted-prefetch mark and back-off are cleared, and it is no prefetch candidate
        any more."""
        if s.prefetched_blocks:
            self.metrics.blocks_prefetch_used += s.prefetched_blocks
            s.prefetched_blocks = s.prefetched_tokens = 0
        s.prefetch_wasted = 0
        s.prefetch_after = -math.inf
        s.prefetch_probe, s.prefetch_need = None, 0
        if self._dropped.get(s.session_id) is s:
            del self._dropped[s.session_id]

    def _resume_hits(self, s: Session) -> Hits:
        """Where the computed tokens of an IDLE session that starts a turn came from
        (call before `_returned`): its own pinned blocks, except what a prefetch brought
        back, which is reported as host hits (restored ahead of time; the rest of that
        prefetch's sequence was in the GPU hash cache)."""
        computed = self.cache.gpu.table(s.session_id).num_computed_tokens
        if not s.prefetched_blocks:
            return Hits(pinned=computed)
        host = min(s.prefetched_tokens, computed)
        return Hits(gpu=computed - host, host=host)

    def _rest_dropped(self, s: Session, table: BlockTable, *, held: bool = False) -> None:
        """Register `s`, being dropped from `table` (its GPU or host table), as a
        prefetch candidate when `held` (its full blocks are known to be on the host) or
        the host holds a copy of its last full block (a later prefetch checks the whole
        chain); else forget it as one."""
        host = self.cache.host
        n = len(table.hashes)
        if not held and host is not None and n:
            # (`match` returns a block id or None: 0 is one)
            held = host.pool.match(table.hashes[n - 1], table.block_content(n - 1)) is not None
        if held and host is not None:
            self._dropped[s.session_id] = s
            self._dropped.move_to_end(s.session_id)
        else:
            self._dropped.pop(s.session_id, None)

    # ------------------------------------------------------------------ prefetch
    def _prefetch(self) -> None:
        """Restore one resting session ahead of its return (`SchedulerConfig.prefetch`).

        Candidates: the offloaded sessions and the dropped ones whose blocks the host
        holds (the latest `_PREFETCH_SCAN` of each) with no turn queued, not backing
        off after a wasted prefetch, and that the idle-gap model expects back within
        their window (`horizon_s`, cut where the idle TTL would evict them again; none
        left: not a candidate) with at least `min_return_probability`. The likeliest
        that is feasible starts (its tenant's caps, `max_inflight_blocks`, the watermark
        less the headroom without making room, the waste budget); at most
        `_PREFETCH_TRIES` are checked per poll. Nothing starts while any restore is in
        flight (one copy at a time, and never ahead of a turn's own restore) or no pin
        slot is free. It lands as an IDLE session whose blocks the host still holds
        (releasing it copies nothing), protected for the rest of its window
        (`PrefetchConfig.protect`), then the first victim."""
        cfg = self.config.prefetch
        cache = self.cache
        if cfg is None or cache.host is None or not (self._offloaded or self._dropped):
            return
        if cache.restores_in_flight() or self._pinned >= self.config.max_pinned_sessions:
            return
        pool = cache.gpu.pool
        limit = int((self.config.high_watermark - cfg.headroom) * pool.num_blocks)
        room = limit - pool.num_in_use
        credit = self._prefetch_credit(cfg)
        if room <= 0 or credit < cfg.min_hit_rate:  # not even one block fits
            return
        now = self.clock()
        for window, s in self._prefetch_candidates(cfg, now, room)[:_PREFETCH_TRIES]:
            try:
                if self._start_prefetch(s, cfg, until=now + window, credit=credit):
                    return
            except (OutOfBlocksError, RuntimeError, ValueError):  # an engine that refused
                return  # the cache rolled itself back: nothing changed

    def _prefetch_candidates(
        self, cfg: PrefetchConfig, now: float, room: int
    ) -> list[tuple[float, Session]]:
        """(window, session) of each prefetch candidate, likeliest to return first
        (empty while the idle-gap model has too few gaps to predict anything). One that
        needed more than `room` GPU blocks when last checked is left out unchecked (the
        check hashes its history: too dear to repeat at every poll)."""
        returns_within = self.idle_gaps.returns_within
        ttl = self.config.idle_ttl_s
        found: list[tuple[float, float, Session]] = []
        stale: list[object] = []
        for registry in (self._offloaded, self._dropped):
            for scanned, s in enumerate(reversed(registry.values())):
                if scanned >= _PREFETCH_SCAN:
                    break
                if registry is self._dropped and (
                    self._sessions.get(s.session_id) is not s or s.state != S.DROPPED
                ):
                    stale.append(s.session_id)
                    continue
                if (
                    s.is_queued
                    or s.pending_tokens is not None
                    or now < s.prefetch_after
                    or s.prefetch_need > room
                    or s.session_id in self._prefetching
                ):
                    continue
                age = now - s.last_active
                window = cfg.horizon_s if ttl is None else min(cfg.horizon_s, ttl - age)
                if window <= 0:
                    continue  # idle past the TTL: it would be offloaded again at once
                p = returns_within(age, window)
                if p is None:
                    return []  # too few gaps observed to predict anything
                if p >= cfg.min_return_probability:
                    found.append((p, window, s))
        for sid in stale:
            del self._dropped[sid]
        found.sort(key=lambda c: -c[0])  # stable: among equals, the latest rested first
        return [(window, s) for _p, window, s in found]

    def _start_prefetch(
        self, s: Session, cfg: PrefetchConfig, *, until: float, credit: float
    ) -> bool:
        """Start prefetching `s` when it is feasible now (False: it is not, nothing
        changed). Raises what the cache raises for an engine that refuses the copy (the
        cache rolled itself back; nothing here changed either)."""
        cache = self.cache
        host = cache.host
        assert host is not None
        cap = self.config.tenant_pinned_cap(s.tenant)
        if cap is not None and self._pinned_by_tenant[s.tenant] >= cap:
            return False
        pool, bs = cache.gpu.pool, cache.block_size
        limit = int((self.config.high_watermark - cfg.headroom) * pool.num_blocks)
        probe, history = None, s.history
        s.prefetch_need = 0
        if s.state == S.OFFLOADED:
            if cache.location(s.session_id) != "host":
                return False
            h = host.table(s.session_id)
            contents = cache.gpu.hasher.chain_contents(h.root, h.tokens, h.hashes)
            hits = pool.match_chain(h.hashes, contents, len(h.hashes))
            num_blocks = len(h.block_ids)
            copied = num_blocks - len(hits)
            copied_tokens = h.num_tokens - len(hits) * bs  # a partial last block too
        else:
            assert history is not None
            kept = s.prefetch_probe
            if kept is not None and kept[0] is history:  # the chain depends on it only
                probe = cache.reprobe(kept[1])
            else:
                probe = cache.probe_prefix(history, tenant=s.tenant, extra_keys=s.extra_keys)
                s.prefetch_probe = (history, probe)
            hits = probe.gpu_hits
            k, chain = len(hits), probe.hashes
            copied = len(host.pool.match_chain(chain[k:], probe.contents[k:], len(chain)))
            if copied == 0 or len(hits) + copied < len(history) // bs:
                return False  # the host does not hold the rest of it: nothing to bring back
            num_blocks = -(-len(history) // bs)
            copied_tokens = copied * bs
        grows = num_blocks - len(hits) + pool.count_cached(hits)
        if pool.num_in_use + grows > limit:
            s.prefetch_need = grows  # not checked again before that much room is free
            return False
        if (
            copied > cfg.max_inflight_blocks
            or cfg.min_hit_rate * copied > credit
            or not self._tenant_blocks_fit(s.tenant, num_blocks)
        ):
            return False
        if probe is None:
            cache.restore(s.session_id)
            del self._offloaded[s.session_id]
        else:
            assert history is not None
            cache.begin_sequence(
                s.session_id, history, tenant=s.tenant, extra_keys=s.extra_keys, probe=probe
            )
            del self._dropped[s.session_id]
            s.prefetch_probe = None
        s.prefetched_blocks, s.prefetched_tokens = copied, copied_tokens
        s.prefetch_until = until
        self.metrics.blocks_prefetched += copied  # wasted or used, it crosses the link
        self.metrics.bytes_prefetched += copied * self.cost.bytes_per_block
        if cache.location(s.session_id) == "gpu":  # nothing to copy: on the GPU already
            self._prefetch_landed(s, ok=True)
        else:
            self._prefetching[s.session_id] = s
        return True

    def _tenant_blocks_fit(self, tenant: str, num_blocks: int) -> bool:
        """Whether `tenant` stays within its pinned-blocks cap when a session of
        `num_blocks` more blocks is pinned (`tenant_max_pinned_blocks`)."""
        cap = self.config.tenant_blocks_cap(tenant)
        return cap is None or self.tenant_gpu_blocks(tenant) + num_blocks <= cap

    def _prefetch_credit(self, cfg: PrefetchConfig) -> float:
        """The waste budget left, in blocks: `waste_allowance_blocks`, plus
        `waste_fraction` of every used prefetched block, less the rest
        (`1 - waste_fraction`) of every wasted one and of every one not decided yet (in
        flight or landed, not returned: counted as if wasted). A prefetch of `n` blocks
        starts only while `(1 - waste_fraction) * n` fits in it, so the blocks wasted
        stay under `waste_fraction` of those prefetched plus the allowance: a low
        observed hit rate stops prefetch."""
        m, w = self.metrics, cfg.waste_fraction
        undecided = sum(v.prefetched_blocks for v in self._prefetching.values())
        undecided += sum(v.prefetched_blocks for v in self._idle.prefetched())
        return (
            cfg.waste_allowance_blocks
            + w * m.blocks_prefetch_used
            - (1.0 - w) * (m.blocks_prefetch_wasted + undecided)
        )

    def _prefetch_wasted_by(self, s: Session) -> None:
        """`s` leaves the GPU (or its prefetch fails or is refused) before it returned:
        count the blocks its prefetch brought as wasted, mark it, and back off: it is
        not prefetched again for `backoff_s` doubled per waste since it last returned."""
        n = s.prefetched_blocks
        if not n:
            return
        self.metrics.blocks_prefetch_wasted += n
        s.prefetched_blocks = s.prefetched_tokens = 0
        s.prefetch_wasted += 1
        cfg = self.config.prefetch
        backoff = 0.0 if cfg is None else cfg.backoff_s * 2.0 ** min(s.prefetch_wasted - 1, 60)
        s.prefetch_after = self.clock() + backoff

    def _prefetch_slot(self, s: Session) -> bool:
        """Whether a pin slot is free for `s`, a prefetch that landed. When every slot is
        taken (turns took the one free at its start), swap: release the idle session
        likeliest to stay idle (`victim_order="predicted"`), when that is at least
        `min_return_probability` and its full blocks are on the host already (so that
        releasing it copies nothing), of no higher priority, and of `s`'s tenant or a
        tenant over its fair share when `s`'s is at its own. Never another prefetch."""
        if self._pinned < self.config.max_pinned_sessions:
            return True
        cfg = self.config.prefetch
        score = self._victim_score()
        if cfg is None or score is None:
            return False
        guard: Callable[[Session], bool] | None = None
        over_cap = self._over_share(s.tenant)
        if self._pinned_by_tenant[s.tenant] >= self._fair_share(s.tenant):
            guard = partial(_within_share, s.tenant, over_cap)
        victim = self._idle.pick_victim(
            max_priority=s.priority,
            exclude=s.session_id,
            tenant=None,
            over_cap=over_cap,
            score=score,
            skip=_either(
                guard,
                lambda v: (
                    not self._backed_up(v)
                    or self._backup_in_flight(v)
                    or v.pending_tokens is not None  # its turn waits: it is coming back
                ),
            ),
            skip_prefetched=lambda v: True,
        )
        if victim is None:
            return False
        stays = score(victim)
        if stays is None or stays < cfg.min_return_probability:
            return False
        self._evict(victim)
        return self._pinned < self.config.max_pinned_sessions

    def _prefetch_landed(self, s: Session, *, ok: bool) -> None:
        """A prefetch restore completed: pin `s` as IDLE (its full blocks are on the
        host, so a later eviction just releases it), protected until its window ends
        (with `PrefetchConfig.protect`); or, when the copy failed, no pin slot is left
        or its tenant is at a cap, release it (a wasted prefetch)."""
        cache = self.cache
        table = cache.gpu.table(s.session_id)
        cap = self.config.tenant_pinned_cap(s.tenant)
        if (
            ok
            and (cap is None or self._pinned_by_tenant[s.tenant] < cap)
            and self._tenant_blocks_fit(s.tenant, len(table.block_ids))
            and self._prefetch_slot(s)
        ):
            cfg = self.config.prefetch
            s.state = S.IDLE
            s.history = None
            s.backup_tokens = table.num_cacheable_blocks * cache.block_size
            self._pin(s)
            if s.pending_tokens is not None:  # its turn is queued: it has come back
                self._idle.add(s)
                return
            protect = cfg is not None and cfg.protect
            self._idle.add(s, prefetched_until=s.prefetch_until if protect else -math.inf)
            return
        self._prefetch_wasted_by(s)
        s.history = table.tokens.copy()
        self._rest_dropped(s, table)
        cache.free(s.session_id)
        s.state = S.DROPPED
        s.evicted_by = "prefetch"

    def _drop(self, s: Session, *, reason: str) -> None:
        self._prefetch_wasted_by(s)  # released before it returned
        table = self.cache.gpu.table(s.session_id)
        s.history = table.tokens.copy()
        if reason != "backed_up":  # those blocks live on in the host tier
            self.metrics.blocks_dropped += len(table.block_ids)
        # released onto its host copy (a backup in flight may still be writing it)
        self._rest_dropped(s, table, held=reason == "backed_up")
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
        self._pinned_ids.setdefault(s.tenant, {})[s.session_id] = s

    def _unpin(self, s: Session) -> None:
        self._pinned -= 1
        self._pinned_by_tenant[s.tenant] -= 1
        mine = self._pinned_ids.get(s.tenant)
        if mine is not None:
            mine.pop(s.session_id, None)
            if not mine:
                del self._pinned_ids[s.tenant]

    def pinned_by_tenant(self) -> dict[str, int]:
        """Pinned sessions of each tenant that has one."""
        return {t: n for t, n in self._pinned_by_tenant.items() if n > 0}

    def tenant_gpu_blocks(self, tenant: str) -> int:
        """GPU blocks referenced by `tenant`'s pinned sessions (a block two of them share
        counts once)."""
        gpu = self.cache.gpu
        blocks: set[int] = set()
        for sid in self._pinned_ids.get(tenant, {}):
            if sid in gpu:
                blocks.update(gpu.table(sid).block_ids)
        return len(blocks)

    def _over_share(self, requester: str) -> dict[str, bool]:
        """Tenants holding more pinned sessions than their cap or, while the pin slots
        are all taken, than a fair share of them (the slots split evenly between the
        tenants that hold one or ask for one): their idle sessions make room first."""
        cfg = self.config
        tenants = set(self._pinned_by_tenant) | {requester}
        share = math.ceil(cfg.max_pinned_sessions / max(len(tenants), 1))
        out: dict[str, bool] = {}
        for t, n in self._pinned_by_tenant.items():
            cap = cfg.tenant_pinned_cap(t)
            over = (cap is not None and n > cap) or (len(tenants) > 1 and n > share)
            if over:
                out[t] = True
        return out

    def _fair_share(self, requester: str) -> int:
        tenants = set(self._pinned_by_tenant) | {requester}
        return math.ceil(self.config.max_pinned_sessions / max(len(tenants), 1))

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
        prefetched = self._prefetching.pop(r.seq_id, None)
        if prefetched is not None:
            if prefetched is s:
                if self._parked.pop(s.session_id, None) is s:
                    self._start_parked(s, ok=r.ok)  # its turn is here: a foreground start
                else:
                    self._prefetch_landed(s, ok=r.ok)
            return
        if r.seq_id in self._restoring_plans:  # its plan is out: commit_restore reports it
            self._restore_done[r.seq_id] = r.valid_tokens
            return
        hits = self._waiting.pop(r.seq_id, None)
        if s is None or hits is None:
            return
        self._events.append(TurnReady(s.session_id, self._ready(s, hits)))
