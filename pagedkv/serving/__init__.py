"""pagedkv.serving: the inference engine and the Responses API server.

`Engine` runs continuous batching over `pagedkv.model` on scheduler-managed blocks
(`EngineConfig`, `EngineRequest` in; `TurnStarted`, `OutputDelta`, `TurnDone`,
`TurnFailed` out); `create_app` serves it as the OpenAI Responses API over HTTP (SSE)
and WebSocket mode; `LocalServer` runs that app on a loopback port in a thread.
`run_websocket`, `run_http` and `run_concurrent` drive an agent loop against a server
with the real `openai` SDK.

Names are imported on first use (PEP 562), so a process that needs one piece (the
router needs neither the engine nor torch) loads only that piece.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedkv.serving.agent_loop import (
        AgentLoopError,
        AgentLoopSpec,
        TurnTiming,
        run_concurrent,
        run_http,
        run_websocket,
    )
    from pagedkv.serving.conversation import (
        FunctionCall,
        FunctionCallOutput,
        FunctionTool,
        Message,
        render_prompt,
    )
    from pagedkv.serving.engine import Engine
    from pagedkv.serving.engine_types import (
        EngineConfig,
        EngineRequest,
        OutputDelta,
        OutputStarted,
        TurnDone,
        TurnFailed,
        TurnStarted,
    )
    from pagedkv.serving.factory import build_engine, build_model
    from pagedkv.serving.local_server import LocalServer
    from pagedkv.serving.protocol import ProtocolError
    from pagedkv.serving.response_run import ServerConfig
    from pagedkv.serving.server import create_app

_EXPORTS = {
    "AgentLoopError": "pagedkv.serving.agent_loop",
    "AgentLoopSpec": "pagedkv.serving.agent_loop",
    "Engine": "pagedkv.serving.engine",
    "EngineConfig": "pagedkv.serving.engine_types",
    "EngineRequest": "pagedkv.serving.engine_types",
    "FunctionCall": "pagedkv.serving.conversation",
    "FunctionCallOutput": "pagedkv.serving.conversation",
    "FunctionTool": "pagedkv.serving.conversation",
    "LocalServer": "pagedkv.serving.local_server",
    "Message": "pagedkv.serving.conversation",
    "OutputDelta": "pagedkv.serving.engine_types",
    "OutputStarted": "pagedkv.serving.engine_types",
    "ProtocolError": "pagedkv.serving.protocol",
    "ServerConfig": "pagedkv.serving.response_run",
    "TurnDone": "pagedkv.serving.engine_types",
    "TurnFailed": "pagedkv.serving.engine_types",
    "TurnStarted": "pagedkv.serving.engine_types",
    "TurnTiming": "pagedkv.serving.agent_loop",
    "build_engine": "pagedkv.serving.factory",
    "build_model": "pagedkv.serving.factory",
    "create_app": "pagedkv.serving.server",
    "render_prompt": "pagedkv.serving.conversation",
    "run_concurrent": "pagedkv.serving.agent_loop",
    "run_http": "pagedkv.serving.agent_loop",
    "run_websocket": "pagedkv.serving.agent_loop",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedkv.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "AgentLoopError",
    "AgentLoopSpec",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "FunctionCall",
    "FunctionCallOutput",
    "FunctionTool",
    "LocalServer",
    "Message",
    "OutputDelta",
    "OutputStarted",
    "ProtocolError",
    "ServerConfig",
    "TurnDone",
    "TurnFailed",
    "TurnStarted",
    "TurnTiming",
    "build_engine",
    "build_model",
    "create_app",
    "render_prompt",
    "run_concurrent",
    "run_http",
    "run_websocket",
]
