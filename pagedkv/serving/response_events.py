"""ResponseBuilder: the Responses API response object and its stream events.

One builder per response. Every event carries the next `sequence_number` (0, 1, 2 ...
per response, as the HTTP stream numbers them). The event order for a message is:

    response.created, response.in_progress,
    response.output_item.added, response.content_part.added,
    response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done, response.completed

and for a function call `response.function_call_arguments.delta` ... `.done` in place
of the content part and text events. A failure after `response.created` sends `error`
then `response.failed`. The response object carries a non-standard `metrics` field
(TTFT and friends, for benchmarks).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pagedkv.serving.conversation import FunctionCall, Item, Message, item_to_json
from pagedkv.serving.protocol import CreateRequest, ProtocolError


def new_id(prefix: str, num_hex: int = 32) -> str:
    """A fresh id such as `resp_3f2a...` (`num_hex` digits of a uuid4)."""
    return f"{prefix}_{uuid.uuid4().hex[:num_hex]}"


class ResponseBuilder:
    """Builds the events of one response (see the module docstring)."""

    def __init__(
        self,
        req: CreateRequest,
        *,
        model: str,
        max_output_tokens: int,
        temperature: float,
        function_call: bool,
    ) -> None:
        self.req = req
        self.response_id = new_id("resp")
        self.item_id = new_id("fc" if function_call else "msg")
        self.function_call = function_call
        self.model = model
        self.max_output_tokens = max_output_tokens
        self.temperature = temperature
        self.created_at = int(time.time())
        self.status = "in_progress"
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete_details: dict[str, Any] | None = None
        self.metrics: dict[str, Any] = {}
        self._seq = 0
        self._text: list[str] = []

    # ------------------------------------------------------------------ objects
    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return ev

    def response(self) -> dict[str, Any]:
        """The response object in its current state."""
        req = self.req
        choice = req.tool_choice
        tool_choice: Any = (
            {"type": "function", "name": choice.name} if choice.mode == "function" else choice.mode
        )
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": False,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "instructions": req.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": None,
            "model": self.model,
            "output": list(self.output),
            "parallel_tool_calls": False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": req.store,
            "prompt_cache_key": req.prompt_cache_key,
            "temperature": self.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": tool_choice,
            "tools": [{**t.to_json(), "strict": False} for t in req.tools],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": None,
            "metadata": dict(req.metadata),
            "metrics": dict(self.metrics),
        }

    def _pending_item(self) -> dict[str, Any]:
        if self.function_call:
            return {
                "id": self.item_id,
                "type": "function_call",
                "status": "in_progress",
                "call_id": "",
                "name": "",
                "arguments": "",
            }
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }

    # ------------------------------------------------------------------ events
    def created(self) -> list[dict[str, Any]]:
        return [
            self.event("response.created", response=self.response()),
            self.event("response.in_progress", response=self.response()),
        ]

    def output_started(
        self, *, call_id: str | None = None, name: str | None = None
    ) -> list[dict[str, Any]]:
        item = self._pending_item()
        if self.function_call:
            item["call_id"], item["name"] = call_id, name
        events = [self.event("response.output_item.added", output_index=0, item=item)]
        if not self.function_call:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=self.item_id,
                    output_index=0,
                    content_index=0,
                    part=part,
                )
            )
        return events

    def delta(self, text: str) -> list[dict[str, Any]]:
        self._text.append(text)
        if self.function_call:
            return [
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=self.item_id,
                    output_index=0,
                    delta=text,
                )
            ]
        return [
            self.event(
                "response.output_text.delta",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        ]

    def completed(
        self,
        item: Item | None,
        *,
        input_tokens: int,
        cached_tokens: int,
        output_tokens: int,
        metrics: dict[str, Any],
        incomplete_reason: str | None = None,
    ) -> list[dict[str, Any]]:
        """The closing events; `item` None for a warm-up (`generate: false`). With an
        `incomplete_reason` (the output limit cut the item off) the response and its item
        are "incomplete" and the last event is `response.incomplete`, as in the API."""
        events: list[dict[str, Any]] = []
        if isinstance(item, Message):
            part = {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
            events.append(
                self.event(
                    "response.output_text.done",
                    item_id=self.item_id,
                    output_index=0,
                    content_index=0,
                    text=item.text,
                    logprobs=[],
                )
            )
            events.append(
                self.event(
                    "response.content_part.done",
                    item_id=self.item_id,
                    output_index=0,
                    content_index=0,
                    part=part,
                )
            )
        elif isinstance(item, FunctionCall):
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=self.item_id,
                    output_index=0,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        if item is not None:
            item_json = item_to_json(item, item_id=self.item_id)
            if incomplete_reason is not None:
                item_json["status"] = "incomplete"
            self.output.append(item_json)
            events.append(self.event("response.output_item.done", output_index=0, item=item_json))
        self.status = "completed" if incomplete_reason is None else "incomplete"
        if incomplete_reason is not None:
            self.incomplete_details = {"reason": incomplete_reason}
        self.usage = {
            "input_tokens": input_tokens,
            # prefix-cache reads are reported; this server has no separate cache writes
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        self.metrics = metrics_ms(metrics)
        kind = "response.completed" if incomplete_reason is None else "response.incomplete"
        events.append(self.event(kind, response=self.response()))
        return events

    def failed(self, err: ProtocolError) -> list[dict[str, Any]]:
        """`error` then `response.failed`."""
        self.status = "failed"
        self.error = {"code": err.code, "message": err.message}
        return [
            self.event("error", **error_fields(err)),
            self.event("response.failed", response=self.response()),
        ]


def metrics_ms(metrics: dict[str, Any]) -> dict[str, Any]:
    """Timings in seconds (`*_s`) as milliseconds (`*_ms`); other entries as they are."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.endswith("_s") and isinstance(value, float):
            out[key[:-2] + "_ms"] = round(value * 1000.0, 3)
        else:
            out[key] = value
    return out


def error_fields(err: ProtocolError) -> dict[str, Any]:
    """The `error` event's fields besides `type`: status and the error object."""
    return {"status": err.status, "error": err.to_json()}


def error_event(err: ProtocolError) -> dict[str, Any]:
    """A standalone `error` event (a request refused before `response.created`)."""
    return {"type": "error", **error_fields(err)}
