"""LocalServer: run the app with uvicorn on a loopback port in a background thread.

For tests, `pagedkv demo` and the benchmark: the server and its clients in one process.

    with LocalServer(create_app(engine)) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

HEADER_TIMEOUT_S = 10.0


def guarded_http_protocol(header_timeout_s: float = HEADER_TIMEOUT_S) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a request-header timeout: a connection that has
    not completed a request's headers within `header_timeout_s` of opening (or of its
    previous response) is closed. uvicorn has none, so a client that connects and sends
    nothing, or trickles header lines (slowloris), would hold its socket forever.
    Requests in progress (bodies have their own timeout in the app) and connections
    upgraded to WebSocket are not touched."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol

    class HeaderTimeoutProtocol(base):  # type: ignore[misc]
        _pk_timer: asyncio.TimerHandle | None = None
        _pk_cycle: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._pk_arm()

        def _pk_arm(self) -> None:
            if self._pk_timer is not None:
                self._pk_timer.cancel()
            self._pk_cycle = self.cycle
            self._pk_timer = self.loop.call_later(header_timeout_s, self._pk_expire)

        def _pk_expire(self) -> None:
            self._pk_timer = None
            t = self.transport
            if t is None or t.is_closing() or t.get_protocol() is not self:
                return  # closed already, or upgraded to a WebSocket
            cycle = self.cycle
            idle = cycle is None or getattr(cycle, "response_complete", False)
            if cycle is self._pk_cycle and idle:  # no request's headers since armed
                t.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._pk_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._pk_timer is not None:
                self._pk_timer.cancel()
                self._pk_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


# exceptions that only say a client broke the protocol (bad UTF-8 in a text frame, a
# malformed request line ...): logged as one line, without a traceback
def _client_protocol_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UnicodeDecodeError]
    try:
        from websockets.exceptions import ProtocolError as WsProtocolError

        errors.append(WsProtocolError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import h11

        errors.append(h11.RemoteProtocolError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


class ClientErrorFilter(logging.Filter):
    """Drops the traceback from uvicorn's and websockets' log records about a client's
    protocol error: the client's bytes must not put tracebacks into the server log."""

    errors = _client_protocol_errors()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, self.errors):
            record.msg = f"{record.getMessage().rstrip()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_filters() -> None:
    """Put `ClientErrorFilter` on the loggers uvicorn and websockets write to (once)."""
    for name in ("uvicorn.error", "websockets.server", "websockets"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
            logger.addFilter(ClientErrorFilter())


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
        header_timeout_s: float = HEADER_TIMEOUT_S,
    ) -> None:
        self.host = host
        install_log_filters()
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            http=guarded_http_protocol(header_timeout_s),
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
