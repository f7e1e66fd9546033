"""`paged_decode`: one query token per sequence over a block-paged KV cache.

Split-KV: a sequence's positions are cut into `num_splits` contiguous ranges, each
handled by its own program (per KV head), and the partial results are merged by their
log-sum-exp in a second tiny kernel. The split count is planned on the host from shapes
only (batch, heads, the block table's width) so the launcher never reads `seq_lens`
(no device sync) and a captured CUDA graph replays with the same launch for any lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pagedkv.kernels._plan import (
    PROGRAMS_PER_SM,
    cdiv,
    check_positive_int,
    check_triton_head_dim,
    next_pow2,
    num_sms,
)
from pagedkv.kernels._triton import (
    Backend,
    check_kernel_runnable,
    device_context,
    interpreting,
    resolve_backend,
)
from pagedkv.kernels._validate import (
    check_attention_args,
    check_lse_out,
    check_scale,
    check_table_values,
)
from pagedkv.kernels.cpu_attention import paged_decode_sdpa
from pagedkv.kernels.reference import paged_decode_reference

MAX_SPLITS = 256
# A split should cover at least this many tiles, so the merge stays cheap next to it.
MIN_TILES_PER_SPLIT = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodePlan:
    """Launch shape of one `paged_decode` call, chosen from shapes only.

    Invariants: `tokens_per_split` is a multiple of `block_n`; `num_splits` splits of
    `tokens_per_split` positions cover the planned length (the last split also takes any
    positions beyond it, so an underestimated `max_seq_len` costs speed, not correctness).
    """

    num_splits: int
    tokens_per_split: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.num_splits < 1 or self.block_n < 16 or self.tokens_per_split % self.block_n:
            raise ValueError(f"DecodePlan: inconsistent plan {self}")

    def workspace_numel(self, num_seqs: int, num_q_heads: int, head_dim: int) -> int:
        """fp32 elements of the split workspace (0 when there is a single split):
        partial outputs `[B, Hq, num_splits, D]` then partial LSEs `[B, Hq, num_splits]`."""
        if self.num_splits == 1:
            return 0
        return num_seqs * num_q_heads * self.num_splits * (head_dim + 1)


def plan_decode(
    *,
    num_seqs: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_blocks: int,
    device: torch.device,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    op: str = "plan_decode",
) -> DecodePlan:
    """Choose tile size and split count for `paged_decode` (host only, no sync).

    The split count aims at `PROGRAMS_PER_SM` programs per SM over `num_seqs *
    num_kv_heads` (sequence, KV head) pairs, so batch 1 with a 32k context still fills the
    GPU, while each split keeps at least `MIN_TILES_PER_SPLIT` tiles of work. The length is
    taken as `max_seq_len` if given, else the table's capacity `max_blocks * block_size`.
    `dtype` changes the tiles for fp32 only: fp32 runs on FMA units with tiles twice the
    size, and at 4 warps and 64-key tiles it spilled (224 B per thread at head_dim 128 on
    sm_80, 5.4 KB at head_dim 256 on sm_90; still 4 B at 8 warps), so fp32 gets 32-key
    tiles, 8 warps and no pipelining (no spill on sm_80 or sm_90 at any head_dim, GQA or
    block size, `benchmarks/kernel_resources.py`). Through the tile size the split count
    and the workspace depend on the dtype too; `decode_workspace` plans with q's dtype,
    as `paged_decode` does. `op` names the caller in errors.

    Raises:
        TypeError, ValueError: a non-positive `max_seq_len` or `num_splits`.
    """
    fp32 = dtype == torch.float32
    block_n = 32 if head_dim > 128 or fp32 else 64
    max_tokens = max_blocks * block_size
    if max_seq_len is not None:
        max_tokens = min(max_tokens, check_positive_int(op, "max_seq_len", max_seq_len))
    num_tiles = max(1, cdiv(max_tokens, block_n))
    if num_splits is None:
        pairs = num_seqs * num_kv_heads
        wanted = cdiv(PROGRAMS_PER_SM * num_sms(device), max(1, pairs))
        num_splits = max(1, min(wanted, num_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
    else:
        num_splits = min(check_positive_int(op, "num_splits", num_splits), num_tiles)
    tiles_per_split = cdiv(num_tiles, num_splits)
    num_splits = cdiv(num_tiles, tiles_per_split)  # no trailing empty splits
    return DecodePlan(
        num_splits=num_splits,
        tokens_per_split=tiles_per_split * block_n,
        block_n=block_n,
        num_warps=8 if fp32 else 4,
        num_stages=1 if fp32 else 2 if head_dim > 128 else 3,
    )


def _plan_for(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    max_seq_len: int | None,
    num_splits: int | None,
    op: str = "plan_decode",
) -> DecodePlan:
    return plan_decode(
        num_seqs=q.shape[0],
        num_kv_heads=k_cache.shape[2],
        head_dim=k_cache.shape[3],
        block_size=k_cache.shape[1],
        max_blocks=block_tables.shape[1],
        device=q.device,
        max_seq_len=max_seq_len,
        num_splits=num_splits,
        dtype=q.dtype,
        op=op,
    )


# Split workspaces kept per (device, stream) for calls that pass none: the workspace is
# scratch (written and read within one call), and calls on one stream run in order, so
# one buffer per stream serves them all without allocating on every step.
_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}


def _scratch_workspace(device: torch.device, numel: int) -> torch.Tensor:
    """An fp32 scratch buffer of >= `numel` elements for the current stream of `device`.

    Reused across calls on a CUDA stream (grown geometrically when a call needs more).
    While a CUDA graph is being captured it is allocated fresh, from the graph's private
    pool: the graph keeps it to itself, so replays never race an eager call on the cached
    buffer. Elsewhere (CPU under the interpreter) it is allocated per call.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        size = max(numel, 2 * buf.numel() if buf is not None else 0)
        buf = torch.empty(size, dtype=torch.float32, device=device)
        _SCRATCH[key] = buf
    return buf


