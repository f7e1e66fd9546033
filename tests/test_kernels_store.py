"""`store_kv`: the Triton kernel (interpreted) against the reference, slot -1 skipped,
out-of-range slots rejected before anything is written."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kernels_helpers import DTYPES, bits, dtype_id, needs_interpreter, randn, torch_threads

from pagedkv.kernels import store_kv, store_kv_reference


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def poisoned_kv(dtype: torch.dtype, block_size: int = 16, num_kv_heads: int = 3) -> torch.Tensor:
    """`[num_blocks=6, num_layers=2, 2, block_size, Hkv, 64]`, all NaN."""
    shape = (6, 2, 2, block_size, num_kv_heads, 64)
    return torch.full(shape, float("nan"), dtype=dtype)


SLOTS = [5, -1, 16 * 3 + 15, 0, -1, 16 * 5, 17]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_store_kernel_matches_reference(dtype: torch.dtype) -> None:
    k = randn(len(SLOTS), 3, 128, dtype=dtype)[:, :, ::2]  # strided input, head_dim stride 2
    v = randn(len(SLOTS), 3, 64, dtype=dtype, seed=2)
    slots = torch.tensor(SLOTS)
    got, want = poisoned_kv(dtype), poisoned_kv(dtype)
    store_kv(k, v, got[:, 1, 0], got[:, 1, 1], slots, backend="triton")
    store_kv_reference(k, v, want[:, 1, 0], want[:, 1, 1], slots)
    assert torch.equal(bits(got), bits(want))
    assert torch.equal(got[0, 1, 0, 5], k[0]) and torch.equal(got[1, 1, 1, 1], v[6])


@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=needs_interpreter), "torch", "auto"]
)
@pytest.mark.parametrize("bad_slot", [6 * 16, 10**12, -2])
def test_store_out_of_range_raises_and_leaves_cache_bit_identical(
    backend: str, bad_slot: int
) -> None:
    kv = poisoned_kv(torch.float16)
    kv[2, 1, 0, 3] = 1.5  # some real data among the poison
    before = bits(kv)
    k = v = randn(3, 3, 64, dtype=torch.float16)
    slots = torch.tensor([1, 2, bad_slot])
    with pytest.raises(ValueError, match=rf"slot_mapping\[2\]={bad_slot} is outside \[-1, "):
        store_kv(k, v, kv[:, 1, 0], kv[:, 1, 1], slots, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(bits(kv), before)


@needs_interpreter
def test_store_kernel_unchecked_bad_slot_is_skipped_not_written() -> None:
    # check_slots=False is the CUDA default (a check would sync): the kernel must still
    # never write outside the cache, and the valid tokens must land.
    # The cache sits in the middle of a larger buffer of 7.0s, so a write one block past
    # its end (slot 6 * 16) or before its start (slot -5) would land in the margins.
    poisoned = poisoned_kv(torch.float32)
    n = poisoned.numel()
    buf = torch.full((3 * n,), 7.0)
    kv = buf[n : 2 * n].view(poisoned.shape)
    kv.copy_(poisoned)
    k = v = randn(3, 3, 64, dtype=torch.float32)
    slots = torch.tensor([4, 6 * 16, -5])
    store_kv(k, v, kv[:, 0, 0], kv[:, 0, 1], slots, check_slots=False, backend="triton")
    assert torch.equal(kv[0, 0, 0, 4], k[0])
    assert int(torch.isnan(kv).logical_not().sum()) == 2 * 3 * 64
    assert bool((buf[:n] == 7.0).all()) and bool((buf[2 * n :] == 7.0).all())


@needs_interpreter
def test_store_kernel_empty_batch_is_a_no_op() -> None:
    kv = poisoned_kv(torch.float32)
    before = bits(kv)
    empty = torch.empty(0, 3, 64)
    store_kv(
        empty, empty, kv[:, 0, 0], kv[:, 0, 1], torch.empty(0, dtype=torch.int64), backend="triton"
    )
    assert torch.equal(bits(kv), before)
