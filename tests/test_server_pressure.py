"""More concurrent `openai` SDK connections than the pinned cap.

Every turn either completes or gets the over-capacity error; pinned sessions never
exceed the cap (scheduler invariants hold throughout); once every client has closed,
no block is in use in either pool.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

from pagedkv.scheduler.config import SchedulerConfig  # noqa: E402
from pagedkv.serving.testing import engine_check, read_response, tiny_server  # noqa: E402

NUM_CLIENTS = 6
NUM_TURNS = 3
TOOLS = [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def agent(base_url: str, index: int, outcomes: list[str], errors: list[BaseException]) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    try:
        with client.responses.connect() as conn:
            previous = None
            new_input: Any = f"client {index}: " + "context " * (40 + 10 * index)
            for _turn in range(NUM_TURNS):
                conn.response.create(
                    model="tiny", tools=TOOLS, tool_choice="required", input=new_input,
                    previous_response_id=previous.id if previous else None,
                    store=False, max_output_tokens=6,
                )  # fmt: skip
                events = read_response(conn)
                last = events[-1]
                if last.type in ("response.completed", "response.incomplete"):
                    outcomes.append("completed")
                    previous = last.response
                    call = previous.output[0]
                    new_input = [
                        {
                            "type": "function_call_output",
                            "call_id": call.call_id,
                            "output": "ok " * 30,
                        }
                    ]
                    continue
                errs = [e for e in events if e.type == "error"]
                assert len(errs) == 1, [e.type for e in events]
                outcomes.append(errs[0].error.code)
                if previous is None:
                    continue  # the first turn was refused: try it again
                # a refused turn changes nothing: retry the same input on the same chain
    except BaseException as exc:  # reported to the main thread
        errors.append(exc)


def test_more_connections_than_pinned_sessions() -> None:
    sched = SchedulerConfig(max_pinned_sessions=2, max_queue=1, queue_timeout_s=2.0)
    with tiny_server(
        scheduler=sched, num_gpu_blocks=96, num_host_blocks=48, step_delay_s=0.005
    ) as (srv, engine):
        outcomes: list[str] = []
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=agent, args=(srv.base_url, i, outcomes, errors))
            for i in range(NUM_CLIENTS)
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            stats = engine_check(engine)  # invariants hold while clients run
            assert stats["num_pinned"] <= 2, stats
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert not errors, errors
        counts = Counter(outcomes)
        assert set(counts) <= {"completed", "over_capacity"}, counts
        assert counts["completed"] >= NUM_TURNS and len(outcomes) == NUM_CLIENTS * NUM_TURNS
        deadline = time.monotonic() + 10
        while (stats := engine_check(engine))["num_sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["num_sessions"] == 0, stats
        assert stats["gpu_blocks"]["in_use"] == 0, stats
        assert stats["host_blocks"]["in_use"] == 0, stats
        sched_metrics = stats["scheduler"]
        evicted = ("sessions_offloaded", "sessions_dropped", "sessions_released_backed_up")
        assert sum(sched_metrics[k] for k in evicted) > 0
        print(dict(counts), sched_metrics)
