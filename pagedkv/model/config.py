"""LlamaConfig: the shape of a Llama-style decoder, its presets, and the Hugging Face mapping.

The model runner (`pagedkv.model.llama`) is built from one of these. Presets: `tiny` (CPU tests,
a byte tokenizer fits its vocab), `demo` (a few M parameters, CPU serving) and `llama_1b`
(Llama-3.2-1B shapes, GPU benchmarks). `to_hf_dict` / `from_hf_dict` map to and from a
Hugging Face `config.json` for `LlamaForCausalLM`, so real checkpoints load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pagedkv.cache.spec import KVSpec

# dtype names a model computes in (a subset of KVSpec's, which also stores fp8)
MODEL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _check_int(owner: str, name: str, value: object, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def _check_float(owner: str, name: str, value: object, *, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= minimum:
        raise ValueError(f"{owner}.{name} must be finite and > {minimum}, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Llama3RopeScaling:
    """Llama 3.1-style rotary frequency scaling (Hugging Face `rope_type="llama3"`).

    Wavelengths longer than `original_max_position / low_freq_factor` are stretched by
    `factor`, those shorter than `original_max_position / high_freq_factor` are kept, and
    the band between is interpolated.

    Raises:
        TypeError, ValueError: a field of the wrong type, `factor < 1`, or
            `high_freq_factor <= low_freq_factor`.
    """

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        owner = "Llama3RopeScaling"
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_float(owner, name, getattr(self, name))
        _check_int(owner, "original_max_position", self.original_max_position)
        if self.factor < 1.0:
            raise ValueError(f"{owner}.factor must be >= 1, got {self.factor}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"{owner}: high_freq_factor must be > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a decoder-only Llama-style transformer.

    RMSNorm, rotary embeddings (optionally Llama 3 scaled), grouped-query attention with
    `num_heads` query heads sharing `num_kv_heads` K/V heads of `head_dim`, SwiGLU MLP,
    and an LM head tied to the embeddings or not. No biases.

    Invariants: `num_heads % num_kv_heads == 0`; `head_dim` is even (rotary pairs).

    Raises:
        TypeError, ValueError: a field of the wrong type, a non-positive size, heads that
            do not group, an odd head_dim, or an unknown dtype name.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position: int = 4096
    dtype: str = "float32"
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        owner = "LlamaConfig"
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position",
        ):
            _check_int(owner, name, getattr(self, name))
        _check_float(owner, "rope_theta", self.rope_theta)
        _check_float(owner, "rms_norm_eps", self.rms_norm_eps)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: num_heads must be a multiple of num_kv_heads, got "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"{owner}.head_dim must be even (rotary pairs), got {self.head_dim}")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(
                f"{owner}.dtype must be one of {sorted(MODEL_DTYPES)}, got {self.dtype!r}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(
                f"{owner}.tie_word_embeddings must be a bool, got "
                f"{type(self.tie_word_embeddings).__name__}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise TypeError(
                f"{owner}.rope_scaling must be a Llama3RopeScaling or None, got "
                f"{type(self.rope_scaling).__name__}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of weights, activations and the KV cache."""
        return MODEL_DTYPES[self.dtype]

    @property
    def group_size(self) -> int:
        """Query heads per K/V head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        """Width of the query projection, `num_heads * head_dim`."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) projection, `num_kv_heads * head_dim`."""
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count (a tied LM head counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_size * 2 + h * self.kv_size * 2
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    def kv_spec(self, block_size: int = 16) -> KVSpec:
        """The KV cache shape for this model with `block_size` positions per block."""
        return KVSpec(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            block_size=block_size,
        )

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """2 layers, hidden 64, 4 heads over 2 KV heads of 16, vocab 288 (byte tokenizer
        fits), fp32: for CPU tests and CI (~0.1 M parameters)."""
        base: dict[str, Any] = dict(
            vocab_size=288,
            hidden_size=64,
            intermediate_size=160,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            max_position=2048,
            dtype="float32",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def demo(cls, **overrides: Any) -> LlamaConfig:
        """4 layers, hidden 256, 4 heads over 2 KV heads of 64, vocab 288, tied head, fp32:
        a ~3.2 M parameter model for serving demos on a CPU."""
        base: dict[str, Any] = dict(
            vocab_size=288,
            hidden_size=256,
            intermediate_size=768,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            rope_theta=10000.0,
            max_position=8192,
            dtype="float32",
            tie_word_embeddings=True,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def llama_1b(cls, **overrides: Any) -> LlamaConfig:
        """Llama-3.2-1B shapes (16 layers, hidden 2048, 32 heads over 8 KV heads of 64,
        vocab 128256, llama3 rope scaling, tied head), bf16: for GPU benchmarks."""
        base: dict[str, Any] = dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            rope_theta=500000.0,
            rope_scaling=Llama3RopeScaling(),
            max_position=131072,
            dtype="bfloat16",
            tie_word_embeddings=True,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """One of the presets by name: "tiny", "demo" or "llama_1b".

        Raises:
            ValueError: an unknown name.
        """
        presets = {"tiny": cls.tiny, "demo": cls.demo, "llama_1b": cls.llama_1b}
        if name not in presets:
            raise ValueError(
                f"unknown LlamaConfig preset {name!r}; expected one of {sorted(presets)}"
            )
        return presets[name](**overrides)

    # ------------------------------------------------------------------ Hugging Face
    def to_hf_dict(self) -> dict[str, Any]:
        """This config as a Hugging Face `config.json` dict for `LlamaForCausalLM`.

        Written in the long-standing layout (`rope_theta`, `rope_scaling`, `torch_dtype`)
        of the checkpoints on the Hub, which transformers 4.x and 5.x both read.
        """
        rope_scaling = None
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            rope_scaling = {
                "rope_type": "llama3",
                "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.dtype,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, dtype: str | None = None) -> LlamaConfig:
        """A config from a Hugging Face Llama `config.json` dict (transformers 4.x layout
        with `rope_theta`/`rope_scaling`, or 5.x with `rope_parameters`).

        `dtype` overrides the checkpoint's `torch_dtype`/`dtype` (default float32 if absent).
        Keys that do not change the math (token ids, `use_cache`, ...) are ignored.

        Raises:
            ValueError: a required key is missing, or a feature this runner does not
                implement is on (biases, an activation other than SiLU, a rope type other
                than "default"/"llama3", a model type other than "llama").
            TypeError: a value of the wrong type (from the config's own checks).
        """
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"from_hf_dict: expected model_type 'llama', got {model_type!r}")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if key in hf and hf[key] != ok:
                raise ValueError(f"from_hf_dict: only {key}={ok!r} is supported, got {hf[key]!r}")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"from_hf_dict: missing required keys {missing}")
        num_heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"from_hf_dict: rope_type must be 'default' or 'llama3', got {rope_type!r}"
            )
        scaling = None
        if rope_type == "llama3":
            scaling = Llama3RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position=int(rope["original_max_position_embeddings"]),
            )
        if dtype is None:
            dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position=hf.get("max_position_embeddings", 2048),
            dtype=str(dtype).removeprefix("torch."),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
