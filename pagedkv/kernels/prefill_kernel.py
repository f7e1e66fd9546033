"""Triton kernel of `paged_prefill`: variable-length causal attention over paged K/V.

Imported lazily by `pagedkv.kernels.prefill` (this module needs Triton). One program handles
`BLOCK_M` new tokens of one sequence for one query head (grid-striding over the
sequence's query tiles, so any grid size is correct). Keys come from the block table:
first the tiles entirely before the query tile (visible to every row, no mask), then the
tiles on the diagonal with the causal mask. Address arithmetic is int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _prefill_kv_tile(
    acc,
    m_i,
    l_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    tile_start,
    kv_end,
    q_pos,
    head_off,
    d,
    d_mask,
    scale_log2,
    stride_tp,
    stride_cb,
    stride_ct,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys `tile_start .. tile_start + BLOCK_N - 1`."""
    pos = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    if MASKED:
        pos_mask = pos < kv_end
        block_id = tl.load(table_row + (pos // BLOCK_SIZE) * stride_tp, mask=pos_mask, other=0)
    else:
        block_id = tl.load(table_row + (pos // BLOCK_SIZE) * stride_tp)
    tok_offs = block_id.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_ct + head_off
    kv_offs = tok_offs[:, None] + d[None, :] * stride_cd  # [BLOCK_N, HEAD_DIM_PAD]
    kv_mask = d_mask[None, :]  # [1, HEAD_DIM_PAD], broadcast over the tile
    if MASKED:
        kv_mask = pos_mask[:, None] & kv_mask
    k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & pos_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,  # same shape and strides as k_cache
    block_tables_ptr,  # int32 [B, max_blocks]
    query_start_loc_ptr,  # int32 [B + 1]
    seq_lens_ptr,  # int32 [B]
    out_ptr,  # [T, Hq, D]
    scale_log2,  # softmax scale * log2(e): scores are kept in base 2
    stride_qt,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_tb,
    stride_tp,
    stride_qsl,  # query_start_loc
    stride_sl,  # seq_lens
    stride_ot,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq * stride_qsl)
    q_len = tl.load(query_start_loc_ptr + (seq + 1) * stride_qsl) - q_start
    seq_len = tl.load(seq_lens_ptr + seq * stride_sl)
    prefix_len = seq_len - q_len  # the new tokens are the sequence's last q_len positions

    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    table_row = block_tables_ptr + seq * stride_tb
    head_off = (head // GROUP) * stride_ch
    num_m_tiles = tl.cdiv(q_len, BLOCK_M)
    for i in range(tl.program_id(0), num_m_tiles, tl.num_programs(0)):
        # Last tiles first: they see the most keys (causal), so the longest programs start
        # earliest and the short ones fill in behind them instead of trailing at the end.
        m_tile = num_m_tiles - 1 - i
        rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] index among new tokens
        row_mask = rows < q_len
        q_pos = prefix_len + rows  # absolute positions of the queries
        q_rows = (q_start + rows).to(tl.int64)
        q_offs = q_rows[:, None] * stride_qt + head * stride_qh + d[None, :] * stride_qd
        q = tl.load(q_ptr + q_offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong; compute in fp32 there
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        first_pos = prefix_len + m_tile * BLOCK_M  # position of the tile's first query
        # Keys before `first_pos` are visible to every row: whole tiles need no mask.
        unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
        for tile_start in range(0, unmasked_end, BLOCK_N):
            acc, m_i, l_i = _prefill_kv_tile(
                acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, tile_start, seq_len,
                q_pos, head_off, d, d_mask, scale_log2, stride_tp, stride_cb, stride_ct,
                stride_cd, BLOCK_SIZE, BLOCK_N, False, UPCAST, DOT_PRECISION,
            )  # fmt: skip
        # The diagonal: the first key here (unmasked_end <= first_pos) is visible to every
        # row, so no row's running max stays -inf (which would make exp2 produce NaN).
        kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
        for tile_start in range(unmasked_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _prefill_kv_tile(
                acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, tile_start, kv_end,
                q_pos, head_off, d, d_mask, scale_log2, stride_tp, stride_cb, stride_ct,
                stride_cd, BLOCK_SIZE, BLOCK_N, True, UPCAST, DOT_PRECISION,
            )  # fmt: skip

        o = acc / l_i[:, None]
        o_offs = q_rows[:, None] * stride_ot + head * stride_oh + d[None, :] * stride_od
        tl.store(
            out_ptr + o_offs,
            o.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & d_mask[None, :],
        )
