"""Fast attention over a paged cache for CPU tensors, through torch's fused SDPA.

The pure-torch references in `pagedkv.kernels.reference` are the oracles: simple, explicit, and
slow (they materialise every score). For CPU tensors `backend="auto"` runs these instead:
gather each sequence's K/V pages once (`index_select` over whole blocks) and call
`scaled_dot_product_attention`, whose CPU kernel is fused and multi-threaded. Same
signatures and contracts as the references; tested against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather(cache: torch.Tensor, table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """K or V of one sequence: `[seq_len, Hkv, D]` from `[num_blocks, bs, Hkv, D]`."""
    bs = cache.shape[1]
    num_blocks = -(-seq_len // bs)
    pages = cache.index_select(0, table_row[:num_blocks].to(torch.int64))  # [n, bs, Hkv, D]
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_prefill_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_prefill` for CPU tensors (arguments already validated by the caller).

    q `[T, Hq, D]`; each sequence's new tokens are the last `query_len` of its
    `seq_lens[b]` positions and attend to everything before them plus causally to each
    other. Returns out `[T, Hq, D]` in q's dtype.
    """
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()  # CPU tensors: no device sync involved
    lens = seq_lens.tolist()
    group = q.shape[1] // k_cache.shape[2]
    for b, seq_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        query_len = q1 - q0
        if query_len == 0:
            continue
        k = _gather(k_cache, block_tables[b], seq_len)  # [S, Hkv, D]
        v = _gather(v_cache, block_tables[b], seq_len)
        if group > 1:  # [S, Hq, D]: expand the KV heads over their query-head group
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        prefix = seq_len - query_len
        mask = None
        causal = prefix == 0 and query_len > 1  # the fused kernel's own causal path
        if prefix and query_len > 1:
            # new token i (position prefix + i) sees keys 0 .. prefix + i: a bottom-right
            # aligned causal mask [query_len, seq_len]
            rows = torch.arange(query_len).unsqueeze(1)
            cols = torch.arange(seq_len).unsqueeze(0)
            mask = cols <= rows + prefix
        # 4-D [1, H, L, D]: the layout torch's fused CPU (flash) kernel takes; 3-D inputs
        # fall back to a kernel about 3x slower
        res = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1).unsqueeze(0),  # [1, Hq, Lq, D]
            k.transpose(0, 1).unsqueeze(0),  # [1, Hq, S, D]
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
        )[0]  # [Hq, Lq, D]
        out[q0:q1] = res.transpose(0, 1)
    return out


def paged_decode_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_decode` for CPU tensors: q `[B, Hq, D]`, one new token per sequence (the
    last of its `seq_lens[b]` positions, already stored), attending to all of them."""
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_prefill_sdpa(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale=scale, out=out
    )
