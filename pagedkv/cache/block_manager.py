"""BlockManager: sequences' block tables on one pool, with content-hash prefix reuse."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import numpy as np

from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.block_table import BlockTable
from pagedkv.cache.errors import InvariantError, OutOfBlocksError
from pagedkv.cache.hashing import INT32_MAX, INT32_MIN, BlockHasher, TokenInput, as_token_array

SeqId = Hashable


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What `BlockManager.append_tokens` did.

    Attributes:
        num_cached_tokens: leading new tokens served from the prefix cache (their K/V is
            already in `hit_block_ids`; do not compute them).
        compute_start: sequence position of the first token to compute.
        slot_mapping: int64 `[num_tokens - compute_start]`, the slot each token to
            compute writes its K/V to.
        hit_block_ids: cached blocks now shared by this sequence.
        new_block_ids: blocks freshly allocated for it.
    """

    num_cached_tokens: int
    compute_start: int
    slot_mapping: np.ndarray
    hit_block_ids: list[int]
    new_block_ids: list[int]


@dataclass(frozen=True, slots=True)
class ForkResult:
    """What `BlockManager.fork` did: shared full blocks, and a partial block to copy.

    `copy_src_block` -> `copy_dst_block` must be copied (whole block) by the caller before
    the child runs; both are None when the parent ended on a block boundary.
    """

    shared_block_ids: list[int]
    copy_src_block: int | None
    copy_dst_block: int | None


