"""Shared fixtures for the kernel tests: paged cases with NaN poison and fp64 oracles.

Importing this module sets `TRITON_INTERPRET=1` when no CUDA device is present, so the
Triton kernels (whose modules are imported on first use) run on CPU tensors under the
interpreter. On a GPU machine the interpreted tests skip and the `gpu` tests run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pagedkv.kernels import (
    paged_decode,
    paged_decode_reference,
    paged_prefill,
    paged_prefill_reference,
    store_kv,
)
from pagedkv.kernels._triton import HAS_TRITON, interpreting

# Relative and absolute tolerance per dtype (outputs are O(1) averages of V rows).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()),
    reason="Triton kernels on CPU need triton and TRITON_INTERPRET=1 (set without CUDA)",
)


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run with `num_threads` intra-op threads, then restore the previous count.

    The kernel tests run thousands of tiny ops, where thread hand-offs dominate (7 ms vs
    0.1 ms per op on a loaded 2-core machine), so they run single-threaded.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def dtype_id(dtype: torch.dtype) -> str:
    """Short test id for a dtype."""
    return str(dtype).removeprefix("torch.")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare at the tolerance of `dtype`; NaN anywhere fails."""
    assert not torch.isnan(actual).any(), "output contains NaN (read past a sequence's end?)"
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol, check_device=False
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of `t` as integers, for exact comparisons that treat NaN == NaN."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]).cpu()


@dataclass
class PagedCase:
    """A block-major KV cache with sequences laid out through a permuted block table.

    Every slot that holds no valid token of the chosen layer (the rest of each last page,
    unused blocks, the other layers) is NaN, and unused table entries point at a poisoned
    block, so a kernel that reads past a sequence's end produces NaN.
    """

    kv: torch.Tensor  # [num_blocks, num_layers, 2, block_size, Hkv, D]
    layer: int
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B]

    @property
    def k_cache(self) -> torch.Tensor:
        return self.kv[:, self.layer, 0]

    @property
    def v_cache(self) -> torch.Tensor:
        return self.kv[:, self.layer, 1]

    @property
    def block_size(self) -> int:
        return self.kv.shape[3]


