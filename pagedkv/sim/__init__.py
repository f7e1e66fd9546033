"""pagedkv.sim: replay workloads against the real scheduler on a virtual clock.

Workloads come from the built-in agent-loop generator (`generate_agent_workload`) or
from traces (`load_workload`: pagedkv-trace JSONL or Mooncake). `replay` runs one
policy on metadata-only pools with a cost model for transfers and compute;
`run_jobs` runs several (in worker processes); `build_report`, `format_tables`,
`write_json` and `plot_report` turn the runs into numbers. No tensors are allocated.
"""

from __future__ import annotations

from pagedkv.sim.agent_workload import (
    DEFAULT_NUM_SESSIONS,
    AgentWorkloadConfig,
    LogNormalRange,
    generate_agent_workload,
)
from pagedkv.sim.compare import (
    Job,
    ReplayError,
    WorkloadFacts,
    default_workers,
    gpu_sweep_sizes,
    main_jobs,
    run_jobs,
    sweep_jobs,
    workload_facts,
)
from pagedkv.sim.policies import (
    DEFAULT_IDLE_TTL_S,
    DEFAULT_POLICIES,
    POLICIES,
    HardwareProfile,
    Policy,
    SimSettings,
    default_pinned_cap,
    ideal_gpu_blocks,
    parse_policies,
    scheduler_config,
)
from pagedkv.sim.report import build_report, format_tables, plot_report, summarize, write_json
from pagedkv.sim.simulator import DONE, REFUSED, PolicyRun, TurnRecords, replay
from pagedkv.sim.tokens import PromptTokens
from pagedkv.sim.traces import (
    TraceFormatError,
    load_mooncake,
    load_trace,
    load_workload,
    write_trace,
)
from pagedkv.sim.workload import Request, Workload, WorkloadStats

__all__ = [
    "DEFAULT_IDLE_TTL_S",
    "DEFAULT_NUM_SESSIONS",
    "DEFAULT_POLICIES",
    "DONE",
    "POLICIES",
    "REFUSED",
    "AgentWorkloadConfig",
    "HardwareProfile",
    "Job",
    "LogNormalRange",
    "Policy",
    "PolicyRun",
    "PromptTokens",
    "ReplayError",
    "Request",
    "SimSettings",
    "TraceFormatError",
    "TurnRecords",
    "Workload",
    "WorkloadFacts",
    "WorkloadStats",
    "build_report",
    "default_pinned_cap",
    "default_workers",
    "format_tables",
    "generate_agent_workload",
    "gpu_sweep_sizes",
    "ideal_gpu_blocks",
    "load_mooncake",
    "load_trace",
    "load_workload",
    "main_jobs",
    "parse_policies",
    "plot_report",
    "replay",
    "run_jobs",
    "scheduler_config",
    "summarize",
    "sweep_jobs",
    "workload_facts",
    "write_json",
    "write_trace",
]
