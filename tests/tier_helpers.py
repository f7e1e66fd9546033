"""Shared helpers for the tier tests: a small two-tier cache on CPU tensors."""

from __future__ import annotations

import torch

from pagedkv.cache.block_manager import BlockManager
from pagedkv.cache.block_pool import BlockPool
from pagedkv.cache.hashing import BlockHasher
from pagedkv.cache.spec import KVSpec
from pagedkv.tiers.kv_store import KVStore
from pagedkv.tiers.tiered import TieredKVCache
from pagedkv.tiers.transfer import CopyTransferEngine, TransferEngine

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


def compute(cache: TieredKVCache, store: KVStore, seq_id: object, gen: torch.Generator) -> None:
    """Fill the uncomputed tokens of a GPU sequence with random K/V, then mark them."""
    t = cache.gpu.table(seq_id)
    bs = store.spec.block_size
    for slot in cache.gpu.slot_mapping(seq_id, t.num_computed_tokens, t.num_tokens).tolist():
        store.kv[slot // bs, :, :, slot % bs] = torch.randn(
            store.kv.shape[1:3] + store.kv.shape[4:], generator=gen
        )
    cache.gpu.mark_computed(seq_id)


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


class DeferredCopyEngine(TransferEngine):
    """Real copies that happen only when the transfer completes.

    At submit the destination blocks are filled with NaN; the bytes move when the clock
    reaches `ready_at` (seen by `done()`) or on `wait()`. So a reader that uses a
    destination before completion, or a writer that reuses a source block while its copy
    is in flight, produces wrong bytes that the byte checks catch. While `failing`, pairs
    whose ids sum to a multiple of 3 are not copied and are reported failed.
    """

    def __init__(
        self, gpu: KVStore, host: KVStore, clock: object, delay: float, *, layers: bool = False
    ) -> None:
        self.gpu, self.host, self.clock, self.delay = gpu, host, clock, delay
        self.failing = False
        self.num_in_flight = 0
        # with `layers`, a layered copy's `wait_layer(i)` completes the whole copy early
        self.supports_layers = layers

    def submit(self, direction, src_ids, dst_ids, *, layered=False):  # type: ignore[no-untyped-def]
        from pagedkv.kernels import copy_blocks
        from pagedkv.tiers.transfer import TransferHandle

        src, dst = (self.gpu, self.host) if direction == "offload" else (self.host, self.gpu)
        bad = {
            i
            for i, (s, d) in enumerate(zip(src_ids, dst_ids, strict=True))
            if self.failing and (s + d) % 3 == 0
        }
        keep = [i for i in range(len(src_ids)) if i not in bad]
        for d in dst_ids:
            dst.kv[d] = float("nan")
        ready_at = self.clock() + self.delay  # type: ignore[operator]
        state = {"done": False}
        self.num_in_flight += 1

        def finish() -> None:
            if not state["done"]:
                copy_blocks(src.kv, dst.kv, [src_ids[i] for i in keep], [dst_ids[i] for i in keep])
                state["done"] = True
                self.num_in_flight -= 1

        def poll() -> bool:
            if self.clock() >= ready_at:  # type: ignore[operator]
                finish()
            return state["done"]

        handle = TransferHandle(
            direction, list(src_ids), list(dst_ids), ready_at=ready_at, failed=bad,
            _poll=poll, _wait=finish,
        )  # fmt: skip
        if layered and self.supports_layers:
            handle.num_layers = self.gpu.spec.num_layers
            handle._wait_layer = lambda layer: finish()
        return handle
