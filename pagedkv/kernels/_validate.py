"""Argument checks shared by the launchers and the references.

Every check runs on shapes, dtypes, devices and strides only (host metadata), never on
tensor values, so a launcher that calls them stays free of host-device syncs and
capturable in a CUDA graph. Dtype problems raise `TypeError`; shape, stride and device
problems raise `ValueError`; each message names what was received and what was expected.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    """Return `t` if it is a tensor, else raise `TypeError`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    return t


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise `TypeError` unless `t.dtype` is one of `allowed`."""
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype in ({names}); got {name}.dtype={t.dtype}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    """Raise `ValueError` unless `t` has `ndim` dims; `layout` names them, e.g. "[B, Hq, D]"."""
    if t.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must be {ndim}-D {layout}; got {name}.shape={tuple(t.shape)}"
        )


def check_same_device(op: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    """Raise `ValueError` unless all tensors live on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        got = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {got}")
    return first


def check_writable(op: str, name: str, t: torch.Tensor) -> None:
    """Raise `ValueError` if `t` has a zero stride on a dimension of size > 1.

    Such a tensor (from `expand`) aliases its own elements, so a kernel writing it
    would race with itself.
    """
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size > 1 and stride == 0:
            raise ValueError(
                f"{op}: {name} is written, so it must not alias itself (no zero strides); "
                f"got {name}.shape={tuple(t.shape)}, {name}.stride()={t.stride()}"
            )


class CacheDims(NamedTuple):
    """Dimensions of a per-layer K or V cache view `[num_blocks, block_size, Hkv, D]`."""

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int


def check_kv_caches(op: str, k_cache: object, v_cache: object) -> CacheDims:
    """Validate a K/V cache pair: 4-D NHD views of one float dtype, equal shapes and strides.

    K and V are views `kv[:, layer, 0]` and `kv[:, layer, 1]` of one block-major tensor,
    so they share shape and strides; the kernels rely on that (one set of strides).
    """
    k = check_tensor(op, "k_cache", k_cache)
    v = check_tensor(op, "v_cache", v_cache)
    layout = "[num_blocks, block_size, num_kv_heads, head_dim]"
    check_ndim(op, "k_cache", k, 4, layout)
    check_ndim(op, "v_cache", v, 4, layout)
    check_dtype(op, "k_cache", k, FLOAT_DTYPES)
    if v.dtype != k.dtype:
        raise TypeError(
            f"{op}: v_cache must have the dtype of k_cache; got k_cache.dtype={k.dtype}, "
            f"v_cache.dtype={v.dtype}"
        )
    if v.shape != k.shape:
        raise ValueError(
            f"{op}: v_cache must have the shape of k_cache; got k_cache.shape={tuple(k.shape)}, "
            f"v_cache.shape={tuple(v.shape)}"
        )
    if v.stride() != k.stride():
        raise ValueError(
            f"{op}: v_cache must have the strides of k_cache (both are views of one kv "
            f"tensor); got k_cache.stride()={k.stride()}, v_cache.stride()={v.stride()}"
        )
    num_blocks, block_size, num_kv_heads, head_dim = k.shape
    if block_size < 1 or num_kv_heads < 1 or head_dim < 1:
        raise ValueError(
            f"{op}: k_cache has an empty dimension; got k_cache.shape={tuple(k.shape)}"
        )
    return CacheDims(num_blocks, block_size, num_kv_heads, head_dim)


def check_query(op: str, q: object, dims: CacheDims, batch_name: str) -> torch.Tensor:
    """Validate q `[N, Hq, D]` against the cache: same dtype, D equal, Hq % Hkv == 0."""
    t = check_tensor(op, "q", q)
    layout = f"[{batch_name}, Hq, D]"
    if t.dim() != 3 or t.shape[2] != dims.head_dim:
        raise ValueError(
            f"{op}: q must be {layout} with D == k_cache.shape[-1] == {dims.head_dim}; "
            f"got q.shape={tuple(t.shape)}"
        )
    if t.shape[1] < 1 or t.shape[1] % dims.num_kv_heads != 0:
        raise ValueError(
            f"{op}: q's head count Hq must be a positive multiple of the cache's "
            f"num_kv_heads={dims.num_kv_heads}; got q.shape={tuple(t.shape)}"
        )
    check_dtype(op, "q", t, FLOAT_DTYPES)
    return t


