"""HTTP `POST /v1/responses` refuses hostile bodies with a JSON error, never a 500."""

from __future__ import annotations

import time

import httpx

from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.testing import engine_check, tiny_server


def test_hostile_bodies_get_json_errors() -> None:
    config = ServerConfig(model_name="tiny", max_message_bytes=256 * 1024)
    with tiny_server(server=config) as (srv, engine):
        url = srv.base_url + "/responses"
        r = httpx.post(url, content="[" * 50_000 + "]" * 50_000)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = httpx.post(url, content='{"input": "x", "instructions": "\\ud800"}')
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "instructions"
        r = httpx.post(url, json={"input": "x", "top_p": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
        r = httpx.post(url, json={"input": "x", "background": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "background"
        r = httpx.post(url, content=b"x" * (300 * 1024))
        assert r.status_code == 413

        def chunks():  # chunked transfer encoding: no Content-Length to refuse early
            for _ in range(40):
                yield b"x" * (16 * 1024)

        r = httpx.post(url, content=chunks())
        assert r.status_code == 413 and r.json()["error"]["code"] == "message_too_large"
        r = httpx.post(url, json={"input": "still fine?", "max_output_tokens": 2})
        assert r.status_code == 200
        assert r.json()["status"] in ("completed", "incomplete")
        # the ephemeral session is closed on the engine thread just after the reply
        deadline = time.monotonic() + 5.0
        while (stats := engine_check(engine))["gpu_blocks"][
            "in_use"
        ] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["gpu_blocks"]["in_use"] == 0 and stats["num_sessions"] == 0
