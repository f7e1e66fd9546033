"""`pagedkv route`: the front process for several `pagedkv serve` replicas.

    pagedkv serve --port 8001 --remote-url redis://127.0.0.1:6379/0 --hash-secret-file s &
    pagedkv serve --port 8002 --remote-url redis://127.0.0.1:6379/0 --hash-secret-file s &
    pagedkv route --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002 --port 8000

Clients use the router's address as a replica's. See `pagedkv.serving.router`.

KV-aware routing (new sessions go to the replica holding the longest cached prefix of
their prompt, by the block hashes replicas publish in Redis): give the router the
replicas' store, namespace, hash secret, block size, tokenizer (`--model DIR` for a
checkpoint's) and keys file:

    pagedkv route --replica ... --remote-url redis://127.0.0.1:6379/0 --hash-secret-file s
"""

from __future__ import annotations

import argparse
import logging
from typing import Any
from urllib.parse import urlparse

from pagedkv.cli.serve import model_choice, port_number, positive_float, positive_int


def replica_url(text: str) -> str:
    """argparse type: an http(s)://host:port base URL."""
    url = urlparse(text)
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"expected http://host:port, got {text!r}")
    return text.rstrip("/")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `route` on the `pagedkv` subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "route",
        help="route clients to several `pagedkv serve` replicas (KV-affine, failover)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replica", type=replica_url, action="append", required=True,
                   help="a replica's base URL (repeat for each)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--load-factor", type=float, default=1.25,
                   help="bounded-load factor of the consistent hash (> 1; default 1.25)")  # fmt: skip
    p.add_argument("--health-interval", type=positive_float, default=1.0,
                   help="seconds between health checks (default 1)")  # fmt: skip
    p.add_argument("--max-message-bytes", type=positive_int, default=8 * 1024 * 1024)
    g = p.add_argument_group("KV-aware routing (by the block hashes replicas publish)")
    g.add_argument("--remote-url", default=None,
                   help="redis://host:port/db the replicas publish in (their --remote-url; "
                        "default: none, routing by consistent hashing only)")  # fmt: skip
    g.add_argument("--remote-namespace", default="default",
                   help="the replicas' --remote-namespace (default: default)")  # fmt: skip
    g.add_argument("--hash-secret-file", default=None,
                   help="the replicas' hash secret (default: $PAGEDKV_HASH_SECRET); "
                        "needed with --remote-url")  # fmt: skip
    g.add_argument("--block-size", type=positive_int, default=16,
                   help="the replicas' --block-size (default 16)")  # fmt: skip
    g.add_argument("--model", type=model_choice, default="demo",
                   help="the replicas' --model: a preset (the built-in byte tokenizer) or a "
                        "checkpoint directory (its tokenizer.json; no weights are loaded)")  # fmt: skip
    g.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="the replicas' keys file (also PAGEDKV_API_KEYS), so the router "
                        "resolves tenants as they do; a router without it does not route by "
                        "prefix to replicas that have one")  # fmt: skip
    g.add_argument("--kv-max-probe-blocks", type=positive_int, default=1024,
                   help="blocks of a prompt hashed and looked up (default 1024)")  # fmt: skip
    g.add_argument("--kv-max-probe-bytes", type=positive_int, default=256 * 1024,
                   help="larger bodies (or first WebSocket messages) are routed by the "
                        "consistent hash, unprobed (default 256 KiB)")  # fmt: skip
    g.add_argument("--kv-timeout", type=positive_float, default=0.25,
                   help="seconds one lookup may take before the consistent hash decides "
                        "(default 0.25)")  # fmt: skip
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pagedkv.cli.main import UsageError
    from pagedkv.serving.router import RouterConfig, create_router_app

    py_level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=py_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = RouterConfig(load_factor=args.load_factor, health_interval_s=args.health_interval,
                              max_message_bytes=args.max_message_bytes)  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from None
    if len(set(args.replica)) != len(args.replica):
        raise UsageError("a replica is listed twice")
    kv, secret = None, None
    if args.remote_url is not None:
        try:
            kv, secret = _kv_routing(args)
        except (OSError, ValueError, ImportError) as err:
            raise UsageError(str(err)) from None
    print(f"pagedkv route: {len(args.replica)} replicas ({', '.join(args.replica)}) on "
          f"http://{args.host}:{args.port}")  # fmt: skip
    if kv is not None:
        print(f"  KV-aware routing on {args.remote_url} (namespace {args.remote_namespace!r}, "
              f"block size {args.block_size}, up to {args.kv_max_probe_blocks} blocks probed)")  # fmt: skip
    app = create_router_app(args.replica, config, kv=kv, secret=secret)
    uvicorn.run(app, host=args.host, port=args.port,
                ws_max_size=2 * args.max_message_bytes, log_level=args.log_level.lower())  # fmt: skip
    return 0


def _kv_routing(args: argparse.Namespace) -> tuple[Any, bytes]:
    """The `KVRouting` the options describe, and the routing-key secret.

    Raises:
        ValueError: no hash secret, a bad keys file, a tokenizer that cannot be read.
    """
    from pagedkv.cli.serve import hash_secret_from_args, is_checkpoint_dir
    from pagedkv.serving.auth import auth_secret_for, load_authenticator
    from pagedkv.serving.kv_routing import KVRouting, KVRoutingConfig
    from pagedkv.serving.router import routing_secret

    hash_secret = hash_secret_from_args(args)
    if hash_secret is None:
        raise ValueError("--remote-url needs the replicas' hash secret (--hash-secret-file or "
                         "PAGEDKV_HASH_SECRET)")  # fmt: skip
    tokenizer = None
    if is_checkpoint_dir(args.model):
        from pagedkv.integrations.hf_tokenizer import ChatMLTokenizer

        tokenizer = ChatMLTokenizer.from_pretrained(args.model)
    auth = load_authenticator(args.api_keys_file, secret=auth_secret_for(hash_secret))
    config = KVRoutingConfig(namespace=args.remote_namespace, block_size=args.block_size,
                             max_probe_blocks=args.kv_max_probe_blocks,
                             max_probe_bytes=args.kv_max_probe_bytes,
                             timeout_s=args.kv_timeout)  # fmt: skip
    kv = KVRouting(config, hash_secret=hash_secret, tokenizer=tokenizer, auth=auth,
                   remote_url=args.remote_url)  # fmt: skip
    return kv, routing_secret(hash_secret)
