"""`paged_prefill`: variable-length causal attention of new tokens over a paged cache."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pagedkv.kernels._plan import (
    cdiv,
    check_positive_int,
    check_triton_head_dim,
    cuda_capability,
    next_pow2,
)
from pagedkv.kernels._triton import (
    Backend,
    check_kernel_runnable,
    device_context,
    interpreting,
    resolve_backend,
)
from pagedkv.kernels._validate import (
    check_attention_args,
    check_query_start_loc,
    check_scale,
    check_table_values,
)
from pagedkv.kernels.cpu_attention import paged_prefill_sdpa
from pagedkv.kernels.reference import paged_prefill_reference


class PrefillConfig(NamedTuple):
    """Tile shape and launch options of the prefill kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """Fixed tile configs by architecture, head dim and dtype (autotuning needs a GPU).

    Chosen with `benchmarks/kernel_resources.py` (ptxas of the Triton wheel, no GPU
    needed) so that no configuration spills registers on sm_80 or sm_90 and the
    pipelined K/V tiles plus the Q tile fit the architecture's shared memory; the CI test
    `tests/test_kernel_resources.py` keeps it so.

    - bf16/fp16 on sm_90: 128 x 64 tiles (8 warps at head_dim 128), 64 x 32 at 256.
    - bf16/fp16 on sm_80 (and other pre-Hopper GPUs): its mma.sync fragments take more
      registers than sm_90's wgmma, so the sm_90 tiles spilled 24-72 B per thread there:
      8 warps at head_dim 64 (173 registers), 64 x 32 tiles at head_dim 128 (236).
    - fp32 (no tensor cores, FMA): 8 warps and narrow key tiles; 4 warps spilled up to
      1.7 KB per thread (head_dim 128, sm_90).

    Under the interpreter the tiles are small so tiny test shapes still span several
    query and key tiles (BLOCK_M != BLOCK_N, as on the GPU).
    """
    if device.type != "cuda":
        return PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        if head_dim <= 64:
            return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
        if head_dim <= 128:
            return PrefillConfig(block_m=64, block_n=16, num_warps=8, num_stages=2)
        return PrefillConfig(block_m=32, block_n=16, num_warps=8, num_stages=2)
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if cuda_capability(device) < 90:
        if head_dim <= 64:
            return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Prefill attention for a variable-length batch over a block-paged KV cache.

    Sequence b's new tokens are `q[query_start_loc[b]:query_start_loc[b + 1]]` and are
    the LAST `query_len` of its `seq_lens[b]` positions; their K/V must already be stored
    (`store_kv`). Each attends to the cached prefix and causally to the new tokens up to
    and including itself.

    Args:
        q: `[T, Hq, D]` fp16/bf16/fp32, any strides.
        k_cache, v_cache: `[num_blocks, block_size, Hkv, D]` views of q's dtype with equal
            strides; Hq % Hkv == 0.
        block_tables: int32 `[B, max_blocks]`; query_start_loc: int32 `[B + 1]`, starting
            at 0 and ending at T; seq_lens: int32 `[B]`, total length per sequence.
        scale: softmax scale, default `1/sqrt(D)`.
        out: optional `[T, Hq, D]` output of q's dtype (any strides).
        max_query_len: optional host-known bound on the new tokens per sequence; it sizes
            the grid (`cdiv(max_query_len, BLOCK_M)` programs per sequence and head).
            Default T (q.shape[0]), which is always enough but launches programs that exit
            at once. The launcher never reads `query_start_loc` (that would sync); a too
            small value is still correct (programs stride over the query tiles), only slower.
        backend: "auto" (Triton on CUDA; on CPU torch's fused SDPA over the gathered
            pages, see `pagedkv.kernels.cpu_attention`), "triton", or "torch" (the reference).

    Returns:
        out `[T, Hq, D]`, q's dtype.

    Raises:
        TypeError, ValueError: a dtype, shape, device or stride contract is broken. Offsets,
            lengths and block ids are not checked on this path (that would sync); the torch
            reference checks them.
        ImportError, RuntimeError: `backend="triton"` without Triton, or on CPU without
            `TRITON_INTERPRET=1`.
    """
    op = "paged_prefill"
    dims = check_attention_args(
        op, q, k_cache, v_cache, block_tables, seq_lens, out, query_start_loc=query_start_loc
    )
    sm_scale = check_scale(op, scale, dims.cache.head_dim)
    if max_query_len is not None:
        check_positive_int(op, "max_query_len", max_query_len)
    if resolve_backend(op, backend, q.device) == "torch":
        if backend == "auto" and q.device.type == "cpu":
            # CPU tensors: the fused SDPA path (the reference stays the oracle for "torch")
            query_lens = check_query_start_loc(op, query_start_loc, q.shape[0])
            check_table_values(op, block_tables, seq_lens, dims.cache, query_lens=query_lens)
            return paged_prefill_sdpa(
                q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                scale=sm_scale, out=out,
            )  # fmt: skip
        return paged_prefill_reference(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale=sm_scale, out=out
        )

    from pagedkv.kernels import prefill_kernel

    check_kernel_runnable(op, prefill_kernel._paged_prefill_kernel, q.device)
    check_triton_head_dim(op, dims.cache.head_dim)
    if out is None:
        out = torch.empty_like(q)
    num_tokens, _, head_dim = q.shape
    if num_tokens == 0:
        return out
    if dims.num_seqs > 65535 or dims.num_q_heads > 65535:  # CUDA grid y/z limits
        raise ValueError(
            f"{op}: at most 65535 sequences and 65535 query heads per launch; got "
            f"B={dims.num_seqs}, Hq={dims.num_q_heads}"
        )
    cfg = prefill_config(head_dim, q.dtype, q.device)
    bound = num_tokens if max_query_len is None else min(max_query_len, num_tokens)
    grid = (cdiv(bound, cfg.block_m), dims.num_seqs, dims.num_q_heads)
    upcast = interpreting() and q.dtype == torch.bfloat16
    with device_context(q.device):
        prefill_kernel._paged_prefill_kernel[grid](
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
            sm_scale * math.log2(math.e),
            *q.stride(), *k_cache.stride(), *block_tables.stride(),
            query_start_loc.stride(0), seq_lens.stride(0), *out.stride(),
            GROUP=dims.group_size,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=max(16, next_pow2(head_dim)),
            BLOCK_SIZE=dims.cache.block_size,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            UPCAST=upcast,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    return out
