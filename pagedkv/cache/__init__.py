"""pagedkv.cache: block metadata in plain Python ints and bytes (no torch).

A fixed-size `BlockPool` with reference counts, an LRU of cached blocks and a prefix
index by chained content hash (`BlockHasher`, tenant-salted); `BlockManager` gives each
sequence a `BlockTable` over one pool; `KVSpec` describes the KV bytes of a block. The
simulator models an 80 GB GPU with these alone.
"""

from __future__ import annotations

from pagedkv.cache.block_manager import AppendResult, BlockManager, ForkResult, SeqId
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.block_table import BlockTable
from pagedkv.cache.errors import InvariantError, OutOfBlocksError, PagedKVError
from pagedkv.cache.hashing import HASH_BYTES, BlockHasher, TokenInput, as_token_array
from pagedkv.cache.spec import DTYPE_BYTES, KVSpec

__all__ = [
    "DTYPE_BYTES",
    "HASH_BYTES",
    "AppendResult",
    "BlockHasher",
    "BlockManager",
    "BlockPool",
    "BlockTable",
    "ForkResult",
    "InvariantError",
    "KVSpec",
    "OutOfBlocksError",
    "PagedKVError",
    "SeqId",
    "TokenInput",
    "as_token_array",
]
