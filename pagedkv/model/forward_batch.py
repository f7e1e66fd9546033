"""ForwardBatch: one forward step over several sequences, as the model consumes it.

Continuous batching: in one step some sequences prefill many new tokens (a whole prompt,
a chunk of one, or a new turn after a cached prefix) and others decode one. The model
knows nothing of sessions or pools; it reads this description. `build_forward_batch`
makes one on the host from each sequence's block ids, cached-token count and new token
ids, vectorised (NumPy over all tokens at once, a Python loop only over sequences).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass
from typing import NamedTuple

import numpy as np
import torch


def _check_tensor(name: str, t: object, dtype: torch.dtype, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ForwardBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"ForwardBatch.{name} must be {dtype} {layout}, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"ForwardBatch.{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ForwardBatch.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"ForwardBatch.{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardBatch:
    """The tensors of one forward step over B sequences with T new tokens in all.

    Sequence b's new tokens are `input_ids[query_start_loc[b]:query_start_loc[b + 1]]`,
    the LAST `query_len` of its `seq_lens[b]` positions (the ones before are cached).

    Attributes:
        input_ids: int64 `[T]` new token ids, sequences concatenated in order.
        positions: int64 `[T]` each token's position in its sequence.
        slot_mapping: int64 `[T]` the cache slot (`block_id * block_size + offset`) each
            token's K/V is written to; -1 skips a token (padding).
        query_start_loc: int32 `[B + 1]` offsets of each sequence's tokens, 0 ... T.
        seq_lens: int32 `[B]` total length of each sequence including its new tokens.
        block_tables: int32 `[B, max_blocks]`; row b lists sequence b's block ids, padded
            with 0 (never read past `seq_lens[b]`).
        max_query_len: the largest number of new tokens of one sequence (host-known, so
            launches need no device read). 1 means a pure decode step (T == B).
        max_seq_len: an upper bound of `seq_lens` (host-known).
        wait_layer: None, or called with i just before layer i reads or writes the cache
            (a layer-wise restore: layer i of the blocks being copied in is in place once
            it returns; `TransferHandle.wait_layer`). Models call it once per layer, in
            order.
        check_values: (init only, not stored) check the values of CPU tensors (below);
            `build_forward_batch` passes False, its output being valid by construction
            (saves ~0.1 ms a step). `dataclasses.replace` checks again.

    Invariants checked on construction: dtypes, ranks and matching shapes, one device,
    `B <= T <= B * max_query_len`, `max_query_len <= max_seq_len`. When the tensors are
    on the CPU (reading them is free) the values are checked too: `query_start_loc`
    starts at 0, rises by >= 1 per sequence and ends at T, its largest step is
    `max_query_len`, `query_len <= seq_len <= max_seq_len`, the positions are the last
    `query_len` of each sequence, and slots are >= -1. On CUDA nothing is read (no sync).

    Raises:
        TypeError, ValueError: a broken invariant; the message names the field, what it
            got and what was expected.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    wait_layer: Callable[[int], None] | None = None
    check_values: InitVar[bool] = True

    def __post_init__(self, check_values: bool) -> None:
        _check_tensor("input_ids", self.input_ids, torch.int64, 1, "[T]")
        _check_tensor("positions", self.positions, torch.int64, 1, "[T]")
        _check_tensor("slot_mapping", self.slot_mapping, torch.int64, 1, "[T]")
        _check_tensor("query_start_loc", self.query_start_loc, torch.int32, 1, "[B + 1]")
        _check_tensor("seq_lens", self.seq_lens, torch.int32, 1, "[B]")
        _check_tensor("block_tables", self.block_tables, torch.int32, 2, "[B, max_blocks]")
        num_tokens = self.input_ids.shape[0]
        num_seqs = self.seq_lens.shape[0]
        for name in ("positions", "slot_mapping"):
            if getattr(self, name).shape[0] != num_tokens:
                raise ValueError(
                    f"ForwardBatch.{name} must be [T] with T == input_ids.shape[0] == "
                    f"{num_tokens}, got shape {tuple(getattr(self, name).shape)}"
                )
        if self.query_start_loc.shape[0] != num_seqs + 1:
            raise ValueError(
                f"ForwardBatch.query_start_loc must be [B + 1] with B == seq_lens.shape[0] == "
                f"{num_seqs}, got shape {tuple(self.query_start_loc.shape)}"
            )
        if self.block_tables.shape[0] != num_seqs or self.block_tables.shape[1] < 1:
            raise ValueError(
                f"ForwardBatch.block_tables must be [B, max_blocks] with B == {num_seqs} and "
                f"max_blocks >= 1, got shape {tuple(self.block_tables.shape)}"
            )
        if self.wait_layer is not None and not callable(self.wait_layer):
            raise TypeError(
                f"ForwardBatch.wait_layer must be callable or None, got {self.wait_layer!r}"
            )
        max_query_len = _check_int("max_query_len", self.max_query_len, 1)
        _check_int("max_seq_len", self.max_seq_len, 1)
        if self.max_seq_len < max_query_len:
            raise ValueError(
                f"ForwardBatch.max_seq_len={self.max_seq_len} must be >= max_query_len="
                f"{max_query_len} (a sequence holds its new tokens)"
            )
        if not num_seqs <= num_tokens <= num_seqs * max_query_len:
            raise ValueError(
                f"ForwardBatch: need B <= T <= B * max_query_len (every sequence has 1 to "
                f"max_query_len new tokens), got B={num_seqs}, T={num_tokens}, "
                f"max_query_len={max_query_len}"
            )
        names = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens")
        devices = {name: getattr(self, name).device for name in (*names, "block_tables")}
        if len(set(devices.values())) != 1:
            raise ValueError(f"ForwardBatch: all tensors must be on one device, got {devices}")
        if check_values and self.input_ids.device.type == "cpu":
            self._check_values()

    def _check_values(self) -> None:
        """Value checks (CPU tensors only; see the class docstring)."""
        qsl = self.query_start_loc.to(torch.int64)
        query_lens = qsl[1:] - qsl[:-1]  # [B]
        if int(qsl[0]) != 0 or int(qsl[-1]) != self.num_tokens or bool((query_lens < 1).any()):
            raise ValueError(
                "ForwardBatch.query_start_loc must start at 0, rise by >= 1 per sequence and "
                f"end at T={self.num_tokens}, got {qsl.tolist()[:32]}"
            )
        if int(query_lens.max()) != self.max_query_len:
            raise ValueError(
                f"ForwardBatch.max_query_len must be the largest query_len "
                f"{int(query_lens.max())}, got {self.max_query_len}"
            )
        seq_lens = self.seq_lens.to(torch.int64)
        bad = (seq_lens < query_lens) | (seq_lens > self.max_seq_len)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"ForwardBatch: sequence {b} has seq_len={int(seq_lens[b])}, query_len="
                f"{int(query_lens[b])}; need query_len <= seq_len <= max_seq_len="
                f"{self.max_seq_len}"
            )
        seq_of_token = torch.repeat_interleave(torch.arange(self.num_seqs), query_lens)  # [T]
        start = (seq_lens - query_lens)[seq_of_token] - qsl[:-1][seq_of_token]  # [T]
        expected = torch.arange(self.num_tokens) + start  # [T]
        bad = self.positions != expected
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"ForwardBatch.positions[{t}]={int(self.positions[t])}, expected "
                f"{int(expected[t])}: a sequence's new tokens are the last query_len of its "
                "seq_len positions"
            )
        if bool((self.slot_mapping < -1).any()):
            t = int((self.slot_mapping < -1).nonzero()[0, 0])
            raise ValueError(
                f"ForwardBatch.slot_mapping[{t}]={int(self.slot_mapping[t])}; slots are >= 0, "
                "or -1 to skip"
            )

    @property
    def num_seqs(self) -> int:
        """B, the number of sequences."""
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        """T, the number of new tokens in all."""
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """True when every sequence has exactly one new token (T == B)."""
        return self.max_query_len == 1

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: str | torch.device, *, non_blocking: bool = False) -> ForwardBatch:
        """The same batch on `device` (host-known ints carried over; nothing read)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return ForwardBatch(
            input_ids=move(self.input_ids),
            positions=move(self.positions),
            slot_mapping=move(self.slot_mapping),
            query_start_loc=move(self.query_start_loc),
            seq_lens=move(self.seq_lens),
            block_tables=move(self.block_tables),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            wait_layer=self.wait_layer,
        )


class SeqChunk(NamedTuple):
    """One sequence's part of a forward step, as the scheduler knows it.

    Attributes:
        block_ids: the sequence's block table; it must cover `num_computed_tokens +
            len(new_token_ids)` positions.
        num_computed_tokens: leading positions whose K/V is already in the cache
            (computed earlier or served by the prefix cache).
        new_token_ids: the tokens to run now (>= 1), at the next positions.
    """

    block_ids: Sequence[int]
    num_computed_tokens: int
    new_token_ids: Sequence[int]


def _as_int_array(name: str, b: int, values: Sequence[int]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"build_forward_batch: sequence {b}'s {name} must be a 1-D sequence of ints, got "
            f"array of dtype {arr.dtype} and shape {arr.shape}"
        )
    return arr.astype(np.int64)


def build_forward_batch(
    chunks: Sequence[SeqChunk],
    *,
    block_size: int,
    max_blocks: int | None = None,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    wait_layer: Callable[[int], None] | None = None,
) -> ForwardBatch:
    """Build a `ForwardBatch` on the host from each sequence's chunk, then move it.

    Slots come from the block tables: the token at position p of sequence b goes to
    `block_ids[p // block_size] * block_size + p % block_size`.

    Args:
        chunks: one `SeqChunk` per sequence (>= 1), in batch order.
        block_size: positions per block of the KV store the batch runs on.
        max_blocks: width of `block_tables` (default: the longest table). A fixed width
            keeps shapes static across steps (CUDA graphs).
        vocab_size: if given, token ids are checked to be in `[0, vocab_size)`.
        device: where the tensors go (copied once, after all host work).
        wait_layer: the batch's `wait_layer` (a layer-wise restore), or None.

    Raises:
        TypeError: ids that are not integers.
        ValueError: no sequences, a sequence without new tokens, a negative cached count,
            a table too short for its sequence or wider than `max_blocks`, a negative
            block id, or a token id outside the vocabulary.
    """
    op = "build_forward_batch"
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{op}: block_size must be an int >= 1, got {block_size!r}")
    if len(chunks) == 0:
        raise ValueError(f"{op}: need at least one sequence, got none")
    tokens = [_as_int_array("new_token_ids", b, c.new_token_ids) for b, c in enumerate(chunks)]
    tables = [_as_int_array("block_ids", b, c.block_ids) for b, c in enumerate(chunks)]
    query_lens = np.array([t.size for t in tokens], dtype=np.int64)  # [B]
    computed = np.array([c.num_computed_tokens for c in chunks], dtype=np.int64)  # [B]
    num_blocks = np.array([t.size for t in tables], dtype=np.int64)  # [B]
    seq_lens = computed + query_lens  # [B]
    for bad, what in (
        (query_lens < 1, "has no new tokens (need >= 1)"),
        (computed < 0, "has a negative num_computed_tokens"),
        (num_blocks * block_size < seq_lens, "has too few blocks for its length"),
    ):
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{op}: sequence {b} {what}: num_computed_tokens={int(computed[b])}, "
                f"{int(query_lens[b])} new tokens, {int(num_blocks[b])} blocks of {block_size}"
            )
    width = int(num_blocks.max()) if max_blocks is None else max_blocks
    if width < 1 or width < int(num_blocks.max()):
        raise ValueError(
            f"{op}: max_blocks={max_blocks} is less than the longest table "
            f"({int(num_blocks.max())} blocks)"
        )
    flat_ids = np.concatenate(tables)  # [sum(num_blocks)]
    if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{op}: block ids must be in [0, 2**31), got {flat_ids.min()}..")
    input_ids = np.concatenate(tokens)  # [T]
    if vocab_size is not None and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"{op}: token ids must be in [0, vocab_size={vocab_size}), got "
            f"{int(input_ids.min())}..{int(input_ids.max())}"
        )

    num_seqs, num_tokens = len(chunks), int(query_lens.sum())
    block_tables = np.zeros((num_seqs, width), dtype=np.int32)  # padded with block 0
    rows = np.repeat(np.arange(num_seqs), num_blocks)  # [sum(num_blocks)]
    cols = np.arange(flat_ids.size) - np.repeat(np.cumsum(num_blocks) - num_blocks, num_blocks)
    block_tables[rows, cols] = flat_ids
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)  # [T]
    positions = np.arange(num_tokens) - query_start_loc[seq_of_token] + computed[seq_of_token]
    block_of_token = block_tables[seq_of_token, positions // block_size].astype(np.int64)  # [T]
    slot_mapping = block_of_token * block_size + positions % block_size  # [T]

    batch = ForwardBatch(
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slot_mapping),
        query_start_loc=torch.from_numpy(query_start_loc.astype(np.int32)),
        seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
        block_tables=torch.from_numpy(block_tables),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        wait_layer=wait_layer,
        check_values=False,  # valid by construction (every input was checked above)
    )
    return batch if torch.device(device).type == "cpu" else batch.to(device)
