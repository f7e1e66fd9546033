"""`copy_blocks`: bit-exact whole-block copies, run planning, the Triton gather kernel."""

from __future__ import annotations

import pytest
import torch
from kernels_helpers import bits, needs_interpreter, randn

from pagedkv.kernels import copy_blocks, copy_blocks_reference


def pool(num_blocks: int, seed: int = 0) -> torch.Tensor:
    """A small KV pool `[num_blocks, num_layers=2, 2, block_size=16, Hkv=2, D=8]`, bf16,
    with NaNs of distinct payloads so the copy must move raw bits."""
    t = randn(num_blocks, 2, 2, 16, 2, 8, dtype=torch.bfloat16, seed=seed)
    t.view(torch.int16)[:, 0, 0, 0, 0, :2] = torch.tensor([0x7FC1, -0x3F], dtype=torch.int16)
    return t


PAIRS = [
    ([3, 4, 5, 6], [0, 1, 2, 3]),  # one contiguous run
    ([9, 2, 7, 0, 1, 5], [4, 0, 6, 2, 3, 10]),  # scattered, partly consecutive
    ([], []),
    ([1, 1, 1], [7, 8, 9]),  # one source to several destinations
]


@pytest.mark.parametrize(
    "backend", ["auto", "torch", pytest.param("triton", marks=needs_interpreter)]
)
@pytest.mark.parametrize(("src_ids", "dst_ids"), PAIRS)
def test_copy_blocks_is_bit_exact(backend: str, src_ids: list[int], dst_ids: list[int]) -> None:
    src, dst = pool(12), pool(11, seed=1)
    expected = dst.clone()
    for s, d in zip(src_ids, dst_ids, strict=True):
        expected[d] = src[s]
    copy_blocks(src, dst, src_ids, dst_ids, backend=backend)
    assert torch.equal(bits(dst), bits(expected))


def test_copy_blocks_within_one_pool_and_from_tensors() -> None:
    p = pool(10)
    expected = p.clone()
    expected[[6, 7, 8]] = p[[0, 1, 2]]
    copy_blocks(p, p, torch.tensor([0, 1, 2], dtype=torch.int32), torch.arange(6, 9))
    assert torch.equal(bits(p), bits(expected))


def test_copy_blocks_non_dense_blocks_use_slice_copies() -> None:
    src = pool(6).transpose(1, 2)  # blocks are no longer one dense chunk
    dst = torch.zeros_like(src)
    copy_blocks(src, dst, [0, 4, 5], [1, 2, 3])
    assert torch.equal(bits(dst[[1, 2, 3]]), bits(src[[0, 4, 5]]))
    with pytest.raises(
        ValueError, match="backend='triton' needs src and dst on one device with dense"
    ):
        copy_blocks(src, dst, [0], [0], backend="triton")


@needs_interpreter
def test_copy_kernel_matches_reference_on_many_runs() -> None:
    src = pool(40)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    src_ids, dst_ids = perm[:25], perm[15:40]
    dst_a, dst_b = pool(40, seed=2), pool(40, seed=2)
    copy_blocks(src, dst_a, src_ids, dst_ids, backend="triton")
    copy_blocks_reference(src, dst_b, src_ids, dst_ids)
    assert torch.equal(bits(dst_a), bits(dst_b))


@pytest.mark.parametrize(
    ("src_ids", "dst_ids", "error", "match"),
    [
        ([0, 1], [0], ValueError, "same length; got 2 and 1"),
        ([12], [0], ValueError, r"src_ids\[0\]=12 is outside \[0, 12\)"),
        ([0], [-1], ValueError, r"dst_ids\[0\]=-1 is outside \[0, 11\)"),
        ([0, 1], [3, 3], ValueError, "dst_ids must be unique"),
        ([0.5], [1], TypeError, "src_ids must be a sequence of ints"),
        ([[0]], [[1]], ValueError, "src_ids must be 1-D"),
    ],
)
def test_copy_blocks_rejects_bad_ids_and_leaves_dst(
    src_ids: object, dst_ids: object, error: type[Exception], match: str
) -> None:
    src, dst = pool(12), pool(11, seed=1)
    before = bits(dst)
    with pytest.raises(error, match=match):
        copy_blocks(src, dst, src_ids, dst_ids)
    assert torch.equal(bits(dst), before)


def test_copy_blocks_rejects_mismatched_pools_and_overlap() -> None:
    src = pool(4)
    with pytest.raises(
        ValueError,
        match=r"same per-block shape .* got src.shape=\(4, 2, 2, 16, 2, 8\), dst.shape=\(4, 2, 2, 16, 2, 4\)",
    ):
        copy_blocks(src, torch.zeros(4, 2, 2, 16, 2, 4, dtype=torch.bfloat16), [0], [0])
    with pytest.raises(
        TypeError, match=r"same dtype; got src.dtype=torch.bfloat16, dst.dtype=torch.float16"
    ):
        copy_blocks(src, torch.zeros(4, 2, 2, 16, 2, 8, dtype=torch.float16), [0], [0])
    with pytest.raises(ValueError, match=r"block ids \[1\] in both src_ids and dst_ids"):
        copy_blocks(src, src, [0, 1], [1, 2])
    with pytest.raises(ValueError, match="share memory but are different views"):
        copy_blocks(src[:2], src[2:], [0], [0])
    with pytest.raises(TypeError, match=r"dst must be a torch.Tensor; got list"):
        copy_blocks(src, [1, 2], [0], [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        copy_blocks(src, pool(4), [0], [0], backend="cuda")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int64], ids=str)
def test_copy_kernel_moves_raw_words_of_any_dtype(dtype: torch.dtype) -> None:
    src = (torch.randn(6, 3, 5) * 100).to(dtype)
    dst = torch.zeros_like(src)
    copy_blocks(src, dst, [5, 0, 2], [1, 2, 4], backend="triton")
    assert torch.equal(dst[[1, 2, 4]], src[[5, 0, 2]]) and not dst[[0, 3, 5]].any()
