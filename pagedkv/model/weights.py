"""Save and load `LlamaModel` weights as safetensors in the Hugging Face Llama layout.

Tensor names are those of transformers' `LlamaForCausalLM` (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`),
so a Hub checkpoint directory (`config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`) loads with `load_pretrained`, and what `save_pretrained`
writes loads in transformers. A tied LM head is written once, as the embeddings (the Hub
convention); its `lm_head.weight`, if a file has one, is ignored.

Needs the optional `safetensors` package.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pagedkv.model.config import LlamaConfig
from pagedkv.model.llama import LlamaModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Keys some checkpoints carry that hold no weights (recomputed here).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pagedkv.model.weights needs the 'safetensors' package: pip install safetensors"
        ) from exc
    return safetensors


def hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, contiguous; a tied LM head omitted."""
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def save_safetensors(
    model: LlamaModel, path: str | Path, *, metadata: dict[str, str] | None = None
) -> None:
    """Write the model's weights to one safetensors file (`{"format": "pt"}` metadata,
    as transformers writes, plus `metadata`)."""
    st = _safetensors()
    tensors = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    st.torch.save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


def _expected_shapes(model: LlamaModel) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _iter_files(paths: list[Path]) -> Iterator[tuple[str, Any]]:
    """(name, lazy file handle) pairs over safetensors files, reading no tensor yet."""
    st = _safetensors()
    for path in paths:
        with st.safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f


def load_weights(model: LlamaModel, paths: str | Path | list[str | Path]) -> None:
    """Copy weights from safetensors file(s) into `model`, casting to its dtype/device.

    Every expected tensor must be present exactly once with the expected shape; keys
    that hold no weights (`*.rotary_emb.inv_freq`) and, for a tied model, `lm_head.weight`
    are skipped. Tensors are read one at a time (a 1B checkpoint never sits in memory
    twice).

    Raises:
        ValueError: missing, unexpected or duplicated tensors, or a shape mismatch; the
            model may then be partly overwritten (all names and shapes are checked before
            the first copy, so this happens only on a read error).
        FileNotFoundError: a file is missing.
    """
    files = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"load_weights: no safetensors file at {p}")
    expected = _expected_shapes(model)
    found: dict[str, tuple[int, ...]] = {}
    duplicated: list[str] = []
    for name, f in _iter_files(files):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name in found:
            duplicated.append(name)
        found[name] = tuple(f.get_slice(name).get_shape())
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad_shapes = [
        f"{n}: {found[n]} != {expected[n]}"
        for n in sorted(expected)
        if n in found and found[n] != expected[n]
    ]
    if missing or unexpected or duplicated or bad_shapes:
        raise ValueError(
            f"load_weights: checkpoint does not match the model: missing={missing[:8]}, "
            f"unexpected={unexpected[:8]}, duplicated={duplicated[:8]}, "
            f"shape mismatches (got != expected)={bad_shapes[:8]}"
        )
    params = model.state_dict()
    with torch.no_grad():
        for name, f in _iter_files(files):
            if name in expected:
                params[name].copy_(f.get_tensor(name))  # casts dtype, moves device


def load_safetensors(
    config: LlamaConfig, paths: str | Path | list[str | Path], *, device: str | torch.device = "cpu"
) -> LlamaModel:
    """Build a model of `config` on `device` (in `config.dtype`) with weights from file(s).

    Raises:
        ValueError, FileNotFoundError: see `load_weights`.
    """
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device=device).to(config.torch_dtype)
    model.tie_weights()
    model.reset_rope()
    load_weights(model, paths)
    return model.eval()


def save_pretrained(model: LlamaModel, directory: str | Path) -> None:
    """Write `config.json` and `model.safetensors` into `directory` (created if needed),
    a layout transformers' `LlamaForCausalLM.from_pretrained` reads."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    save_safetensors(model, out / WEIGHTS_NAME)


def load_pretrained(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: str | None = None
) -> LlamaModel:
    """Load a Hugging Face Llama checkpoint directory: `config.json` and either
    `model.safetensors` or the shards named in `model.safetensors.index.json`.

    `dtype` overrides the checkpoint's dtype (e.g. "float32" on a CPU).

    Raises:
        FileNotFoundError: no config or no weights in `directory`.
        ValueError: an unsupported config or mismatched weights (see `from_hf_dict`,
            `load_weights`).
    """
    root = Path(directory)
    if not (root / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"load_pretrained: no {CONFIG_NAME} in {root}")
    config = LlamaConfig.from_hf_dict(json.loads((root / CONFIG_NAME).read_text()), dtype=dtype)
    if (root / INDEX_NAME).is_file():
        weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
        paths: list[str | Path] = [root / name for name in sorted(set(weight_map.values()))]
    elif (root / WEIGHTS_NAME).is_file():
        paths = [root / WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"load_pretrained: neither {WEIGHTS_NAME} nor {INDEX_NAME} in {root}"
        )
    return load_safetensors(config, paths, device=device)
