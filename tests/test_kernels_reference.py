"""The torch references against fp64 naive attention and independent indexing.

The references are the oracle for the Triton kernels, so they are checked on the full
matrix: head_dim 64/128/256, block_size 16/32/64/256, GQA 1:1/4:1/8:1, fp32/fp16/bf16,
on permuted block tables with uneven lengths and NaN poison in every unused slot.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from kernels_helpers import (
    DTYPES,
    assert_close,
    bits,
    check_int64_addressing,
    dtype_id,
    make_case,
    naive_attention,
    query_start_loc,
    randn,
    torch_threads,
    uneven_lens,
)

from pagedkv.kernels import (
    copy_blocks_reference,
    paged_decode_reference,
    paged_prefill_reference,
    store_kv_reference,
)
from pagedkv.kernels.copy import plan_runs

HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 256)
GROUPS = (1, 4, 8)
MATRIX = list(itertools.product(DTYPES, HEAD_DIMS, BLOCK_SIZES, GROUPS))
MATRIX_IDS = [f"{dtype_id(t)}-d{d}-bs{b}-g{g}" for t, d, b, g in MATRIX]
NUM_KV_HEADS = 2


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def long_len(block_size: int) -> int:
    return 3 * block_size + 5 if block_size < 256 else 2 * block_size + 7


@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "group"), MATRIX, ids=MATRIX_IDS)
def test_decode_reference_matches_naive(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    lens = uneven_lens(block_size, long_len(block_size))
    case = make_case(
        lens, block_size=block_size, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim, dtype=dtype
    )
    q = randn(len(lens), NUM_KV_HEADS * group, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    out, lse = paged_decode_reference(
        q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, return_lse=True
    )
    want, want_lse = naive_attention(q, case, [1] * len(lens), scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, want, dtype)
    assert_close(lse, want_lse, torch.float32)


@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "group"), MATRIX, ids=MATRIX_IDS)
def test_prefill_reference_matches_naive(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    # (cached prefix, new tokens): prefixes 0, 1, bs - 1, bs and long.
    shapes = [
        (0, 1),
        (0, 7),
        (1, 4),
        (block_size - 1, 2),
        (block_size, 3),
        (long_len(block_size), 5),
    ]
    lens = [p + n for p, n in shapes]
    query_lens = [n for _, n in shapes]
    case = make_case(
        lens, block_size=block_size, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim, dtype=dtype
    )
    q = randn(sum(query_lens), NUM_KV_HEADS * group, head_dim, dtype=dtype)
    out = paged_prefill_reference(
        q, case.k_cache, case.v_cache, case.block_tables, query_start_loc(query_lens),
        case.seq_lens,
    )  # fmt: skip
    want, _ = naive_attention(q, case, query_lens, head_dim**-0.5)
    assert_close(out, want, dtype)


def test_decode_reference_zero_length_is_zero_output() -> None:
    case = make_case([0, 5], block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    q = randn(2, 4, 64, dtype=torch.float32)
    out, lse = paged_decode_reference(
        q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, return_lse=True
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isinf(lse[0]).all() and (lse[0] < 0).all()
    want, _ = naive_attention(q, case, [1, 1], 64**-0.5)
    assert_close(out[1], want[1], torch.float32)


def test_prefill_reference_custom_scale_and_out_buffer() -> None:
    case = make_case([20, 9], block_size=16, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    query_lens = [6, 9]
    q = randn(15, 4, 64, dtype=torch.float32)
    out = torch.empty_like(q)
    res = paged_prefill_reference(
        q, case.k_cache, case.v_cache, case.block_tables, query_start_loc(query_lens),
        case.seq_lens, scale=0.3, out=out,
    )  # fmt: skip
    assert res is out
    want, _ = naive_attention(q, case, query_lens, 0.3)
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_store_kv_reference_writes_slots_and_skips_padding(dtype: torch.dtype) -> None:
    block_size, num_blocks = 16, 6
    kv = torch.full((num_blocks, 2, 2, block_size, 2, 64), float("nan"), dtype=dtype)
    k_cache, v_cache = kv[:, 1, 0], kv[:, 1, 1]
    slots = torch.tensor([5, -1, 16 * 3 + 15, 0, -1, 16 * 5], dtype=torch.int64)
    k, v = randn(6, 2, 64, dtype=dtype), randn(6, 2, 64, dtype=dtype, seed=2)
    before = bits(kv)
    store_kv_reference(k, v, k_cache, v_cache, slots)
    expected = kv.clone()
    expected.copy_(before.view(dtype).view(kv.shape))
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // block_size, 1, 0, slot % block_size] = k[t]
            expected[slot // block_size, 1, 1, slot % block_size] = v[t]
    assert torch.equal(bits(kv), bits(expected))


def test_store_kv_reference_out_of_range_raises_and_leaves_cache() -> None:
    kv = torch.full((4, 1, 2, 16, 2, 64), float("nan"), dtype=torch.float16)
    before = bits(kv)
    k = v = randn(3, 2, 64, dtype=torch.float16)
    for bad in (64, -2):
        with pytest.raises(ValueError, match=r"slot_mapping\[2\]=.* is outside \[-1, num_blocks"):
            store_kv_reference(k, v, kv[:, 0, 0], kv[:, 0, 1], torch.tensor([0, 1, bad]))
        assert torch.equal(bits(kv), before)


def test_copy_blocks_reference_is_bit_exact() -> None:
    src = randn(10, 2, 2, 16, 2, 8, dtype=torch.bfloat16)
    src[3, 0, 0, 0, 0, 0] = float("nan")
    dst = torch.zeros(7, 2, 2, 16, 2, 8, dtype=torch.bfloat16)
    src_ids, dst_ids = [3, 4, 5, 9, 0], [0, 1, 2, 6, 4]
    copy_blocks_reference(src, dst, src_ids, dst_ids)
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert torch.equal(bits(dst[d]), bits(src[s]))
    assert torch.equal(dst[3], torch.zeros_like(dst[3])) and torch.equal(dst[5], dst[3])


def test_plan_runs_merges_consecutive_pairs() -> None:
    src = torch.tensor([7, 2, 3, 4, 10, 11, 0])
    dst = torch.tensor([9, 0, 1, 2, 5, 6, 3])
    runs = plan_runs(src, dst)
    # Sorted by destination: 2..4 -> 0..2 merges, 0 -> 3 alone, 10..11 -> 5..6, 7 -> 9.
    assert runs.src_start == [2, 0, 10, 7]
    assert runs.dst_start == [0, 3, 5, 9]
    assert runs.length == [3, 1, 2, 1]


def test_reference_int64_addressing_beyond_int32() -> None:
    check_int64_addressing("cpu", "torch")
