"""`store_kv`: write new tokens' K/V into their slots of a block-paged cache."""

from __future__ import annotations

import torch

from pagedkv.kernels._plan import cdiv, next_pow2
from pagedkv.kernels._triton import Backend, check_kernel_runnable, device_context, resolve_backend
from pagedkv.kernels._validate import check_slot_values, check_store_args
from pagedkv.kernels.reference import store_kv_reference

# Elements one program moves per tensor: enough heads per program to amortise the slot
# load, few enough registers to keep many programs resident.
_ELEMS_PER_PROGRAM = 4096


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    check_slots: bool | None = None,
    backend: Backend = "auto",
) -> None:
    """Write `k[t]`, `v[t]` into slot `slot_mapping[t]` of `k_cache`, `v_cache`.

    Args:
        k, v: `[T, Hkv, D]` of the cache dtype (fp16/bf16/fp32), any strides.
        k_cache, v_cache: `[num_blocks, block_size, Hkv, D]` views with equal strides
            (e.g. `kv[:, layer, 0]`, `kv[:, layer, 1]`); changed in place.
        slot_mapping: int64 `[T]` on the cache's device; slot = block_id * block_size +
            offset; -1 skips the token (padding).
        check_slots: check every slot is in `[-1, num_blocks * block_size)` before writing
            and raise otherwise, leaving the caches untouched. Default: check when the
            slots are on the CPU (free); on CUDA a check is a device sync, so it is opt-in
            (`check_slots=True`, for debugging) and an unchecked out-of-range slot is
            skipped by the kernel, never written out of bounds.
        backend: "auto" (Triton on CUDA, torch reference on CPU), "triton" or "torch".

    Raises:
        TypeError, ValueError: a dtype, shape, device or stride contract is broken, or (when
            checked) a slot is out of range; nothing is written then.
        ImportError, RuntimeError: `backend="triton"` without Triton, or on CPU without
            `TRITON_INTERPRET=1`.

    Graph capture: with `check_slots` false on CUDA the call reads no tensor values on the
    host and allocates nothing.
    """
    op = "store_kv"
    dims = check_store_args(op, k, v, k_cache, v_cache, slot_mapping)
    num_slots = dims.num_blocks * dims.block_size
    if check_slots is None:
        check_slots = slot_mapping.device.type == "cpu"
    if check_slots:
        check_slot_values(op, slot_mapping, num_slots)
    if resolve_backend(op, backend, k.device) == "torch":
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return

    from pagedkv.kernels import store_kernel

    check_kernel_runnable(op, store_kernel._store_kv_kernel, k.device)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    head_dim_pad = next_pow2(dims.head_dim)
    block_h = min(next_pow2(dims.num_kv_heads), max(1, _ELEMS_PER_PROGRAM // head_dim_pad))
    grid = (num_tokens, cdiv(dims.num_kv_heads, block_h))
    with device_context(k.device):
        store_kernel._store_kv_kernel[grid](
            k, v, k_cache, v_cache, slot_mapping, num_slots, slot_mapping.stride(0),
            *k.stride(), *v.stride(), *k_cache.stride(),
            NUM_KV_HEADS=dims.num_kv_heads,
            HEAD_DIM=dims.head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            BLOCK_H=block_h,
            BLOCK_SIZE=dims.block_size,
            num_warps=4,
        )  # fmt: skip
