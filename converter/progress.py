"""Timed, logged pipeline steps, with a heartbeat for long calls that report nothing themselves.

A TorchScript export or an ONNX Runtime optimization of a full-size model is one opaque call of
a minute or more; the heartbeat line tells the user it is alive and how long it has run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import math
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("converter")

HEARTBEAT_SECONDS = 15.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (NaN where it cannot be read).

    On Linux it is VmHWM: `ru_maxrss` keeps the parent's peak across fork and exec, so a bench
    child started by a large parent would report the parent's size. POSIX's `resource` (macOS
    reports bytes) does not exist on Windows, where the peak working set comes from psapi;
    imported here so the verify tools import on Windows.
    """
    if sys.platform == "win32":
        return _peak_working_set_mb()
    if sys.platform.startswith("linux"):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    import resource  # here: POSIX only, and the verify tools must import on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _peak_working_set_mb() -> float:
    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
        _fields_ = [("cb", ctypes.c_ulong), ("PageFaultCount", ctypes.c_ulong)] + [
            (name, ctypes.c_size_t)
            for name in (
                "PeakWorkingSetSize",
                "WorkingSetSize",
                "QuotaPeakPagedPoolUsage",
                "QuotaPagedPoolUsage",
                "QuotaPeakNonPagedPoolUsage",
                "QuotaNonPagedPoolUsage",
                "PagefileUsage",
                "PeakPagefileUsage",
            )
        ]

    counters = Counters(cb=ctypes.sizeof(Counters))
    try:
        kernel32 = ctypes.WinDLL("kernel32")
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p
        process = kernel32.GetCurrentProcess()
        ok = kernel32.K32GetProcessMemoryInfo(
            ctypes.c_void_p(process), ctypes.byref(counters), counters.cb
        )
    except (AttributeError, OSError):
        return math.nan
    return counters.PeakWorkingSetSize / (1 << 20) if ok else math.nan


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    A step's temporaries (a traced graph, protobuf copies, PyTorch activations) are freed when it
    ends, but glibc keeps small-block heap pages resident, so the next step's peak would stack on
    top of them; `malloc_trim` returns them. A no-op where glibc is not the allocator.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


@contextlib.contextmanager
def step(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Log `name` at start and end (seconds, peak RSS); beat every HEARTBEAT_SECONDS meanwhile."""
    log.info("%s ...", name)
    start = time.perf_counter()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            log.info("%s: still running, %.0f s", name, time.perf_counter() - start)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        release_memory()
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[name] = elapsed
    log.info("%s: done in %.1f s (peak RSS %.0f MB)", name, elapsed, peak_rss_mb())
