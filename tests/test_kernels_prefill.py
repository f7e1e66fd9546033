"""The Triton prefill kernel against the torch reference (interpreted on CPU, tiny shapes).

Under the interpreter the tiles are BLOCK_M=32, BLOCK_N=16, so sequences of 40 new tokens
span two query tiles, and prefixes of 0, 1, bs-1, bs and long cross key tiles and pages.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kernels_helpers import (
    assert_close,
    dtype_id,
    make_case,
    naive_attention,
    needs_interpreter,
    query_start_loc,
    randn,
    torch_threads,
)

from pagedkv.kernels import paged_prefill, paged_prefill_reference

pytestmark = needs_interpreter


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


CASES = [
    (torch.float32, 64, 16, 4),
    (torch.float16, 64, 16, 1),
    (torch.bfloat16, 64, 32, 8),
    (torch.float16, 128, 64, 4),
    (torch.float32, 32, 256, 2),
]
CASE_IDS = [f"{dtype_id(t)}-d{d}-bs{b}-g{g}" for t, d, b, g in CASES]


def prefill_shapes(block_size: int) -> list[tuple[int, int]]:
    """(cached prefix, new tokens) per sequence: prefixes 0, 1, bs-1, bs and long."""
    return [
        (0, 1),
        (0, 40),
        (1, 5),
        (block_size - 1, 17),
        (block_size, 2),
        (2 * block_size + 9, 33),
    ]


@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "group"), CASES, ids=CASE_IDS)
def test_prefill_kernel_matches_reference(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    shapes = prefill_shapes(block_size)
    lens, query_lens = [p + n for p, n in shapes], [n for _, n in shapes]
    case = make_case(lens, block_size=block_size, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    q = randn(sum(query_lens), 2 * group, head_dim, dtype=dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, query_start_loc(query_lens))
    out = paged_prefill(*args, case.seq_lens, max_query_len=max(query_lens), backend="triton")
    assert_close(out, paged_prefill_reference(*args, case.seq_lens), dtype)


@pytest.mark.parametrize("max_query_len", [None, 1], ids=["default", "too-small"])
def test_prefill_kernel_grid_hint_never_changes_the_result(max_query_len: int | None) -> None:
    # The default grid covers T tokens per sequence; a too small hint makes each program
    # stride over several query tiles. Both must give the exact attention.
    dtype = torch.float16
    shapes = [(3, 70), (0, 33), (20, 1)]
    lens, query_lens = [p + n for p, n in shapes], [n for _, n in shapes]
    case = make_case(lens, block_size=16, num_kv_heads=1, head_dim=64, dtype=dtype)
    q = randn(sum(query_lens), 2, 64, dtype=dtype)
    qsl = query_start_loc(query_lens)
    out = paged_prefill(
        q, case.k_cache, case.v_cache, case.block_tables, qsl, case.seq_lens,
        max_query_len=max_query_len, backend="triton",
    )  # fmt: skip
    want, _ = naive_attention(q, case, query_lens, 64**-0.5)
    assert_close(out, want, dtype)


def test_prefill_kernel_honours_strides_scale_and_empty_sequences() -> None:
    dtype = torch.float32
    shapes = [(5, 9), (0, 0), (16, 4)]  # the middle sequence has no new tokens
    lens, query_lens = [p + n for p, n in shapes], [n for _, n in shapes]
    case = make_case(lens, block_size=16, num_kv_heads=2, head_dim=64, dtype=dtype)
    q = randn(13, 4, 128, dtype=dtype)[:, :, 32:96]  # offset view, token stride 512
    out = torch.zeros(4, 13, 64, dtype=dtype).transpose(0, 1)  # [T, Hq, D], T stride 64
    qsl = query_start_loc(query_lens)
    res = paged_prefill(
        q, case.k_cache, case.v_cache, case.block_tables, qsl, case.seq_lens,
        scale=0.2, out=out, backend="triton",
    )  # fmt: skip
    assert res is out
    want, _ = naive_attention(q, case, query_lens, 0.2)
    assert_close(out, want, dtype)


def test_prefill_kernel_non_power_of_two_head_dim() -> None:
    shapes = [(0, 9), (17, 35)]
    lens, query_lens = [p + n for p, n in shapes], [n for _, n in shapes]
    case = make_case(lens, block_size=16, num_kv_heads=1, head_dim=80, dtype=torch.bfloat16)
    q = randn(sum(query_lens), 3, 80, dtype=torch.bfloat16)
    args = (q, case.k_cache, case.v_cache, case.block_tables, query_start_loc(query_lens))
    out = paged_prefill(*args, case.seq_lens, backend="triton")
    assert_close(out, paged_prefill_reference(*args, case.seq_lens), torch.bfloat16)
