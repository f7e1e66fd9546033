"""Pure-torch references of every kernel: the test oracle and the CPU path.

Each reference has the signature of its public op, computes in fp32 (the kernels'
softmax and accumulation precision) and casts the result to the output dtype. They are
written for clarity, not speed: per-sequence loops, host reads of `seq_lens` (a sync on
CUDA), and value checks the kernels cannot afford (block ids and lengths in range).
"""

from __future__ import annotations

import math

import torch

from pagedkv.kernels._validate import (
    AttentionDims,
    check_attention_args,
    check_copy_args,
    check_lse_out,
    check_query_start_loc,
    check_scale,
    check_slot_values,
    check_store_args,
    check_table_values,
)


def store_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' K/V into their cache slots (reference of `store_kv`).

    Args:
        k, v: `[T, Hkv, D]`, the cache dtype.
        k_cache, v_cache: `[num_blocks, block_size, Hkv, D]` views (any strides); changed.
        slot_mapping: int64 `[T]`; slot = block_id * block_size + offset, -1 = skip.

    Raises:
        TypeError, ValueError: bad dtypes/shapes/devices, or a slot outside
            `[-1, num_blocks * block_size)`; the caches are then left untouched.
    """
    op = "store_kv_reference"
    dims = check_store_args(op, k, v, k_cache, v_cache, slot_mapping)
    check_slot_values(op, slot_mapping, dims.num_blocks * dims.block_size)
    keep = slot_mapping >= 0  # [T] bool; -1 = padding
    slots = slot_mapping[keep]
    block_ids = slots // dims.block_size
    offsets = slots % dims.block_size
    # Advanced-index assignment honours the caches' strides (index_put_ on the view).
    k_cache[block_ids, offsets] = k[keep]
    v_cache[block_ids, offsets] = v[keep]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal GQA attention of one sequence's new tokens, fp32.

    q `[L, Hq, D]` are positions `prefix_len .. prefix_len + L - 1`; k, v `[n, Hkv, D]`
    are positions `0 .. n - 1`. Key j is visible to query i iff `j <= prefix_len + i`.
    Returns out `[L, Hq, D]` fp32 and lse `[L, Hq]` fp32 (natural log; -inf and out 0
    for a query that sees no key).
    """
    num_q, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    qg = q.float().reshape(num_q, num_kv_heads, group, head_dim)  # [L, Hkv, G, D]
    scores = torch.einsum("lhgd,nhd->hgln", qg, k.float()) * scale  # [Hkv, G, L, n]
    key_pos = torch.arange(num_keys, device=q.device)
    query_pos = prefix_len + torch.arange(num_q, device=q.device)
    visible = key_pos[None, :] <= query_pos[:, None]  # [L, n]
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, L]
    # exp(-inf - (-inf)) is NaN; a row with no visible key gets weights exp(-inf) = 0.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    out = torch.einsum("hgln,nhd->lhgd", probs, v.float())  # [L, Hkv, G, D]
    return out.reshape(num_q, num_q_heads, head_dim), lse.permute(2, 0, 1).reshape(num_q, -1)


