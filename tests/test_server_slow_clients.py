"""Slow, idle and dead clients on a real socket: a client that stops reading loses its
response and its engine session within the send timeout (the transport is aborted, not
drained); an idle connection is closed; an SSE stream whose chunk is not taken in time
stops and aborts its transport.
Nothing is leaked and the pool invariants hold afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect
from ws_raw import RawWebSocket

from pagedkv.serving.http_handler import TimedStreamingResponse
from pagedkv.serving.response_run import ABORT_KEY, ServerConfig
from pagedkv.serving.server_metrics import ServerMetrics
from pagedkv.serving.testing import engine_check, read_response, tiny_server

# every event of a response echoes its metadata: 16 x 512 characters make each event
# ~9 KB, so an unread connection fills the socket buffers in a few responses
BIG_METADATA = {f"k{i:02d}": "m" * 512 for i in range(16)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` until true; the seconds it took (fails the test after `timeout`)."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def sessions(engine: Any) -> int:
    return int(engine_check(engine)["num_sessions"])


def test_a_client_that_stops_reading_is_aborted_and_its_session_released() -> None:
    config = ServerConfig(model_name="tiny", send_timeout_s=0.5, max_queued_responses=64)
    metrics = ServerMetrics()
    with tiny_server(server=config, metrics=metrics) as (srv, engine):
        raw = RawWebSocket("127.0.0.1", srv.port, rcvbuf=4096)
        assert raw.status == 101
        # keep asking and never read: the socket buffers (MBs on loopback) fill, then
        # a send waits past the timeout
        start = time.monotonic()
        i = 0
        aborts = metrics.aborts.labels("send_timeout")
        while aborts._value.get() == 0 and time.monotonic() - start < 60.0:
            try:
                raw.send_json({"type": "response.create", "model": "tiny", "input": f"turn {i}",
                               "max_output_tokens": 24, "metadata": BIG_METADATA})  # fmt: skip
            except OSError:  # the server aborted the transport
                break
            i += 1
            time.sleep(0.01)
        wait_for(lambda: sessions(engine) == 0 and srv_connections(srv) == 0, 10.0,
                 "the session release")  # fmt: skip
        # the abort is counted and the connection is gone although the client never read
        assert aborts._value.get() == 1
        stats = engine_check(engine)
        assert stats["gpu_blocks"]["in_use"] == 0 and stats["num_running"] == 0
        # the transport was aborted: the socket reaches EOF/reset without a close frame
        raw.sock.settimeout(5)
        with pytest.raises((ConnectionError, OSError)):
            while True:
                raw.recv_frame()
        raw.close()
        # the server keeps serving others
        with connect(srv.ws_url) as ws:
            ws.send('{"type": "response.create", "model": "tiny", "input": "hi", '
                    '"max_output_tokens": 2}')  # fmt: skip
            assert read_response(_events(ws))[-1]["type"] in ("response.completed",
                                                              "response.incomplete")  # fmt: skip


def srv_connections(srv: Any) -> int:
    app = srv._config.app
    return int(app.state.quotas.snapshot()["connections"])


def _events(ws: Any) -> Iterator[dict[str, Any]]:
    import json

    while True:
        yield json.loads(ws.recv(timeout=30))


def test_an_idle_connection_is_closed_and_its_session_released() -> None:
    config = ServerConfig(model_name="tiny", idle_timeout_s=0.5)
    with tiny_server(server=config) as (srv, engine):
        raw = RawWebSocket("127.0.0.1", srv.port)
        raw.send_json({"type": "response.create", "model": "tiny", "input": "one turn",
                       "max_output_tokens": 2})  # fmt: skip
        assert raw.recv_json()["type"] == "response.created"
        opened = time.monotonic()
        assert raw.close_code() == 1001  # going away, after the idle timeout
        assert time.monotonic() - opened < 10.0
        raw.close()
        wait_for(lambda: sessions(engine) == 0, 10.0, "the session release")
        assert engine_check(engine)["gpu_blocks"]["in_use"] == 0


def test_an_sse_chunk_not_taken_in_time_stops_the_stream_and_aborts() -> None:
    # One response's SSE stream is too small to fill loopback buffers, so the stuck
    # transport is an ASGI `send` that never returns (the WebSocket test above uses a
    # real socket); the stream stops, the transport is aborted, on_close(False) runs.
    closed: list[bool] = []
    aborted: list[bool] = []
    chunks_asked = 0

    async def body() -> AsyncIterator[str]:
        nonlocal chunks_asked
        for i in range(100):
            chunks_asked += 1
            yield f"data: {i}\n\n"

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) == 3:  # the client stops reading after two chunks' worth
            await asyncio.Event().wait()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    response = TimedStreamingResponse(body(), send_timeout_s=0.2, on_close=closed.append,
                                      media_type="text/event-stream")  # fmt: skip
    scope = {
        "type": "http",
        "asgi": {"spec_version": "2.4"},
        ABORT_KEY: lambda: aborted.append(True),
    }
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(response(scope, receive, send), 5.0))
    assert time.monotonic() - started < 2.0
    assert closed == [False] and aborted == [True]
    assert chunks_asked == 2  # nothing more was produced for a client that does not read


def test_a_finished_sse_stream_reports_finished() -> None:
    closed: list[bool] = []

    async def body() -> AsyncIterator[str]:
        yield "data: 1\n\n"

    async def send(message: dict[str, Any]) -> None:
        return None

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    response = TimedStreamingResponse(body(), send_timeout_s=0.2, on_close=closed.append,
                                      media_type="text/event-stream")  # fmt: skip
    asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert closed == [True]


def test_silent_and_slowloris_connections_are_closed_websockets_are_not() -> None:
    with tiny_server(header_timeout_s=0.5) as (srv, _engine):
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        with connect(srv.ws_url) as ws:
            opened = time.monotonic()
            slow.sendall(b"POST /v1/responses HTTP/1.1\r\n")
            closed_slow = None
            for i in range(20):  # a header line every 0.1 s, never the blank line
                try:
                    slow.sendall(f"X-Pad-{i}: a\r\n".encode())
                except OSError:
                    closed_slow = time.monotonic() - opened
                    break
                time.sleep(0.1)
            assert silent.recv(1) == b""  # closed by the server
            assert time.monotonic() - opened < 3.0
            if closed_slow is None:  # writes may still succeed once: the read sees EOF
                assert slow.recv(1) == b""
            # the WebSocket, past the header timeout, still serves
            time.sleep(0.6)
            ws.send('{"type": "response.create", "model": "tiny", "input": "hi", '
                    '"max_output_tokens": 2}')  # fmt: skip
            assert read_response(_events(ws))[-1]["type"] in ("response.completed",
                                                              "response.incomplete")  # fmt: skip
        silent.close()
        slow.close()
        # a keep-alive connection serves requests one after another
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}") as client:
            for _ in range(3):
                assert client.get("/health").status_code == 200
                time.sleep(0.2)
