"""A Hugging Face `transformers` decoder on pagedkv's paged pool and kernels.

Importing this module registers the attention implementation `"pagedkv"` with
`transformers.AttentionInterface`, so

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="pagedkv")
    lm = PagedCausalLM(model)

gives an engine-ready model: `lm(batch, kv_store)` runs one continuous-batching step (any
mix of prefills, chunks of them, new turns on a cached prefix and decodes) through the
model's own embeddings, projections, rotary embedding, norms and MLP, with every
attention layer writing the new tokens' K/V into the block pool (`kernels.store_kv`) and
reading it back through `kernels.paged_prefill` / `kernels.paged_decode`. The pool,
sessions, pinning, offload and the prefix cache are `pagedkv.serving.Engine`'s, as for
the built-in model.

How the step reaches the attention function: the packed step is one "batch row" of T
tokens (`input_ids [1, T]`, `position_ids [1, T]`), `use_cache=False`, and the step's
`ForwardBatch` and `KVStore` ride in the keyword `pagedkv=` that transformers passes
through every layer to the attention function (the mechanism its own continuous batching
uses). The masking utilities build no mask for a registered implementation they do not
know, so no `[T, T]` mask is ever made; causality comes from the kernels.

What is refused, naming the feature (`UnsupportedModelError`), rather than run wrong:
sliding-window layers whose window is shorter than the context, mixed layer types,
attention logit soft-capping, attention sinks, chunked attention, separate key and value
head sizes (MLA), encoder-decoder and non-causal models, and a step run without the
`pagedkv=` context (a plain `model(...)` or `generate()` call on a model loaded with
`attn_implementation="pagedkv"`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagedkv.cache.spec import KVSpec
from pagedkv.kernels import paged_decode, paged_prefill, store_kv
from pagedkv.model.forward_batch import ForwardBatch
from pagedkv.model.protocol import check_kv_store
from pagedkv.tiers.kv_store import TORCH_DTYPES, KVStore

ATTN_IMPLEMENTATION = "pagedkv"

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class UnsupportedModelError(ValueError):
    """The model uses an attention feature pagedkv does not implement (named in the
    message); running it on the paged kernels would be silently wrong."""


@dataclass(slots=True)
class PagedStep:
    """What one forward step's attention layers read: the packed batch and the pool;
    `layers` records which layers ran (each must run exactly once per step)."""

    batch: ForwardBatch
    kv_store: KVStore
    layers: set[int] = field(default_factory=set)


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `"pagedkv"` attention function (transformers' attention-interface signature).

    Args:
        module: the model's attention module (its `layer_idx` picks the pool's layer).
        query: `[1, Hq, T, D]`; key, value: `[1, Hkv, T, D]`, the step's new tokens
            after the rotary embedding.
        attention_mask: ignored (None for a registered implementation; causality and
            sequence boundaries come from the step's `ForwardBatch`).
        scaling: the softmax scale the model declares (default `1/sqrt(D)`).
        sliding_window, softcap: refused unless they cannot change the result.
        kwargs: must hold `pagedkv=PagedStep(...)`; `s_aux` (attention sinks) is refused.

    Returns:
        (`[1, T, Hq, D]` in query's dtype, None): no attention weights.

    Raises:
        UnsupportedModelError: no `pagedkv=` step (a call outside `PagedCausalLM`), or a
            feature the kernels do not implement.
    """
    step = kwargs.get("pagedkv")
    if not isinstance(step, PagedStep):
        raise UnsupportedModelError(
            "attn_implementation='pagedkv' runs inside pagedkv's runner: wrap the model "
            "with pagedkv.integrations.PagedCausalLM and drive it through its Engine (or "
            "PagedLM); a plain forward or generate() call has no paged pool to attend over"
        )
    batch = step.batch
    if sliding_window is not None and sliding_window < batch.max_seq_len:
        raise UnsupportedModelError(
            f"sliding-window attention (window {sliding_window} < sequence length "
            f"{batch.max_seq_len}) is not supported by pagedkv's kernels"
        )
    if softcap is not None:
        raise UnsupportedModelError("attention logit soft-capping is not supported")
    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError("attention sinks (s_aux) are not supported")
    if dropout and module.training:
        raise UnsupportedModelError("attention dropout in training mode is not supported")
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise UnsupportedModelError(
            f"{type(module).__name__} has no integer layer_idx to pick its cache layer"
        )
    if layer in step.layers:  # a second call would overwrite the layer's stored K/V
        raise UnsupportedModelError(
            f"{type(module).__name__} calls attention twice for layer {layer} in one step "
            "(differential or cross attention) and is not supported by pagedkv"
        )
    step.layers.add(layer)
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(
            f"pagedkv attention: query must be [1, Hq, T, D] (one packed row), got "
            f"{tuple(query.shape)}"
        )
    if batch.wait_layer is not None:  # a layer-wise restore: this layer's copy first
        batch.wait_layer(layer)
    kv = step.kv_store
    k_cache, v_cache = kv.k_cache(layer), kv.v_cache(layer)
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1).to(k_cache.dtype).contiguous()  # [T, Hkv, D]
    v = value[0].transpose(0, 1).to(v_cache.dtype).contiguous()
    store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if batch.is_decode:
        out = paged_decode(
            q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
            scale=scale, max_seq_len=batch.max_seq_len,
        )  # fmt: skip
    else:
        out = paged_prefill(
            q, k_cache, v_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens,
            scale=scale, max_query_len=batch.max_query_len,
        )  # fmt: skip
    assert isinstance(out, torch.Tensor)
    return out[None], None  # [1, T, Hq, D]


