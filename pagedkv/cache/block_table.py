"""BlockTable: one sequence's tokens, block ids and incremental hash chain."""

from __future__ import annotations

import numpy as np


class BlockTable:
    """The state of one sequence in a pool. Mutated only by `BlockManager`.

    Invariants:
        len(block_ids) == ceil(num_tokens / block_size)
        len(hashes) == num_tokens // block_size        (full blocks only, hashed once)
        num_registered_blocks <= num_computed_tokens // block_size
        num_computed_tokens <= num_tokens
        blocks from `broken_at` on are never indexed
    """

    __slots__ = (
        "_tokens",
        "block_ids",
        "block_size",
        "broken_at",
        "hashes",
        "num_computed_tokens",
        "num_registered_blocks",
        "num_tokens",
        "root",
        "seq_id",
        "tenant",
    )

    def __init__(self, seq_id: object, *, block_size: int, tenant: str, root: bytes) -> None:
        self.seq_id = seq_id
        self.block_size = block_size
        self.tenant = tenant
        self.root = root
        self.block_ids: list[int] = []
        self.hashes: list[bytes] = []
        self.num_tokens = 0
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        # first block whose hash collided with another block's (different content): it
        # and every later block of this table are never indexed nor matched against
        self.broken_at: int | None = None
        self._tokens = np.empty(max(block_size, 64), dtype=np.int32)

    @property
    def tokens(self) -> np.ndarray:
        """The sequence's token ids, int32 `[num_tokens]` (a view; do not mutate)."""
        return self._tokens[: self.num_tokens]

    @property
    def num_full_blocks(self) -> int:
        return self.num_tokens // self.block_size

    @property
    def num_cacheable_blocks(self) -> int:
        """Leading blocks that are full, computed and indexable (never past a collision
        break): what a copy to another tier can make findable by hash."""
        n = min(self.num_computed_tokens // self.block_size, len(self.hashes))
        return n if self.broken_at is None else min(n, self.broken_at)

    def parent_hash(self, block_index: int) -> bytes:
        """Hash of the block before `block_index` (the tenant root for block 0)."""
        return self.hashes[block_index - 1] if block_index else self.root

    def block_content(self, block_index: int) -> bytes:
        """Content bytes of a full block: parent hash || int32 tokens."""
        bs = self.block_size
        start = block_index * bs
        return self.parent_hash(block_index) + self._tokens[start : start + bs].tobytes()

    def _append_token(self, token: int) -> None:
        if self.num_tokens == len(self._tokens):
            grown = np.empty(2 * len(self._tokens), dtype=np.int32)
            grown[: self.num_tokens] = self._tokens
            self._tokens = grown
        self._tokens[self.num_tokens] = token
        self.num_tokens += 1

    def _extend_tokens(self, tokens: np.ndarray) -> None:
        end = self.num_tokens + len(tokens)
        if end > len(self._tokens):
            grown = np.empty(max(end, 2 * len(self._tokens)), dtype=np.int32)
            grown[: self.num_tokens] = self._tokens[: self.num_tokens]
            self._tokens = grown
        self._tokens[self.num_tokens : end] = tokens
        self.num_tokens = end
