"""A pytest plugin: under CI (`CI=true`) a skipped test fails the run unless it needs a
CUDA device.

A skip hides a missing dependency or missing data (the newest `openai` stopped bringing
`httpx`, and an `importorskip` quietly dropped the HTTP edge tests). Only the `gpu`
marker's skip (no CUDA device on the CI machine) is expected; every other skip, of a
test or of a whole module, is listed at the end of the run and turns the exit status
into a failure. Outside CI the skips are only listed (`-ra`).
"""

from __future__ import annotations

import os

import pytest

GPU_SKIP_REASON = "needs a CUDA device; none is available"


def enforced() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


class SkipPolicy:
    """Collects the skips that are not GPU skips; fails the session on them under CI."""

    def __init__(self) -> None:
        self.unexpected: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = _reason(report)
        if "gpu" in report.keywords and reason == GPU_SKIP_REASON:
            return
        self.unexpected.append(f"{report.nodeid}: {reason}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a module skipped at import (importorskip, allow_module_level)
            self.unexpected.append(f"{report.nodeid}: {_reason(report)}")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.unexpected and enforced():
            terminalreporter.section("skips that are not GPU skips: a failure under CI")
            for line in self.unexpected:
                terminalreporter.line(line)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        ok = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
        if self.unexpected and enforced() and exitstatus in ok:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(), "pagedkv-skip-policy")
