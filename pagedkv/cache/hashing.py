"""Chained block hashing over raw int32 token bytes, salted per tenant.

A block's hash is `xxh3_128(seed; parent_hash || int32 token bytes || extra_keys)`, so it
identifies the whole prefix up to and including the block. The parent of a sequence's
first block is the tenant root: a keyed BLAKE2b of the tenant name under a per-process
secret, so two tenants never share a chain and a client cannot compute another tenant's
hashes.

xxh3 is fast but not collision-resistant against an adversary. Safety does not rest on
it: the hash is only an index key, and every hit is confirmed by comparing the block's
stored content (`parent_hash || tokens || extra`) byte for byte (see `BlockPool.match`).
Walking a chain confirms every level, so by induction a hit means the same tenant root
and the same tokens all the way down; a forced collision is a miss, never a wrong hit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import xxhash

HASH_BYTES = 16  # 128-bit block hashes

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

TokenInput = Sequence[int] | np.ndarray


def as_token_array(tokens: TokenInput, *, what: str = "tokens") -> np.ndarray:
    """Convert token ids to a contiguous int32 array, checking the int32 range.

    Raises:
        TypeError: tokens are not integers (floats, strings, a 2-D array ...).
        ValueError: a token id lies outside int32.
    """
    orig = tokens
    if not isinstance(tokens, np.ndarray):
        if isinstance(tokens, (str, bytes)):
            raise TypeError(
                f"{what} must be a sequence of int token ids, got {type(tokens).__name__}"
            )
        if len(tokens) == 0:
            return np.empty(0, dtype=np.int32)
        try:
            tokens = np.array(tokens)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what} must be a flat sequence of int token ids") from exc
        if tokens.dtype == object and all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise ValueError(f"{what} hold an id outside int32 [{INT32_MIN}, {INT32_MAX}]")
    arr = tokens
    if arr.ndim != 1:
        raise TypeError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.int32:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind not in "iu":
        bad = next((t for t in list(orig) if not isinstance(t, (int, np.integer))), None)
        raise TypeError(
            f"{what} must be int token ids, got {type(bad).__name__} {bad!r} (dtype {arr.dtype})"
        )
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < INT32_MIN or hi > INT32_MAX:
            bad_id = lo if lo < INT32_MIN else hi
            raise ValueError(f"{what} hold id {bad_id}, outside int32 [{INT32_MIN}, {INT32_MAX}]")
    return arr.astype(np.int32)


class BlockHasher:
    """Computes chained block hashes for one block size under one secret.

    Args:
        block_size: tokens per block.
        secret: bytes that key the tenant roots and seed xxh3; random per process when
            omitted. Pass the same secret to get the same hashes in another process.
    """

    def __init__(self, *, block_size: int, secret: bytes | None = None) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if secret is None:
            secret = os.urandom(32)
        if not isinstance(secret, bytes) or not 1 <= len(secret) <= 64:
            got = f"{len(secret)} bytes" if isinstance(secret, bytes) else type(secret).__name__
            raise ValueError(f"secret must be 1..64 bytes, got {got}")
        self.block_size = block_size
        self._secret = secret
        self._seed = int.from_bytes(hashlib.blake2b(secret, digest_size=8).digest(), "little")
        self._block_bytes = 4 * block_size

    def root(self, tenant: str, extra_keys: bytes = b"") -> bytes:
        """The parent hash of a sequence's first block for `tenant` (the tenant salt).

        `extra_keys` are mixed into the root as well, so they apply to every block of
        the chain (a LoRA adapter id, a model revision ...).
        """
        if not isinstance(tenant, str):
            raise TypeError(f"tenant must be a str, got {type(tenant).__name__} {tenant!r}")
        if not isinstance(extra_keys, bytes):
            raise TypeError(f"extra_keys must be bytes, got {type(extra_keys).__name__}")
        h = hashlib.blake2b(digest_size=HASH_BYTES, key=self._secret, person=b"pagedkv-tenant")
        name = tenant.encode()
        h.update(len(name).to_bytes(8, "little"))
        h.update(name)
        h.update(self.block_size.to_bytes(8, "little"))
        h.update(extra_keys)
        return h.digest()

    def block_content(self, parent: bytes, token_bytes: bytes | memoryview) -> bytes:
        """The bytes a block's hash is taken over: `parent || int32 tokens`."""
        return parent + token_bytes

    def hash_content(self, content: bytes) -> bytes:
        """Hash of a block given its content bytes."""
        return xxhash.xxh3_128_digest(content, seed=self._seed)

    def chain_contents(self, parent: bytes, tokens: np.ndarray, hashes: list[bytes]) -> list[bytes]:
        """Content bytes of each full block of `tokens`, given the chain's known hashes.

        The same bytes `hash_chain(..., with_content=True)` returns, without hashing:
        `hashes[i]` must be the hash of block i (from a table hashed with this hasher).
        """
        buf = memoryview(tokens.tobytes())
        width = self._block_bytes
        contents: list[bytes] = []
        for i in range(len(tokens) // self.block_size):
            contents.append(parent + buf[i * width : (i + 1) * width])
            parent = hashes[i]
        return contents

    def hash_chain(
        self, parent: bytes, tokens: np.ndarray, *, with_content: bool = False
    ) -> tuple[list[bytes], list[bytes]]:
        """Hashes of every full block of `tokens`, chained from `parent`.

        Args:
            parent: hash of the block before `tokens[0]` (or the tenant root).
            tokens: int32 array; its `len(tokens) // block_size` full blocks are hashed
                (a partial tail is ignored).
            with_content: also return each block's content bytes (for registering).

        Returns:
            `(hashes, contents)`; `contents` is empty unless `with_content`.
        """
        buf = memoryview(tokens.tobytes())
        width = self._block_bytes
        seed = self._seed
        digest = xxhash.xxh3_128_digest
        hashes: list[bytes] = []
        contents: list[bytes] = []
        for start in range(0, (len(tokens) // self.block_size) * width, width):
            content = parent + buf[start : start + width]
            parent = digest(content, seed=seed)
            hashes.append(parent)
            if with_content:
                contents.append(content)
        return hashes, contents
