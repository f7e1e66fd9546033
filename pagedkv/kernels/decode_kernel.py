"""Triton kernels of `paged_decode`: split-KV attention and the log-sum-exp merge.

Imported lazily by `pagedkv.kernels.decode` (this module needs Triton). One program handles one
(sequence, KV head, split): the `GROUP` query heads that share the KV head are processed
together, so each K/V page is loaded once per group (GQA) and the scores are a
`[GROUP_PAD, BLOCK_N]` tensor-core dot. All address arithmetic is int64: a block id
times the block stride of a large pool overflows int32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,  # same shape and strides as k_cache
    block_tables_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    out_ptr,  # [B, Hq, D]; written when SINGLE_SPLIT
    lse_ptr,  # fp32 [B, Hq]; written when SINGLE_SPLIT and WRITE_LSE
    part_out_ptr,  # fp32 [B, Hq, num_splits, D]; written unless SINGLE_SPLIT
    part_lse_ptr,  # fp32 [B, Hq, num_splits]; written unless SINGLE_SPLIT
    scale_log2,  # softmax scale * log2(e): scores are kept in base 2
    tokens_per_split,  # multiple of BLOCK_N
    num_splits,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_tb,
    stride_tp,
    stride_sl,  # seq_lens
    stride_ob,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq * stride_sl)
    start = split * tokens_per_split
    # The last split runs to the end, so a plan sized for shorter sequences stays correct.
    end = tl.where(split == num_splits - 1, seq_len, tl.minimum(start + tokens_per_split, seq_len))

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + g  # [GROUP_PAD] int64
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q_offs = seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is wrong; compute in fp32 there
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    table_row = block_tables_ptr + seq * stride_tb
    head_off = kv_head * stride_ch
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        pos_mask = pos < end
        # Positions past the end are masked, so neither the block table entry nor the
        # (possibly garbage) page behind it is read.
        block_id = tl.load(table_row + (pos // BLOCK_SIZE) * stride_tp, mask=pos_mask, other=0)
        tok_offs = block_id.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_ct + head_off
        kv_offs = tok_offs[:, None] + d[None, :] * stride_cd  # [BLOCK_N, HEAD_DIM_PAD]
        kv_mask = pos_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [G, N]
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (or seq_len 0) has l_i == 0: it contributes out 0 and lse -inf.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    # Scores are base 2; the LSE is returned in natural log: ln(x) = log2(x) * ln(2).
    lse_2 = m_i + tl.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), lse_2 * 0.6931471805599453)
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        o_offs = seq * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
        if WRITE_LSE:
            tl.store(lse_ptr + seq * stride_lb + heads * stride_lh, lse, mask=g_mask)
    else:
        # Workspace rows are (seq, head, split); contiguous, so no strides are passed.
        row = (seq * (GROUP * tl.num_programs(1)) + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=out_mask)
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,  # fp32 [B, Hq, num_splits, D]
    part_lse_ptr,  # fp32 [B, Hq, num_splits]
    out_ptr,  # [B, Hq, D]
    lse_ptr,  # fp32 [B, Hq]; written when WRITE_LSE
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Merge the per-split partial outputs of one (sequence, query head) by their LSE."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    row0 = (seq * tl.num_programs(1) + head) * num_splits  # first split's workspace row
    sp = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + row0 + sp, mask=sp < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # All splits empty (seq_len 0): keep out 0 and lse -inf instead of NaN.
    safe_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lse - safe_max)  # [SPLITS_PAD], 0 for empty splits
    total = tl.sum(weights, 0)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    acc = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.exp(tl.load(part_lse_ptr + row0 + s) - safe_max)
        o = tl.load(part_out_ptr + (row0 + s) * HEAD_DIM + d, mask=d_mask, other=0.0)
        acc += w * o
    o = acc / tl.where(total == 0.0, 1.0, total)
    o_offs = seq * stride_ob + head * stride_oh + d * stride_od
    tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=d_mask)
    if WRITE_LSE:
        safe_total = tl.where(total == 0.0, 1.0, total)
        lse_out = tl.where(total == 0.0, float("-inf"), safe_max + tl.log(safe_total))
        tl.store(lse_ptr + seq * stride_lb + head * stride_lh, lse_out)
