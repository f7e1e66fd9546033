"""Hypothesis state machine over both tiers with real CPU tensors and injected faults.

K/V written for a token is a deterministic function of (tenant, prefix tokens), so any
block that either tier reports findable for some content can be checked byte for byte.
After every step: both tiers' invariants hold, every GPU sequence's computed tokens hold
its values, every offloaded sequence's host blocks hold its values, and every lookup on
either tier returns blocks holding exactly the requested content (nothing lost, nothing
wrong served).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sched_helpers import Clock
from tier_helpers import (
    SPEC,
    DeferredCopyEngine,
    expected_tokens,
    make_cache,
    read_tokens,
    token_values,
    write_kv,
)

from pagedkv.cache.errors import OutOfBlocksError
from pagedkv.tiers import Backup, TransferResult

BS = SPEC.block_size
TENANTS = ("t0", "t1")
PREFIXES = ([], [5] * 6, list(range(10)))
tokens_st = st.lists(st.integers(0, 3), max_size=10)
prompts = st.tuples(st.sampled_from(PREFIXES), tokens_st).map(lambda p: p[0] + p[1])


class TieredMachine(RuleBasedStateMachine):
    @initialize(num_gpu=st.integers(4, 14), num_host=st.integers(2, 14))
    def setup(self, num_gpu: int, num_host: int) -> None:
        self.clock = Clock()
        self.cache, self.gpu, self.host = make_cache(num_gpu, num_host)
        self.engine = DeferredCopyEngine(self.gpu, self.host, self.clock, delay=1.0)
        self.cache.engine = self.engine
        self.model: dict[int, tuple[int, list[int]]] = {}  # seq -> (tenant index, tokens)
        self.seen: list[tuple[int, list[int]]] = []  # histories presented so far
        self.next_id = 0
        self.cancelled: set[object] = set()  # copies cancelled while in flight

    # -------------------------------------------------------------- helpers
    def _compute_rest(self, seq: int) -> None:
        """Write the values of a GPU sequence's uncomputed tokens, then mark them."""
        t = self.cache.gpu.table(seq)
        tenant, tokens = self.model[seq]
        slots = self.cache.gpu.slot_mapping(seq, t.num_computed_tokens, t.num_tokens).tolist()
        write_kv(self.gpu, slots, token_values(tenant, tokens)[t.num_computed_tokens :])
        self.cache.gpu.mark_computed(seq)

    def _settle(self, results: list[TransferResult]) -> None:
        for r in results:
            if r.seq_id in self.cancelled:  # a cancelled copy keeps nothing it moved
                self.cancelled.discard(r.seq_id)
                assert not r.ok and r.failed_blocks and r.num_blocks_copied == 0, r
                if r.direction == "offload" and not r.backup:
                    assert r.valid_tokens == 0, r
            if r.direction == "restore" and self.cache.location(r.seq_id) == "gpu":
                assert r.valid_tokens == self.cache.gpu.table(r.seq_id).num_computed_tokens
                self._compute_rest(r.seq_id)  # failed blocks are recomputed
            if r.direction == "offload" and not r.ok:
                assert self.cache.location(r.seq_id) in ("gpu", None)

    def _seqs_at(self, where: str) -> list[int]:
        return sorted(s for s in self.model if self.cache.location(s) == where)

    # -------------------------------------------------------------- rules
    @rule(tenant=st.sampled_from([0, 1]), prompt=prompts, wait=st.booleans())
    def begin(self, tenant: int, prompt: list[int], wait: bool) -> None:
        seq = self.next_id
        self.next_id += 1
        try:
            plan = self.cache.begin_sequence(
                seq, prompt, tenant=TENANTS[tenant], max_cached_tokens=max(len(prompt) - 1, 0)
            )
        except OutOfBlocksError:
            assert self.cache.location(seq) is None
            return
        self.model[seq] = (tenant, list(prompt))
        self.seen.append((tenant, list(prompt)))
        assert plan.compute_start == plan.num_gpu_cached_tokens + plan.num_host_cached_tokens
        if not plan.pending:
            self._compute_rest(seq)
        elif wait:
            r = self.cache.wait(seq)
            assert r is not None
            self._settle([r])
        # else: computed once the copy completes (see _settle)

    @precondition(lambda self: bool(self.seen))
    @rule(data=st.data(), extra=tokens_st, wait=st.booleans())
    def reconnect(self, data: st.DataObject, extra: list[int], wait: bool) -> None:
        """A client comes back with a history seen before (GPU, then host hits)."""
        tenant, hist = data.draw(st.sampled_from(self.seen))
        self.begin(tenant, hist + extra, wait)

    @rule(data=st.data(), extra=tokens_st, drop=st.booleans(), wait=st.booleans())
    def offload_reclaim_reconnect(
        self, data: st.DataObject, extra: list[int], drop: bool, wait: bool
    ) -> None:
        """The pressure cycle in one step: offload a session (copy completes), maybe drop
        it, reclaim the GPU copies, and reconnect with its history: host hits, restored
        by a copy that may stay in flight while other rules run."""
        seqs = [s for s in self._seqs_at("gpu") if self._computed(s)]
        if not seqs:
            return
        seq = data.draw(st.sampled_from(seqs))
        tenant, hist = self.model[seq]
        try:
            self.cache.offload(seq)
        except OutOfBlocksError:
            return
        r = self.cache.wait(seq)
        if r is not None:
            self._settle([r])
        if drop and self.cache.location(seq) == "host":
            self.cache.drop_offloaded(seq)
            del self.model[seq]
        self.reclaim_gpu()
        self.begin(tenant, hist + extra, wait)

    @rule()
    def reclaim_gpu(self) -> None:
        """Reclaim every cached GPU block (what memory pressure does)."""
        for block_id in self.cache.gpu.pool.evict(self.cache.gpu.pool.num_cached):
            self.gpu.kv[block_id] = float("nan")

    @rule(data=st.data(), tokens=tokens_st)
    def append(self, data: st.DataObject, tokens: list[int]) -> None:
        seqs = [s for s in self._seqs_at("gpu") if self._computed(s)]
        if not seqs:
            return
        seq = data.draw(st.sampled_from(seqs))
        try:
            self.cache.gpu.append_tokens(seq, tokens)
        except OutOfBlocksError:
            return
        self.model[seq][1].extend(tokens)
        self._compute_rest(seq)

    def _computed(self, seq: int) -> bool:
        t = self.cache.gpu.table(seq)
        return t.num_computed_tokens == t.num_tokens

    @rule(data=st.data(), wait=st.booleans())
    def offload(self, data: st.DataObject, wait: bool) -> None:
        seqs = [s for s in self._seqs_at("gpu") if self._computed(s)]
        if not seqs:
            return
        seq = data.draw(st.sampled_from(seqs))
        before = (self.cache.host.pool.num_available, len(self.cache.host))
        try:
            self.cache.offload(seq)
        except OutOfBlocksError:
            assert (self.cache.host.pool.num_available, len(self.cache.host)) == before
            assert self.cache.location(seq) == "gpu"
            return
        if wait:
            r = self.cache.wait(seq)
            if r is None:  # nothing needed copying: it completed inside offload()
                assert self.cache.location(seq) == "host"
            else:
                self._settle([r])

    @rule(data=st.data(), wait=st.booleans())
    def backup(self, data: st.DataObject, wait: bool) -> None:
        """Write a GPU sequence's full blocks back to the host while it stays usable."""
        seqs = [s for s in self._seqs_at("gpu") if not self.cache.is_pending(Backup(s))]
        if not seqs:
            return
        seq = data.draw(st.sampled_from(seqs))
        before = (self.cache.host.pool.num_available, len(self.cache.host))
        try:
            handle = self.cache.backup(seq)
        except OutOfBlocksError:
            assert (self.cache.host.pool.num_available, len(self.cache.host)) == before
            return
        assert self.cache.location(seq) == "gpu"
        if handle is not None and wait:
            r = self.cache.wait(Backup(seq))
            assert r is not None and r.seq_id == Backup(seq)
            self._settle([r])

    @rule(data=st.data(), wait=st.booleans())
    def restore(self, data: st.DataObject, wait: bool) -> None:
        seqs = self._seqs_at("host")
        if not seqs:
            return
        seq = data.draw(st.sampled_from(seqs))
        try:
            self.cache.restore(seq)
        except OutOfBlocksError:
            assert self.cache.location(seq) == "host"
            return
        if wait:
            r = self.cache.wait(seq)
            if r is not None:
                self._settle([r])

    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        seqs = self._seqs_at("host")
        if seqs:
            seq = data.draw(st.sampled_from(seqs))
            self.cache.drop_offloaded(seq)
            del self.model[seq]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.cache.free(seq)  # deferred when a copy is in flight
        if not self.cache.is_pending(seq):
            assert self.cache.location(seq) is None
            del self.model[seq]

    @rule(tier=st.sampled_from(["gpu", "host"]), num=st.integers(0, 4))
    def evict(self, tier: str, num: int) -> None:
        manager = self.cache.gpu if tier == "gpu" else self.cache.host
        out = manager.pool.evict(num)
        store = self.gpu if tier == "gpu" else self.host
        for block_id in out:
            store.kv[block_id] = float("nan")  # reclaimed: its bytes may be overwritten

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0]))
    def poll(self, dt: float) -> None:
        self.clock.now += dt
        self._settle(self.cache.poll())
        self._forget_freed()

    @rule()
    def wait_all(self) -> None:
        self._settle(self.cache.wait_all())
        self._forget_freed()

    @rule(failing=st.booleans())
    def set_faults(self, failing: bool) -> None:
        self.engine.failing = failing

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        seqs = [s for s in self.model if self.cache.is_pending(s)]
        seqs += [Backup(s) for s in range(self.next_id) if self.cache.is_pending(Backup(s))]
        if seqs:
            key = data.draw(st.sampled_from(seqs))
            self.cache.cancel(key)
            self.cancelled.add(key)

    def _forget_freed(self) -> None:
        for seq in [s for s in self.model if self.cache.location(s) is None]:
            del self.model[seq]

    @rule(tenant=st.sampled_from([0, 1]), prompt=prompts)
    def lookup(self, tenant: int, prompt: list[int]) -> None:
        gpu_tokens, host_tokens = self.cache.cached_prefix(prompt, tenant=TENANTS[tenant])
        values = token_values(tenant, prompt)
        gpu_ids = self.cache.gpu.match_prefix(prompt, tenant=TENANTS[tenant])
        assert len(gpu_ids) * BS == gpu_tokens
        if gpu_tokens:
            got = read_tokens(self.gpu, gpu_ids, gpu_tokens)
            assert torch.equal(got, expected_tokens(values[:gpu_tokens]))
        # the host blocks that continue the chain after the GPU hits hold the right bytes
        hasher = self.cache.gpu.hasher
        arr = np.asarray(prompt, dtype=np.int32)
        hashes, contents = hasher.hash_chain(hasher.root(TENANTS[tenant]), arr, with_content=True)
        k1, k2 = gpu_tokens // BS, host_tokens // BS
        for i in range(k1, k1 + k2):
            block_id = self.cache.host.pool.match(hashes[i], contents[i])
            assert block_id is not None
            got = read_tokens(self.host, [block_id], BS)
            want = expected_tokens(values[: (i + 1) * BS])[i * BS :]
            assert torch.equal(got, want), f"host block {block_id} at {i} holds wrong bytes"
        # every block the host tier itself matches, under GPU hits too
        host_ids = self.cache.host.match_prefix(prompt, tenant=TENANTS[tenant])
        if host_ids:
            got = read_tokens(self.host, host_ids, len(host_ids) * BS)
            assert torch.equal(got, expected_tokens(values[: len(host_ids) * BS]))

    # -------------------------------------------------------------- invariants
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.cache.check_invariants()
        for seq, (tenant, tokens) in self.model.items():
            loc = self.cache.location(seq)
            assert loc is not None, f"sequence {seq} was lost"
            if loc in ("gpu", "offloading"):
                t = self.cache.gpu.table(seq)
                assert t.tokens.tolist() == tokens
                n = t.num_computed_tokens
                got = read_tokens(self.gpu, t.block_ids, n)
                if n:
                    assert torch.equal(got, expected_tokens(token_values(tenant, tokens)[:n]))
            if loc == "host":
                t = self.cache.host.table(seq)
                got = read_tokens(self.host, t.block_ids, t.num_tokens)
                assert torch.equal(got, expected_tokens(token_values(tenant, tokens)))


TestTieredMachine = TieredMachine.TestCase
