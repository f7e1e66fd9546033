"""`pagedkv route`: the front process for several `pagedkv serve` replicas.

    pagedkv serve --port 8001 --remote-url redis://127.0.0.1:6379/0 --hash-secret-file s &
    pagedkv serve --port 8002 --remote-url redis://127.0.0.1:6379/0 --hash-secret-file s &
    pagedkv route --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002 --port 8000

Clients use the router's address as a replica's. See `pagedkv.serving.router`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any
from urllib.parse import urlparse

from pagedkv.cli.serve import port_number, positive_float, positive_int


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
    print(f"pagedkv route: {len(args.replica)} replicas ({', '.join(args.replica)}) on "
          f"http://{args.host}:{args.port}")  # fmt: skip
    uvicorn.run(create_router_app(args.replica, config), host=args.host, port=args.port,
                ws_max_size=2 * args.max_message_bytes, log_level=args.log_level.lower())  # fmt: skip
    return 0
