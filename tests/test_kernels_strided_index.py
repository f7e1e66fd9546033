"""1-D index tensors (`seq_lens`, `query_start_loc`, `slot_mapping`, copy ids) that are
strided views, e.g. every other element of a larger buffer: every kernel must read them
through their stride, exactly as it reads the contiguous copy."""

from __future__ import annotations

import pytest
import torch
from kernels_helpers import (
    assert_close,
    bits,
    make_case,
    needs_interpreter,
    query_start_loc,
    randn,
)

from pagedkv.kernels import copy_blocks, paged_decode, paged_prefill, store_kv

BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
CUDA = [pytest.param("triton", marks=pytest.mark.gpu)]


def spread(t: torch.Tensor, fill: int) -> torch.Tensor:
    """A view of `t`'s values at stride 2 in a buffer whose other elements are `fill`
    (garbage a kernel ignoring the stride would read)."""
    buf = torch.full((2 * t.numel(),), fill, dtype=t.dtype, device=t.device)
    view = buf[::2]
    view.copy_(t)
    assert view.stride(0) == 2
    return view


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", BACKENDS + CUDA)
def test_decode_reads_strided_seq_lens(backend: str) -> None:
    device = device_for(backend)
    case = make_case([5, 17, 40], block_size=16, num_kv_heads=2, head_dim=16,
                     dtype=torch.float32, device=device)  # fmt: skip
    q = randn(3, 4, 16, dtype=torch.float32, device=device)
    args = (q, case.k_cache, case.v_cache, case.block_tables)
    dense = paged_decode(*args, case.seq_lens, backend=backend, num_splits=1)
    strided = paged_decode(*args, spread(case.seq_lens, 10_000), backend=backend, num_splits=1)
    assert not torch.isnan(strided).any()
    assert_close(strided, dense, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS + CUDA)
def test_prefill_reads_strided_offsets_and_lengths(backend: str) -> None:
    device = device_for(backend)
    lens, new = [5, 17, 40], [2, 17, 3]
    case = make_case(lens, block_size=16, num_kv_heads=2, head_dim=16,
                     dtype=torch.float32, device=device)  # fmt: skip
    q = randn(sum(new), 4, 16, dtype=torch.float32, device=device)
    qsl = query_start_loc(new, device)
    args = (q, case.k_cache, case.v_cache, case.block_tables)
    dense = paged_prefill(*args, qsl, case.seq_lens, backend=backend)
    strided = paged_prefill(*args, spread(qsl, 7_777), spread(case.seq_lens, 9_999),
                            backend=backend)  # fmt: skip
    assert not torch.isnan(strided).any()
    assert_close(strided, dense, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS + CUDA)
def test_store_reads_strided_slot_mapping(backend: str) -> None:
    device = device_for(backend)
    kv = torch.zeros(2, 4, 2, 8, device=device)  # 2 blocks of 4 slots
    k = randn(3, 2, 8, dtype=torch.float32, device=device)
    v = randn(3, 2, 8, dtype=torch.float32, device=device, seed=2)
    slots = spread(torch.tensor([6, -1, 1], dtype=torch.int64, device=device), 3)
    k_cache, v_cache = kv.clone(), kv.clone()
    store_kv(k, v, k_cache, v_cache, slots, backend=backend)
    expected_k, expected_v = kv.clone(), kv.clone()
    expected_k[1, 2], expected_v[1, 2] = k[0], v[0]
    expected_k[0, 1], expected_v[0, 1] = k[2], v[2]
    assert torch.equal(k_cache, expected_k)  # slot 3 (the filler) stays untouched
    assert torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("backend", BACKENDS + CUDA)
def test_copy_reads_strided_ids(backend: str) -> None:
    device = device_for(backend)
    src = randn(6, 2, 4, 8, dtype=torch.bfloat16, device=device)
    dst = torch.zeros_like(src)
    src_ids = torch.tensor([4, 0, 5, 1, 3, 2])[::2]  # 4, 5, 3
    dst_ids = torch.tensor([1, 9, 3, 9, 0, 9])[::2]  # 1, 3, 0
    copy_blocks(src, dst, src_ids, dst_ids, backend=backend)
    expected = torch.zeros_like(src)
    expected[[1, 3, 0]] = src[[4, 5, 3]]
    assert torch.equal(bits(dst), bits(expected))
