"""Block hash properties: chaining, salting, incrementality, token validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv.cache.hashing import HASH_BYTES, BlockHasher, as_token_array

BS = 4
tokens_st = st.lists(st.integers(-(2**31), 2**31 - 1), min_size=BS, max_size=6 * BS)


def chain(h: BlockHasher, tokens: list[int], tenant: str = "t") -> list[bytes]:
    return h.hash_chain(h.root(tenant), as_token_array(tokens))[0]


@given(tokens=tokens_st)
def test_same_tokens_same_salt_same_chain(tokens: list[int]) -> None:
    a, b = BlockHasher(block_size=BS, secret=b"k"), BlockHasher(block_size=BS, secret=b"k")
    ha = chain(a, tokens)
    assert ha == chain(b, tokens)
    assert len(ha) == len(tokens) // BS and all(len(x) == HASH_BYTES for x in ha)


@given(tokens=tokens_st, data=st.data())
def test_token_change_changes_hash_from_that_block_on(
    tokens: list[int], data: st.DataObject
) -> None:
    h = BlockHasher(block_size=BS, secret=b"k")
    pos = data.draw(st.integers(0, (len(tokens) // BS) * BS - 1))
    changed = list(tokens)
    changed[pos] = tokens[pos] + 1 if tokens[pos] < 2**31 - 1 else tokens[pos] - 1
    before, after = chain(h, tokens), chain(h, changed)
    j = pos // BS
    assert before[:j] == after[:j]
    assert all(x != y for x, y in zip(before[j:], after[j:], strict=True))


@given(tokens=tokens_st)
def test_other_tenant_or_secret_changes_every_hash(tokens: list[int]) -> None:
    h = BlockHasher(block_size=BS, secret=b"k")
    base = chain(h, tokens, "t")
    for other in (chain(h, tokens, "u"), chain(BlockHasher(block_size=BS, secret=b"j"), tokens)):
        assert all(x != y for x, y in zip(base, other, strict=True))


@given(tokens=tokens_st, cut=st.integers(0, 6))
def test_incremental_equals_one_shot(tokens: list[int], cut: int) -> None:
    h = BlockHasher(block_size=BS, secret=b"k")
    full = chain(h, tokens)
    k = min(cut, len(tokens) // BS)
    first = h.hash_chain(h.root("t"), as_token_array(tokens[: k * BS]))[0]
    rest = h.hash_chain(first[-1] if first else h.root("t"), as_token_array(tokens[k * BS :]))[0]
    assert first + rest == full


def test_extra_keys_and_block_size_are_part_of_the_root() -> None:
    h4, h8 = BlockHasher(block_size=4, secret=b"k"), BlockHasher(block_size=8, secret=b"k")
    assert h4.root("t") != h4.root("t", b"lora-1") != h4.root("t", b"lora-2")
    assert h4.root("t") != h8.root("t")


def test_as_token_array_validation() -> None:
    assert as_token_array(np.arange(3, dtype=np.int64)).dtype == np.int32
    assert as_token_array([]).shape == (0,)
    with pytest.raises(ValueError, match="id 2147483648, outside int32"):
        as_token_array([1, 2**31])
    with pytest.raises(ValueError, match="outside int32"):
        as_token_array([1, 2**80])
    with pytest.raises(TypeError, match=r"got float 1\.5"):
        as_token_array([1, 1.5])
    with pytest.raises(TypeError, match="must be 1-D"):
        as_token_array(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(TypeError, match="got str"):
        as_token_array("abc")
    with pytest.raises(TypeError, match="dtype float32"):
        as_token_array(np.zeros(3, dtype=np.float32))


def test_bad_hasher_config() -> None:
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        BlockHasher(block_size=0)
    with pytest.raises(ValueError, match=r"secret must be 1\.\.64 bytes"):
        BlockHasher(block_size=4, secret=b"")