class BlockManager:
    """Owns the block tables of many sequences on one `BlockPool`.

    Tokens are appended per sequence; blocks are allocated as needed; full blocks are
    hashed once, as they fill, and become findable (indexed) once `mark_computed` says
    their K/V has been written. A sequence whose tokens so far are all computed and end
    on a block boundary reuses cached blocks for the next full blocks whose hash chain
    matches (longest prefix, stopping at the first miss).

    Every mutating call checks first and then mutates: on error nothing has changed.
    """

    def __init__(self, pool: BlockPool, hasher: BlockHasher) -> None:
        self.pool = pool
        self.hasher = hasher
        self.block_size = hasher.block_size
        self._tables: dict[SeqId, BlockTable] = {}
        # sequences whose blocks a copy between tiers is reading or writing (set by
        # TieredKVCache): appending to or freeing them would race the copy
        self._frozen: dict[SeqId, str] = {}

    # ------------------------------------------------------------------ copies
    def freeze(self, seq_id: SeqId, why: str) -> None:
        """Refuse appends to and frees of `seq_id` until `thaw` (a copy of its blocks is
        in flight; `why` names it in the errors)."""
        self.table(seq_id)
        self._frozen[seq_id] = why

    def thaw(self, seq_id: SeqId) -> None:
        self._frozen.pop(seq_id, None)

    def _check_not_frozen(self, seq_id: SeqId, what: str) -> None:
        why = self._frozen.get(seq_id)
        if why is not None:
            raise ValueError(
                f"{what} {seq_id!r}: its {why} is in flight; wait for it to complete "
                "(TieredKVCache.poll / wait)"
            )

    # ------------------------------------------------------------------ queries
    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    def sequences(self) -> Iterator[SeqId]:
        return iter(self._tables)

    def table(self, seq_id: SeqId) -> BlockTable:
        """The block table of a sequence (read it; mutate only through the manager).

        Raises:
            KeyError: unknown sequence id.
        """
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id!r}") from None

    def match_prefix(
        self, tokens: TokenInput, *, tenant: str = "default", extra_keys: bytes = b""
    ) -> list[int]:
        """Block ids holding the longest cached prefix of `tokens` (full blocks only).

        The walk stops at the first miss. Changes nothing (a cached hit stays reclaimable).
        """
        arr = as_token_array(tokens)
        hashes, contents = self.hasher.hash_chain(
            self.hasher.root(tenant, extra_keys), arr, with_content=True
        )
        return self._match(hashes, contents, len(hashes))

    def num_cached_tokens(
        self, tokens: TokenInput, *, tenant: str = "default", extra_keys: bytes = b""
    ) -> int:
        """How many leading tokens of a prompt are cached in full blocks. Changes nothing."""
        return (
            len(self.match_prefix(tokens, tenant=tenant, extra_keys=extra_keys)) * self.block_size
        )

    def _match(self, hashes: list[bytes], contents: list[bytes], limit: int) -> list[int]:
        return self.pool.match_chain(hashes, contents, limit)

    # ------------------------------------------------------------------ mutations
    def add_sequence(
        self,
        seq_id: SeqId,
        *,
        tenant: str = "default",
        extra_keys: bytes = b"",
        root: bytes | None = None,
    ) -> BlockTable:
        """Create an empty sequence.

        `root` (the chain's root hash) defaults to `hasher.root(tenant, extra_keys)`; pass
        another table's `root` to recreate that sequence in another tier.

        Raises:
            ValueError: `seq_id` already exists.
            TypeError: tenant is not a str or extra_keys not bytes.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence id {seq_id!r} already exists")
        if root is None:
            root = self.hasher.root(tenant, extra_keys)
        table = BlockTable(seq_id, block_size=self.block_size, tenant=tenant, root=root)
        self._tables[seq_id] = table
        return table

    def append_tokens(
        self,
        seq_id: SeqId,
        tokens: TokenInput,
        *,
        max_cached_tokens: int | None = None,
        known_hashes: list[bytes] | None = None,
        known_contents: list[bytes] | None = None,
    ) -> AppendResult:
        """Append tokens to a sequence, reusing cached blocks where the prefix matches.

        Args:
            seq_id: an existing sequence.
            tokens: new token ids (int32 range).
            max_cached_tokens: at most this many of the new tokens may come from the
                cache (pass `len(tokens) - 1` when the model needs the last token's logits).

        Returns:
            An `AppendResult`; the tokens from `compute_start` on must be computed and
            their K/V written to `slot_mapping`, then `mark_computed` called.

        Raises:
            KeyError: unknown sequence id.
            TypeError / ValueError: bad tokens or a negative `max_cached_tokens`.
            OutOfBlocksError: not enough blocks; nothing was changed.
        """
        table = self.table(seq_id)
        if self._frozen:
            self._check_not_frozen(seq_id, "append_tokens")
        arr = as_token_array(tokens)
        if max_cached_tokens is not None and max_cached_tokens < 0:
            raise ValueError(f"max_cached_tokens must be >= 0, got {max_cached_tokens}")
        bs = self.block_size
        start = table.num_tokens
        end = start + len(arr)
        first_block = start // bs
        # hash each block that becomes full, once: old partial tokens + the new ones
        head = table.tokens[first_block * bs : start]
        segment = np.concatenate((head, arr)) if len(head) else arr
        parent = table.parent_hash(first_block)
        if known_hashes is None:
            new_hashes, contents = self.hasher.hash_chain(parent, segment, with_content=True)
        else:
            if len(known_hashes) < end // bs:
                raise ValueError(
                    f"known_hashes has {len(known_hashes)} hashes, the sequence will have "
                    f"{end // bs} full blocks"
                )
            new_hashes = list(known_hashes[first_block : end // bs])
            if known_contents is not None and first_block == 0:
                contents = known_contents[: end // bs]
            else:
                contents = self.hasher.chain_contents(parent, segment, new_hashes)
        hits: list[int] = []
        if start % bs == 0 and table.num_computed_tokens == start and table.broken_at is None:
            limit = len(new_hashes)
            if max_cached_tokens is not None:
                limit = min(limit, max_cached_tokens // bs)
            hits = self._match(new_hashes, contents, limit)
        num_new = -(-end // bs) - len(table.block_ids) - len(hits)
        # a cached hit stops being reclaimable once acquired
        available = self.pool.num_available - self.pool.count_cached(hits)
        if num_new > available:
            raise OutOfBlocksError(
                f"sequence {seq_id!r}: appending {len(arr)} tokens needs {num_new} new blocks, "
                f"{available} available",
                needed=num_new,
                available=available,
            )
        # ---- mutate (nothing below can fail)
        self.pool.acquire_matched(hits)
        new_ids = self.pool.allocate(num_new)
        table.block_ids.extend(hits)
        table.block_ids.extend(new_ids)
        table._extend_tokens(arr)
        table.hashes.extend(new_hashes)
        num_cached = len(hits) * bs
        if hits:
            table.num_computed_tokens += num_cached
            table.num_registered_blocks += len(hits)
        compute_start = start + num_cached
        return AppendResult(
            num_cached_tokens=num_cached,
            compute_start=compute_start,
            slot_mapping=self.slot_mapping(seq_id, compute_start, end),
            hit_block_ids=hits,
            new_block_ids=new_ids,
        )

    def append_token(self, seq_id: SeqId, token: int) -> int:
        """Append one token (a decode step's hot path) and return its slot.

        Same rules as `append_tokens` (one token never completes a cached prefix hit, so
        none is looked up); a block that becomes full is hashed here, once.

        Raises:
            KeyError: unknown sequence. TypeError / ValueError: not an int32 token id.
            OutOfBlocksError: a new block is needed and none is available; nothing changed.
        """
        table = self.table(seq_id)
        if self._frozen:
            self._check_not_frozen(seq_id, "append_token")
        if type(token) is not int:
            if isinstance(token, np.integer) and not isinstance(token, np.bool_):
                token = int(token)
            else:
                raise TypeError(f"token must be an int token id, got {token!r}")
        if not INT32_MIN <= token <= INT32_MAX:
            raise ValueError(f"token {token} is outside int32 [{INT32_MIN}, {INT32_MAX}]")
        bs = self.block_size
        pos = table.num_tokens
        if pos % bs == 0:
            table.block_ids.append(self.pool.allocate(1)[0])
        table._append_token(token)
        if (pos + 1) % bs == 0:
            i = pos // bs
            content = table.block_content(i)
            table.hashes.append(self.hasher.hash_content(content))
        return table.block_ids[pos // bs] * bs + pos % bs

    def slot_mapping(self, seq_id: SeqId, start: int, end: int) -> np.ndarray:
        """Slots of positions `[start, end)` of a sequence: int64 `[end - start]`.

        Raises:
            KeyError: unknown sequence. ValueError: the range is outside the sequence.
        """
        table = self.table(seq_id)
        if not 0 <= start <= end <= table.num_tokens:
            raise ValueError(
                f"slot_mapping: need 0 <= start <= end <= {table.num_tokens}, got [{start}, {end})"
            )
        bs = self.block_size
        if start >= end:
            return np.empty(0, dtype=np.int64)
        first = start // bs
        ids = np.asarray(table.block_ids[first : -(-end // bs)], dtype=np.int64)
        pos = np.arange(start, end, dtype=np.int64)
        # slot = block_id * block_size + offset, per token, vectorised over the new span
        slots: np.ndarray = ids[pos // bs - first] * bs + pos % bs
        return slots

    def mark_computed(self, seq_id: SeqId, num_tokens: int | None = None) -> None:
        """Record that K/V of the first `num_tokens` positions is written (default: all).

        Full blocks that became computed are registered in the index. When an identical
        block (same hash and content) is already indexed, the sequence switches to it and
        its own copy is freed: the K/V bytes are the same, memory holds them once.

        Raises:
            KeyError: unknown sequence id.
            ValueError: `num_tokens` beyond the sequence or below what was already computed.
        """
        table = self.table(seq_id)
        n = table.num_tokens if num_tokens is None else num_tokens
        if not table.num_computed_tokens <= n <= table.num_tokens:
            raise ValueError(
                f"sequence {seq_id!r}: num_tokens must be in "
                f"[{table.num_computed_tokens}, {table.num_tokens}], got {n}"
            )
        table.num_computed_tokens = n
        pool = self.pool
        for i in range(table.num_registered_blocks, n // self.block_size):
            if table.broken_at is not None:
                break
            block_id = table.block_ids[i]
            content = table.block_content(i)
            if pool.register(block_id, table.hashes[i], content):
                continue
            twin = pool.match(table.hashes[i], content)
            if twin is not None:
                # an identical block is already indexed: share it and free this copy, so
                # memory holds one copy and every computed full block stays findable
                pool.acquire([twin])
                pool.release([block_id])
                table.block_ids[i] = twin
            else:
                # a different block holds this hash (a collision): this block and every
                # later one chain from a colliding hash, so none may ever be indexed
                table.broken_at = i
        table.num_registered_blocks = max(table.num_registered_blocks, n // self.block_size)

    def fork(self, src_id: SeqId, dst_id: SeqId) -> ForkResult:
        """Create `dst_id` as a copy of `src_id` sharing its full blocks.

        The partial last block is never shared: the child gets a fresh block, and the
        caller copies the parent's partial block into it (see `ForkResult`).

        Raises:
            KeyError: unknown `src_id`. ValueError: `dst_id` exists, or the parent has
                tokens not yet computed. OutOfBlocksError: no block for the partial tail.
        """
        src = self.table(src_id)
        if dst_id in self._tables:
            raise ValueError(f"sequence id {dst_id!r} already exists")
        if src.num_computed_tokens != src.num_tokens:
            raise ValueError(
                f"fork: sequence {src_id!r} has {src.num_tokens - src.num_computed_tokens} "
                "tokens not yet computed; fork between steps"
            )
        num_full = src.num_full_blocks
        partial = src.num_tokens % self.block_size != 0
        if partial and not self.pool.can_allocate(1):
            raise OutOfBlocksError(
                f"fork {src_id!r} -> {dst_id!r}: no block for the partial last block",
                needed=1,
                available=self.pool.num_available,
            )
        shared = src.block_ids[:num_full]
        self.pool.acquire(shared)
        dst = BlockTable(dst_id, block_size=self.block_size, tenant=src.tenant, root=src.root)
        dst.block_ids = list(shared)
        dst.hashes = list(src.hashes)
        dst._extend_tokens(src.tokens)
        dst.num_computed_tokens = src.num_computed_tokens
        dst.num_registered_blocks = src.num_registered_blocks
        dst.broken_at = src.broken_at
        copy_src = copy_dst = None
        if partial:
            (copy_dst,) = self.pool.allocate(1)
            copy_src = src.block_ids[-1]
            dst.block_ids.append(copy_dst)
        self._tables[dst_id] = dst
        return ForkResult(shared_block_ids=shared, copy_src_block=copy_src, copy_dst_block=copy_dst)

    def free_sequence(self, seq_id: SeqId) -> BlockTable:
        """Remove a sequence and release its blocks tail-first.

        Its computed full blocks stay cached (findable by hash) until reclaimed.
        Returns the removed table.

        Raises:
            KeyError: unknown sequence id.
            ValueError: a copy of its blocks between tiers is in flight.
        """
        table = self.table(seq_id)
        if self._frozen:
            self._check_not_frozen(seq_id, "free_sequence")
        self.pool.release(table.block_ids[::-1])
        del self._tables[seq_id]
        return table

    # ------------------------------------------------------------------ checks
    def holders(self) -> dict[int, int]:
        """Block id -> number of tables holding it."""
        counts: dict[int, int] = {}
        for table in self._tables.values():
            for block_id in table.block_ids:
                counts[block_id] = counts.get(block_id, 0) + 1
        return counts

    def check_invariants(
        self, *, deep: bool = True, extra_holders: dict[int, int] | None = None
    ) -> None:
        """Check the pool and every table; `deep` also re-derives every hash chain.

        Args:
            extra_holders: references held outside tables (e.g. by in-flight transfers).

        Raises:
            InvariantError: with the numbers that disagree.
        """
        holders = self.holders()
        for block_id, n in (extra_holders or {}).items():
            holders[block_id] = holders.get(block_id, 0) + n
        self.pool.check_invariants(holders)
        bs = self.block_size
        for seq_id, t in self._tables.items():
            if len(t.block_ids) != -(-t.num_tokens // bs):
                raise InvariantError(
                    f"seq {seq_id!r}: {len(t.block_ids)} blocks for {t.num_tokens} tokens"
                )
            if len(t.hashes) != t.num_tokens // bs:
                raise InvariantError(
                    f"seq {seq_id!r}: {len(t.hashes)} hashes for {t.num_full_blocks} full blocks"
                )
            if not t.num_registered_blocks <= t.num_computed_tokens // bs:
                raise InvariantError(
                    f"seq {seq_id!r}: {t.num_registered_blocks} blocks registered but only "
                    f"{t.num_computed_tokens} tokens computed"
                )
            if deep:
                expect, _ = self.hasher.hash_chain(t.root, t.tokens)
                if expect != t.hashes:
                    raise InvariantError(f"seq {seq_id!r}: stored hash chain is stale")
            for i, block_id in enumerate(t.block_ids):
                key = self.pool.key_of(block_id)
                indexed = i < t.num_registered_blocks and (t.broken_at is None or i < t.broken_at)
                want = t.hashes[i] if indexed else None
                if key != want:
                    raise InvariantError(
                        f"seq {seq_id!r}: block {block_id} at index {i} is indexed under "
                        f"{key!r}, expected {want!r} (registered {t.num_registered_blocks}, "
                        f"broken at {t.broken_at})"
                    )
            if t.broken_at is not None:
                b = t.broken_at
                if self.pool.match(t.hashes[b], t.block_content(b)) is not None:
                    raise InvariantError(f"seq {seq_id!r}: chain marked broken at {b} but matches")
