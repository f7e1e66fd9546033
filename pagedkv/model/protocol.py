"""What the engine needs of a model: the built-in `LlamaModel` and
`pagedkv.integrations.hf_model.PagedCausalLM` both are one."""

from __future__ import annotations

from typing import Protocol

import torch

from pagedkv.cache.spec import KVSpec
from pagedkv.model.forward_batch import ForwardBatch
from pagedkv.tiers.kv_store import KVStore


class PagedModelConfig(Protocol):
    """The architecture facts the engine and its cost model read."""

    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def max_position(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def num_params(self) -> int: ...
    def kv_spec(self, block_size: int = 16) -> KVSpec: ...


class PagedModel(Protocol):
    """A causal LM over the paged KV cache: one call runs one `ForwardBatch` step,
    writes every new token's K/V into `kv_store` and returns fp32 logits `[B, vocab]`
    (each sequence's last new token). When `batch.wait_layer` is set (a layer-wise
    restore is copying part of the cache in), the model calls `batch.wait_layer(i)`
    for every layer i before that layer reads or writes the cache; the engine detects a
    model that does not, computes that step again and stops using layer-wise restores."""

    @property
    def config(self) -> PagedModelConfig: ...
    @property
    def device(self) -> torch.device: ...
    def __call__(self, batch: ForwardBatch, kv_store: KVStore) -> torch.Tensor: ...


def check_kv_store(owner: str, config: PagedModelConfig, num_kv_heads: int, head_dim: int,
                   device: torch.device, kv_store: KVStore) -> None:  # fmt: skip
    """Raise `ValueError` unless `kv_store` has the model's layers, heads, dtype, device."""
    spec = kv_store.spec
    got = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
    want = (config.num_layers, num_kv_heads, head_dim, config.dtype)
    if got != want:
        raise ValueError(
            f"{owner}: kv_store must have (num_layers, num_kv_heads, head_dim, dtype) = "
            f"{want}, got {got}"
        )
    if kv_store.device != device:
        raise ValueError(f"{owner}: kv_store must be on the model's device {device}, got "
                         f"{kv_store.device}")  # fmt: skip
