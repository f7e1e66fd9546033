"""BlockPool: a fixed set of block ids with refcounts, lazy reclamation and a hash index.

Plain Python ints and bytes (no torch), so the simulator can model a large GPU without
allocating it, and the same class serves the GPU and the host tier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence

from pagedkv.cache.errors import InvariantError, OutOfBlocksError

BlockKey = Hashable  # a block hash (bytes from BlockHasher, or an int in the simulator)


class BlockPool:
    """`num_blocks` block ids, each exactly one of: free-uncached, cached, or in use.

    - in use: refcount > 0 (held by one or more block tables). It may be indexed.
    - cached: refcount 0 and indexed by its hash; it sits on an LRU list and stays
      findable until its id is needed for a new block (lazy reclamation).
    - free-uncached: refcount 0 and not indexed; taken first by `allocate`.

    Every operation is O(1) per block: the free list is a stack, the LRU is an
    `OrderedDict` (a C doubly-linked list with O(1) removal from the middle).

    The index maps a key to one block and remembers the block's *content* (the bytes the
    key was computed from). `match` confirms the content on every hit, so a key
    collision can never serve the wrong bytes.

    Invariants (checked by `check_invariants`): the three states partition the ids;
    the LRU holds exactly the refcount-0 indexed blocks; the index and the per-block key
    agree both ways.
    """

    def __init__(self, num_blocks: int, *, name: str = "gpu") -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        self.name = name
        self._num_blocks = num_blocks
        self._ref: list[int] = [0] * num_blocks
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._content: list[bytes] = [b""] * num_blocks
        # allocate pops from the end: low ids first, which keeps tests readable
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # first = least recently used
        self._index: dict[BlockKey, int] = {}
        self._num_in_use = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_blocks(self) -> int:
        """Total block ids in the pool."""
        return self._num_blocks

    @property
    def num_in_use(self) -> int:
        """Blocks with refcount > 0."""
        return self._num_in_use

    @property
    def num_cached(self) -> int:
        """Refcount-0 blocks still findable by hash (reclaimable)."""
        return len(self._lru)

    @property
    def num_free_uncached(self) -> int:
        """Refcount-0 blocks holding nothing findable."""
        return len(self._free)

    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out: free-uncached plus cached."""
        return len(self._free) + len(self._lru)

    @property
    def num_indexed(self) -> int:
        """Blocks findable by hash (cached or in use)."""
        return len(self._index)

    def refcount(self, block_id: int) -> int:
        """Reference count of one block."""
        self._check_id(block_id)
        return self._ref[block_id]

    def key_of(self, block_id: int) -> BlockKey | None:
        """The key a block is indexed under, or None when it is not indexed."""
        self._check_id(block_id)
        return self._key[block_id]

    def content_of(self, block_id: int) -> bytes:
        """The content an indexed block was registered with (b"" when not indexed)."""
        self._check_id(block_id)
        return self._content[block_id] if self._key[block_id] is not None else b""

    def can_allocate(self, num: int) -> bool:
        """Whether `allocate(num)` would succeed. Changes nothing."""
        return 0 <= num <= self.num_available

    def allocate(self, num: int) -> list[int]:
        """Take `num` blocks with refcount 1, free-uncached first, then LRU-cached ones.

        A cached block taken here loses its index entry (its bytes are about to be
        overwritten).

        Raises:
            ValueError: `num` is negative or not an int.
            OutOfBlocksError: fewer than `num` blocks are available; nothing changed.
        """
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"allocate: num must be an int >= 0, got {num!r}")
        available = len(self._free) + len(self._lru)
        if num > available:
            raise OutOfBlocksError(
                f"{self.name} pool: need {num} blocks, only {available} available "
                f"({len(self._free)} free + {len(self._lru)} cached of {self._num_blocks})",
                needed=num,
                available=available,
            )
        free = self._free
        take = min(num, len(free))
        if take:
            ids = free[-take:]
            ids.reverse()
            del free[-take:]
        else:
            ids = []
        for _ in range(num - take):
            block_id, _unused = self._lru.popitem(last=False)
            self._unindex(block_id)
            ids.append(block_id)
        ref = self._ref
        for block_id in ids:
            ref[block_id] = 1
        self._num_in_use += num
        return ids

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block (share it, or take back a cached hit).

        A cached block leaves the LRU and is in use again.

        Raises:
            TypeError / ValueError: an id is not an int or out of range, or a block is
                free-uncached (nothing to share: allocate it instead). Nothing changed.
        """
        ids = list(block_ids)
        ref, lru, n = self._ref, self._lru, self._num_blocks
        for block_id in ids:  # checks inlined: this runs per block of every prefix hit
            if type(block_id) is not int or not 0 <= block_id < n:
                self._check_id(block_id)
            if ref[block_id] == 0 and block_id not in lru:
                raise ValueError(
                    f"{self.name} pool: cannot acquire block {block_id}: it is free and "
                    f"holds nothing (expected a block in use or cached)"
                )
        for block_id in ids:
            if ref[block_id] == 0:
                del lru[block_id]
                self._num_in_use += 1
            ref[block_id] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block, in the given order.

        A block reaching refcount 0 becomes cached (MRU end of the LRU) when indexed,
        free-uncached otherwise. Callers release a sequence tail-first, so a chain's
        descendants sit nearer the LRU head than its ancestors and are reclaimed first.

        Raises:
            ValueError: an id is out of range, or released more often than it is
                referenced (a double free). Nothing changed.
        """
        ref, n = self._ref, self._num_blocks
        for block_id in block_ids:
            if type(block_id) is not int or not 0 <= block_id < n:
                self._check_id(block_id)
            if ref[block_id] == 0:
                raise ValueError(
                    f"{self.name} pool: double free of block {block_id} (refcount is 0)"
                )
        if len(set(block_ids)) != len(block_ids):
            counts: dict[int, int] = {}
            for block_id in block_ids:
                counts[block_id] = counts.get(block_id, 0) + 1
            for block_id, n in counts.items():
                if n > ref[block_id]:
                    raise ValueError(
                        f"{self.name} pool: block {block_id} released {n} times but "
                        f"referenced {ref[block_id]} times"
                    )
        key = self._key
        for block_id in block_ids:
            r = ref[block_id] - 1
            ref[block_id] = r
            if r == 0:
                self._num_in_use -= 1
                if key[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._lru[block_id] = None

    def touch(self, block_ids: Iterable[int]) -> None:
        """Mark cached blocks as recently used (move them to the LRU's MRU end).

        Blocks in use are ignored (they are not on the LRU).
        """
        ids = list(block_ids)
        for block_id in ids:
            self._check_id(block_id)
        lru = self._lru
        for block_id in ids:
            if block_id in lru:
                lru.move_to_end(block_id)

    def evict(self, num: int) -> list[int]:
        """Reclaim up to `num` cached blocks now (LRU first): unindex them, free them.

        Returns the ids reclaimed (fewer than `num` when fewer are cached).
        """
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"evict: num must be an int >= 0, got {num!r}")
        out: list[int] = []
        lru = self._lru
        while lru and len(out) < num:
            block_id, _unused = lru.popitem(last=False)
            self._unindex(block_id)
            self._free.append(block_id)
            out.append(block_id)
        return out

    def evict_block(self, block_id: int) -> None:
        """Reclaim one specific cached block (unindex and free it).

        Raises:
            ValueError: the block is not cached (in use, or free already).
        """
        self._check_id(block_id)
        if block_id not in self._lru:
            raise ValueError(
                f"{self.name} pool: block {block_id} is not cached "
                f"(refcount {self._ref[block_id]}, indexed {self._key[block_id] is not None})"
            )
        del self._lru[block_id]
        self._unindex(block_id)
        self._free.append(block_id)

    # ------------------------------------------------------------------ index
    def register(self, block_id: int, key: BlockKey, content: bytes = b"") -> bool:
        """Make an in-use, full block findable under `key`.

        Returns False (and changes nothing) when another block already holds `key`: the
        caller keeps its private copy, which is freed uncached later.

        Raises:
            ValueError: the block is not in use, or is already indexed.
        """
        self._check_id(block_id)
        if self._ref[block_id] == 0:
            raise ValueError(
                f"{self.name} pool: register block {block_id}: it is not in use (refcount 0)"
            )
        if self._key[block_id] is not None:
            raise ValueError(f"{self.name} pool: block {block_id} is already indexed")
        if key in self._index:
            return False
        self._index[key] = block_id
        self._key[block_id] = key
        self._content[block_id] = content
        return True

    def match(self, key: BlockKey, content: bytes = b"") -> int | None:
        """The block indexed under `key` whose stored content equals `content`, else None.

        Read-only: a cached hit stays cached until `acquire`.
        """
        block_id = self._index.get(key)
        if block_id is None or self._content[block_id] != content:
            return None
        return block_id

    def match_chain(
        self, keys: Sequence[BlockKey], contents: Sequence[bytes], limit: int
    ) -> list[int]:
        """`match` along a hash chain: the blocks of the longest prefix of `keys[:limit]`
        whose content is confirmed, stopping at the first miss. Read-only."""
        index_get, stored = self._index.get, self._content
        hits: list[int] = []
        for i in range(min(limit, len(keys))):
            block_id = index_get(keys[i])
            if block_id is None or stored[block_id] != contents[i]:
                break
            hits.append(block_id)
        return hits

    def held_keys(self, limit: int) -> list[BlockKey]:
        """Up to `limit` keys of indexed blocks (what this pool can serve by hash): the
        blocks in use first, then the cached ones, most recently released first. Read
        only. O(1) per key below `limit` (a C-level copy of the index); past it, one
        pass over the index to take the blocks in use.

        Raises:
            ValueError: `limit` is negative or not an int.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"held_keys: limit must be an int >= 0, got {limit!r}")
        if len(self._index) <= limit:
            return list(self._index)
        ref, key = self._ref, self._key
        keys = [k for k, block_id in self._index.items() if ref[block_id]][:limit]
        for block_id in reversed(self._lru):  # MRU end first
            if len(keys) >= limit:
                break
            keys.append(key[block_id])
        return keys

    def count_cached(self, block_ids: Sequence[int]) -> int:
        """How many of these indexed block ids are cached (refcount 0: reclaimable)."""
        ref = self._ref
        return [ref[block_id] for block_id in block_ids].count(0)

    def acquire_matched(self, block_ids: Sequence[int]) -> None:
        """`acquire` for ids just returned by `match` / `match_chain` with no mutation in
        between (they are valid and indexed, so the checks are skipped)."""
        ref, lru = self._ref, self._lru
        for block_id in block_ids:
            r = ref[block_id]
            if r == 0:
                del lru[block_id]
                self._num_in_use += 1
            ref[block_id] = r + 1

    def _unindex(self, block_id: int) -> None:
        key = self._key[block_id]
        if key is not None:
            del self._index[key]
            self._key[block_id] = None
            self._content[block_id] = b""

    def _check_id(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            raise TypeError(f"{self.name} pool: block id must be an int, got {block_id!r}")
        if not 0 <= block_id < self._num_blocks:
            raise ValueError(
                f"{self.name} pool: block id {block_id} out of range [0, {self._num_blocks})"
            )

    # ------------------------------------------------------------------ checks
    def check_invariants(self, holders: Mapping[int, int] | None = None) -> None:
        """Raise `InvariantError` (with the numbers) if any invariant fails.

        Args:
            holders: optional block id -> number of tables holding it; when given, every
                refcount must equal it (blocks absent from the mapping must have ref 0).
        """
        n = self._num_blocks
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            raise InvariantError(f"{self.name}: free list has duplicates")
        lru_set = set(self._lru)
        in_use = {b for b in range(n) if self._ref[b] > 0}
        if any(r < 0 for r in self._ref):
            raise InvariantError(f"{self.name}: negative refcount")
        if free_set & lru_set or free_set & in_use or lru_set & in_use:
            raise InvariantError(
                f"{self.name}: a block is in two states: free&cached={free_set & lru_set}, "
                f"free&in_use={free_set & in_use}, cached&in_use={lru_set & in_use}"
            )
        if len(free_set) + len(lru_set) + len(in_use) != n:
            raise InvariantError(
                f"{self.name}: free + cached + in_use != total: "
                f"{len(free_set)} + {len(lru_set)} + {len(in_use)} != {n}"
            )
        if len(in_use) != self._num_in_use:
            raise InvariantError(
                f"{self.name}: in-use counter {self._num_in_use} != {len(in_use)} blocks in use"
            )
        for b in free_set:
            if self._key[b] is not None:
                raise InvariantError(f"{self.name}: free block {b} is still indexed")
        for b in lru_set:
            if self._key[b] is None:
                raise InvariantError(f"{self.name}: cached block {b} is not indexed")
        indexed = [b for b in range(n) if self._key[b] is not None]
        if len(indexed) != len(self._index):
            raise InvariantError(
                f"{self.name}: {len(indexed)} blocks carry a key but the index has "
                f"{len(self._index)} entries"
            )
        for key, b in self._index.items():
            if self._key[b] != key:
                raise InvariantError(
                    f"{self.name}: index maps a key to block {b}, which has another key"
                )
        if holders is not None:
            for b in range(n):
                want = holders.get(b, 0)
                if self._ref[b] != want:
                    raise InvariantError(
                        f"{self.name}: block {b} refcount {self._ref[b]} != {want} holders"
                    )
