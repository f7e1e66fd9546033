"""pagedkv: a block-paged KV cache, Triton paged-attention kernels, a session-pinning
scheduler and a content-hash prefix cache for LLM inference servers.

One import package; each layer imports only those below it:

    pagedkv.cli        `pagedkv demo | serve | simulate` (the only place that parses argv)
    pagedkv.serving    engine, Responses protocol, HTTP/WebSocket server
    pagedkv.model      reference model runner: config, weights, tokenizer, forward batch
    pagedkv.sim        workloads, trace loaders, simulator, policies, reports
    pagedkv.scheduler  sessions, admission, idle-gap model, eviction/offload (no tensors)
    pagedkv.tiers      KV tensors, host tier, transfer engines, TieredKVCache
    pagedkv.cache      block pool, hashing, block tables, KVSpec (no torch)
    pagedkv.kernels    Triton kernels + torch references: tensors in, tensors out

Importing `pagedkv` itself loads nothing; import the layer you use. The version is the
distribution's: `importlib.metadata.version("pagedkv")`.
"""
