"""converter.progress: logged steps, and peak RSS where POSIX's `resource` does not exist."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from converter import progress


def test_peak_rss_is_read_without_resource_on_windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "resource", None)  # absent on Windows
    value = progress.peak_rss_mb()  # psapi on Windows; NaN here, where there is no kernel32
    assert math.isnan(value) if not hasattr(__import__("ctypes"), "WinDLL") else value > 0


def test_step_logs_start_end_and_records_its_time(caplog):
    timings: dict[str, float] = {}
    with caplog.at_level(logging.INFO, logger="converter"), progress.step("export", timings):
        pass
    assert "export ..." in caplog.text and "export: done in" in caplog.text
    assert timings["export"] >= 0 and progress.peak_rss_mb() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's VmHWM")
def test_a_child_reports_its_own_peak_not_its_parents():
    """Linux keeps a process's ru_maxrss across fork and exec; bench children must not report
    the size of the (large) process that started them."""
    ballast = bytearray(400 << 20)
    ballast[:: 1 << 12] = b"\1" * len(ballast[:: 1 << 12])  # touch every page
    done = subprocess.run(
        [sys.executable, "-c", "from converter import progress; print(progress.peak_rss_mb())"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert 0 < float(done.stdout) < 200
    del ballast
