"""pagedkv.serving: the inference engine and the Responses API server.

`Engine` runs continuous batching over `pagedkv.model` on scheduler-managed blocks
(`EngineConfig`, `EngineRequest` in; `TurnStarted`, `OutputDelta`, `TurnDone`,
`TurnFailed` out); `create_app` serves it as the OpenAI Responses API over HTTP (SSE)
and WebSocket mode; `LocalServer` runs that app on a loopback port in a thread.
`run_websocket`, `run_http` and `run_concurrent` drive an agent loop against a server
with the real `openai` SDK.
"""

from __future__ import annotations

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
