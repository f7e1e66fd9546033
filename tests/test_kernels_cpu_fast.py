"""The CPU fast path of `paged_prefill` (fused SDPA) against the reference oracle."""

from __future__ import annotations

import math

import pytest
import torch

from pagedkv.kernels import paged_prefill, paged_prefill_reference


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_prefill_matches_reference(group: int, block_size: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    hkv, d = 2, 16
    hq = hkv * group
    # (prefix, new) per sequence: empty prefix, 1, block_size - 1, block_size, long
    shapes = [(0, 5), (1, 3), (block_size - 1, 2), (block_size, 1), (3 * block_size + 2, 7)]
    seq_lens = [p + n for p, n in shapes]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 4
    k_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    width = max(blocks_per_seq)
    tables = torch.zeros(len(shapes), width, dtype=torch.int32)
    used: set[int] = set()
    for b, n in enumerate(blocks_per_seq):
        ids = [perm.pop() for _ in range(n)]
        used.update(ids)
        tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
        # NaN poison in the unused slots of each sequence's last page
        tail = seq_lens[b] % block_size
        if tail:
            k_cache[ids[-1], tail:] = float("nan")
            v_cache[ids[-1], tail:] = float("nan")
    for blk in set(range(num_blocks)) - used:
        k_cache[blk] = float("nan")
        v_cache[blk] = float("nan")
    qsl = torch.tensor(
        [0, *torch.tensor([n for _, n in shapes]).cumsum(0).tolist()], dtype=torch.int32
    )
    q = torch.randn(int(qsl[-1]), hq, d).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    fast = paged_prefill(q, k_cache, v_cache, tables, qsl, lens, scale=scale)
    ref = paged_prefill_reference(q, k_cache, v_cache, tables, qsl, lens, scale=scale)
    assert not torch.isnan(fast).any()
    # fp32 1e-5; bf16 1.6e-2 relative (the fused kernel rounds in a different order)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(fast.float(), ref.float(), rtol=tol, atol=tol)


def test_cpu_prefill_checks_values_like_the_reference() -> None:
    k = torch.zeros(4, 4, 1, 8)
    q = torch.zeros(3, 1, 8)
    tables = torch.tensor([[0, 9]], dtype=torch.int32)  # block 9 is out of range
    with pytest.raises(ValueError, match="block"):
        paged_prefill(q, k, k, tables, torch.tensor([0, 3], dtype=torch.int32),
                      torch.tensor([7], dtype=torch.int32))  # fmt: skip
