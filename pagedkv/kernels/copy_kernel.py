"""Triton kernel of `copy_blocks`: gather-scatter whole blocks within one device.

Imported lazily by `pagedkv.kernels.copy` (this module needs Triton). Used when many scattered
blocks move within one GPU, where one launch beats one `cudaMemcpyAsync` per run. Blocks
are copied as raw integer words (the launcher reinterprets the dtype), so the copy is
bit-exact, NaN payloads included. Program (pair, chunk) strides over the pair's block.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _copy_blocks_kernel(
    src_ptr,  # [src_blocks, block_numel], rows contiguous
    dst_ptr,  # [dst_blocks, block_numel], rows contiguous
    src_ids_ptr,  # int64 [n]
    dst_ids_ptr,  # int64 [n]
    block_numel,
    stride_src,  # elements between blocks of src
    stride_dst,  # elements between blocks of dst
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    src_row = src_ptr + tl.load(src_ids_ptr + pair).to(tl.int64) * stride_src
    dst_row = dst_ptr + tl.load(dst_ids_ptr + pair).to(tl.int64) * stride_dst
    step = tl.num_programs(1).to(tl.int64) * CHUNK
    for start in range(tl.program_id(1).to(tl.int64) * CHUNK, block_numel, step):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < block_numel
        tl.store(dst_row + offs, tl.load(src_row + offs, mask=mask), mask=mask)
