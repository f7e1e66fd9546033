"""LlamaModel's boundary checks: they raise before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedkv.model.config import LlamaConfig
from pagedkv.model.forward_batch import ForwardBatch, SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.tiers.kv_store import KVStore

CFG = LlamaConfig.tiny(max_position=16)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return init_random(CFG, seed=0)


def batch(num_tokens: int = 5) -> ForwardBatch:
    return build_forward_batch([SeqChunk([0, 1, 2, 3, 4], 0, [1] * num_tokens)], block_size=4)


def test_forward_shapes(model: LlamaModel) -> None:
    store = KVStore(CFG.kv_spec(4), 8, fill=float("nan"))
    logits = model(batch(), store)
    assert logits.shape == (1, CFG.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("spec_changes", "match"),
    [
        (
            {"num_layers": 3},
            r"\(num_layers, num_kv_heads, head_dim, dtype\) = \(2, 2, 16, 'float32'\)",
        ),
        ({"num_kv_heads": 4}, r"got \(2, 4, 16, 'float32'\)"),
        ({"dtype": "bfloat16"}, r"got \(2, 2, 16, 'bfloat16'\)"),
    ],
)
def test_mismatched_store_raises_and_writes_nothing(
    model: LlamaModel, spec_changes: dict[str, object], match: str
) -> None:
    store = KVStore(dataclasses.replace(CFG.kv_spec(4), **spec_changes), 8, fill=0.0)
    with pytest.raises(ValueError, match=match):
        model(batch(), store)
    assert (store.kv == 0).all()


def test_other_errors(model: LlamaModel) -> None:
    store = KVStore(CFG.kv_spec(4), 8, fill=0.0)
    with pytest.raises(TypeError, match="batch must be a ForwardBatch"):
        model({"input_ids": [1]}, store)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_seq_len=17 exceeds the model's max_position=16"):
        model(batch(17), store)
    with pytest.raises(TypeError, match="LlamaModel needs a LlamaConfig, got dict"):
        LlamaModel({"hidden_size": 8})  # type: ignore[arg-type]
    assert (store.kv == 0).all()


def test_casting_a_built_model_is_refused() -> None:
    """`.to(dtype)` would also cast the fp32 rotary frequencies; build with the dtype instead."""
    cast = init_random(CFG, seed=0).to(torch.float16)
    store = KVStore(CFG.kv_spec(4), 8)
    with pytest.raises(ValueError, match=r"weights must be torch\.float32 and inv_freq float32"):
        cast(batch(), store)
