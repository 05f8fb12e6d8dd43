"""converter.progress: logged steps, and peak RSS where POSIX's `resource` does not exist."""

from __future__ import annotations

import logging
import math
import sys

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