def register() -> None:
    """Register `"pagedkv"` with transformers' attention interface (idempotent; done on
    import of this module)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


register()


@dataclass(frozen=True, slots=True)
class HFModelSpec:
    """What the engine and the scheduler need to know of a transformers model.

    Attributes:
        model_type: the config's `model_type` ("llama", "qwen2", ...).
        num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size: the
            architecture (from the config).
        max_position: the context the runner allows (at most the model's
            `max_position_embeddings`, and at most a sliding window if it has one).
        dtype: the weights' dtype name ("float32", "bfloat16", ...).
        num_params: parameter count (for the cost model).
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position: int
    dtype: str
    num_params: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def kv_spec(self, block_size: int = 16) -> KVSpec:
        """The KV cache shape for this model with `block_size` positions per block."""
        return KVSpec(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            block_size=block_size,
        )


# architectures whose attention pagedkv cannot run exactly although their configs look
# plain: named here rather than found out by a wrong answer
_REFUSED_TYPES = {
    "gpt_oss": "attention sinks",
    "llama4": "NoPE temperature tuning over packed positions",
    "llama4_text": "NoPE temperature tuning over packed positions",
    "diffllama": "differential attention (two attention calls per layer)",
}


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def check_supported(config: Any, *, max_position: int | None = None) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of a transformers decoder config, after
    checking that pagedkv runs it exactly; the context is capped to `max_position` (if
    given) before the sliding-window check.

    Raises:
        UnsupportedModelError: a feature pagedkv does not implement, named.
    """
    cfg = _text_config(config)
    name = getattr(cfg, "model_type", type(cfg).__name__)

    def refuse(feature: str, hint: str = "") -> UnsupportedModelError:
        return UnsupportedModelError(f"{name}: {feature} is not supported by pagedkv{hint}")

    if getattr(cfg, "is_encoder_decoder", False):
        raise refuse("an encoder-decoder architecture")
    if name in _REFUSED_TYPES:
        raise refuse(_REFUSED_TYPES[name])
    for attr in ("kv_lora_rank", "q_lora_rank"):
        if getattr(cfg, attr, None):
            raise refuse(f"latent attention ({attr}={getattr(cfg, attr)})")
    v_dim = getattr(cfg, "v_head_dim", None)
    num_heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(num_heads, int) or not isinstance(hidden, int):
        raise refuse("a config without num_attention_heads / hidden_size")
    head_dim = getattr(cfg, "head_dim", None) or hidden // num_heads
    if v_dim is not None and v_dim != head_dim:
        raise refuse(f"a value head size {v_dim} different from the key head size {head_dim}")
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv:
        raise refuse(f"num_attention_heads={num_heads} not a multiple of num_kv_heads={num_kv}")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise refuse(f"attention logit soft-capping (attn_logit_softcapping="
                     f"{cfg.attn_logit_softcapping})")  # fmt: skip
    context = getattr(cfg, "max_position_embeddings", None) or 0
    if max_position is not None:
        context = min(context, max_position) if context else max_position
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk and not (context and context <= chunk):  # a chunk covering the context is full
        raise refuse(f"chunked attention (attention_chunk_size={chunk} < context {context})",
                     f"; pass max_position <= {chunk} to run it as full attention")  # fmt: skip
    layer_types = getattr(cfg, "layer_types", None) or ()
    others = sorted({t for t in layer_types if t != "full_attention"})
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    if others and others != ["sliding_attention"]:
        raise refuse(f"layer types {others}")
    if window is not None and (others or not layer_types) and window < context:
        raise refuse(
            f"sliding-window attention (sliding_window={window} < context {context})",
            f"; pass max_position <= {window} to run it as full attention",
        )
    return num_heads, num_kv, head_dim


class PagedCausalLM:
    """A transformers causal LM as an engine model: `lm(batch, kv_store)` -> logits.

    Args:
        model: a `*ForCausalLM` built or loaded with `attn_implementation="pagedkv"`
            (see `load_pretrained` / `from_config`), in eval mode.
        max_position: cap the context below the model's `max_position_embeddings`.

    Attributes:
        hf: the transformers model; config: its `HFModelSpec`; device.

    Raises:
        UnsupportedModelError: as `check_supported`, or the model was not built with the
            "pagedkv" attention implementation.
    """

    def __init__(self, model: nn.Module, *, max_position: int | None = None) -> None:
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"PagedCausalLM needs a transformers model, got {type(model)}")
        impl = getattr(_text_config(config), "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise UnsupportedModelError(
                f"the model was built with attn_implementation={impl!r}; build it with "
                f"attn_implementation={ATTN_IMPLEMENTATION!r} (or call "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r}))"
            )
        if max_position is not None and max_position < 1:
            raise ValueError(f"max_position must be >= 1, got {max_position}")
        if not getattr(type(model), "_supports_attention_backend", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} computes attention itself (it does not use "
                "transformers' attention interface), so it cannot run on pagedkv"
            )
        if any(hasattr(m, "sinks") for m in model.modules()):
            raise UnsupportedModelError(
                f"{type(model).__name__}: attention sinks are not supported"
            )
        num_heads, num_kv, head_dim = check_supported(config, max_position=max_position)
        cfg = _text_config(config)
        context = int(getattr(cfg, "max_position_embeddings", None) or max_position or 0)
        if max_position is not None:
            context = min(context, max_position) if context else max_position
        if context < 1:
            raise UnsupportedModelError(
                f"{cfg.model_type}: no max_position_embeddings in the config; pass max_position"
            )
        weight = next(model.parameters())
        self.hf = model.eval()
        self.device = weight.device
        self.config = HFModelSpec(
            model_type=str(cfg.model_type),
            num_layers=int(cfg.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            hidden_size=int(cfg.hidden_size),
            vocab_size=int(cfg.vocab_size),
            max_position=context,
            dtype=_DTYPE_NAMES[weight.dtype],
            num_params=sum(p.numel() for p in model.parameters()),
        )

    def check_kv_store(self, kv_store: KVStore) -> None:
        """Raise `ValueError` unless `kv_store` has this model's layers, heads, dtype, device."""
        cfg = self.config
        check_kv_store("PagedCausalLM", cfg, cfg.num_kv_heads, cfg.head_dim, self.device,
                       kv_store)  # fmt: skip

    @torch.inference_mode()
    def __call__(self, batch: ForwardBatch, kv_store: KVStore) -> torch.Tensor:
        """Run one step: write every new token's K/V, return each sequence's last logits.

        Returns:
            fp32 logits `[B, vocab_size]`, row b for sequence b's last new token.

        Raises:
            TypeError, ValueError: the batch or the store does not match the model.
        """
        if not isinstance(batch, ForwardBatch):
            raise TypeError(f"PagedCausalLM: batch must be a ForwardBatch, got {type(batch)}")
        self.check_kv_store(kv_store)
        if batch.device != self.device:
            raise ValueError(f"PagedCausalLM: batch must be on {self.device}, got {batch.device}")
        if batch.max_seq_len > self.config.max_position:
            raise ValueError(
                f"PagedCausalLM: max_seq_len={batch.max_seq_len} exceeds the model's "
                f"max_position={self.config.max_position}"
            )
        impl = getattr(_text_config(self.hf.config), "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:  # e.g. another model built from the same config object
            raise UnsupportedModelError(
                f"the model's attention implementation changed to {impl!r} after it was "
                "wrapped (a config object shared with another model?); it must stay "
                f"{ATTN_IMPLEMENTATION!r}"
            )
        if batch.is_decode:
            last = torch.arange(batch.num_seqs, device=self.device)
        else:
            last = batch.query_start_loc[1:].long() - 1  # [B]
        step = PagedStep(batch, kv_store)
        out = self.hf(
            input_ids=batch.input_ids[None],
            position_ids=batch.positions[None],
            use_cache=False,
            logits_to_keep=last,
            pagedkv=step,
        )
        if len(step.layers) != self.config.num_layers:  # attention that bypassed the pool
            raise UnsupportedModelError(
                f"{self.config.model_type}: {len(step.layers)} of {self.config.num_layers} "
                "layers ran pagedkv's attention in this step; the model computes attention "
                "itself and is not supported"
            )
        logits: torch.Tensor = out.logits[0].float()  # [B, vocab]
        return logits


def from_config(
    config: Any,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_position: int | None = None,
) -> PagedCausalLM:
    """A randomly initialised (seeded) transformers model of `config` on pagedkv."""
    from transformers import AutoModelForCausalLM

    check_supported(config, max_position=max_position)
    config = copy.deepcopy(config)  # from_config writes the attention choice into it
    torch.manual_seed(seed)
    model: nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype or torch.float32
    )
    return PagedCausalLM(model.to(device), max_position=max_position)


