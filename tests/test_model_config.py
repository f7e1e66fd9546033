"""LlamaConfig: validation, presets, KV spec, and the Hugging Face config mapping."""

from __future__ import annotations

import dataclasses

import pytest

from pagedkv.model.config import Llama3RopeScaling, LlamaConfig

# config.json of meta-llama/Llama-3.2-1B as published on the Hub (transformers 4.x layout).
LLAMA_3_2_1B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


@pytest.mark.parametrize("name", ["tiny", "demo", "llama_1b"])
def test_presets_are_valid_and_round_trip_through_hf_dict(name: str) -> None:
    cfg = LlamaConfig.from_preset(name)
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_preset_sizes() -> None:
    assert LlamaConfig.tiny().vocab_size >= 272  # the byte tokenizer fits
    assert 2e6 < LlamaConfig.demo().num_params < 6e6
    assert 1.2e9 < LlamaConfig.llama_1b().num_params < 1.3e9  # Llama-3.2-1B: 1.24 B
    assert LlamaConfig.tiny(num_layers=3).num_layers == 3


def test_llama_3_2_1b_config_json_gives_the_1b_preset() -> None:
    assert LlamaConfig.from_hf_dict(LLAMA_3_2_1B_CONFIG) == LlamaConfig.llama_1b()
    assert LlamaConfig.from_hf_dict(LLAMA_3_2_1B_CONFIG, dtype="float32").dtype == "float32"


def test_transformers_reads_and_writes_our_dict() -> None:
    """transformers (5.x writes `rope_parameters`) reads our dict and its own dump maps back."""
    import transformers

    for cfg in (LlamaConfig.tiny(), LlamaConfig.llama_1b()):
        hf = transformers.LlamaConfig(**cfg.to_hf_dict())
        assert hf.num_key_value_heads == cfg.num_kv_heads and hf.head_dim == cfg.head_dim
        assert LlamaConfig.from_hf_dict(hf.to_dict(), dtype=cfg.dtype) == cfg


def test_kv_spec() -> None:
    spec = LlamaConfig.llama_1b().kv_spec(16)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (16, 8, 64)
    assert (spec.dtype, spec.block_size) == ("bfloat16", 16)
    assert spec.bytes_per_token == 32768  # 2 * 16 layers * 8 heads * 64 * 2 bytes


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"hidden_size": 0}, ValueError, "hidden_size must be >= 1, got 0"),
        ({"num_layers": 2.0}, TypeError, "num_layers must be an int, got float"),
        ({"vocab_size": True}, TypeError, "vocab_size must be an int, got bool"),
        ({"num_heads": 6, "num_kv_heads": 4}, ValueError, "num_heads=6, num_kv_heads=4"),
        ({"head_dim": 15}, ValueError, "head_dim must be even"),
        ({"dtype": "fp8"}, ValueError, "dtype must be one of"),
        ({"rope_theta": 0.0}, ValueError, "rope_theta must be finite and > 0"),
        ({"rms_norm_eps": float("nan")}, ValueError, "rms_norm_eps must be finite"),
        ({"tie_word_embeddings": 1}, TypeError, "tie_word_embeddings must be a bool"),
        ({"rope_scaling": {"factor": 8.0}}, TypeError, "rope_scaling must be a Llama3RopeScaling"),
    ],
)
def test_invalid_fields_raise(changes: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        dataclasses.replace(LlamaConfig.tiny(), **changes)


def test_rope_scaling_validation() -> None:
    with pytest.raises(ValueError, match="factor must be >= 1"):
        Llama3RopeScaling(factor=0.5)
    with pytest.raises(ValueError, match="high_freq_factor must be > low_freq_factor"):
        Llama3RopeScaling(low_freq_factor=4.0, high_freq_factor=4.0)
    with pytest.raises(TypeError, match="original_max_position must be an int"):
        Llama3RopeScaling(original_max_position=8192.0)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        LlamaConfig.tiny().hidden_size = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_type": "mistral"}, "model_type 'llama'"),
        ({"hidden_act": "gelu"}, "hidden_act='silu'"),
        ({"attention_bias": True}, "attention_bias=False"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type must be"),
        ({"vocab_size": None}, "missing required keys"),
    ],
)
def test_unsupported_hf_configs_raise(changes: dict[str, object], match: str) -> None:
    hf = {**LLAMA_3_2_1B_CONFIG, **changes}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf_dict(hf)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown LlamaConfig preset 'huge'"):
        LlamaConfig.from_preset("huge")