def check_index(
    op: str, name: str, t: object, ndim: int, layout: str, dtype: torch.dtype
) -> torch.Tensor:
    """Validate an index tensor (block tables, lengths, offsets): `ndim` dims, `dtype`."""
    x = check_tensor(op, name, t)
    check_ndim(op, name, x, ndim, layout)
    check_dtype(op, name, x, (dtype,))
    return x


def check_out(
    op: str, name: str, out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor
) -> None:
    """Validate a caller-provided output buffer: `shape`, dtype and device of `like`."""
    check_tensor(op, name, out)
    if tuple(out.shape) != shape:
        raise ValueError(
            f"{op}: {name} must have shape {shape}; got {name}.shape={tuple(out.shape)}"
        )
    if out.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have dtype {like.dtype}; got {name}.dtype={out.dtype}")
    if out.device != like.device:
        raise ValueError(f"{op}: {name} must be on {like.device}; got {name}.device={out.device}")
    check_writable(op, name, out)


def check_scale(op: str, scale: float | None, head_dim: int) -> float:
    """Return the softmax scale: `scale`, or `1/sqrt(head_dim)` when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None; got {type(scale).__name__}")
    return float(scale)


class AttentionDims(NamedTuple):
    """Shapes shared by `paged_decode` and `paged_prefill` after validation."""

    num_seqs: int
    num_q_heads: int
    max_blocks: int
    cache: CacheDims

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_q_heads // self.cache.num_kv_heads


def check_attention_args(
    op: str,
    q: object,
    k_cache: object,
    v_cache: object,
    block_tables: object,
    seq_lens: object,
    out: torch.Tensor | None,
    query_start_loc: object = None,
) -> AttentionDims:
    """Validate the tensors of a paged attention call (metadata only, no sync).

    Decode (`query_start_loc is None`): q `[B, Hq, D]`. Prefill: q `[T, Hq, D]` and
    `query_start_loc` int32 `[B + 1]`. Both: block_tables int32 `[B, max_blocks]`,
    seq_lens int32 `[B]`, caches `[num_blocks, block_size, Hkv, D]` of q's dtype.
    """
    dims = check_kv_caches(op, k_cache, v_cache)
    prefill = query_start_loc is not None
    qt = check_query(op, q, dims, "T" if prefill else "B")
    kt = check_tensor(op, "k_cache", k_cache)
    if qt.dtype != kt.dtype:
        raise TypeError(
            f"{op}: q must have the dtype of k_cache; got q.dtype={qt.dtype}, "
            f"k_cache.dtype={kt.dtype}"
        )
    tables = check_index(op, "block_tables", block_tables, 2, "[B, max_blocks]", torch.int32)
    lens = check_index(op, "seq_lens", seq_lens, 1, "[B]", torch.int32)
    num_seqs = tables.shape[0]
    vt = check_tensor(op, "v_cache", v_cache)
    tensors = {"q": qt, "k_cache": kt, "v_cache": vt, "block_tables": tables, "seq_lens": lens}
    if lens.shape[0] != num_seqs:
        raise ValueError(
            f"{op}: seq_lens must be [B] with B == block_tables.shape[0] == {num_seqs}; "
            f"got seq_lens.shape={tuple(lens.shape)}"
        )
    if prefill:
        qsl = check_index(op, "query_start_loc", query_start_loc, 1, "[B + 1]", torch.int32)
        if qsl.shape[0] != num_seqs + 1:
            raise ValueError(
                f"{op}: query_start_loc must be [B + 1] with B == block_tables.shape[0] == "
                f"{num_seqs}; got query_start_loc.shape={tuple(qsl.shape)}"
            )
        tensors["query_start_loc"] = qsl
    elif qt.shape[0] != num_seqs:
        raise ValueError(
            f"{op}: q must be [B, Hq, D] with B == block_tables.shape[0] == {num_seqs}; "
            f"got q.shape={tuple(qt.shape)}"
        )
    if tables.shape[1] < 1:
        raise ValueError(
            f"{op}: block_tables must have at least one column; got shape {tuple(tables.shape)}"
        )
    check_same_device(op, tensors)
    if out is not None:
        check_out(op, "out", out, tuple(qt.shape), qt)
    return AttentionDims(num_seqs, qt.shape[1], tables.shape[1], dims)


def check_lse_out(op: str, lse: torch.Tensor, shape: tuple[int, int], device: torch.device) -> None:
    """Validate a caller-provided LSE buffer: fp32 `shape` on `device`."""
    check_tensor(op, "lse", lse)
    if tuple(lse.shape) != shape:
        raise ValueError(f"{op}: lse must have shape {shape}; got lse.shape={tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"{op}: lse must have dtype torch.float32; got lse.dtype={lse.dtype}")
    if lse.device != device:
        raise ValueError(f"{op}: lse must be on {device}; got lse.device={lse.device}")
    check_writable(op, "lse", lse)


def check_table_values(
    op: str,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cache: CacheDims,
    query_lens: torch.Tensor | None = None,
) -> None:
    """Value checks the references can afford (they read values on the host anyway).

    Raises `ValueError` if a length is negative or exceeds the table's capacity, if a
    block id a sequence uses is outside `[0, num_blocks)`, or (prefill) if a sequence has
    more new tokens than its total length.
    """
    lens = seq_lens.to("cpu", torch.int64)
    capacity = block_tables.shape[1] * cache.block_size
    bad = (lens < 0) | (lens > capacity)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: seq_lens[{i}]={int(lens[i])} is outside [0, max_blocks * block_size = "
            f"{capacity}]"
        )
    tables = block_tables.to("cpu", torch.int64)
    used = torch.arange(tables.shape[1])[None, :] * cache.block_size < lens[:, None]
    out_of_range = used & ((tables < 0) | (tables >= cache.num_blocks))
    if bool(out_of_range.any()):
        b, j = (int(x) for x in out_of_range.nonzero()[0])
        raise ValueError(
            f"{op}: block_tables[{b}, {j}]={int(tables[b, j])} is outside [0, num_blocks = "
            f"{cache.num_blocks})"
        )
    if query_lens is not None:
        qlens = query_lens.to("cpu", torch.int64)
        bad = (qlens < 0) | (qlens > lens)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{op}: sequence {i} has query_len={int(qlens[i])} new tokens but "
                f"seq_len={int(lens[i])}; need 0 <= query_len <= seq_len"
            )


def check_query_start_loc(op: str, query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Value checks of `query_start_loc` (references only): starts at 0, non-decreasing,
    ends at `num_tokens`. Returns the per-sequence query lengths (CPU int64)."""
    qsl = query_start_loc.to("cpu", torch.int64)
    qlens = qsl[1:] - qsl[:-1]
    if int(qsl[0]) != 0 or int(qsl[-1]) != num_tokens or bool((qlens < 0).any()):
        raise ValueError(
            f"{op}: query_start_loc must start at 0, be non-decreasing and end at "
            f"q.shape[0]={num_tokens}; got {qsl.tolist()}"
        )
    return qlens