def make_case(
    seq_lens: list[int],
    *,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    num_layers: int = 2,
    layer: int = 1,
    extra_columns: int = 1,
    seed: int = 0,
) -> PagedCase:
    """Random K/V for `seq_lens` in randomly permuted blocks, NaN everywhere else."""
    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(pages) + extra_columns
    num_blocks = sum(pages) + 3  # spare blocks stay poisoned
    kv = torch.full(
        (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype
    )
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    poison_block = perm.pop()
    tables = torch.full((len(seq_lens), max_blocks), poison_block, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        ids = [perm.pop() for _ in range(pages[b])]
        tables[b, : pages[b]] = torch.tensor(ids, dtype=torch.int32)
        for j, block_id in enumerate(ids):
            count = min(block_size, n - j * block_size)
            values = torch.randn((2, count, num_kv_heads, head_dim), generator=gen)
            kv[block_id, layer, :, :count] = values.to(dtype)
    return PagedCase(
        kv=kv.to(device),
        layer=layer,
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


def randn(*shape: int, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 1):
    """Seeded standard-normal tensor (generated on the CPU, then moved)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def naive_attention(
    q: torch.Tensor,
    case: PagedCase,
    query_lens: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 attention written independently of the reference: per-position gathers
    (`table[p // bs]`, `p % bs`), GQA by `repeat_interleave`, an explicit softmax.

    q `[T, Hq, D]` holds each sequence's `query_lens[b]` newest tokens in order.
    Returns out `[T, Hq, D]` and lse `[T, Hq]`, fp64 on the CPU.
    """
    q = q.double().cpu()
    k_cache, v_cache = case.k_cache.double().cpu(), case.v_cache.double().cpu()
    tables, lens = case.block_tables.cpu().long(), case.seq_lens.tolist()
    num_q_heads = q.shape[1]
    group = num_q_heads // k_cache.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    row = 0
    for b, (query_len, seq_len) in enumerate(zip(query_lens, lens, strict=True)):
        if query_len == 0 or seq_len == 0:
            row += query_len
            continue
        pos = torch.arange(seq_len)
        blocks = tables[b, pos // case.block_size]
        k = k_cache[blocks, pos % case.block_size].repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[blocks, pos % case.block_size].repeat_interleave(group, dim=1)
        for i in range(query_len):
            q_pos = seq_len - query_len + i
            scores = torch.einsum("hd,nhd->hn", q[row + i], k[: q_pos + 1]) * scale
            top = scores.max(dim=1, keepdim=True).values
            weights = torch.exp(scores - top)
            total = weights.sum(dim=1, keepdim=True)
            out[row + i] = torch.einsum("hn,nhd->hd", weights / total, v[: q_pos + 1])
            lse[row + i] = (top + torch.log(total)).squeeze(1)
        row += query_len
    return out, lse


def query_start_loc(query_lens: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 `[B + 1]` prefix sums of the query lengths."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def uneven_lens(block_size: int, long: int) -> list[int]:
    """The lengths every attention test covers: 1, bs - 1, bs, bs + 1 and a long one."""
    return [1, max(1, block_size - 1), block_size, block_size + 1, long]


def huge_strided_cache(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V views whose block stride times the last block id exceeds 2**31 elements.

    The storage is over 4 GiB but untouched (`torch.empty`), so only the pages actually
    written become resident: each block is a tiny window at a 2**29-element stride.
    """
    block_size, num_kv_heads, head_dim, num_blocks = 16, 2, 64, 5
    block_stride = 2**29 + 64
    per_block = 2 * block_size * num_kv_heads * head_dim
    storage = torch.empty((num_blocks - 1) * block_stride + per_block, dtype=dtype, device=device)
    kv = storage.as_strided(
        (num_blocks, 2, block_size, num_kv_heads, head_dim),
        (block_stride, block_size * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, 1),
    )
    for block_id in range(num_blocks):
        kv[block_id].fill_(float("nan"))
    assert (num_blocks - 1) * block_stride > 2**31
    return kv[:, 0], kv[:, 1]


def check_int64_addressing(device: str, backend: str) -> None:
    """store_kv, decode and prefill through blocks beyond element 2**31 of a cache view."""
    dtype = torch.float16
    k_cache, v_cache = huge_strided_cache(dtype, device)
    # Sequence 0 lives in block 4 (offset > 2**31 elements) then block 1; sequence 1 in 3.
    tables = torch.tensor([[4, 1], [3, 0]], dtype=torch.int32, device=device)
    lens = [20, 9]
    slots = [4 * 16 + p for p in range(16)] + [16 + p for p in range(4)]
    slots += [3 * 16 + p for p in range(9)]
    k = randn(29, 2, 64, dtype=dtype, device=device)
    v = randn(29, 2, 64, dtype=dtype, device=device, seed=3)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    store_kv(k, v, k_cache, v_cache, slot_mapping, backend=backend)
    assert torch.equal(k_cache[4, 3].cpu(), k[3].cpu()) and torch.equal(
        v_cache[3, 8].cpu(), v[28].cpu()
    )

    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(2, 8, 64, dtype=dtype, device=device)
    out = paged_decode(q, k_cache, v_cache, tables, seq_lens, backend=backend)
    want = paged_decode_reference(
        q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), seq_lens.cpu()
    )
    assert_close(out, want, dtype)

    query_lens = [6, 9]
    qp = randn(15, 8, 64, dtype=dtype, device=device)
    qsl = query_start_loc(query_lens, device)
    out = paged_prefill(qp, k_cache, v_cache, tables, qsl, seq_lens, backend=backend)
    want = paged_prefill_reference(
        qp.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), qsl.cpu(), seq_lens.cpu()
    )
    assert_close(out, want, dtype)
