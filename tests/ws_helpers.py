"""WebSocket-mode helpers for the tests (a `websockets` sync client, JSON events)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from websockets.sync.client import ClientConnection

from pagedkv.serving.testing import read_response

# a response ends completed, or incomplete when max_output_tokens (or a steer) cut it off
DONE = ("response.completed", "response.incomplete")


def recv(ws: ClientConnection, timeout: float = 60.0) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=timeout)))


def events(ws: ClientConnection, timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    while True:
        yield recv(ws, timeout)


def create(ws: ClientConnection, **fields: Any) -> None:
    ws.send(json.dumps({"type": "response.create", "model": "tiny", **fields}))


def completed(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    """Send a request and return its finished response (asserting it finished)."""
    create(ws, **fields)
    got = read_response(events(ws))
    assert got[-1]["type"] in DONE, got[-3:]
    return dict(got[-1]["response"])
