"""`pagedkv serve`: the Responses API server (WebSocket + HTTP) on a built-in model.

    pagedkv serve                         # demo model, random weights, 127.0.0.1:8000
    pagedkv serve --model llama_1b --device cuda --gpu-memory-fraction 0.5
    pagedkv serve --checkpoint ./Llama-3.2-1B --device cuda

Clients: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`, then
`client.responses.connect()` or `client.responses.create(...)`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

PRESETS = ("tiny", "demo", "llama_1b")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model and device options shared by `serve`, `demo` and the benchmark."""
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=PRESETS, default="demo",
                   help="built-in preset with seeded random weights (default: demo, ~3M params)")  # fmt: skip
    g.add_argument("--checkpoint", default=None,
                   help="a Hugging Face Llama checkpoint directory instead of a preset")  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="override the preset's dtype")  # fmt: skip
    g.add_argument("--max-position", type=int, default=None,
                   help="override the preset's context length (rotary works at any length)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="weights and sampling seed")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """KV pool, batching and scheduler options."""
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="device pool blocks (default: 4096 on CPU; on CUDA from "
                        "--gpu-memory-fraction)")  # fmt: skip
    g.add_argument("--gpu-memory-fraction", type=float, default=0.5,
                   help="CUDA: fraction of free memory for the KV pool (default 0.5)")  # fmt: skip
    g.add_argument("--num-host-blocks", type=int, default=None,
                   help="host tier blocks (default: 2x the device pool; 0: no host tier)")  # fmt: skip
    g.add_argument("--max-batch-tokens", type=int, default=None,
                   help="new tokens per forward step (default 512 CPU, 8192 CUDA)")  # fmt: skip
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="new tokens of one sequence per step (default: --max-batch-tokens)")  # fmt: skip
    g.add_argument("--max-pinned-sessions", type=int, default=64)
    g.add_argument("--max-queue", type=int, default=256)
    g.add_argument("--queue-timeout", type=float, default=30.0, help="seconds")
    g.add_argument("--idle-ttl", type=float, default=None,
                   help="offload sessions idle this long (seconds; default: only under pressure)")  # fmt: skip
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="switch the content-hash prefix cache off (pure stateless HTTP)")  # fmt: skip


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the Responses API server (WebSocket mode + HTTP)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name reported")
    p.add_argument("--max-output-tokens", type=int, default=16,
                   help="default when a request sets none (default 16)")  # fmt: skip
    p.add_argument("--max-connection-age", type=float, default=3600.0,
                   help="seconds before websocket_connection_limit_reached (default 3600)")  # fmt: skip
    p.add_argument("--max-queued-responses", type=int, default=32,
                   help="responses one WebSocket connection may queue behind its running "
                   "one; more are refused (default 32)")  # fmt: skip
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=("critical", "error", "warning", "info", "debug", "trace"))  # fmt: skip
    p.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help='JSON {"keys": [{"key": ..., "tenant": ..., "admin": false}]}: API '
                   "keys and their tenants; other keys get 401 (also PAGEDKV_API_KEYS="
                   "key=tenant,...). Without keys each bearer token is its own tenant")  # fmt: skip
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="the key that opens /v1/engine/stats (prefer PAGEDKV_ADMIN_KEY: "
                   "a command line is visible to other local users)")  # fmt: skip
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=run)
    return p


def build_model_from_args(args: argparse.Namespace, *, min_position: int = 0) -> Any:
    """The model the model options describe (threads set first)."""
    import torch

    from pagedkv.serving.factory import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {}
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.checkpoint is None:
        from pagedkv.model.config import LlamaConfig

        preset_max = LlamaConfig.from_preset(args.model).max_position
        max_position = max(args.max_position or preset_max, min_position)
        if max_position != preset_max:
            overrides["max_position"] = max_position
    return build_model(args.model, checkpoint=args.checkpoint, device=args.device,
                       seed=args.seed, **overrides)  # fmt: skip


def engine_config_from_args(args: argparse.Namespace, model: Any, **changes: Any) -> Any:
    """The `EngineConfig` the engine options describe, for `model`."""
    import torch

    from pagedkv.scheduler.config import SchedulerConfig
    from pagedkv.serving.engine_types import EngineConfig

    cuda = torch.device(args.device).type == "cuda"
    num_gpu = args.num_gpu_blocks
    if num_gpu is None:
        if cuda:
            free, _total = torch.cuda.mem_get_info(torch.device(args.device))
            spec = model.config.kv_spec(args.block_size)
            num_gpu = max(spec.num_blocks_in(int(free * args.gpu_memory_fraction)), 1)
        else:
            num_gpu = 4096
    num_host = 2 * num_gpu if args.num_host_blocks is None else args.num_host_blocks
    batch = args.max_batch_tokens or (8192 if cuda else 512)
    sched = SchedulerConfig(
        max_pinned_sessions=args.max_pinned_sessions,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout,
        idle_ttl_s=args.idle_ttl,
        reuse_prefix=not getattr(args, "no_prefix_cache", False),
        backup_idle=True,  # with a host tier: idle sessions' blocks written back early
    )
    fields: dict[str, Any] = dict(
        block_size=args.block_size,
        num_gpu_blocks=num_gpu,
        num_host_blocks=num_host,
        max_batch_tokens=batch,
        prefill_chunk_tokens=args.prefill_chunk or batch,
        scheduler=sched,
        device=str(model.device),  # "cuda:0", as the model reports it (not bare "cuda")
        seed=args.seed,
    )
    fields.update(changes)
    return EngineConfig(**fields)


def run(args: argparse.Namespace) -> int:
    """Build the model and engine, then serve until interrupted. Returns the exit code."""
    import uvicorn

    from pagedkv.cli.main import UsageError
    from pagedkv.serving.auth import load_authenticator
    from pagedkv.serving.engine import Engine
    from pagedkv.serving.local_server import ws_protocol
    from pagedkv.serving.response_run import ServerConfig
    from pagedkv.serving.server import create_app

    # uvicorn's "trace" is below Python logging's DEBUG
    py_level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=py_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        auth = load_authenticator(args.api_keys_file, admin_key=args.admin_key)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model = build_model_from_args(args)
    config = engine_config_from_args(args, model)
    engine = Engine(model, config)
    name = args.served_model_name or (args.checkpoint or args.model)
    server = ServerConfig(
        model_name=str(name),
        default_max_output_tokens=args.max_output_tokens,
        max_connection_age_s=args.max_connection_age,
        max_queued_responses=args.max_queued_responses,
    )
    cfg = model.config
    print(
        f"pagedkv serve: {name} ({cfg.num_params / 1e6:.1f} M params, {cfg.dtype}, "
        f"{args.device}), KV pool {config.num_gpu_blocks} blocks of {config.block_size} + "
        f"host {config.num_host_blocks}, prefix cache {'off' if args.no_prefix_cache else 'on'}"
    )
    print(f"  WebSocket ws://{args.host}:{args.port}/v1/responses, HTTP POST same path")
    if auth.requires_keys:
        tenants = len({c.tenant for c in auth.keys.values()})
        print(f"  {len(auth.keys)} API keys, {tenants} tenants; other keys get 401")
    else:
        print("  no API keys configured: each bearer token is its own tenant (caches never "
              "shared between tokens), requests without one share the anonymous tenant")  # fmt: skip
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"  warning: listening on {args.host} without API keys: anyone who can "
                  "reach the port can use the server (--api-keys-file)")  # fmt: skip
    print(f"  /v1/engine/stats: {'admin key' if auth.has_admin else 'closed (no admin key)'}")
    uvicorn.run(
        create_app(engine, server, auth=auth),
        host=args.host,
        port=args.port,
        ws=ws_protocol(),
        ws_max_size=2 * server.max_message_bytes,
        log_level=args.log_level.lower(),
    )
    return 0