def decode_workspace(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Allocate the fp32 split workspace that `paged_decode` needs for these shapes.

    Pass it back as `workspace=` (with the same `max_seq_len` / `num_splits`) so the call
    allocates nothing, e.g. inside a CUDA graph. Shape `[n]`, n >= 1.
    """
    plan = _plan_for(q, k_cache, block_tables, max_seq_len, num_splits)
    numel = plan.workspace_numel(q.shape[0], q.shape[1], q.shape[2])
    return torch.empty(max(1, numel), dtype=torch.float32, device=q.device)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    lse: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention: each sequence's newest token over its whole paged sequence.

    Args:
        q: `[B, Hq, D]` fp16/bf16/fp32, any strides; token `seq_lens[b] - 1` of sequence b
            (its K/V already stored with `store_kv`).
        k_cache, v_cache: `[num_blocks, block_size, Hkv, D]` views of q's dtype with equal
            strides (e.g. `kv[:, layer, 0]` and `kv[:, layer, 1]`); Hq % Hkv == 0.
        block_tables: int32 `[B, max_blocks]`; row b lists sequence b's block ids.
        seq_lens: int32 `[B]`, each <= max_blocks * block_size; 0 (padding) gives out 0,
            lse -inf. Not read on the host.
        scale: softmax scale, default `1/sqrt(D)`.
        out: optional `[B, Hq, D]` output of q's dtype (any strides).
        return_lse: also return the natural-log LSE of the scaled scores, fp32 `[B, Hq]`.
        lse: optional fp32 `[B, Hq]` buffer for the LSE (written when given).
        workspace: optional fp32 buffer from `decode_workspace` (same `max_seq_len` and
            `num_splits`). Without it a split launch uses a scratch buffer cached for the
            current CUDA stream (allocated on the first call that needs it, or a larger
            one), so with `out` (and `lse`, when wanted) given a steady-state call
            allocates nothing.
        max_seq_len: optional host-known upper bound of `seq_lens` for sizing the splits
            (default: the table capacity). An underestimate is still correct, only slower.
        num_splits: force the split count (tests, benchmarks); default planned.
        backend: "auto" (Triton on CUDA; on CPU torch's fused SDPA over the gathered
            pages, or the reference when the lse is asked for), "triton" or "torch".

    Returns:
        out, or (out, lse) when `return_lse`.

    Raises:
        TypeError, ValueError: a dtype, shape, device or stride contract is broken, or the
            workspace is too small. Block ids and lengths are not checked on this path
            (that would sync); the torch reference checks them.
        ImportError, RuntimeError: `backend="triton"` without Triton, or on CPU without
            `TRITON_INTERPRET=1`.

    Graph capture: the Triton path reads no tensor values on the host and launches a
    grid that depends on shapes only, so it can be captured in a CUDA graph and replayed
    with new `seq_lens` / `block_tables` contents. During capture a missing `workspace`
    is allocated from the graph's private pool (at capture only, never on replay);
    pass one to share it between graphs.
    """
    op = "paged_decode"
    dims = check_attention_args(op, q, k_cache, v_cache, block_tables, seq_lens, out)
    sm_scale = check_scale(op, scale, dims.cache.head_dim)
    if lse is not None:
        check_lse_out(op, lse, (dims.num_seqs, dims.num_q_heads), q.device)
    # Launch hints and the workspace are checked on every backend, so a call that is
    # wrong on CUDA is wrong on CPU too.
    plan = _plan_for(q, k_cache, block_tables, max_seq_len, num_splits, op)
    num_seqs, num_q_heads, head_dim = q.shape
    need = plan.workspace_numel(num_seqs, num_q_heads, head_dim)
    if workspace is not None and (
        workspace.dtype != torch.float32
        or workspace.device != q.device
        or workspace.dim() != 1
        or not workspace.is_contiguous()
        or workspace.numel() < need
    ):
        raise ValueError(
            f"{op}: workspace must be a contiguous 1-D float32 tensor on {q.device} with >= "
            f"{need} elements for {plan.num_splits} splits (see decode_workspace); got "
            f"dtype={workspace.dtype}, device={workspace.device}, shape={tuple(workspace.shape)}"
        )
    if resolve_backend(op, backend, q.device) == "torch":
        if backend == "auto" and q.device.type == "cpu" and not return_lse and lse is None:
            # CPU tensors: the fused SDPA path (the reference stays the oracle for "torch")
            ones = torch.ones(dims.num_seqs, dtype=torch.int32)  # one new token each
            check_table_values(op, block_tables, seq_lens, dims.cache, query_lens=ones)
            return paged_decode_sdpa(
                q, k_cache, v_cache, block_tables, seq_lens, scale=sm_scale, out=out
            )
        return paged_decode_reference(
            q, k_cache, v_cache, block_tables, seq_lens,
            scale=sm_scale, out=out, return_lse=return_lse, lse=lse,
        )  # fmt: skip

    from pagedkv.kernels import decode_kernel

    check_kernel_runnable(op, decode_kernel._paged_decode_kernel, q.device)
    check_triton_head_dim(op, dims.cache.head_dim)
    if out is None:
        out = torch.empty_like(q)
    write_lse = return_lse or lse is not None
    if write_lse and lse is None:
        lse = torch.empty((num_seqs, num_q_heads), dtype=torch.float32, device=q.device)
    if num_seqs == 0:  # an empty grid is not launchable
        return (out, lse) if return_lse and lse is not None else out
    if need == 0:
        # One split writes `out` directly; the workspace pointers are never dereferenced.
        part_out = part_lse = out
    else:
        if workspace is None:
            workspace = _scratch_workspace(q.device, need)
        part_numel = num_seqs * num_q_heads * plan.num_splits * head_dim
        part_out = workspace[:part_numel]  # [B, Hq, num_splits, D] flattened
        part_lse = workspace[part_numel:need]  # [B, Hq, num_splits] flattened
    lse_arg = lse if lse is not None else out  # only written when write_lse
    lse_strides = lse.stride() if lse is not None else (0, 0)
    group = dims.group_size
    upcast = interpreting() and q.dtype == torch.bfloat16
    with device_context(q.device):
        decode_kernel._paged_decode_kernel[(num_seqs, dims.cache.num_kv_heads, plan.num_splits)](
            q, k_cache, v_cache, block_tables, seq_lens,
            out, lse_arg, part_out, part_lse,
            sm_scale * math.log2(math.e), plan.tokens_per_split, plan.num_splits,
            *q.stride(), *k_cache.stride(), *block_tables.stride(), seq_lens.stride(0),
            *out.stride(), *lse_strides,
            GROUP=group,
            GROUP_PAD=max(16, next_pow2(group)),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=max(16, next_pow2(head_dim)),
            BLOCK_SIZE=dims.cache.block_size,
            BLOCK_N=plan.block_n,
            SINGLE_SPLIT=need == 0,
            WRITE_LSE=write_lse,
            UPCAST=upcast,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )  # fmt: skip
        if need:
            decode_kernel._decode_merge_kernel[(num_seqs, num_q_heads)](
                part_out, part_lse, out, lse_arg, plan.num_splits,
                *out.stride(), *lse_strides,
                HEAD_DIM=head_dim,
                HEAD_DIM_PAD=next_pow2(head_dim),
                SPLITS_PAD=max(2, next_pow2(plan.num_splits)),
                WRITE_LSE=write_lse,
                num_warps=4 if head_dim <= 128 else 8,
            )  # fmt: skip
    if return_lse:
        assert lse is not None
        return out, lse
    return out
