"""Hypothesis state machine over many sessions, with real CPU tensors.

The model writes K/V for a token as a deterministic function of (tenant, prefix), so at
every step we can check the bytes behind every block the scheduler serves or holds.
Copies are real but move their bytes only when they complete (`DeferredCopyEngine`:
destinations hold NaN until then), once the clock has moved past their modelled
duration, so offloads and restores are seen in flight and any early read or reuse shows
as wrong bytes; faults are injected at random.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sched_helpers import Clock
from tier_helpers import (
    SPEC,
    DeferredCopyEngine,
    expected_tokens,
    read_tokens,
    token_values,
    write_kv,
)

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.scheduler.config import PrefetchConfig, SchedulerConfig
from pagedkv.scheduler.cost import CostModel
from pagedkv.scheduler.errors import OverCapacityError
from pagedkv.scheduler.eviction import IdleGapModel
from pagedkv.scheduler.scheduler import SessionScheduler, TurnPlan, TurnReady
from pagedkv.scheduler.session import SessionState as S
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.tiered import TieredKVCache

BS = SPEC.block_size
TENANTS = ("t0", "t1")
PREFIXES = ([], [3] * 8, list(range(12)))
new_tokens = st.lists(st.integers(0, 4), min_size=1, max_size=9)


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_gpu=st.integers(6, 16),
        num_host=st.integers(0, 16),
        cap=st.integers(1, 4),
        ttl=st.sampled_from([None, 2.0]),
        backup=st.booleans(),
        victim_order=st.sampled_from(["predicted", "lru"]),
        prefetch=st.booleans(),
        split=st.sampled_from([None, "layerwise", "serial"]),
        layered=st.booleans(),
    )
    def setup(
        self, num_gpu: int, num_host: int, cap: int, ttl: float | None, backup: bool,
        victim_order: str, prefetch: bool, split: str | None, layered: bool,
    ) -> None:  # fmt: skip
        self.clock = Clock()
        self.gpu = KVStore(SPEC, num_gpu, fill=float("nan"))
        hasher = BlockHasher(block_size=BS, secret=b"m")
        host_mgr, self.host, self.engine = None, None, None
        if num_host:
            self.host = KVStore(SPEC, num_host, fill=float("nan"))
            self.engine = DeferredCopyEngine(
                self.gpu, self.host, self.clock, delay=0.5, layers=layered
            )
            host_mgr = BlockManager(BlockPool(num_host, name="host"), hasher)
        cache = TieredKVCache(
            BlockManager(BlockPool(num_gpu, name="gpu"), hasher), host_mgr, self.engine
        )
        self.prefetch = (
            PrefetchConfig(
                headroom=0.0, max_inflight_blocks=6, horizon_s=30.0, min_return_probability=0.05
            )
            if prefetch
            else None
        )
        config = SchedulerConfig(max_pinned_sessions=cap, max_queue=4, queue_timeout_s=5.0,
                                 idle_ttl_s=ttl, high_watermark=0.9, backup_idle=backup,
                                 victim_order=victim_order, prefetch=self.prefetch,
                                 restore_split=split is not None,
                                 # a layered engine: plans handed out mid-copy
                                 layerwise_restore=split == "layerwise" or layered)  # fmt: skip
        # with splits on, a link slow enough against compute that restores do split
        cost = (
            CostModel(block_size=BS, host_link_bytes_per_s=2e9, gpu_flops=1e16) if split else None
        )
        self.sched = SessionScheduler(cache, config, clock=self.clock, cost=cost)
        self.sched.idle_gaps = IdleGapModel(min_samples=2)  # an opinion after two gaps
        self.limit = int(0.9 * num_gpu)
        self.tokens: dict[int, tuple[int, list[int]]] = {}  # open session -> (tenant, history)
        self.ready: set[int] = set()  # sessions with a turn ready to run
        # ready sessions whose plan came with a layer-wise restore still copying
        self.restoring: dict[int, TurnPlan] = {}
        self.queue_order: list[int] = []
        self.histories: list[tuple[int, list[int]]] = []  # closed sessions' histories
        self.next_id = 0

    # -------------------------------------------------------------- helpers
    def _on_plan(self, sid: int, plan: TurnPlan, *, newly_pinned: bool) -> None:
        tenant, hist = self.tokens[sid]
        assert plan.num_tokens == len(hist)
        if newly_pinned:  # admission kept GPU use under the watermark
            assert self.sched.cache.gpu.pool.num_in_use <= self.limit
        self.ready.add(sid)
        if plan.restore is not None:  # its bytes land layer by layer: checked in run_turn
            self.restoring[sid] = plan
            return
        # everything before compute_start must already hold this session's bytes
        got = read_tokens(self.gpu, plan.block_ids, plan.compute_start)
        if plan.compute_start:
            assert torch.equal(
                got, expected_tokens(token_values(tenant, hist)[: plan.compute_start])
            )
        self.ready.add(sid)

    def _handle(self, events: list) -> None:  # type: ignore[type-arg]
        self._check_fifo()
        for ev in events:
            if isinstance(ev, TurnReady):
                self._on_plan(ev.session_id, ev.plan, newly_pinned=True)
            else:
                self.tokens[ev.session_id] = (
                    self.tokens[ev.session_id][0],
                    self.tokens[ev.session_id][1][: self._seq_len(ev.session_id)],
                )

    def _check_fifo(self) -> None:
        """Turns leave the queue (admitted or timed out) strictly in arrival order."""
        self.queue_order = [s for s in self.queue_order if s in self.tokens]  # drop closed
        left = [s for s in self.queue_order if not self.sched.session(s).is_queued]
        assert left == self.queue_order[: len(left)], f"left {left} of {self.queue_order}"
        self.queue_order = self.queue_order[len(left) :]

    def _seq_len(self, sid: int) -> int:
        return self.sched._seq_len(self.sched.session(sid))

    def _begin(self, sid: int, toks: list[int]) -> None:
        s = self.sched.session(sid)
        was_pinned = s.is_pinned
        try:
            plan = self.sched.begin_turn(sid, toks)
        except OverCapacityError:
            return
        tenant, hist = self.tokens[sid]
        self.tokens[sid] = (tenant, hist + toks)
        if plan is not None:
            self._on_plan(sid, plan, newly_pinned=not was_pinned)
        elif s.is_queued:
            self.queue_order.append(sid)

    # -------------------------------------------------------------- rules
    @rule(tenant=st.sampled_from([0, 1]), prefix=st.sampled_from(PREFIXES), toks=new_tokens)
    def open_and_begin(self, tenant: int, prefix: list[int], toks: list[int]) -> None:
        sid = self.next_id
        self.next_id += 1
        self.sched.open_session(sid, tenant=TENANTS[tenant])
        self.tokens[sid] = (tenant, [])
        self._begin(sid, prefix + toks)

    @rule(data=st.data(), toks=new_tokens)
    def next_turn(self, data: st.DataObject, toks: list[int]) -> None:
        idle = [s for s in self.tokens if s not in self.ready and not self.sched.session(s).is_queued
                and self.sched.session(s).state in (S.IDLE, S.OFFLOADED, S.DROPPED, S.NEW)]  # fmt: skip
        if idle:
            self._begin(data.draw(st.sampled_from(sorted(idle))), toks)

    @rule(data=st.data(), toks=new_tokens, reclaim=st.booleans())
    def come_back(self, data: st.DataObject, toks: list[int], reclaim: bool) -> None:
        """A session resting on the host (or released) returns, after the GPU reclaimed
        its cached blocks (`reclaim`) or not: the restore paths. With none resting, a
        lowered pin cap pushes idle sessions out first."""

        def away() -> list[int]:
            return [s for s in self.tokens if not self.sched.session(s).is_queued
                    and self.sched.session(s).state in (S.OFFLOADED, S.DROPPED)]  # fmt: skip

        if not away() and self.sched.num_pinned > 1:
            cap = self.sched.config.max_pinned_sessions
            self.change_cap(1)
            self.change_cap(cap)
        self.advance(1.0)  # let offloads in flight land
        resting = away()
        if resting:
            if reclaim:
                pool = self.sched.cache.gpu.pool
                pool.evict(pool.num_cached)
            self._begin(data.draw(st.sampled_from(sorted(resting))), toks)

    @rule(data=st.data(), output=st.lists(st.integers(0, 4), max_size=6))
    def run_turn(self, data: st.DataObject, output: list[int]) -> None:
        if not self.ready:
            return
        sid = data.draw(st.sampled_from(sorted(self.ready)))
        tenant, hist = self.tokens[sid]
        plan = self.restoring.pop(sid, None)
        if plan is not None:  # the runner's order: wait per layer, forward, commit
            assert plan.restore is not None
            for layer in range(plan.restore.num_layers):
                plan.restore.wait_layer(layer)
            valid = self.sched.commit_restore(sid)
            assert 0 <= valid <= plan.compute_start
            assert self.sched.cache.gpu.table(sid).num_computed_tokens == valid
            got = read_tokens(self.gpu, plan.block_ids, valid)
            assert torch.equal(got, expected_tokens(token_values(tenant, hist)[:valid]))
        t = self.sched.cache.gpu.table(sid)
        slots = self.sched.cache.gpu.slot_mapping(sid, t.num_computed_tokens, t.num_tokens).tolist()
        write_kv(self.gpu, slots, token_values(tenant, hist)[t.num_computed_tokens :])
        self.sched.mark_computed(sid)
        if output:
            try:
                slots = self.sched.append_tokens(sid, output).tolist()
            except Exception as exc:  # OutOfBlocksError: the turn ends without output
                assert "blocks" in str(exc)
            else:
                hist = hist + output
                self.tokens[sid] = (tenant, hist)
                write_kv(self.gpu, slots, token_values(tenant, hist)[len(hist) - len(output) :])
                self.sched.mark_computed(sid)
        self.sched.end_turn(sid)
        self.ready.discard(sid)
        self._handle(self.sched.poll())

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        if self.tokens:
            sid = data.draw(st.sampled_from(sorted(self.tokens)))
            tenant, hist = self.tokens.pop(sid)
            self.sched.close_session(sid)
            self.ready.discard(sid)
            self.restoring.pop(sid, None)
            if hist and self.sched.cache.location(sid) is None:
                self.histories.append((tenant, hist[: len(hist)]))
            self._handle(self.sched.poll())

    @rule(data=st.data(), extra=new_tokens)
    def resume(self, data: st.DataObject, extra: list[int]) -> None:
        if not self.histories:
            return
        tenant, hist = data.draw(st.sampled_from(self.histories))
        sid = self.next_id
        self.next_id += 1
        self.sched.open_session(sid, tenant=TENANTS[tenant])
        self.tokens[sid] = (tenant, [])
        self._begin(sid, hist + extra)

    @rule(dt=st.sampled_from([0.1, 0.6, 3.0, 6.0]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt
        self._handle(self.sched.poll())

    @rule(failing=st.booleans())
    def faults(self, failing: bool) -> None:
        if self.engine is not None:
            self.engine.failing = failing

    @rule(cap=st.integers(1, 4))
    def change_cap(self, cap: int) -> None:
        self.sched.set_max_pinned_sessions(cap)
        self._handle(self.sched.poll())

    # -------------------------------------------------------------- invariants
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "sched"):
            return
        sched = self.sched
        sched.check_invariants()
        assert set(sched._sessions) == set(self.tokens)
        for sid, (tenant, hist) in self.tokens.items():
            s = sched.session(sid)
            loc = sched.cache.location(sid)
            values = token_values(tenant, hist)
            if s.is_pinned and loc == "gpu":  # ACTIVE or IDLE: no lost blocks, right bytes
                t = sched.cache.gpu.table(sid)
                n = t.num_computed_tokens
                assert t.tokens.tolist() == hist[: t.num_tokens]
                if n:
                    assert torch.equal(
                        read_tokens(self.gpu, t.block_ids, n), expected_tokens(values[:n])
                    )
            if loc == "host":
                t = sched.cache.host.table(sid)
                got = read_tokens(self.host, t.block_ids, t.num_tokens)
                assert torch.equal(got, expected_tokens(values[: t.num_tokens]))
        for tenant, hist in self.histories[-3:]:  # findable prefixes hold the right bytes
            ids = sched.cache.gpu.match_prefix(hist, tenant=TENANTS[tenant])
            n = len(ids) * BS
            if n:
                assert torch.equal(
                    read_tokens(self.gpu, ids, n), expected_tokens(token_values(tenant, hist)[:n])
                )
        # prefetch: one restore in flight at most, within its block budget
        if self.prefetch is not None:
            flying = list(sched._prefetching.values())
            assert len(flying) <= 1, flying
            assert sum(s.prefetched_blocks for s in flying) <= self.prefetch.max_inflight_blocks
        m = sched.metrics
        assert m.blocks_prefetch_used <= m.blocks_prefetched
        # no starvation: a waiting turn is blocked only by running turns or copies
        if sched.num_queued:
            running = any(sched.session(s).state == S.ACTIVE for s in self.tokens)
            assert running or sched.cache.num_pending or self._queued_head_blocked_by_idle_pins()

    def _queued_head_blocked_by_idle_pins(self) -> bool:
        # poll() has not run since the last change: give it a chance, then re-check
        self._handle(self.sched.poll())
        return (
            self.sched.num_queued == 0
            or any(self.sched.session(s).state == S.ACTIVE for s in self.tokens)
            or self.sched.cache.num_pending > 0
        )


TestSchedulerMachine = SchedulerMachine.TestCase
