"""pagedkv.integrations: other people's models on pagedkv (above `serving`).

`pagedkv.integrations.hf_model` registers the `"pagedkv"` attention implementation with
Hugging Face `transformers` and wraps a `*ForCausalLM` as an engine model
(`PagedCausalLM`); `PagedLM` (`pagedkv.integrations.session`) drives one synchronously
with sessions, pinning, offload and the prefix cache. Both need the `hf` extra
(`pip install pagedkv[hf]`); importing this package does not import transformers.
"""

from __future__ import annotations