def _gather_seq(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` positions of one sequence, `[seq_len, Hkv, D]`."""
    block_size = cache.shape[1]
    num_pages = -(-seq_len // block_size)
    ids = block_table_row[:num_pages].long()
    pages = cache.index_select(0, ids)  # [num_pages, block_size, Hkv, D]
    return pages.reshape(num_pages * block_size, *cache.shape[2:])[:seq_len]


def _paged_attention(
    dims: AttentionDims,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for every sequence; q rows are the sequences' new tokens in order."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [T, Hq, D]
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)  # [T, Hq]
    start = 0
    for b in range(dims.num_seqs):
        query_len, seq_len = query_lens[b], seq_lens[b]
        if query_len > 0 and seq_len > 0:
            k = _gather_seq(k_cache, block_tables[b], seq_len)
            v = _gather_seq(v_cache, block_tables[b], seq_len)
            rows = slice(start, start + query_len)
            out[rows], lse[rows] = _attend(q[rows], k, v, seq_len - query_len, scale)
        start += query_len
    return out, lse


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    lse: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence attending to its whole cached sequence (reference).

    Args:
        q: `[B, Hq, D]` fp16/bf16/fp32, the newest token of each sequence (its K/V
            already stored, so it is position `seq_lens[b] - 1`).
        k_cache, v_cache: `[num_blocks, block_size, Hkv, D]`, q's dtype, Hq % Hkv == 0.
        block_tables: int32 `[B, max_blocks]`; seq_lens: int32 `[B]` (0 gives a zero output).
        scale: softmax scale, default `1/sqrt(D)`.
        out: optional `[B, Hq, D]` buffer of q's dtype; lse: optional fp32 `[B, Hq]` buffer.
        return_lse: also return the natural-log log-sum-exp of the scores, fp32 `[B, Hq]`.

    Returns:
        out, or (out, lse) when `return_lse`.

    Raises:
        TypeError, ValueError: bad dtypes/shapes/devices, or lengths or block ids out of range.
    """
    op = "paged_decode_reference"
    dims = check_attention_args(op, q, k_cache, v_cache, block_tables, seq_lens, out)
    sm_scale = check_scale(op, scale, dims.cache.head_dim)
    if lse is not None:
        check_lse_out(op, lse, (dims.num_seqs, dims.num_q_heads), q.device)
    check_table_values(op, block_tables, seq_lens, dims.cache)
    lens = seq_lens.tolist()
    query_lens = [1 if n > 0 else 0 for n in lens]
    # A sequence of length 0 (CUDA-graph padding) keeps out 0 and lse -inf.
    rows = torch.tensor([b for b, n in enumerate(lens) if n > 0], dtype=torch.long)
    q_live = q.index_select(0, rows.to(q.device))
    res_live, lse_live = _paged_attention(
        dims, q_live, k_cache, v_cache, block_tables, query_lens, lens, sm_scale
    )
    res = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    res[rows] = res_live
    lse_all = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    lse_all[rows] = lse_live
    if out is None:
        out = torch.empty_like(q)
    out.copy_(res)
    if lse is not None:
        lse.copy_(lse_all)
    if return_lse:
        return out, lse if lse is not None else lse_all
    return out


def paged_prefill_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Variable-length causal attention of new tokens over a paged cache (reference).

    Sequence b's new tokens are `q[query_start_loc[b]:query_start_loc[b + 1]]`, the LAST
    `query_len` positions of its `seq_lens[b]` (their K/V already stored). Each attends to
    the cached prefix and causally to the new tokens up to itself.

    Args:
        q: `[T, Hq, D]` fp16/bf16/fp32.
        k_cache, v_cache: `[num_blocks, block_size, Hkv, D]`, q's dtype, Hq % Hkv == 0.
        block_tables: int32 `[B, max_blocks]`; query_start_loc: int32 `[B + 1]`;
        seq_lens: int32 `[B]`, total length (prefix + new tokens).
        scale: softmax scale, default `1/sqrt(D)`; out: optional `[T, Hq, D]` buffer.

    Returns:
        out `[T, Hq, D]`, q's dtype.

    Raises:
        TypeError, ValueError: bad dtypes/shapes/devices, or offsets, lengths or block ids
            out of range.
    """
    op = "paged_prefill_reference"
    dims = check_attention_args(
        op, q, k_cache, v_cache, block_tables, seq_lens, out, query_start_loc=query_start_loc
    )
    sm_scale = check_scale(op, scale, dims.cache.head_dim)
    query_lens = check_query_start_loc(op, query_start_loc, q.shape[0])
    check_table_values(op, block_tables, seq_lens, dims.cache, query_lens=query_lens)
    res, _ = _paged_attention(
        dims, q, k_cache, v_cache, block_tables, query_lens.tolist(), seq_lens.tolist(), sm_scale
    )
    if out is None:
        out = torch.empty_like(q)
    out.copy_(res)
    return out


def copy_blocks_reference(
    src: torch.Tensor, dst: torch.Tensor, src_ids: object, dst_ids: object
) -> None:
    """Copy whole blocks `src[src_ids[i]] -> dst[dst_ids[i]]`, bit-exact (reference).

    Args:
        src, dst: tensors whose dim 0 is the block dim, same dtype and `shape[1:]`; any
            devices (e.g. the full `[num_blocks, num_layers, 2, block_size, Hkv, D]` pools).
        src_ids, dst_ids: equal-length sequences of ints or CPU integer tensors.

    Raises:
        TypeError, ValueError: mismatched pools, ids out of range, duplicate destination
            ids, or a block both read and written within one tensor; dst is then untouched.
    """
    sid, did = check_copy_args("copy_blocks_reference", src, dst, src_ids, dst_ids)
    if sid.numel() == 0:
        return
    blocks = src.index_select(0, sid.to(src.device))  # [n, *block_shape]
    dst.index_copy_(0, did.to(dst.device), blocks.to(dst.device))
