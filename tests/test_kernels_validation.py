"""Launch-contract checks: each broken dtype/device/shape/stride contract raises the
specific error naming what was received and what was expected; the package imports and
its references run without Triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kernels_helpers import make_case, needs_interpreter, query_start_loc, randn

from pagedkv.kernels import (
    paged_decode,
    paged_decode_reference,
    paged_prefill,
    paged_prefill_reference,
    store_kv,
)
from pagedkv.kernels._triton import check_kernel_runnable

CASE = make_case([5, 20], block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16)
K, V, TABLES, LENS = CASE.k_cache, CASE.v_cache, CASE.block_tables, CASE.seq_lens
Q = randn(2, 8, 64, dtype=torch.float16)
QP = randn(7, 8, 64, dtype=torch.float16)
QSL = query_start_loc([3, 4])
WIDE = TABLES.repeat(1, 8)  # 256 positions: room for 2 decode splits of 64

DECODE_ERRORS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("q-not-tensor", lambda: paged_decode([1], K, V, TABLES, LENS), TypeError,
     "paged_decode: q must be a torch.Tensor; got list"),
    ("q-head-dim", lambda: paged_decode(Q[..., :32], K, V, TABLES, LENS), ValueError,
     r"q must be \[B, Hq, D\] with D == k_cache.shape\[-1\] == 64; got q.shape=\(2, 8, 32\)"),
    ("q-heads-not-multiple", lambda: paged_decode(Q[:, :3], K, V, TABLES, LENS), ValueError,
     r"positive multiple of the cache's num_kv_heads=2; got q.shape=\(2, 3, 64\)"),
    ("q-dtype-int", lambda: paged_decode(Q.to(torch.int32), K, V, TABLES, LENS), TypeError,
     "q must have dtype in .*; got q.dtype=torch.int32"),
    ("q-dtype-vs-cache", lambda: paged_decode(Q.float(), K, V, TABLES, LENS), TypeError,
     "q must have the dtype of k_cache; got q.dtype=torch.float32, k_cache.dtype=torch.float16"),
    ("q-batch", lambda: paged_decode(Q[:1], K, V, TABLES, LENS), ValueError,
     r"B == block_tables.shape\[0\] == 2; got q.shape=\(1, 8, 64\)"),
    ("cache-3d", lambda: paged_decode(Q, K[0], V[0], TABLES, LENS), ValueError,
     r"k_cache must be 4-D \[num_blocks, block_size, num_kv_heads, head_dim\]; got k_cache.shape=\(16, 2, 64\)"),
    ("cache-dtype", lambda: paged_decode(Q, K.float(), V, TABLES, LENS), TypeError,
     "v_cache must have the dtype of k_cache"),
    ("cache-strides", lambda: paged_decode(Q, K, V.contiguous(), TABLES, LENS), ValueError,
     r"v_cache must have the strides of k_cache .*got k_cache.stride\(\)=\(8192, 128, 64, 1\), v_cache.stride\(\)=\(2048, 128, 64, 1\)"),
    ("tables-int64", lambda: paged_decode(Q, K, V, TABLES.long(), LENS), TypeError,
     "block_tables must have dtype in .int32.; got block_tables.dtype=torch.int64"),
    ("tables-1d", lambda: paged_decode(Q, K, V, TABLES[0], LENS), ValueError,
     r"block_tables must be 2-D \[B, max_blocks\]"),
    ("lens-length", lambda: paged_decode(Q, K, V, TABLES, LENS[:1]), ValueError,
     r"seq_lens must be \[B\] with B == block_tables.shape\[0\] == 2; got seq_lens.shape=\(1,\)"),
    ("device", lambda: paged_decode(Q, K, V, TABLES, LENS.to("meta")), ValueError,
     "all tensors must be on one device; got q on cpu, .* seq_lens on meta"),
    ("out-shape", lambda: paged_decode(Q, K, V, TABLES, LENS, out=torch.empty(2, 8, 32)), ValueError,
     r"out must have shape \(2, 8, 64\); got out.shape=\(2, 8, 32\)"),
    ("out-dtype", lambda: paged_decode(Q, K, V, TABLES, LENS, out=torch.empty(2, 8, 64)), TypeError,
     "out must have dtype torch.float16; got out.dtype=torch.float32"),
    ("out-aliased", lambda: paged_decode(Q, K, V, TABLES, LENS, out=torch.empty(1, 8, 64, dtype=torch.float16).expand(2, 8, 64)), ValueError,
     r"out is written, so it must not alias itself .*out.stride\(\)=\(0, 64, 1\)"),
    ("lse-dtype", lambda: paged_decode(Q, K, V, TABLES, LENS, lse=torch.empty(2, 8, dtype=torch.float16)), TypeError,
     "lse must have dtype torch.float32; got lse.dtype=torch.float16"),
    ("scale", lambda: paged_decode(Q, K, V, TABLES, LENS, scale="0.1"), TypeError,  # type: ignore[arg-type]
     "scale must be a float or None; got str"),
    ("backend", lambda: paged_decode(Q, K, V, TABLES, LENS, backend="cuda"), ValueError,  # type: ignore[arg-type]
     r"backend must be one of \('auto', 'triton', 'torch'\); got backend='cuda'"),
    ("num-splits-zero", lambda: paged_decode(Q, K, V, TABLES, LENS, num_splits=0), ValueError,
     "paged_decode: num_splits must be >= 1; got num_splits=0"),
    ("num-splits-type", lambda: paged_decode(Q, K, V, TABLES, LENS, num_splits=2.0), TypeError,  # type: ignore[arg-type]
     "paged_decode: num_splits must be an int; got float"),
    ("max-seq-len", lambda: paged_decode(Q, K, V, TABLES, LENS, max_seq_len=-3), ValueError,
     "paged_decode: max_seq_len must be >= 1; got max_seq_len=-3"),
    ("workspace-dtype", lambda: paged_decode(Q, K, V, WIDE, LENS, num_splits=2, workspace=torch.empty(10**4, dtype=torch.int8)), ValueError,
     r"paged_decode: workspace must be a contiguous 1-D float32 tensor .* for 2 splits .*got dtype=torch.int8"),
    ("workspace-small", lambda: paged_decode(Q, K, V, WIDE, LENS, num_splits=2, workspace=torch.empty(3)), ValueError,
     r"with >= \d+ elements for 2 splits .*shape=\(3,\)"),
    ("ref-block-id", lambda: paged_decode_reference(Q, K, V, torch.tensor([[0, 0], [1, 99]], dtype=torch.int32), LENS), ValueError,
     r"block_tables\[1, 1\]=99 is outside \[0, num_blocks = \d+\)"),
    ("ref-too-long", lambda: paged_decode_reference(Q, K, V, TABLES, torch.tensor([5, 999], dtype=torch.int32)), ValueError,
     r"seq_lens\[1\]=999 is outside \[0, max_blocks \* block_size = \d+\]"),
]  # fmt: skip

PREFILL_ERRORS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("qsl-length", lambda: paged_prefill(QP, K, V, TABLES, QSL[:2], LENS), ValueError,
     r"query_start_loc must be \[B \+ 1\] with B == block_tables.shape\[0\] == 2; got query_start_loc.shape=\(2,\)"),
    ("qsl-dtype", lambda: paged_prefill(QP, K, V, TABLES, QSL.long(), LENS), TypeError,
     "query_start_loc must have dtype in .int32.; got query_start_loc.dtype=torch.int64"),
    ("q-2d", lambda: paged_prefill(QP[0], K, V, TABLES, QSL, LENS), ValueError,
     r"q must be \[T, Hq, D\] with D == k_cache.shape\[-1\] == 64; got q.shape=\(8, 64\)"),
    ("max-query-len", lambda: paged_prefill(QP, K, V, TABLES, QSL, LENS, max_query_len=0), ValueError,
     "max_query_len must be >= 1; got max_query_len=0"),
    ("ref-qsl-end", lambda: paged_prefill_reference(QP, K, V, TABLES, query_start_loc([3, 3]), LENS), ValueError,
     r"query_start_loc must start at 0, be non-decreasing and end at q.shape\[0\]=7; got \[0, 3, 6\]"),
    ("ref-query-longer-than-seq", lambda: paged_prefill_reference(QP, K, V, TABLES, query_start_loc([6, 1]), LENS), ValueError,
     "sequence 0 has query_len=6 new tokens but seq_len=5"),
]  # fmt: skip

STORE_K = randn(3, 2, 64, dtype=torch.float16)
SLOTS = torch.tensor([0, 1, 2])
STORE_ERRORS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("k-shape", lambda: store_kv(STORE_K[:, :1], STORE_K, K, V, SLOTS), ValueError,
     r"k must be \[T, 2, 64\] \(T, k_cache.shape\[2:\]\); got k.shape=\(3, 1, 64\)"),
    ("v-dtype", lambda: store_kv(STORE_K, STORE_K.float(), K, V, SLOTS), TypeError,
     "v must have the cache dtype torch.float16; got v.dtype=torch.float32"),
    ("slots-int32", lambda: store_kv(STORE_K, STORE_K, K, V, SLOTS.int()), TypeError,
     "slot_mapping must have dtype in .int64.; got slot_mapping.dtype=torch.int32"),
    ("slots-length", lambda: store_kv(STORE_K, STORE_K, K, V, SLOTS[:2]), ValueError,
     r"same length T; got k.shape=\(3, 2, 64\), v.shape=\(3, 2, 64\), slot_mapping.shape=\(2,\)"),
    ("cache-aliased", lambda: store_kv(STORE_K, STORE_K, K[:1].expand(4, -1, -1, -1), V[:1].expand(4, -1, -1, -1), SLOTS), ValueError,
     r"k_cache is written, so it must not alias itself .*k_cache.stride\(\)=\(0, 128, 64, 1\)"),
    ("slots-device", lambda: store_kv(STORE_K, STORE_K, K, V, SLOTS.to("meta")), ValueError,
     "all tensors must be on one device; got k on cpu, .*slot_mapping on meta"),
]  # fmt: skip


def _params(table: list[tuple[str, Callable[[], object], type[Exception], str]]) -> list[object]:
    return [pytest.param(call, error, match, id=name) for name, call, error, match in table]


@pytest.mark.parametrize(
    ("call", "error", "match"), _params(DECODE_ERRORS + PREFILL_ERRORS + STORE_ERRORS)
)
def test_bad_arguments_raise_specific_errors(
    call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_forced_triton_on_cpu_without_interpreter_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((RuntimeError, ImportError), match="backend='triton'"):
        paged_decode(Q, K, V, TABLES, LENS, backend="triton")


def test_kernel_compiled_for_gpu_is_refused_on_cpu() -> None:
    class JITFunction:  # stands in for a kernel decorated without TRITON_INTERPRET
        pass

    with pytest.raises(RuntimeError, match="imported without TRITON_INTERPRET=1"):
        check_kernel_runnable("paged_decode", JITFunction(), torch.device("cpu"))


@needs_interpreter
def test_triton_head_dim_limit() -> None:
    case = make_case([3], block_size=16, num_kv_heads=1, head_dim=512, dtype=torch.float32)
    q = randn(1, 1, 512, dtype=torch.float32)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    with pytest.raises(ValueError, match=r"support head_dim <= 256; got head_dim=512"):
        paged_decode(*args, backend="triton")
    assert paged_decode(*args).shape == q.shape  # the reference takes any head_dim


@needs_interpreter
def test_auto_backend_on_cpu_is_fused_sdpa_matching_the_reference() -> None:
    want = paged_decode_reference(Q, K, V, TABLES, LENS)
    got = paged_decode(Q, K, V, TABLES, LENS)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16
    # the log-sum-exp comes from the reference (SDPA does not return it): exactly it
    got, lse = paged_decode(Q, K, V, TABLES, LENS, return_lse=True)
    want_out, want_lse = paged_decode_reference(Q, K, V, TABLES, LENS, return_lse=True)
    assert torch.equal(got, want_out) and torch.equal(lse, want_lse)


def test_package_works_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch
        from pagedkv import kernels
        assert not kernels.HAS_TRITON
        kv = torch.randn(4, 2, 2, 16, 1, 64)
        q = torch.randn(1, 2, 64)
        tables = torch.tensor([[2, 0]], dtype=torch.int32)
        lens = torch.tensor([20], dtype=torch.int32)
        out = kernels.paged_decode(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens)
        assert out.shape == q.shape and not out.isnan().any()
        try:
            kernels.paged_decode(q, kv[:, 0, 0], kv[:, 0, 1], tables, lens, backend="triton")
        except ImportError as exc:
            assert "needs the triton package" in str(exc), exc
        else:
            raise AssertionError("backend='triton' without triton did not raise")
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
