"""`pagedkv serve`: the Responses API server (WebSocket + HTTP) on a built-in model.

    pagedkv serve                         # demo model, random weights, 127.0.0.1:8000
    pagedkv serve --model llama_1b --device cuda --gpu-memory-fraction 0.5
    pagedkv serve --checkpoint ./Llama-3.2-1B --device cuda   # on the built-in Llama runner
    pagedkv serve --model ./Qwen2.5-0.5B-Instruct              # any HF checkpoint directory

Clients: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`, then
`client.responses.connect()` or `client.responses.create(...)`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import Any

PRESETS = ("tiny", "demo", "llama_1b")
log = logging.getLogger("pagedkv.cli.serve")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {value}")
    return value


def model_choice(text: str) -> str:
    """argparse type: a preset name, or a Hugging Face checkpoint directory."""
    if text in PRESETS:
        return text
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{text} is a directory without a config.json")
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
    )


def is_checkpoint_dir(model: str) -> bool:
    """Whether a `--model` value names a checkpoint directory rather than a preset."""
    return model not in PRESETS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model and device options shared by `serve`, `demo` and the benchmark."""
    g = p.add_argument_group("model")
    g.add_argument("--model", type=model_choice, default="demo",
                   help=f"a built-in preset with seeded random weights ({', '.join(PRESETS)}; "
                        "default: demo, ~3M params), or a local Hugging Face checkpoint "
                        "directory (config, safetensors, tokenizer.json with ChatML tokens) "
                        "run through transformers on pagedkv's attention")  # fmt: skip
    g.add_argument("--checkpoint", default=None,
                   help="a Hugging Face Llama checkpoint directory instead of a preset")  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="override the preset's dtype")  # fmt: skip
    g.add_argument("--max-position", type=positive_int, default=None,
                   help="override the preset's context length (rotary works at any length)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="weights and sampling seed")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """KV pool, batching and scheduler options."""
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=positive_int, default=16)
    g.add_argument("--num-gpu-blocks", type=positive_int, default=None,
                   help="device pool blocks (default: 4096 on CPU; on CUDA from "
                        "--gpu-memory-fraction)")  # fmt: skip
    g.add_argument("--gpu-memory-fraction", type=float, default=0.5,
                   help="CUDA: fraction of free memory for the KV pool (default 0.5)")  # fmt: skip
    g.add_argument("--num-host-blocks", type=int, default=None,
                   help="host tier blocks (default: 2x the device pool; 0: no host tier)")  # fmt: skip
    g.add_argument("--max-batch-tokens", type=positive_int, default=None,
                   help="new tokens per forward step (default 512 CPU, 8192 CUDA)")  # fmt: skip
    g.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="new tokens of one sequence per step (default: --max-batch-tokens)")  # fmt: skip
    g.add_argument("--max-pinned-sessions", type=positive_int, default=64)
    g.add_argument("--max-queue", type=positive_int, default=256)
    g.add_argument("--queue-timeout", type=positive_float, default=30.0, help="seconds")
    g.add_argument("--idle-ttl", type=positive_float, default=None,
                   help="offload sessions idle this long (seconds; default: only under pressure)")  # fmt: skip
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="switch the content-hash prefix cache off (pure stateless HTTP)")  # fmt: skip
    g.add_argument("--no-layerwise-restore", action="store_true",
                   help="wait for a whole host-to-GPU restore before its prefill starts "
                        "(default on CUDA: the prefill waits for each layer's copy only; "
                        "always whole on CPU)")  # fmt: skip
    g = p.add_argument_group("remote tier (KV blocks shared by replicas through Redis/Valkey)")
    g.add_argument("--remote-url", default=None,
                   help="redis://host:port/db of the shared store (default: none)")  # fmt: skip
    g.add_argument("--remote-namespace", default="default",
                   help="key namespace on the store (replicas that share use the same)")  # fmt: skip
    g.add_argument("--remote-ttl", type=positive_float, default=3600.0,
                   help="seconds each block lives in the store (default 3600)")  # fmt: skip
    g.add_argument("--advertise-url", default=None, metavar="URL",
                   help="with --remote-url: the URL the router knows this replica by, under "
                        "which its held block hashes are published for KV-aware routing "
                        "(default: http://HOST:PORT; on a wildcard --host such as 0.0.0.0 "
                        "nothing is published without it)")  # fmt: skip
    g.add_argument("--kv-publish-interval", type=nonnegative_float, default=1.0,
                   help="seconds between publishes of the held block hashes (default 1; "
                        "0: publish nothing)")  # fmt: skip
    g.add_argument("--kv-publish-max-hashes", type=positive_int, default=65536,
                   help="the most block hashes published (default 65536)")  # fmt: skip
    g.add_argument("--hash-secret-file", default=None,
                   help="a file whose bytes key the block hashes (1-64 bytes; the same on "
                        "every replica; default: $PAGEDKV_HASH_SECRET, else random per "
                        "process). Needed with --remote-url")  # fmt: skip


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the Responses API server (WebSocket mode + HTTP)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name reported")
    p.add_argument("--max-output-tokens", type=positive_int, default=16,
                   help="default when a request sets none (default 16)")  # fmt: skip
    p.add_argument("--max-connection-age", type=positive_float, default=3600.0,
                   help="seconds before websocket_connection_limit_reached (default 3600)")  # fmt: skip
    p.add_argument("--max-queued-responses", type=positive_int, default=32,
                   help="responses one WebSocket connection may queue behind its running "
                   "one; more are refused (default 32)")  # fmt: skip
    p.add_argument("--max-output-tokens-cap", type=positive_int, default=1024,
                   help="a request asking for more max_output_tokens is refused with "
                   "integer_above_max_value (default 1024)")  # fmt: skip
    p.add_argument("--max-message-bytes", type=positive_int, default=8 * 1024 * 1024,
                   help="largest WebSocket message or HTTP body (default 8 MiB)")  # fmt: skip
    p.add_argument("--send-timeout", type=positive_float, default=20.0,
                   help="seconds a client may take to read one event before its response "
                   "is aborted and its connection dropped (default 20)")  # fmt: skip
    p.add_argument("--read-timeout", type=positive_float, default=30.0,
                   help="seconds an HTTP request body may take to arrive (default 30)")  # fmt: skip
    p.add_argument("--header-timeout", type=positive_float, default=10.0,
                   help="seconds a connection may take to send a request's headers "
                   "(default 10): silent and slowloris connections are closed")  # fmt: skip
    p.add_argument("--limit-concurrency", type=positive_int, default=None,
                   help="connections + tasks before uvicorn answers 503 (default: "
                   "--max-connections + --max-http-requests + 64)")  # fmt: skip
    p.add_argument("--idle-timeout", type=nonnegative_float, default=900.0,
                   help="seconds a WebSocket connection may sit with nothing running and "
                   "nothing received before it is closed (default 900; 0: never)")  # fmt: skip
    g = p.add_argument_group("quotas (429 rate_limit_exceeded over a cap; per-tenant "
                             "limits in the keys file override the --tenant-* defaults)")  # fmt: skip
    g.add_argument("--max-connections", type=positive_int, default=1024,
                   help="open WebSocket connections, all tenants (default 1024)")  # fmt: skip
    g.add_argument("--max-http-requests", type=positive_int, default=1024,
                   help="HTTP requests in flight, all tenants (default 1024)")  # fmt: skip
    g.add_argument("--tenant-max-connections", type=positive_int, default=None,
                   help="open WebSocket connections per tenant (default: no cap)")  # fmt: skip
    g.add_argument("--tenant-max-http-requests", type=positive_int, default=None,
                   help="HTTP requests in flight per tenant (default: no cap)")  # fmt: skip
    g.add_argument("--tenant-max-pinned-sessions", type=positive_int, default=None,
                   help="sessions a tenant may keep pinned on the GPU (default: no cap "
                   "beyond --max-pinned-sessions and the fair share)")  # fmt: skip
    g.add_argument("--tenant-max-pinned-blocks", type=positive_int, default=None,
                   help="GPU blocks a tenant's pinned sessions may hold (default: no cap)")  # fmt: skip
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=("critical", "error", "warning", "info", "debug", "trace"))  # fmt: skip
    p.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help='JSON {"keys": [{"key": ..., "tenant": ..., "admin": false}], '
                   '"default_limits": {...}, "tenants": {name: {...}}}: API keys, their '
                   "tenants and per-tenant limits; other keys get 401 (also PAGEDKV_API_KEYS="
                   "key=tenant,...). Without keys each bearer token is its own tenant")  # fmt: skip
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="the key that opens /v1/engine/stats and /metrics (prefer "
                   "PAGEDKV_ADMIN_KEY: a command line is visible to other local users)")  # fmt: skip
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
    if is_checkpoint_dir(args.model):
        from pagedkv.integrations.hf_model import load_pretrained

        if args.checkpoint is not None:
            raise ValueError("give a checkpoint directory as --model DIR or --checkpoint, not both")
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        return load_pretrained(args.model, device=args.device, dtype=dtype,
                               max_position=args.max_position)  # fmt: skip
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


def build_tokenizer_from_args(args: argparse.Namespace, model: Any) -> Any:
    """The checkpoint's own tokenizer for a `--model DIR` (None: the byte tokenizer).

    Raises:
        UnsupportedModelError: it lacks the ChatML tokens, or has ids the model lacks.
    """
    if not is_checkpoint_dir(args.model):
        return None
    from pagedkv.integrations.hf_model import UnsupportedModelError
    from pagedkv.integrations.hf_tokenizer import ChatMLTokenizer

    tok = ChatMLTokenizer.from_pretrained(args.model)
    if tok.vocab_size > model.config.vocab_size:
        raise UnsupportedModelError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only "
            f"{model.config.vocab_size} embeddings"
        )
    return tok


def hash_secret_from_args(args: argparse.Namespace) -> bytes | None:
    """The block-hash secret: `--hash-secret-file`, else $PAGEDKV_HASH_SECRET, else None.

    Raises:
        ValueError: the file cannot be read, or the secret is not 1-64 bytes.
    """
    import os

    path = getattr(args, "hash_secret_file", None)
    if path is not None:
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as err:
            raise ValueError(f"--hash-secret-file {path}: {err.strerror or err}") from None
    else:
        env = os.environ.get("PAGEDKV_HASH_SECRET")
        if not env:
            return None
        secret = env.encode()
    if not 1 <= len(secret) <= 64:
        raise ValueError(f"the hash secret must be 1-64 bytes, got {len(secret)}")
    return secret


def advertise_url_from_args(args: argparse.Namespace) -> str | None:
    """The URL a replica publishes its held block hashes under: `--advertise-url`, else
    `http://HOST:PORT`; None (nothing published) without `--remote-url`, with
    `--kv-publish-interval 0`, or on a wildcard `--host` (0.0.0.0, ::) without
    `--advertise-url`: no router can reach that address, so the hashes would only
    sit in Redis, never matched (one warning says so)."""
    if getattr(args, "remote_url", None) is None or not getattr(args, "kv_publish_interval", 0.0):
        return None
    advertise: str | None = getattr(args, "advertise_url", None)
    if advertise is not None or not hasattr(args, "port"):
        return advertise
    bare = args.host.strip("[]")
    url = f"http://[{bare}]:{args.port}" if ":" in bare else f"http://{bare}:{args.port}"
    try:
        wildcard = ipaddress.ip_address(bare).is_unspecified
    except ValueError:  # a host name
        wildcard = False
    if wildcard:
        log.warning("--host %s with --remote-url and no --advertise-url: not publishing the "
                    "held block hashes for KV-aware routing (no router can reach %s); give "
                    "--advertise-url http://ADDRESS:%d, the URL the router knows this "
                    "replica by", args.host, url, args.port)  # fmt: skip
        return None
    return url


def engine_config_from_args(
    args: argparse.Namespace,
    model: Any,
    *,
    scheduler_caps: dict[str, Any] | None = None,
    **changes: Any,
) -> Any:
    """The `EngineConfig` the engine options describe, for `model`; `scheduler_caps`
    are extra `SchedulerConfig` fields (the tenants' pinned caps)."""
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
        # on a GPU a restore copies layer by layer and the prefill waits per layer; on a
        # CPU the copy thread and the prefill share the cores, and overlap costs time
        layerwise_restore=cuda and not getattr(args, "no_layerwise_restore", False),
        **(scheduler_caps or {}),
    )
    remote_url = getattr(args, "remote_url", None)
    interval = getattr(args, "kv_publish_interval", 0.0)
    fields: dict[str, Any] = dict(
        remote_url=remote_url,
        advertise_url=advertise_url_from_args(args),
        publish_interval_s=interval or 1.0,
        publish_max_hashes=getattr(args, "kv_publish_max_hashes", 65536),
        remote_namespace=getattr(args, "remote_namespace", "default"),
        remote_ttl_s=getattr(args, "remote_ttl", 3600.0),
        hash_secret=hash_secret_from_args(args),
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
    from pagedkv.serving.auth import auth_fingerprint, auth_secret_for, load_authenticator
    from pagedkv.serving.engine import Engine
    from pagedkv.serving.local_server import guarded_http_protocol, install_log_filters, ws_protocol
    from pagedkv.serving.quotas import ConnectionQuotas, TenantLimits, load_policy, scheduler_caps
    from pagedkv.serving.response_run import ServerConfig
    from pagedkv.serving.server import create_app

    # uvicorn's "trace" is below Python logging's DEBUG
    py_level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=py_level, format="%(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or args.checkpoint
    if name is None:
        name = Path(args.model).name if is_checkpoint_dir(args.model) else args.model
    try:
        hash_secret = hash_secret_from_args(args)
        # replicas sharing a hash secret also agree on which tenant a bare token is
        auth = load_authenticator(args.api_keys_file, admin_key=args.admin_key,
                                  secret=auth_secret_for(hash_secret))  # fmt: skip
        policy = load_policy(
            args.api_keys_file,
            TenantLimits(
                max_connections=args.tenant_max_connections,
                max_http_requests=args.tenant_max_http_requests,
                max_pinned_sessions=args.tenant_max_pinned_sessions,
                max_pinned_blocks=args.tenant_max_pinned_blocks,
            ),
        )
        quotas = ConnectionQuotas(policy, max_connections=args.max_connections,
                                  max_http_requests=args.max_http_requests)  # fmt: skip
        server = ServerConfig(
            model_name=str(name),
            default_max_output_tokens=args.max_output_tokens,
            max_output_tokens_cap=args.max_output_tokens_cap,
            max_message_bytes=args.max_message_bytes,
            max_connection_age_s=args.max_connection_age,
            max_queued_responses=args.max_queued_responses,
            send_timeout_s=args.send_timeout,
            read_timeout_s=args.read_timeout,
            idle_timeout_s=args.idle_timeout or None,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        model = build_model_from_args(args)
        tokenizer = build_tokenizer_from_args(args, model)
    except (OSError, ValueError) as err:  # a checkpoint it cannot serve, named
        raise UsageError(f"--model {args.model}: {err}") from None
    try:
        config = engine_config_from_args(args, model, scheduler_caps=scheduler_caps(policy))
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        engine = Engine(model, config, tokenizer=tokenizer)
    except (ImportError, ValueError) as err:  # e.g. a malformed --remote-url
        raise UsageError(str(err)) from None
    if engine.publisher is not None:  # so a router can tell it resolves tenants alike
        engine.publisher.meta["auth"] = auth_fingerprint(auth)
    cfg = model.config
    print(
        f"pagedkv serve: {name} ({cfg.num_params / 1e6:.1f} M params, {cfg.dtype}, "
        f"{args.device}), KV pool {config.num_gpu_blocks} blocks of {config.block_size} + "
        f"host {config.num_host_blocks}, prefix cache {'off' if args.no_prefix_cache else 'on'}"
    )
    print(f"  WebSocket ws://{args.host}:{args.port}/v1/responses, HTTP POST same path")
    if config.remote_url is not None:
        print(f"  remote KV tier {config.remote_url} (namespace {config.remote_namespace!r}, "
              f"blocks expire after {config.remote_ttl_s:.0f} s)")  # fmt: skip
    if config.advertise_url is not None:
        print(f"  held block hashes published as {config.advertise_url!r} every "
              f"{config.publish_interval_s:g} s (at most {config.publish_max_hashes})")  # fmt: skip
    if auth.requires_keys:
        tenants = len({c.tenant for c in auth.keys.values()})
        print(f"  {len(auth.keys)} API keys, {tenants} tenants; other keys get 401")
    else:
        print("  no API keys configured: each bearer token is its own tenant (caches never "
              "shared between tokens), requests without one share the anonymous tenant")  # fmt: skip
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"  warning: listening on {args.host} without API keys: anyone who can "
                  "reach the port can use the server (--api-keys-file)")  # fmt: skip
    admin = "admin key" if auth.has_admin else "closed (no admin key)"
    print(f"  /v1/engine/stats and /metrics: {admin}; at most {args.max_connections} "
          f"connections, {args.max_http_requests} HTTP requests in flight")  # fmt: skip
    install_log_filters()
    uvicorn.run(
        create_app(engine, server, auth=auth, quotas=quotas),
        host=args.host,
        port=args.port,
        http=guarded_http_protocol(args.header_timeout),
        limit_concurrency=args.limit_concurrency
        or args.max_connections + args.max_http_requests + 64,
        ws=ws_protocol(),
        ws_max_size=2 * server.max_message_bytes,
        log_level=args.log_level.lower(),
    )
    return 0
