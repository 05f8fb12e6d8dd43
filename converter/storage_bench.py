"""`invoke bench`'s weight-storage comparison: the shipped float16-storage file against its
float32 twin from the same conversion (`storage.restore_float32`, the bytes `--weight-storage
float32` writes), at ORT's default options and at OpenKara's (graph optimization off).

Latency alternates the two files run by run in one process, so both see the same machine.
Peak RSS (load + two segments, what a song's first seconds cost) and session load time come
from one fresh process per file, alternated, ROUNDS times each.
"""

from __future__ import annotations

import logging
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from . import metadata as meta
from . import storage

log = logging.getLogger(__name__)

COMPARED_CONFIGS = ("default options", "graph optimization off (OpenKara, separate)")
ROUNDS = 2
# The bounds for the float16 file against the float32 one.
LATENCY_RATIO = 1.03
RSS_RATIO = 1.10
STEMS_MSE = 1e-14


def float32_twin(path: Path, out: Path) -> Path:
    """Write `path` with every weight back in float32, stamped as such; return `out`."""
    model = onnx.load(path)
    storage.restore_float32(model)
    entries = meta.read_metadata(model)
    entries.pop(meta.CACHE_KEY, None)
    meta.stamp(model, {**entries, meta.WEIGHT_STORAGE: storage.FLOAT32})
    onnx.save(model, out)
    return out


def gzip_bytes(path: Path, level: int = 6) -> int:
    """Size of `path` gzip'd at `level` (gzip's default), streamed."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    size = 0
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            size += len(compressor.compress(block))
    return size + len(compressor.flush())


# --- children, run by `converter.bench.run_child` in their own processes ----------------------


def child_memory(path: str, config: str, threads: int) -> dict:
    """Load `path` and run two segments: the parent reads this process's peak RSS."""
    from .bench import ORT_CONFIGS, _input, _ort_session

    start = time.perf_counter()
    session = _ort_session(path, *ORT_CONFIGS[config], threads)
    loaded = time.perf_counter() - start
    shape = session.get_inputs()[0].shape
    audio = _input(shape[1], shape[2])
    segments = []
    for _ in range(2):
        start = time.perf_counter()
        session.run(["stems"], {"audio": audio})
        segments.append(time.perf_counter() - start)
    return {"session_s": loaded, "segments_s": segments}


def child_latency(half: str, float32: str, config: str, runs: int, threads: int) -> dict:
    """Both files in one process, run alternately; their stems compared."""
    from .bench import ORT_CONFIGS, WARMUPS, _input, _ort_session

    sessions = {
        name: _ort_session(path, *ORT_CONFIGS[config], threads)
        for name, path in ((storage.FLOAT16, half), (storage.FLOAT32, float32))
    }
    shape = sessions[storage.FLOAT16].get_inputs()[0].shape
    audio = _input(shape[1], shape[2])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    stems = {}
    for turn in range(WARMUPS + runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            stems[name] = session.run(["stems"], {"audio": audio})[0]
            if turn >= WARMUPS:
                times[name].append(time.perf_counter() - start)
    diff = stems[storage.FLOAT16].astype(np.float64) - stems[storage.FLOAT32]
    return {
        "latencies_s": times,
        "stems_mse": float(np.mean(diff**2)),
        "stems_max_abs": float(np.abs(diff).max()),
        "stems_identical": bool(np.array_equal(stems[storage.FLOAT16], stems[storage.FLOAT32])),
    }


CHILDREN = {"storage_memory": child_memory, "storage_latency": child_latency}


# --- the parent -------------------------------------------------------------------------------


def compare(path: Path, runs: int, threads: int, run_child: Callable[..., dict]) -> dict:
    """Sizes, latency, peak RSS and stems of `path` (float16 storage) against its float32 twin."""
    twin = float32_twin(path, path.with_name(path.stem + ".float32.onnx"))
    try:
        return _compare({storage.FLOAT16: path, storage.FLOAT32: twin}, runs, threads, run_child)
    finally:
        twin.unlink()


def _compare(
    files: dict[str, Path], runs: int, threads: int, run_child: Callable[..., dict]
) -> dict:
    path, twin = files[storage.FLOAT16], files[storage.FLOAT32]
    result: dict = {
        "files": {
            name: {"bytes": p.stat().st_size, "gzip_bytes": gzip_bytes(p)}
            for name, p in files.items()
        },
        "configs": {},
    }
    for config in COMPARED_CONFIGS:
        latency = run_child(
            "storage_latency",
            half=str(path),
            float32=str(twin),
            config=config,
            runs=runs,
            threads=threads,
        )
        memory: dict[str, list[dict]] = {name: [] for name in files}
        for _ in range(ROUNDS):
            for name, p in files.items():
                memory[name].append(
                    run_child("storage_memory", path=str(p), config=config, threads=threads)
                )
        per_file = {
            name: {
                "median_s": statistics.median(latency["latencies_s"][name]),
                "latencies_s": latency["latencies_s"][name],
                "peak_rss_mb": max(m["peak_rss_mb"] for m in memory[name]),
                "session_s": statistics.median(m["session_s"] for m in memory[name]),
            }
            for name in files
        }
        half, full = per_file[storage.FLOAT16], per_file[storage.FLOAT32]
        result["configs"][config] = {
            **per_file,
            "latency_ratio": half["median_s"] / full["median_s"],
            "peak_rss_ratio": half["peak_rss_mb"] / full["peak_rss_mb"],
            **{k: latency[k] for k in ("stems_mse", "stems_max_abs", "stems_identical")},
        }
    return result


def table_lines(result: dict, fp32_weight_bytes: int) -> list[str]:
    """Markdown: the float16-storage file against its float32 twin."""
    files = result["files"]
    half, full = files[storage.FLOAT16], files[storage.FLOAT32]
    lines = [
        "",
        (
            "Weight storage: the shipped file (float16 where exact) against its float32 twin, "
            "same conversion."
        ),
        "",
        "| file | MB | gzip'd MB | / fp32 weights |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {name} | {f['bytes'] / 1e6:.1f} | {f['gzip_bytes'] / 1e6:.1f} | "
        f"{f['bytes'] / fp32_weight_bytes:.3f} |"
        for name, f in ((storage.FLOAT16, half), (storage.FLOAT32, full))
    ]
    lines += [
        "",
        (
            "| session options | s / segment float16 / float32 | ratio (≤ "
            f"{LATENCY_RATIO}) | peak RSS GB float16 / float32 | ratio (≤ {RSS_RATIO}) "
            f"| session load s float16 / float32 | stems MSE (≤ {STEMS_MSE:g}) |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config, c in result["configs"].items():
        h, f = c[storage.FLOAT16], c[storage.FLOAT32]
        same = "identical" if c["stems_identical"] else f"{c['stems_mse']:.1e}"
        lines.append(
            f"| {config} | {h['median_s']:.2f} / {f['median_s']:.2f} | {c['latency_ratio']:.3f} | "
            f"{h['peak_rss_mb'] / 1024:.2f} / {f['peak_rss_mb'] / 1024:.2f} | "
            f"{c['peak_rss_ratio']:.3f} | {h['session_s']:.2f} / {f['session_s']:.2f} | {same} |"
        )
    return lines
