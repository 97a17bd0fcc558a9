"""Shared test set-up. A skip is allowed only for a missing GPU: any other skip fails the run, so a
test that could run on CPU is never silently dropped."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_bad_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "CUDA" not in reason and "GPU" not in reason:
            _bad_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _bad_skips:
        terminalreporter.write_line("FAILED: tests skipped on CPU for a reason other than a missing GPU:", red=True)
        for line in _bad_skips:
            terminalreporter.write_line("  " + line, red=True)


needs_cuda = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA (no GPU on this machine)")
