"""LocalServer: run the app with uvicorn on a loopback port in a background thread.

For tests, `pagedkv demo` and the benchmark: the server and its clients in one process.

    with LocalServer(create_app(engine)) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp


def ws_protocol() -> str:
    """uvicorn's sans-I/O `websockets` implementation where it has one (uvicorn >= 0.35;
    the legacy one is deprecated), else the legacy `websockets` one."""
    from uvicorn.config import WS_PROTOCOLS

    return "websockets-sansio" if "websockets-sansio" in WS_PROTOCOLS else "websockets"


class LocalServer:
    """uvicorn serving `app` on `host:port` (port 0: any free port) until `stop()`.

    Attributes (once started): `port`, `base_url` (`http://host:port/v1`), `ws_url`.

    Raises:
        RuntimeError: the server did not start within `start_timeout_s`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ws_max_size: int = 64 * 1024 * 1024,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.host = host
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            ws=ws_protocol(),
            ws_max_size=ws_max_size,
            lifespan="on",
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self._start_timeout_s = start_timeout_s
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/responses"

    def start(self) -> LocalServer:
        self._thread = threading.Thread(
            target=self._server.run, name="pagedkv-uvicorn", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"LocalServer: uvicorn did not start on {self.host}")
            time.sleep(0.01)
        sockets = [s for server in self._server.servers for s in server.sockets]
        self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
