"""The Triton kernels on CUDA: the dtype x head_dim x block_size x GQA matrix against the
torch reference, split-KV on long contexts, CUDA-graph capture and replay, sync-free
launches, int64 addressing, and copy_blocks across tiers. Skipped without a CUDA device.

Compile time bounds the matrix: every (dtype, head_dim, block_size) triple runs, with the
GQA ratio cycling through 1, 4, 8, plus a full GQA sweep at the Llama-3-8B shape.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernels_helpers import (
    DTYPES,
    assert_close,
    bits,
    check_int64_addressing,
    dtype_id,
    make_case,
    query_start_loc,
    randn,
    uneven_lens,
)

from pagedkv.kernels import (
    copy_blocks,
    decode_workspace,
    paged_decode,
    paged_decode_reference,
    paged_prefill,
    paged_prefill_reference,
    plan_decode,
    store_kv,
    store_kv_reference,
)

pytestmark = pytest.mark.gpu

CUDA = "cuda"
GROUP_CYCLE = (1, 4, 8)
MATRIX = [
    (dtype, head_dim, block_size, GROUP_CYCLE[i % 3])
    for i, (dtype, head_dim, block_size) in enumerate(
        itertools.product(DTYPES, (64, 128, 256), (16, 32, 64, 256))
    )
] + [(torch.bfloat16, 128, 16, g) for g in (1, 2, 4, 8)]
MATRIX_IDS = [f"{dtype_id(t)}-d{d}-bs{b}-g{g}" for t, d, b, g in MATRIX]


def cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.cpu() for t in tensors]


@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "group"), MATRIX, ids=MATRIX_IDS)
def test_gpu_decode_matches_reference(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    lens = [*uneven_lens(block_size, long=3 * block_size + 300), 0]
    case = make_case(
        lens, block_size=block_size, num_kv_heads=2, head_dim=head_dim, dtype=dtype, device=CUDA
    )
    q = randn(len(lens), 2 * group, head_dim, dtype=dtype, device=CUDA)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    want, want_lse = paged_decode_reference(*cpu(*args), return_lse=True)
    for num_splits in (None, 1, 3):
        out, lse = paged_decode(*args, return_lse=True, num_splits=num_splits)
        assert_close(out, want, dtype)
        assert_close(lse, want_lse, torch.float32)


@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "group"), MATRIX, ids=MATRIX_IDS)
def test_gpu_prefill_matches_reference(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    # Prefixes 0, 1, bs-1, bs and long; new-token counts across the 64/128-row tiles.
    shapes = [(0, 1), (0, 300), (1, 17), (block_size - 1, 129), (block_size, 64), (700, 65)]
    lens, query_lens = [p + n for p, n in shapes], [n for _, n in shapes]
    case = make_case(
        lens, block_size=block_size, num_kv_heads=2, head_dim=head_dim, dtype=dtype, device=CUDA
    )
    q = randn(sum(query_lens), 2 * group, head_dim, dtype=dtype, device=CUDA)
    qsl = query_start_loc(query_lens, CUDA)
    args = (q, case.k_cache, case.v_cache, case.block_tables, qsl, case.seq_lens)
    want = paged_prefill_reference(*cpu(*args))
    for max_query_len in (None, max(query_lens), 16):
        assert_close(paged_prefill(*args, max_query_len=max_query_len), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gpu_store_matches_reference_and_skips_bad_slots(dtype: torch.dtype) -> None:
    kv = torch.full((8, 2, 2, 16, 4, 128), float("nan"), dtype=dtype, device=CUDA)
    k = randn(50, 4, 128, dtype=dtype, device=CUDA)
    v = randn(50, 4, 128, dtype=dtype, device=CUDA, seed=2)
    perm = torch.randperm(8 * 16, generator=torch.Generator().manual_seed(0))[:50]
    slots = perm.clone()
    slots[[3, 7]] = -1
    want = kv.cpu()
    store_kv_reference(*cpu(k, v), want[:, 1, 0], want[:, 1, 1], slots)
    store_kv(k, v, kv[:, 1, 0], kv[:, 1, 1], slots.to(CUDA))
    assert torch.equal(bits(kv), bits(want))
    # Checked: raises before writing. Unchecked (the CUDA default): skipped, not written.
    before = bits(kv)
    bad = slots.clone().to(CUDA)
    bad[5] = 8 * 16
    with pytest.raises(ValueError, match=r"slot_mapping\[5\]=128 is outside"):
        store_kv(k, v, kv[:, 1, 0], kv[:, 1, 1], bad, check_slots=True)
    assert torch.equal(bits(kv), before)
    store_kv(k, v, kv[:, 1, 0], kv[:, 1, 1], bad)
    torch.cuda.synchronize()
    assert torch.equal(bits(kv), before)  # same values rewritten, the bad slot skipped


def test_gpu_decode_long_context_uses_splits() -> None:
    # Batch 1 x 32k (and a 2-sequence batch with a short max_seq_len hint): split-KV.
    dtype, bs = torch.bfloat16, 16
    case = make_case(
        [32768, 1000], block_size=bs, num_kv_heads=8, head_dim=128, dtype=dtype, device=CUDA
    )
    q = randn(2, 32, 128, dtype=dtype, device=CUDA)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    for batch in (1, 2):
        plan = plan_decode(num_seqs=batch, num_kv_heads=8, head_dim=128, block_size=bs,
                           max_blocks=case.block_tables.shape[1], device=q.device)  # fmt: skip
        assert plan.num_splits > 1, plan
    want = paged_decode_reference(*cpu(*args))
    assert_close(paged_decode(*args), want, dtype)
    assert_close(paged_decode(*args, max_seq_len=2048), want, dtype)
    one = paged_decode(q[:1], case.k_cache, case.v_cache, case.block_tables[:1], case.seq_lens[:1])
    assert_close(one, want[:1], dtype)


def test_gpu_prefill_long_prompt_on_cached_prefix() -> None:
    dtype = torch.bfloat16
    shapes = [(2048, 1500), (0, 2048)]
    lens, query_lens = [p + n for p, n in shapes], [n for _, n in shapes]
    case = make_case(lens, block_size=16, num_kv_heads=8, head_dim=128, dtype=dtype, device=CUDA)
    q = randn(sum(query_lens), 32, 128, dtype=dtype, device=CUDA)
    qsl = query_start_loc(query_lens, CUDA)
    args = (q, case.k_cache, case.v_cache, case.block_tables, qsl, case.seq_lens)
    assert_close(
        paged_prefill(*args, max_query_len=2048), paged_prefill_reference(*cpu(*args)), dtype
    )


def test_gpu_launchers_do_not_sync() -> None:
    dtype = torch.float16
    case = make_case(
        [40, 900], block_size=16, num_kv_heads=2, head_dim=128, dtype=dtype, device=CUDA
    )
    q = randn(2, 8, 128, dtype=dtype, device=CUDA)
    qp = randn(30, 8, 128, dtype=dtype, device=CUDA)
    qsl = query_start_loc([10, 20], CUDA)
    k_new = randn(4, 2, 128, dtype=dtype, device=CUDA)
    slots = torch.tensor([0, 1, 2, -1], device=CUDA)

    def launch_all() -> None:
        paged_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
        paged_prefill(qp, case.k_cache, case.v_cache, case.block_tables, qsl, case.seq_lens)
        store_kv(k_new, k_new, case.k_cache, case.v_cache, slots)

    launch_all()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launch_all()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_gpu_decode_cuda_graph_capture_and_replay() -> None:
    dtype, bs = torch.bfloat16, 16
    lens = [700, 5, 16, 333]
    case = make_case(lens, block_size=bs, num_kv_heads=8, head_dim=128, dtype=dtype, device=CUDA)
    tables, seq_lens = case.block_tables.clone(), case.seq_lens.clone()
    q = randn(4, 32, 128, dtype=dtype, device=CUDA)
    k_new = randn(4, 8, 128, dtype=dtype, device=CUDA, seed=5)
    v_new = randn(4, 8, 128, dtype=dtype, device=CUDA, seed=6)
    slots = torch.full((4,), -1, dtype=torch.int64, device=CUDA)
    out = torch.empty_like(q)
    lse = torch.empty(4, 32, device=CUDA)
    workspace = decode_workspace(q, case.k_cache, tables, num_splits=4)

    def step() -> None:
        store_kv(k_new, v_new, case.k_cache, case.v_cache, slots)
        paged_decode(
            q, case.k_cache, case.v_cache, tables, seq_lens,
            out=out, lse=lse, workspace=workspace, num_splits=4,
        )  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def check() -> None:
        torch.cuda.synchronize()
        want, want_lse = paged_decode_reference(
            *cpu(q, case.k_cache, case.v_cache, tables, seq_lens), return_lse=True
        )
        assert_close(out, want, dtype)
        assert_close(lse, want_lse, torch.float32)

    graph.replay()
    check()
    # New contents, same buffers: permuted sequences, shorter lengths, padding (0), new
    # tokens written through the captured store_kv (slot = last position of sequence 0).
    order = torch.tensor([3, 0, 2, 1], device=CUDA)
    tables.copy_(case.block_tables[order])
    seq_lens.copy_(torch.tensor([300, 701, 0, 2], dtype=torch.int32, device=CUDA))
    last = 700  # position of sequence 0's new token, now row 1
    slot = int(case.block_tables[0, last // bs]) * bs + last % bs
    slots.copy_(torch.tensor([-1, slot, -1, -1], device=CUDA))
    q.copy_(randn(4, 32, 128, dtype=dtype, device=CUDA, seed=9))
    graph.replay()
    check()
    assert torch.equal(case.k_cache[int(case.block_tables[0, last // bs]), last % bs], k_new[1])
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_gpu_decode_with_out_allocates_nothing_in_steady_state() -> None:
    # No workspace passed: the split launch reuses the per-stream scratch buffer.
    dtype = torch.bfloat16
    case = make_case([4000, 90], block_size=16, num_kv_heads=8, head_dim=128, dtype=dtype,
                     device=CUDA)  # fmt: skip
    q = randn(2, 32, 128, dtype=dtype, device=CUDA)
    out = torch.empty_like(q)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    paged_decode(*args, out=out, num_splits=8)  # compile and size the scratch buffer
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(3):
        paged_decode(*args, out=out, num_splits=8)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert_close(out, paged_decode_reference(*cpu(*args)), dtype)


def test_gpu_decode_graph_capture_without_workspace() -> None:
    dtype = torch.float16
    case = make_case([3000, 17], block_size=16, num_kv_heads=2, head_dim=64, dtype=dtype,
                     device=CUDA)  # fmt: skip
    q = randn(2, 8, 64, dtype=dtype, device=CUDA)
    out = torch.empty_like(q)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        paged_decode(*args, out=out, num_splits=6)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(*args, out=out, num_splits=6)
    # an eager call on the default stream between replays must not disturb the graph
    other = paged_decode(*args, num_splits=6)
    q.copy_(randn(2, 8, 64, dtype=dtype, device=CUDA, seed=4))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, paged_decode_reference(*cpu(*args)), dtype)
    assert not torch.equal(out, other)


def test_gpu_int64_addressing_beyond_int32() -> None:
    check_int64_addressing(CUDA, "triton")
    torch.cuda.empty_cache()


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("non_blocking", [False, True])
def test_gpu_copy_blocks_across_tiers(pinned: bool, non_blocking: bool) -> None:
    shape = (64, 4, 2, 16, 8, 128)  # [num_blocks, num_layers, 2, block_size, Hkv, D]
    gpu = randn(*shape, dtype=torch.bfloat16, device=CUDA)
    host = torch.zeros(shape, dtype=torch.bfloat16, pin_memory=pinned)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    src_ids = [*range(10, 30), *perm[:20].tolist()]
    dst_ids = [*range(40, 60), *range(0, 20)]
    src_sel = gpu[torch.tensor(src_ids, device=CUDA)].cpu()
    copy_blocks(gpu, host, src_ids, dst_ids, non_blocking=non_blocking)  # offload
    torch.cuda.synchronize()
    assert torch.equal(bits(host[dst_ids]), bits(src_sel))
    back = torch.zeros_like(gpu)
    copy_blocks(host, back, dst_ids, src_ids[:20] + list(range(30, 50)), non_blocking=non_blocking)
    torch.cuda.synchronize()
    assert torch.equal(bits(back[10:30]), bits(gpu[10:30]))


def test_gpu_copy_blocks_within_gpu_scattered_and_runs() -> None:
    src = randn(128, 2, 2, 16, 8, 64, dtype=torch.float16, device=CUDA)
    for src_ids, dst_ids in (
        (list(range(100, 120)), list(range(0, 20))),  # one run: one memcpy
        (torch.randperm(128)[:50].tolist(), torch.randperm(100)[:50].tolist()),  # kernel
    ):
        dst = torch.zeros(100, 2, 2, 16, 8, 64, dtype=torch.float16, device=CUDA)
        copy_blocks(src, dst, src_ids, dst_ids)
        torch.cuda.synchronize()
        assert torch.equal(bits(dst[dst_ids]), bits(src[src_ids]))
