"""kernels: stateless tensor ops over a block-paged KV cache.

Triton kernels with pure-torch references of the same signatures. Each public op takes
`backend="auto" | "triton" | "torch"`: "auto" runs the Triton kernel on CUDA tensors
and torch on CPU tensors (the reference; for `paged_prefill` a fused-SDPA path tested
against it, see `pagedkv.kernels.cpu_attention`). The package imports without Triton (the references
still work); the kernel modules (`*_kernel.py`) are imported on first Triton use.

KV storage is one block-major tensor `kv: [num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim]`; attention and `store_kv` take the per-layer views
`kv[:, layer, 0]` (K) and `kv[:, layer, 1]` (V), `copy_blocks` takes whole pools.
"""

from __future__ import annotations

from pagedkv.kernels._triton import HAS_TRITON, TRITON_VERSION, Backend
from pagedkv.kernels.copy import copy_blocks
from pagedkv.kernels.decode import DecodePlan, decode_workspace, paged_decode, plan_decode
from pagedkv.kernels.prefill import paged_prefill
from pagedkv.kernels.reference import (
    copy_blocks_reference,
    paged_decode_reference,
    paged_prefill_reference,
    store_kv_reference,
)
from pagedkv.kernels.store import store_kv

__all__ = [
    "HAS_TRITON",
    "TRITON_VERSION",
    "Backend",
    "DecodePlan",
    "copy_blocks",
    "copy_blocks_reference",
    "decode_workspace",
    "paged_decode",
    "paged_decode_reference",
    "paged_prefill",
    "paged_prefill_reference",
    "plan_decode",
    "store_kv",
    "store_kv_reference",
]
