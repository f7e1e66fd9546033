"""`copy_blocks`: move whole blocks between pools of any tier (GPU, pinned host, CPU).

A block is dim 0 of a pool; for the KV cache `[num_blocks, num_layers, 2, block_size,
Hkv, D]` one block is one contiguous chunk across all layers. The host plans: it sorts the
(src, dst) pairs by destination and merges consecutive ids into runs, so contiguous
allocations move as one slice copy each. Across devices each run is one DMA copy
(asynchronous when the host side is pinned); within one GPU, many scattered runs are
moved by a single Triton gather-scatter launch instead of one memcpy per run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedkv.kernels._plan import cdiv
from pagedkv.kernels._triton import (
    HAS_TRITON,
    Backend,
    check_kernel_runnable,
    device_context,
    resolve_backend,
)
from pagedkv.kernels._validate import check_copy_args
from pagedkv.kernels.reference import copy_blocks_reference

# Within one GPU, more runs than this go through one kernel launch instead of memcpys.
KERNEL_MIN_RUNS = 4
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class BlockRuns(NamedTuple):
    """Pairs merged into runs: `dst[dst_start[i]:+length[i]] = src[src_start[i]:+length[i]]`."""

    src_start: list[int]
    dst_start: list[int]
    length: list[int]


def plan_runs(src_ids: torch.Tensor, dst_ids: torch.Tensor) -> BlockRuns:
    """Merge (src, dst) id pairs into maximal runs where both ids step by one.

    Vectorised on the host (CPU int64 `[n]` tensors), so planning costs no per-pair
    Python loop; the caller loops over runs, which are whole slices.
    """
    order = torch.argsort(dst_ids)
    src, dst = src_ids[order], dst_ids[order]  # [n], sorted by destination
    breaks = (dst[1:] != dst[:-1] + 1) | (src[1:] != src[:-1] + 1)  # [n - 1]
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks.nonzero().flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([src.numel()])])
    return BlockRuns(src[starts].tolist(), dst[starts].tolist(), (ends - starts).tolist())


def _rows_contiguous(t: torch.Tensor) -> bool:
    """True if each block `t[i]` is one dense chunk (any stride between blocks)."""
    return t.dim() == 1 or t[0].is_contiguous()


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """`t` as `[num_blocks, block_numel]` integers of the same width (a view, no copy)."""
    integer = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    words = t if t.dtype in integer else t.view(_INT_VIEW[t.element_size()])
    return words.as_strided((t.shape[0], t[0].numel()), (t.stride(0), 1))


def _copy_runs(src: torch.Tensor, dst: torch.Tensor, runs: BlockRuns) -> None:
    """One slice `copy_` per run; asynchronous when both sides are on one GPU or the host
    side is pinned (pageable host memory makes the copy synchronous)."""
    cross = src.device != dst.device
    host = src if src.device.type == "cpu" else dst
    non_blocking = not cross or (host.device.type == "cpu" and host.is_pinned())
    for s, d, n in zip(runs.src_start, runs.dst_start, runs.length, strict=True):
        dst[d : d + n].copy_(src[s : s + n], non_blocking=non_blocking)


def copy_chunk(device: torch.device) -> int:
    """Words each copy program moves per step: 4,096 on a GPU (16 KB of bf16 pairs per
    program and step keeps enough loads in flight), 256 under the interpreter (tiny test
    blocks still take several steps)."""
    return 4096 if device.type == "cuda" else 256


def _copy_kernel(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    from pagedkv.kernels import copy_kernel

    check_kernel_runnable("copy_blocks", copy_kernel._copy_blocks_kernel, src.device)
    src_words, dst_words = _as_words(src), _as_words(dst)  # [blocks, block_numel]
    block_numel = src_words.shape[1]
    if block_numel == 0:
        return
    if src.device.type == "cuda":
        # Pinned staging makes the id upload asynchronous (no host sync).
        src_ids = src_ids.pin_memory().to(src.device, non_blocking=True)
        dst_ids = dst_ids.pin_memory().to(src.device, non_blocking=True)
    chunk = copy_chunk(src.device)
    grid = (src_ids.numel(), min(cdiv(block_numel, chunk), 1024))
    with device_context(src.device):
        copy_kernel._copy_blocks_kernel[grid](
            src_words, dst_words, src_ids, dst_ids, block_numel,
            src_words.stride(0), dst_words.stride(0),
            CHUNK=chunk,
            num_warps=4,
        )  # fmt: skip


def copy_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: object,
    dst_ids: object,
    *,
    non_blocking: bool = False,
    backend: Backend = "auto",
) -> None:
    """Copy whole blocks `src[src_ids[i]] -> dst[dst_ids[i]]`, bit-exact, any tier to any tier.

    Args:
        src, dst: tensors whose dim 0 is the block dim with equal dtype and per-block shape
            (e.g. whole `[num_blocks, num_layers, 2, block_size, Hkv, D]` pools); any
            devices: GPU->GPU, GPU->CPU, CPU->GPU, CPU->CPU. Host pools should be pinned for
            asynchronous, full-bandwidth transfers. `dst` is changed.
        src_ids, dst_ids: equal-length Python sequences of ints or CPU integer tensors (host
            planning reads them; CUDA tensors are refused rather than synced on).
        non_blocking: return once the copies are enqueued on the current CUDA stream;
            the caller must synchronize (or record an event) before the host reads a
            GPU->CPU destination or reuses a CPU->GPU source. Default False: a copy
            that crosses devices is complete on return (one stream sync at the end).
        backend: "auto" (run copies; one Triton launch for many scattered runs within a
            GPU), "torch" (the reference: index_select + index_copy_), or "triton" (force
            the gather-scatter kernel; src and dst on one device with dense blocks; on CPU
            it needs `TRITON_INTERPRET=1`).

    Raises:
        TypeError, ValueError: mismatched pools, ids not 1-D integers on the host, ids out
            of range, duplicate destination ids, or a block both read and written within
            one tensor; dst is then untouched.
    """
    op = "copy_blocks"
    sid, did = check_copy_args(op, src, dst, src_ids, dst_ids)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(
            f"{op}: backend must be one of ('auto', 'triton', 'torch'); got {backend!r}"
        )
    if backend == "torch":
        copy_blocks_reference(src, dst, sid, did)
        return
    if sid.numel() == 0:
        return
    same_device = src.device == dst.device
    dense = _rows_contiguous(src) and _rows_contiguous(dst)
    if backend == "triton":
        if not (same_device and dense):
            raise ValueError(
                f"{op}: backend='triton' needs src and dst on one device with dense blocks; "
                f"got src on {src.device} (dense: {_rows_contiguous(src)}), dst on "
                f"{dst.device} (dense: {_rows_contiguous(dst)})"
            )
        resolve_backend(op, "triton", src.device)
        _copy_kernel(src, dst, sid, did)
        return
    runs = plan_runs(sid, did)
    use_kernel = (
        HAS_TRITON
        and same_device
        and src.device.type == "cuda"
        and dense
        and len(runs.length) > KERNEL_MIN_RUNS
    )
    if use_kernel:
        _copy_kernel(src, dst, sid, did)
    else:
        _copy_runs(src, dst, runs)
    if not non_blocking and not same_device:
        cuda = src.device if src.device.type == "cuda" else dst.device
        if cuda.type == "cuda":
            torch.cuda.current_stream(cuda).synchronize()