def load_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_position: int | None = None,
) -> PagedCausalLM:
    """A local Hugging Face checkpoint directory (config.json + safetensors) on pagedkv.
    Nothing is downloaded (`local_files_only`); the config is checked before the weights
    are read.

    Raises:
        FileNotFoundError: not a directory with a config.json.
        UnsupportedModelError: as `check_supported`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} is not a Hugging Face checkpoint (no config.json)")
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UnsupportedModelError(f"{root}: cannot read the config: {err}") from None
    check_supported(config, max_position=max_position)
    if max_position is None and not getattr(_text_config(config), "max_position_embeddings", None):
        raise UnsupportedModelError(
            f"{getattr(config, 'model_type', '?')}: no max_position_embeddings in the config; "
            "pass max_position"
        )
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(
            root,
            config=config,
            attn_implementation=ATTN_IMPLEMENTATION,
            local_files_only=True,
            dtype=dtype or "auto",
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        # e.g. a class without the attention interface (KeyError 'pagedkv'), bad weights
        raise UnsupportedModelError(
            f"{root}: transformers cannot load it with attn_implementation="
            f"{ATTN_IMPLEMENTATION!r}: {type(err).__name__}: {err}"
        ) from None
    return PagedCausalLM(model.to(device), max_position=max_position)
