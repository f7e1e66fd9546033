"""Build a model and an engine from a preset or a checkpoint (for the CLI, demo, tests)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pagedkv.model.config import LlamaConfig
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import EngineConfig


def build_model(
    preset: str = "demo",
    *,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> LlamaModel:
    """A model: the Hugging Face checkpoint directory `checkpoint` if given, else the
    preset ("tiny", "demo", "llama_1b") with seeded random weights.

    `overrides` change preset fields (e.g. `max_position=32768`, `dtype="float32"`).

    Raises:
        ValueError: an unknown preset, or a bad override (see `LlamaConfig`).
    """
    if checkpoint is not None:
        from pagedkv.model.weights import load_pretrained

        return load_pretrained(checkpoint, device=device, dtype=overrides.get("dtype"))
    config = LlamaConfig.from_preset(preset, **overrides)
    return init_random(config, seed, device=device)


def build_engine(model: LlamaModel, **config: Any) -> Engine:
    """An engine on `model` with `EngineConfig(**config)` (device taken from the model)."""
    base = EngineConfig(device=str(model.device))
    return Engine(model, dataclasses.replace(base, **config))
