"""Hypothesis state machine over BlockPool + BlockManager against a shadow model.

The shadow records, per block id, the content its K/V would hold: `(tenant, prefix
tokens up to the block's end)`, written when the test "computes" a block and wiped when
the pool hands the id out again. After every step: the manager's own invariants hold,
every computed block of a live sequence still holds that sequence's content (nothing was
reclaimed or shared wrongly), every prefix lookup returns blocks whose content is exactly
the requested prefix (soundness), and every computed full block of a live sequence is
findable (completeness).
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.errors import OutOfBlocksError
from pagedkv.cache.hashing import BlockHasher

BS = 4
NUM_BLOCKS = 24
TENANTS = ("t0", "t1")
PREFIXES = ([], [7] * 9, list(range(12)), [1, 2, 3, 4, 5, 6, 7, 8])

token_lists = st.lists(st.integers(0, 3), min_size=0, max_size=14)
prompts = st.tuples(st.sampled_from(PREFIXES), token_lists).map(lambda p: p[0] + p[1])

Content = tuple[str, tuple[int, ...]]


class BlockManagerMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.m = BlockManager(BlockPool(NUM_BLOCKS), BlockHasher(block_size=BS, secret=b"k"))
        self.shadow: dict[int, Content] = {}
        self.model: dict[int, tuple[str, list[int]]] = {}  # seq id -> (tenant, tokens)
        self.next_id = 0

    # -------------------------------------------------------------- helpers
    def _compute(self, seq_id: int, upto: int | None = None) -> None:
        """Pretend the model wrote K/V for the uncomputed tokens, then mark them."""
        t = self.m.table(seq_id)
        tenant, tokens = self.model[seq_id]
        end = t.num_tokens if upto is None else upto
        for i in range(t.num_computed_tokens // BS, end // BS):
            self.shadow[t.block_ids[i]] = (tenant, tuple(tokens[: (i + 1) * BS]))
        self.m.mark_computed(seq_id, end)

    def _snapshot(self) -> object:
        p = self.m.pool
        tables = {
            sid: (list(t.block_ids), t.num_tokens, t.num_computed_tokens, list(t.hashes))
            for sid, t in self.m._tables.items()
        }
        return copy.deepcopy(
            (list(p._ref), list(p._free), list(p._lru), dict(p._index), list(p._key), tables)
        )

    def _append(self, seq_id: int, tokens: list[int], max_cached: int | None) -> bool:
        before = self._snapshot()
        try:
            r = self.m.append_tokens(seq_id, tokens, max_cached_tokens=max_cached)
        except OutOfBlocksError:
            assert self._snapshot() == before, "a refused append changed state"
            return False
        for block_id in r.new_block_ids:
            self.shadow.pop(block_id, None)  # the id was (re)allocated: old bytes are gone
        tenant, model_tokens = self.model[seq_id]
        start = len(model_tokens)
        model_tokens.extend(tokens)
        # cached hits must already hold exactly this prefix
        for k, block_id in enumerate(r.hit_block_ids):
            end = start + (k + 1) * BS
            assert self.shadow.get(block_id) == (tenant, tuple(model_tokens[:end]))
        assert r.num_cached_tokens == len(r.hit_block_ids) * BS
        if max_cached is not None:
            assert r.num_cached_tokens <= max_cached
        assert len(r.slot_mapping) == start + len(tokens) - r.compute_start
        t = self.m.table(seq_id)
        for j, slot in enumerate(r.slot_mapping.tolist()):
            pos = r.compute_start + j
            assert slot == t.block_ids[pos // BS] * BS + pos % BS
        return True

    # -------------------------------------------------------------- rules
    @rule(target=seqs, tenant=st.sampled_from(TENANTS), prompt=prompts, data=st.data())
    def add(self, tenant: str, prompt: list[int], data: st.DataObject) -> object:
        seq_id = self.next_id
        self.next_id += 1
        self.m.add_sequence(seq_id, tenant=tenant)
        self.model[seq_id] = (tenant, [])
        max_cached = data.draw(st.one_of(st.none(), st.integers(0, len(prompt))))
        if not self._append(seq_id, prompt, max_cached):
            self.m.free_sequence(seq_id)
            del self.model[seq_id]
            return multiple()
        if data.draw(st.booleans()):
            self._compute(seq_id)
        return seq_id

    @rule(seq=seqs, tokens=token_lists, compute=st.booleans())
    def append(self, seq: object, tokens: list[int], compute: bool) -> None:
        if not isinstance(seq, int) or seq not in self.model:
            return
        if self._append(seq, tokens, None) and compute:
            self._compute(seq)

    @rule(seq=seqs, token=st.integers(0, 3), compute=st.booleans())
    def decode(self, seq: object, token: int, compute: bool) -> None:
        """One generated token through the single-token fast path."""
        if not isinstance(seq, int) or seq not in self.model:
            return
        t = self.m.table(seq)
        before = self._snapshot()
        try:
            slot = self.m.append_token(seq, token)
        except OutOfBlocksError:
            assert self._snapshot() == before
            return
        pos = len(self.model[seq][1])
        self.model[seq][1].append(token)
        if pos % BS == 0:
            self.shadow.pop(t.block_ids[-1], None)  # a freshly allocated block
        assert slot == t.block_ids[pos // BS] * BS + pos % BS
        if compute:
            self._compute(seq)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), bad=st.sampled_from([2**31, -(2**31) - 1, 1.5, "x", None]))
    def bad_decode_token(self, data: st.DataObject, bad: object) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        before = self._snapshot()
        with pytest.raises((ValueError, TypeError), match=r"int32|int token"):
            self.m.append_token(seq_id, bad)  # type: ignore[arg-type]
        assert self._snapshot() == before

    @rule(seq=seqs, data=st.data())
    def compute_some(self, seq: object, data: st.DataObject) -> None:
        if not isinstance(seq, int) or seq not in self.model:
            return
        t = self.m.table(seq)
        self._compute(seq, data.draw(st.integers(t.num_computed_tokens, t.num_tokens)))

    @rule(target=seqs, seq=seqs)
    def fork(self, seq: object) -> object:
        if not isinstance(seq, int) or seq not in self.model:
            return multiple()
        t = self.m.table(seq)
        if t.num_computed_tokens != t.num_tokens:
            with pytest.raises(ValueError, match="not yet computed"):
                self.m.fork(seq, self.next_id)
            return multiple()
        child = self.next_id
        self.next_id += 1
        before = self._snapshot()
        try:
            r = self.m.fork(seq, child)
        except OutOfBlocksError:
            assert self._snapshot() == before
            return multiple()
        tenant, tokens = self.model[seq]
        self.model[child] = (tenant, list(tokens))
        if r.copy_dst_block is not None:
            self.shadow.pop(r.copy_dst_block, None)
        assert r.shared_block_ids == t.block_ids[: t.num_full_blocks]
        return child

    @rule(seq=consumes(seqs))
    def free(self, seq: object) -> None:
        if not isinstance(seq, int) or seq not in self.model:
            return
        self.m.free_sequence(seq)
        del self.model[seq]

    @rule(num=st.integers(0, 6))
    def evict(self, num: int) -> None:
        cached = self.m.pool.num_cached
        out = self.m.pool.evict(num)
        assert len(out) == min(num, cached)
        for block_id in out:
            self.shadow.pop(block_id, None)

    @rule(tenant=st.sampled_from(TENANTS), prompt=prompts)
    def lookup(self, tenant: str, prompt: list[int]) -> None:
        before = self._snapshot()
        ids = self.m.match_prefix(prompt, tenant=tenant)
        assert self._snapshot() == before, "a lookup changed state"
        for k, block_id in enumerate(ids):
            assert self.shadow.get(block_id) == (tenant, tuple(prompt[: (k + 1) * BS]))
        assert self.m.num_cached_tokens(prompt, tenant=tenant) == len(ids) * BS

    # -------------------------------------------------------------- bad input
    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), bad=st.sampled_from([2**31, -(2**31) - 1, 1.5, "x"]))
    def bad_tokens(self, data: st.DataObject, bad: object) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        before = self._snapshot()
        with pytest.raises((ValueError, TypeError), match=r"int32|int token"):
            self.m.append_tokens(seq_id, [1, bad, 2])  # type: ignore[list-item]
        assert self._snapshot() == before

    @rule(num=st.integers(1, 5))
    def too_many_blocks(self, num: int) -> None:
        before = self._snapshot()
        n = self.m.pool.num_available + num
        with pytest.raises(OutOfBlocksError, match=f"need {n} blocks"):
            self.m.pool.allocate(n)
        assert self._snapshot() == before

    @rule()
    def unknown_and_double_free(self) -> None:
        before = self._snapshot()
        with pytest.raises(KeyError, match="unknown sequence"):
            self.m.free_sequence("nope")
        free_ids = [b for b in range(NUM_BLOCKS) if self.m.pool.refcount(b) == 0]
        if free_ids:
            with pytest.raises(ValueError, match="double free"):
                self.m.pool.release([free_ids[0]])
        with pytest.raises(ValueError, match="out of range"):
            self.m.pool.release([NUM_BLOCKS])
        assert self._snapshot() == before

    # -------------------------------------------------------------- invariants
    @invariant()
    def consistent(self) -> None:
        self.m.check_invariants()
        assert set(self.m.sequences()) == set(self.model)
        for seq_id, (tenant, tokens) in self.model.items():
            t = self.m.table(seq_id)
            assert t.tokens.tolist() == tokens
            for i in range(t.num_computed_tokens // BS):
                assert self.shadow.get(t.block_ids[i]) == (tenant, tuple(tokens[: (i + 1) * BS]))
            # completeness: every computed full block of a live sequence is findable
            n_full = t.num_computed_tokens // BS
            found = self.m.match_prefix(tokens[: n_full * BS], tenant=tenant)
            assert found == t.block_ids[:n_full]


TestBlockManagerMachine = BlockManagerMachine.TestCase
