"""The Triton decode kernel against the torch reference (interpreted on CPU), and the
split planner. Shapes are tiny: the interpreter is ~1000x slower than torch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kernels_helpers import (
    assert_close,
    check_int64_addressing,
    dtype_id,
    make_case,
    naive_attention,
    needs_interpreter,
    randn,
    torch_threads,
    uneven_lens,
)

import pagedkv.kernels.decode
from pagedkv.kernels import decode_workspace, paged_decode, paged_decode_reference, plan_decode


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


# (dtype, head_dim, block_size, group): a representative subset of the reference matrix,
# covering tiles spanning several pages (bs 16 < BLOCK_N) and pages spanning tiles (256).
CASES = [
    (torch.float32, 64, 16, 4),
    (torch.float16, 64, 16, 4),
    (torch.bfloat16, 64, 16, 4),
    (torch.float32, 128, 32, 1),
    (torch.bfloat16, 128, 64, 8),
    (torch.float16, 256, 16, 8),
    (torch.float32, 64, 256, 4),
]
CASE_IDS = [f"{dtype_id(t)}-d{d}-bs{b}-g{g}" for t, d, b, g in CASES]


@needs_interpreter
@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "group"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_splits", [None, 1, 3], ids=["planned", "1split", "3splits"])
def test_decode_kernel_matches_reference(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int, num_splits: int | None
) -> None:
    lens = uneven_lens(block_size, long=2 * block_size + 70)
    case = make_case(lens, block_size=block_size, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    q = randn(len(lens), 2 * group, head_dim, dtype=dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    out, lse = paged_decode(*args, return_lse=True, num_splits=num_splits, backend="triton")
    want, want_lse = paged_decode_reference(*args, return_lse=True)
    assert_close(out, want, dtype)
    assert_close(lse, want_lse, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_kernel_zero_length_rows_give_zeros(num_splits: int) -> None:
    # Length 0 is how a CUDA-graph batch pads unused rows.
    case = make_case([0, 70, 0, 3], block_size=16, num_kv_heads=1, head_dim=64, dtype=torch.float16)
    q = randn(4, 4, 64, dtype=torch.float16)
    out, lse = paged_decode(
        q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
        return_lse=True, num_splits=num_splits, backend="triton",
    )  # fmt: skip
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
    assert bool(torch.isneginf(lse[[0, 2]]).all())
    want, _ = naive_attention(q, case, [1, 1, 1, 1], 64**-0.5)
    assert_close(out, want, torch.float16)


@needs_interpreter
def test_decode_kernel_honours_arbitrary_strides() -> None:
    dtype, bs, hkv, d = torch.float32, 16, 2, 64
    case = make_case([5, 40], block_size=bs, num_kv_heads=hkv, head_dim=d, dtype=dtype)
    # A cache whose head_dim is not innermost: storage [.., D, Hkv], viewed as [.., Hkv, D].
    kv_t = case.kv.transpose(-1, -2).contiguous().transpose(-1, -2)
    k_cache, v_cache = kv_t[:, case.layer, 0], kv_t[:, case.layer, 1]
    assert k_cache.stride(-1) == hkv
    wide = torch.zeros(2, 7, dtype=torch.int32)
    wide[:, 1 : 1 + case.block_tables.shape[1]] = case.block_tables
    tables = wide[:, 1 : 1 + case.block_tables.shape[1]]  # row stride 7, offset 1
    q = randn(2, 8, 2 * d, dtype=dtype)[:, :, ::2]  # head_dim stride 2
    out = torch.zeros(8, 2, d, dtype=dtype).transpose(0, 1)  # [B, Hq, D], strides (D, 2D, 1)
    res = paged_decode(q, k_cache, v_cache, tables, case.seq_lens, out=out, backend="triton")
    assert res is out
    want = paged_decode_reference(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    assert_close(out, want, dtype)


@needs_interpreter
def test_decode_kernel_reuses_buffers_and_tolerates_short_max_seq_len() -> None:
    dtype = torch.float16
    case = make_case([3, 100, 17], block_size=16, num_kv_heads=2, head_dim=64, dtype=dtype)
    q = randn(3, 4, 64, dtype=dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    want, want_lse = paged_decode_reference(*args, return_lse=True)
    # Planned for 32 tokens but sequence 1 has 100: the last split runs to the end.
    workspace = decode_workspace(q, case.k_cache, case.block_tables, max_seq_len=32, num_splits=2)
    out, lse = torch.empty_like(q), torch.empty(3, 4)
    for _ in range(2):
        res, res_lse = paged_decode(
            *args, out=out, lse=lse, return_lse=True, workspace=workspace, max_seq_len=32,
            num_splits=2, backend="triton",
        )  # fmt: skip
        assert res is out and res_lse is lse
        assert_close(out, want, dtype)
        assert_close(lse, want_lse, torch.float32)


@needs_interpreter
def test_decode_kernel_rejects_small_workspace() -> None:
    case = make_case([300], block_size=16, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    q = randn(1, 2, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"workspace must be .* >= \d+ elements for 2 splits"):
        paged_decode(
            q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
            workspace=torch.empty(3), num_splits=2, backend="triton",
        )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("num_splits", [3, 1], ids=["3splits-workspace", "1split-no-workspace"])
def test_decode_kernel_allocates_nothing_with_buffers(
    monkeypatch: pytest.MonkeyPatch, num_splits: int
) -> None:
    case = make_case([300, 7], block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    q = randn(2, 4, 64, dtype=torch.float16)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    # One split needs no workspace at all.
    workspace = None
    if num_splits > 1:
        workspace = decode_workspace(q, case.k_cache, case.block_tables, num_splits=num_splits)
    out, lse = torch.empty_like(q), torch.empty(2, 4)
    want = paged_decode_reference(*args)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("paged_decode allocated although every buffer was given")

    for name in ("empty", "empty_like", "zeros", "zeros_like", "full", "tensor"):
        monkeypatch.setattr(torch, name, refuse)
    paged_decode(
        *args, out=out, lse=lse, workspace=workspace, num_splits=num_splits, backend="triton"
    )  # fmt: skip
    monkeypatch.undo()
    assert_close(out, want, torch.float16)


@needs_interpreter
def test_kernels_int64_addressing_beyond_int32() -> None:
    # store_kv, decode and prefill through a cache view whose last block starts past
    # element 2**31: int32 offset arithmetic would wrap and read or write elsewhere.
    check_int64_addressing("cpu", "triton")


def test_plan_fills_the_gpu_for_one_long_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pagedkv.kernels.decode, "num_sms", lambda device: 132)
    common = {"num_kv_heads": 8, "head_dim": 128, "block_size": 16, "device": torch.device("cpu")}
    long = plan_decode(num_seqs=1, max_blocks=2048, **common)  # batch 1 x 32k
    assert long.num_splits * 8 >= 4 * 132 // 2, long
    assert long.num_splits * long.tokens_per_split >= 2048 * 16
    assert (long.num_splits - 1) * long.tokens_per_split < 2048 * 16  # no empty split
    wide = plan_decode(num_seqs=64, max_blocks=256, **common)  # batch 64 x 4k: plenty
    assert wide.num_splits <= 2, wide
    short = plan_decode(num_seqs=1, max_blocks=4, **common)  # 64 tokens: one tile
    assert short.num_splits == 1
    hinted = plan_decode(num_seqs=1, max_blocks=2048, max_seq_len=1024, **common)
    assert hinted.num_splits * hinted.tokens_per_split < long.num_splits * long.tokens_per_split
    # Shapes alone decide: the same shapes always give the same plan (graph replay).
    assert plan_decode(num_seqs=1, max_blocks=2048, **common) == long
    assert long.workspace_numel(1, 32, 128) == 32 * long.num_splits * 129


def test_plan_rejects_bad_hints() -> None:
    common = {"num_seqs": 1, "num_kv_heads": 1, "head_dim": 64, "block_size": 16}
    with pytest.raises(ValueError, match="num_splits must be >= 1; got num_splits=0"):
        plan_decode(max_blocks=4, device=torch.device("cpu"), num_splits=0, **common)
    with pytest.raises(TypeError, match="max_seq_len must be an int; got float"):
        plan_decode(max_blocks=4, device=torch.device("cpu"), max_seq_len=3.0, **common)  # type: ignore[arg-type]


@needs_interpreter
@pytest.mark.parametrize("head_dim", [80, 96])
def test_decode_kernel_non_power_of_two_head_dim(head_dim: int) -> None:
    # head_dim is padded to a power of two inside the kernel and masked.
    case = make_case(
        [1, 33, 90], block_size=16, num_kv_heads=2, head_dim=head_dim, dtype=torch.float16
    )
    q = randn(3, 6, head_dim, dtype=torch.float16)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    assert_close(
        paged_decode(*args, num_splits=2, backend="triton"),
        paged_decode_reference(*args),
        torch.float16,
    )


@needs_interpreter
def test_decode_kernel_empty_batch() -> None:
    case = make_case([5], block_size=16, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    q = torch.empty(0, 2, 64)
    empty_tables, empty_lens = case.block_tables[:0], case.seq_lens[:0]
    out, lse = paged_decode(
        q, case.k_cache, case.v_cache, empty_tables, empty_lens, return_lse=True, backend="triton"
    )
    assert out.shape == (0, 2, 64) and lse.shape == (0, 2)
