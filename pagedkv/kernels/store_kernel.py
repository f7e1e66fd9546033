"""Triton kernel of `store_kv`: scatter new tokens' K/V into their cache slots.

Imported lazily by `pagedkv.kernels.store` (this module needs Triton). One program copies
`BLOCK_H` KV heads of one token, K and V, from `[T, Hkv, D]` to the slot's page. A slot
of -1 (padding) is skipped, and so is any slot outside `[0, num_slots)`: the launcher only
checks slot values on request (a check costs a device sync), and the kernel must never
write outside the cache. Address arithmetic is int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,  # same shape and strides as k_cache
    slot_mapping_ptr,  # int64 [T]
    num_slots,  # num_blocks * BLOCK_SIZE
    stride_slot,  # slot_mapping
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] kv heads
    d = tl.arange(0, HEAD_DIM_PAD)
    slot = tl.load(slot_mapping_ptr + token * stride_slot).to(tl.int64)
    if (slot >= 0) & (slot < num_slots):
        block_id = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]  # [BLOCK_H, D_PAD]
        dst = block_id * stride_cb + offset * stride_ct
        dst += h[:, None] * stride_ch + d[None, :] * stride_cd
        k_src = token * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd
        v_src = token * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd
        tl.store(k_cache_ptr + dst, tl.load(k_ptr + k_src, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(v_ptr + v_src, mask=mask), mask=mask)
