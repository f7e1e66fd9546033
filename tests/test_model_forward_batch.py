"""ForwardBatch and build_forward_batch: layout, slots, and validation errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pagedkv.model.forward_batch import ForwardBatch, SeqChunk, build_forward_batch


def example() -> ForwardBatch:
    """A: 5-token prompt; B: 2 new tokens after 3 cached; C: decode after 4 cached."""
    return build_forward_batch(
        [
            SeqChunk([7, 2], 0, [10, 11, 12, 13, 14]),
            SeqChunk([5, 0], 3, [20, 21]),
            SeqChunk([9, 3, 4], 4, [30]),
        ],
        block_size=4,
    )


def test_layout() -> None:
    b = example()
    assert b.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 30]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 3, 4, 4]
    assert b.query_start_loc.tolist() == [0, 5, 7, 8]
    assert b.seq_lens.tolist() == [5, 5, 5]
    assert b.block_tables.tolist() == [[7, 2, 0], [5, 0, 0], [9, 3, 4]]
    # slot = block_ids[pos // 4] * 4 + pos % 4
    assert b.slot_mapping.tolist() == [28, 29, 30, 31, 8, 23, 0, 12]
    assert (b.max_query_len, b.max_seq_len, b.num_seqs, b.num_tokens) == (5, 5, 3, 8)
    assert not b.is_decode
    dtypes = [t.dtype for t in (b.input_ids, b.positions, b.slot_mapping)]
    assert dtypes == [torch.int64] * 3
    idx = [t.dtype for t in (b.query_start_loc, b.seq_lens, b.block_tables)]
    assert idx == [torch.int32] * 3


def test_decode_batch_and_fixed_width() -> None:
    b = build_forward_batch(
        [SeqChunk([3], 0, [1]), SeqChunk([1, 2], 4, [2])], block_size=4, max_blocks=6
    )
    assert b.is_decode and b.block_tables.shape == (2, 6)
    assert b.slot_mapping.tolist() == [12, 8]


def test_matches_block_manager_slot_convention() -> None:
    """Slots equal the per-token formula over a long random case (vectorised path)."""
    rng = np.random.default_rng(0)
    chunks = []
    for _ in range(20):
        cached, new = int(rng.integers(0, 50)), int(rng.integers(1, 40))
        ids = rng.permutation(1000)[: -(-(cached + new) // 16)].tolist()
        chunks.append(SeqChunk(ids, cached, rng.integers(0, 288, new).tolist()))
    b = build_forward_batch(chunks, block_size=16)
    expected = [
        c.block_ids[p // 16] * 16 + p % 16
        for c in chunks
        for p in range(c.num_computed_tokens, c.num_computed_tokens + len(c.new_token_ids))
    ]
    assert b.slot_mapping.tolist() == expected
    dataclasses.replace(b)  # the builder skips the value checks; its output passes them


@pytest.mark.parametrize(
    ("chunks", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "at least one sequence"),
        ([SeqChunk([0], 0, [])], {}, ValueError, "sequence 0 has no new tokens"),
        ([SeqChunk([0], -1, [1])], {}, ValueError, "negative num_computed_tokens"),
        ([SeqChunk([0], 3, [1, 2])], {}, ValueError, "too few blocks"),
        ([SeqChunk([0, 1], 0, [1])], {"max_blocks": 1}, ValueError, "max_blocks=1"),
        ([SeqChunk([-2], 0, [1])], {}, ValueError, "block ids must be in"),
        ([SeqChunk([0], 0, [300])], {"vocab_size": 288}, ValueError, "vocab_size=288"),
        ([SeqChunk([0], 0, [1.5])], {}, TypeError, "new_token_ids must be a 1-D sequence"),
        ([SeqChunk([0], 0, [1])], {"block_size": 0}, ValueError, "block_size must be"),
    ],
)
def test_builder_errors(
    chunks: list[SeqChunk], kwargs: dict[str, object], error: type, match: str
) -> None:
    kwargs = {"block_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        build_forward_batch(chunks, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        (
            "input_ids",
            torch.zeros(8, dtype=torch.int32),
            TypeError,
            "input_ids must be torch.int64",
        ),
        ("positions", torch.zeros(7, dtype=torch.int64), ValueError, "positions must be \\[T\\]"),
        ("seq_lens", [5, 5, 5], TypeError, "seq_lens must be a torch.Tensor"),
        ("block_tables", torch.zeros(3, dtype=torch.int32), ValueError, "block_tables must be"),
        ("block_tables", torch.zeros(2, 3, dtype=torch.int32), ValueError, "B == 3"),
        ("query_start_loc", torch.zeros(3, dtype=torch.int32), ValueError, "\\[B \\+ 1\\]"),
        ("max_query_len", 0, ValueError, "max_query_len must be >= 1"),
        ("max_query_len", 2, ValueError, "T <= B \\* max_query_len"),
        ("max_query_len", 4, ValueError, "largest query_len 5"),
        ("max_seq_len", 4, ValueError, "max_seq_len=4 must be >= max_query_len=5"),
        ("max_seq_len", True, TypeError, "max_seq_len must be an int"),
        (
            "query_start_loc",
            torch.tensor([0, 5, 5, 8], dtype=torch.int32),
            ValueError,
            "rise by >= 1",
        ),
        ("seq_lens", torch.tensor([5, 1, 5], dtype=torch.int32), ValueError, "sequence 1"),
        ("positions", torch.tensor([0, 1, 2, 3, 4, 3, 4, 3]), ValueError, "positions\\[7\\]=3"),
        (
            "slot_mapping",
            torch.tensor([0, 1, 2, 3, 4, 5, 6, -2]),
            ValueError,
            "slot_mapping\\[7\\]",
        ),
    ],
)
def test_batch_errors(field: str, value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        dataclasses.replace(example(), **{field: value})


def test_padding_slot_is_allowed_and_batch_is_frozen() -> None:
    b = dataclasses.replace(example(), slot_mapping=torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]))
    assert b.slot_mapping[-1] == -1
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.max_query_len = 2  # type: ignore[misc]


def test_to_same_device_keeps_values() -> None:
    b = example()
    moved = b.to("cpu")
    assert moved.max_query_len == b.max_query_len and torch.equal(
        moved.slot_mapping, b.slot_mapping
    )