def check_store_args(
    op: str, k: object, v: object, k_cache: object, v_cache: object, slot_mapping: object
) -> CacheDims:
    """Validate a `store_kv` call: k, v `[T, Hkv, D]` of the cache dtype, slots int64 `[T]`."""
    dims = check_kv_caches(op, k_cache, v_cache)
    kt = check_tensor(op, "k", k)
    vt = check_tensor(op, "v", v)
    kc = check_tensor(op, "k_cache", k_cache)
    vc = check_tensor(op, "v_cache", v_cache)
    expected = f"[T, {dims.num_kv_heads}, {dims.head_dim}] (T, k_cache.shape[2:])"
    for name, t in (("k", kt), ("v", vt)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (dims.num_kv_heads, dims.head_dim):
            raise ValueError(f"{op}: {name} must be {expected}; got {name}.shape={tuple(t.shape)}")
        if t.dtype != kc.dtype:
            raise TypeError(
                f"{op}: {name} must have the cache dtype {kc.dtype}; got {name}.dtype={t.dtype}"
            )
    slots = check_index(op, "slot_mapping", slot_mapping, 1, "[T]", torch.int64)
    if vt.shape[0] != kt.shape[0] or slots.shape[0] != kt.shape[0]:
        raise ValueError(
            f"{op}: k, v and slot_mapping must have the same length T; got k.shape="
            f"{tuple(kt.shape)}, v.shape={tuple(vt.shape)}, slot_mapping.shape={tuple(slots.shape)}"
        )
    check_same_device(op, {"k": kt, "v": vt, "k_cache": kc, "v_cache": vc, "slot_mapping": slots})
    check_writable(op, "k_cache", kc)
    check_writable(op, "v_cache", vc)
    return dims


def check_slot_values(op: str, slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Raise `ValueError` if a slot is outside `[-1, num_slots)` (reads values: syncs on CUDA)."""
    bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: slot_mapping[{i}]={int(slot_mapping[i])} is outside [-1, num_blocks * "
            f"block_size = {num_slots}); nothing was written"
        )


def as_id_tensor(op: str, name: str, ids: object) -> torch.Tensor:
    """Block ids (Python ints, a NumPy array or a CPU integer tensor) as CPU int64 `[n]`.

    Raises `ValueError` for a CUDA tensor: ids feed host-side planning (grouping into
    runs, range checks), and reading them from the GPU would be a hidden sync.
    """
    if isinstance(ids, torch.Tensor) and ids.device.type != "cpu":
        raise ValueError(
            f"{op}: {name} must be a Python sequence or a CPU tensor (planning reads it on "
            f"the host); got a tensor on {ids.device}"
        )
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{op}: {name} must be a sequence of ints or a 1-D integer tensor; got "
            f"{type(ids).__name__} ({exc})"
        ) from exc
    if t.numel() == 0:
        t = t.to(torch.int64)  # an empty list comes back as float32
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(
            f"{op}: {name} must be a sequence of ints or a 1-D integer tensor; got dtype {t.dtype}"
        )
    t = t.to(torch.int64)
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D; got shape {tuple(t.shape)}")
    return t.contiguous()  # kernels index the ids as a dense array


def check_copy_args(
    op: str, src: object, dst: object, src_ids: object, dst_ids: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a `copy_blocks` call; return the ids as CPU int64 tensors.

    src and dst: any tensors whose dim 0 is the block dim, with equal dtype and equal
    per-block shape. Ids: equal lengths, in range, destination ids unique, and when src and
    dst are one tensor, no block both read and written (the copy order would matter).
    """
    s = check_tensor(op, "src", src)
    d = check_tensor(op, "dst", dst)
    if s.dim() < 1 or d.dim() < 1 or tuple(s.shape[1:]) != tuple(d.shape[1:]):
        raise ValueError(
            f"{op}: src and dst must have the same per-block shape (shape[1:]); got "
            f"src.shape={tuple(s.shape)}, dst.shape={tuple(d.shape)}"
        )
    if s.dtype != d.dtype:
        raise TypeError(
            f"{op}: src and dst must have the same dtype; got src.dtype={s.dtype}, "
            f"dst.dtype={d.dtype}"
        )
    check_writable(op, "dst", d)
    sid = as_id_tensor(op, "src_ids", src_ids)
    did = as_id_tensor(op, "dst_ids", dst_ids)
    if sid.shape != did.shape:
        raise ValueError(
            f"{op}: src_ids and dst_ids must have the same length; got {sid.shape[0]} and "
            f"{did.shape[0]}"
        )
    for name, ids, n in (("src_ids", sid, s.shape[0]), ("dst_ids", did, d.shape[0])):
        bad = (ids < 0) | (ids >= n)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: {name}[{i}]={int(ids[i])} is outside [0, {n}) (shape[0])")
    if len(set(did.tolist())) != did.numel():
        raise ValueError(f"{op}: dst_ids must be unique; got duplicates in {did.tolist()[:32]}")
    if s.untyped_storage().data_ptr() == d.untyped_storage().data_ptr() and s.numel() and d.numel():
        same_view = s.data_ptr() == d.data_ptr() and s.stride() == d.stride() and s.shape == d.shape
        if not same_view:
            raise ValueError(
                f"{op}: src and dst share memory but are different views; pass the same "
                "tensor for a copy within one pool"
            )
        both = set(sid.tolist()) & set(did.tolist())
        if both:
            raise ValueError(
                f"{op}: within one tensor a block may not be both read and written; got "
                f"block ids {sorted(both)[:32]} in both src_ids and dst_ids"
            )
    return sid, did
