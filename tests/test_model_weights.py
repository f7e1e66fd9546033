"""Weights: safetensors round trips in the Hugging Face layout, and load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from pagedkv.model.config import LlamaConfig
from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.model.weights import (
    hf_state_dict,
    load_pretrained,
    load_safetensors,
    load_weights,
    save_pretrained,
    save_safetensors,
)
from pagedkv.tiers.kv_store import KVStore


def logits_of(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    store = KVStore(model.config.kv_spec(4), 16, fill=float("nan"))
    chunk = SeqChunk(list(range(-(-len(ids) // 4))), 0, ids)
    return model(build_forward_batch([chunk], block_size=4), store)


IDS = [5, 17, 200, 3, 3, 99, 271, 0, 42]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip(tmp_path: Path, tie: bool) -> None:
    model = init_random(LlamaConfig.tiny(tie_word_embeddings=tie), seed=5)
    path = tmp_path / "model.safetensors"
    save_safetensors(model, path)
    with st.safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        assert f.metadata()["format"] == "pt"
    assert ("lm_head.weight" in names) is not tie  # the Hub omits a tied head
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= names
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    loaded = load_safetensors(model.config, path)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie
    assert torch.equal(logits_of(loaded, IDS), logits_of(model, IDS))


def test_same_seed_same_weights_other_seed_differs() -> None:
    cfg = LlamaConfig.tiny()
    a, b, c = init_random(cfg, seed=1), init_random(cfg, seed=1), init_random(cfg, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_load_casts_to_config_dtype(tmp_path: Path) -> None:
    model = init_random(LlamaConfig.tiny(), seed=6)
    save_safetensors(model, tmp_path / "w.safetensors")
    half = load_safetensors(LlamaConfig.tiny(dtype="bfloat16"), tmp_path / "w.safetensors")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.inv_freq.dtype == torch.float32


def test_pretrained_directory_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = init_random(LlamaConfig.tiny(tie_word_embeddings=True), seed=7)
    save_pretrained(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    hf = hf.float().eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([IDS])).logits[0, -1]
    torch.testing.assert_close(logits_of(model, IDS)[0], ref, atol=1e-4, rtol=1e-4)
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    assert torch.equal(logits_of(again, IDS), logits_of(model, IDS))


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    model = init_random(LlamaConfig.tiny(), seed=8)
    tensors = hf_state_dict(model)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in shards.items():
        st.save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    loaded = load_pretrained(tmp_path)
    assert torch.equal(logits_of(loaded, IDS), logits_of(model, IDS))


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad.safetensors"
    st.save_file(tensors, str(path))
    return path


def test_load_errors(tmp_path: Path) -> None:
    model = init_random(LlamaConfig.tiny(), seed=9)
    good = hf_state_dict(model)
    target = init_random(LlamaConfig.tiny(), seed=10)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"missing=\['model.norm.weight'\]"):
        load_weights(target, _write(tmp_path, missing))
    with pytest.raises(ValueError, match=r"unexpected=\['model.extra'\]"):
        load_weights(target, _write(tmp_path, {**good, "model.extra": torch.zeros(1)}))
    wrong = {**good, "model.norm.weight": torch.zeros(63)}
    with pytest.raises(ValueError, match=r"model.norm.weight: \(63,\) != \(64,\)"):
        load_weights(target, _write(tmp_path, wrong))
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        load_weights(target, tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_pretrained(tmp_path / "empty")
    # a refused load changed nothing
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_extra_keys_that_hold_no_weights_are_ignored(tmp_path: Path) -> None:
    model = init_random(LlamaConfig.tiny(tie_word_embeddings=True), seed=11)
    tensors = {
        **hf_state_dict(model),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "lm_head.weight": torch.zeros(288, 64),  # a tied head written anyway: ignored
    }
    loaded = load_safetensors(model.config, _write(tmp_path, tensors))
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
