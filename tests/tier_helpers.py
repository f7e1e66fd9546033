"""Shared helpers for the tier tests: a small two-tier cache on CPU tensors."""

from __future__ import annotations

import torch

from pagedkv.block_manager import BlockManager
from pagedkv.block_pool import BlockPool
from pagedkv.hashing import BlockHasher
from pagedkv.kv_store import KVStore
from pagedkv.spec import KVSpec
from pagedkv.tiered import TieredKVCache
from pagedkv.transfer import CopyTransferEngine, TransferEngine

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32", block_size=4)


def make_cache(
    num_gpu: int, num_host: int, wrap: type | None = None, **wrap_kwargs: object
) -> tuple[TieredKVCache, KVStore, KVStore]:
    gpu_store = KVStore(SPEC, num_gpu, fill=float("nan"))
    host_store = KVStore(SPEC, num_host, fill=float("nan"))
    engine: TransferEngine = CopyTransferEngine(gpu_store, host_store)
    if wrap is not None:
        engine = wrap(engine, **wrap_kwargs)
    hasher = BlockHasher(block_size=SPEC.block_size, secret=b"test")
    cache = TieredKVCache(
        BlockManager(BlockPool(num_gpu, name="gpu"), hasher),
        BlockManager(BlockPool(num_host, name="host"), hasher),
        engine,
    )
    return cache, gpu_store, host_store


def token_values(tenant_index: int, tokens: list[int]) -> list[float]:
    """A value per position that depends on the tenant and the whole prefix up to it."""
    out, v = [], tenant_index + 1
    for t in tokens:
        v = (v * 31 + t + 7) % 10007
        out.append(float(v))
    return out


def write_kv(store: KVStore, slots: list[int], values: list[float]) -> None:
    """Write K/V for tokens at `slots` (every layer, K and V, all heads) as the model would."""
    bs = store.spec.block_size
    for slot, value in zip(slots, values, strict=True):
        layer_offsets = torch.arange(store.spec.num_layers, dtype=torch.float32)[
            :, None, None, None
        ]
        store.kv[slot // bs, :, :, slot % bs] = value + 0.25 * layer_offsets


def read_tokens(store: KVStore, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """Per-token K/V of a sequence: `[num_tokens, num_layers, 2, Hkv, D]` (a copy)."""
    bs = store.spec.block_size
    rows = [store.kv[block_ids[p // bs], :, :, p % bs] for p in range(num_tokens)]
    return torch.stack(rows) if rows else torch.empty(0)


def expected_tokens(values: list[float]) -> torch.Tensor:
    if not values:
        return torch.empty(0)
    layers = torch.arange(SPEC.num_layers, dtype=torch.float32)[:, None, None, None]
    one = torch.ones(SPEC.num_layers, 2, SPEC.num_kv_heads, SPEC.head_dim)
    return torch.stack([(v + 0.25 * layers) * one for v in values])
