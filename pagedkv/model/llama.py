"""A Llama-style decoder whose attention reads and writes a block-paged KV cache.

RMSNorm, rotary embeddings (optionally Llama 3 scaled), grouped-query attention, SwiGLU
MLP, tied or untied LM head: the math and the parameter names of Hugging Face's
`LlamaForCausalLM`, so its state dict (and its safetensors files, see `pagedkv.model.weights`)
load as they are. Attention goes through `kernels`: each layer writes the new tokens' K/V
with `store_kv`, then runs `paged_decode` when every sequence has one new token and
`paged_prefill` otherwise (chunked prefill, new turns on a cached prefix, and decodes
mixed in one batch). The model knows no sessions or pools: it reads a `ForwardBatch`.

Decode is CUDA-graph friendly in spirit: given the batch size every shape is fixed, and
nothing in the forward pass reads a device tensor on the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pagedkv.kernels import paged_decode, paged_prefill, store_kv
from pagedkv.model.config import Llama3RopeScaling, LlamaConfig
from pagedkv.model.forward_batch import ForwardBatch
from pagedkv.model.protocol import check_kv_store
from pagedkv.tiers.kv_store import KVStore


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies, fp32 `[head_dim // 2]`, Llama 3 scaled if configured.

    The same fp32 arithmetic as transformers' `rope_type` "default" and "llama3".
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # [D / 2]
    rs: Llama3RopeScaling | None = config.rope_scaling
    if rs is None:
        return inv_freq
    low_freq_wavelen = rs.original_max_position / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[T, 1, head_dim]` of `dtype` for int64 `positions` `[T]`.

    Computed in fp32 per call (no table: one tiny outer product, and no table sized by
    `max_position` to keep on the device); the halves repeat, as in the "rotate half"
    convention of Hugging Face Llama checkpoints.
    """
    freqs = positions[:, None].float() * inv_freq[None, :]  # [T, D / 2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[T, H, D]` by the angles of cos/sin `[T, 1, D]` ("rotate half")."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, H, D]
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, normalised in fp32, returned in x's dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    """GQA self-attention over the paged cache of one layer."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.q_proj = nn.Linear(h, config.q_size, bias=False)
        self.k_proj = nn.Linear(h, config.kv_size, bias=False)
        self.v_proj = nn.Linear(h, config.kv_size, bias=False)
        self.o_proj = nn.Linear(config.q_size, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x `[T, hidden]` -> `[T, hidden]`; writes the T new tokens' K/V into the cache."""
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        if batch.is_decode:  # T == B: one query row per sequence
            out = paged_decode(
                q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                scale=self.scale, max_seq_len=batch.max_seq_len,
            )  # fmt: skip
        else:
            out = paged_prefill(
                q, k_cache, v_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens,
                scale=self.scale, max_query_len=batch.max_query_len,
            )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        y: torch.Tensor = self.o_proj(out.view(num_tokens, self.num_heads * self.head_dim))
        return y  # [T, hidden]


class LlamaMLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache)
        y: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return y


class LlamaDecoder(nn.Module):
    """Embeddings, the layers and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """A Llama-style causal LM over a paged KV cache.

    Parameter names are Hugging Face's (`model.embed_tokens.weight`,
    `model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`,
    `lm_head.weight`); with `tie_word_embeddings` the LM head is the embedding matrix.
    Build one with `init_random` or `pagedkv.model.weights.load_safetensors`.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"LlamaModel needs a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.model = LlamaDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def tie_weights(self) -> None:
        """With `tie_word_embeddings`, make the LM head the embedding matrix (one tensor).

        Needed again after `to_empty`, which allocates each module's parameters anew."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """Recompute the fp32 rotary frequencies on the model's device (after `to_empty`,
        or after a `.to(dtype)` cast, which casts buffers too)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.device)

    def check_dtypes(self) -> None:
        """Raise `ValueError` unless the weights are `config.dtype` and the rotary
        frequencies fp32 (casting a built model with `.to(dtype)` breaks both)."""
        weight = self.model.embed_tokens.weight
        if weight.dtype != self.config.torch_dtype or self.inv_freq.dtype != torch.float32:
            raise ValueError(
                f"LlamaModel: weights must be {self.config.torch_dtype} and inv_freq float32, "
                f"got {weight.dtype} and {self.inv_freq.dtype}; build the model with the "
                "dtype in its config (dataclasses.replace on the config) instead of casting it"
            )

    def check_kv_store(self, kv_store: KVStore) -> None:
        """Raise `ValueError` unless `kv_store` has this model's layers, heads, dtype, device."""
        cfg = self.config
        check_kv_store("LlamaModel", cfg, cfg.num_kv_heads, cfg.head_dim, self.device, kv_store)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_store: KVStore) -> torch.Tensor:
        """Run one step: write every new token's K/V, return the last new token's logits.

        Args:
            batch: the step's sequences (see `ForwardBatch`), on the model's device.
            kv_store: the cache, with `config.kv_spec(...)`'s layers, heads and dtype;
                the slots in `batch.slot_mapping` are written in every layer.

        Returns:
            fp32 logits `[B, vocab_size]`, row b for sequence b's last new token.

        Raises:
            TypeError: `batch` is not a ForwardBatch.
            ValueError: the store or the batch does not match the model (shapes, dtype,
                device, a sequence longer than `max_position`).
        """
        if not isinstance(batch, ForwardBatch):
            raise TypeError(f"LlamaModel.forward: batch must be a ForwardBatch, got {type(batch)}")
        self.check_kv_store(kv_store)
        self.check_dtypes()
        if batch.device != self.device:
            raise ValueError(
                f"LlamaModel.forward: batch must be on {self.device}, got {batch.device}"
            )
        if batch.max_seq_len > self.config.max_position:
            raise ValueError(
                f"LlamaModel.forward: max_seq_len={batch.max_seq_len} exceeds the model's "
                f"max_position={self.config.max_position}"
            )
        dtype = self.config.torch_dtype
        x = self.model.embed_tokens(batch.input_ids)  # [T, hidden]
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, dtype)  # [T, 1, D] each
        wait_layer = batch.wait_layer
        for i, layer in enumerate(self.model.layers):
            if wait_layer is not None:  # a layer-wise restore: layer i's copy first
                wait_layer(i)
            x = layer(x, cos, sin, batch, kv_store.k_cache(i), kv_store.v_cache(i))
        if not batch.is_decode:
            last = batch.query_start_loc[1:].long() - 1  # [B], each sequence's last token
            x = x.index_select(0, last)  # [B, hidden]
        logits: torch.Tensor = self.lm_head(self.model.norm(x)).float()  # [B, vocab]
        return logits


def init_random(
    config: LlamaConfig, seed: int = 0, *, device: str | torch.device = "cpu"
) -> LlamaModel:
    """A model with seeded random weights, identical for a seed on any device.

    Weights are drawn on the CPU in fp32 (one parameter at a time, so a 1B model never
    needs a second full fp32 copy), then cast to `config.dtype` on `device`. Projections
    are N(0, 1/fan_in) so activations stay O(1) through the layers, embeddings N(0, 1),
    norm weights 1 + N(0, 0.1^2) (not all ones, so a missed norm weight shows in tests).
    """
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device=device).to(config.torch_dtype)
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            elif name.endswith("embed_tokens.weight"):
                values = torch.randn(param.shape, generator=gen)
            else:
                values = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1])
            param.copy_(values)
    model.reset_rope()
    return model.eval()
