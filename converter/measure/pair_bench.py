"""`invoke bench`'s side-by-side comparisons of two files of one model, at ORT's default options
and at OpenKara's (graph optimization off): the shipped float16-storage file against its float32
twin from the same conversion (`storage.restore_float32`, the bytes `--weight-storage float32`
writes), and, with `--baseline FILE`, this build's file against another build's (say the last
release's), to catch a change that costs speed, memory or accuracy.

Latency alternates the two files run by run in one process, so both see the same machine.
Peak RSS (load + two segments, what a song's first seconds cost) and session load time come
from one fresh process per file, alternated, ROUNDS times each. The children import only
numpy and onnxruntime, so they also run in the contract venvs, one per ORT version.
"""

from __future__ import annotations

import logging
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from converter.errors import UserError
from converter.facts import SPECTRAL_CORE
from converter.gate import ortcheck
from converter.measure.segment import (
    APP_CONFIG,
    DEFAULT_CONFIG,
    ORT_CONFIGS,
    WARMUPS,
    interface_of,
    ort_session,
    run_segment,
    segment_input,
)

log = logging.getLogger(__name__)

COMPARED_CONFIGS = (DEFAULT_CONFIG, APP_CONFIG)
ROUNDS = 2
# The bounds for the first file against the second: float16 storage against float32, or a new
# build against its baseline.
LATENCY_RATIO = 1.03
RSS_RATIO = 1.10
STEMS_MSE = 1e-14


def float32_twin(path: Path, out: Path) -> Path:
    """Write `path` with every weight back in float32, stamped as such; return `out`."""
    # here, not at the top: the children run in venvs of numpy + onnxruntime only
    import onnx

    from converter import metadata as meta
    from converter.build import storage

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


# --- children, run by `converter.measure.bench.run_child` in their own processes ----------


def child_memory(path: str, config: str, threads: int) -> dict:
    """Load `path` and run two segments: the parent reads this process's peak RSS."""

    start = time.perf_counter()
    session = ort_session(path, *ORT_CONFIGS[config], threads)
    loaded = time.perf_counter() - start
    audio = segment_input(session)
    segments = []
    for _ in range(2):
        start = time.perf_counter()
        run_segment(session, audio)
        segments.append(time.perf_counter() - start)
    return {"session_s": loaded, "segments_s": segments}


def child_latency(files: dict[str, str], config: str, runs: int, threads: int) -> dict:
    """Both files in one process, run alternately, the order flipped every turn so neither
    always runs first; the first file's stems compared with the second's. A spectral-core
    file's segment includes its numpy STFT/ISTFT; its graph alone is timed too."""

    sessions = {
        name: ort_session(path, *ORT_CONFIGS[config], threads) for name, path in files.items()
    }
    first, second = sessions
    audio = segment_input(sessions[first])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    graph_s: dict[str, list[float]] = {name: [] for name in sessions}
    stems = {}
    for turn in range(WARMUPS + runs):
        order = list(sessions.items())
        for name, session in order if turn % 2 == 0 else reversed(order):
            start = time.perf_counter()
            stems[name] = run_segment(session, audio, graph_s[name])
            if turn >= WARMUPS:
                times[name].append(time.perf_counter() - start)
    diff = stems[first].astype(np.float64) - stems[second]
    return {
        "latencies_s": times,
        "graph_latencies_s": {name: t[WARMUPS:] for name, t in graph_s.items()},
        "interfaces": {name: interface_of(session) for name, session in sessions.items()},
        "stems_mse": float(np.mean(diff**2)),
        "stems_max_abs": float(np.abs(diff).max()),
        "stems_identical": bool(np.array_equal(stems[first], stems[second])),
    }


def child_margin(files: dict[str, str], reference: str, threads: int, cap_db: float) -> dict:
    """Each file's validation-gate margin (dB, worst stem and input, OpenKara's setting) on the
    inputs and float64 stems recorded at conversion (`NAME.reference.npz`), within ±cap_db."""
    _, audios, truths, bounds = ortcheck.read_reference(Path(reference))
    margins = {}
    for name, path in files.items():
        session = ort_session(path, *ORT_CONFIGS[APP_CONFIG], threads)
        worst = cap_db
        for audio, truth, bound in zip(audios, truths, bounds, strict=True):
            stems = run_segment(session, audio, dtype=np.float64)  # the gate's transforms
            if stems.shape != truth.shape or not np.isfinite(stems).all():
                worst = -cap_db
                break
            worst = min(worst, ortcheck.margin_db(stems, truth, bound))
        margins[name] = max(worst, -cap_db)
        log.info("gate margin of %s: %.1f dB", name, margins[name])
    return {"margin_db": margins}


CHILDREN = {"pair_memory": child_memory, "pair_latency": child_latency, "pair_margin": child_margin}


# --- the parent -------------------------------------------------------------------------------


def compare_storage(path: Path, runs: int, threads: int, run_child: Callable[..., dict]) -> dict:
    """Sizes, latency, peak RSS and stems of `path` (float16 storage) against its float32 twin."""
    # here, not at the top: the children run in venvs of numpy + onnxruntime only
    from converter.build import storage

    twin = float32_twin(path, path.with_name(path.stem + ".float32.onnx"))
    try:
        return compare({storage.FLOAT16: path, storage.FLOAT32: twin}, runs, threads, run_child)
    finally:
        twin.unlink()


def compare(
    files: dict[str, Path], runs: int, threads: int, run_child: Callable[..., dict]
) -> dict:
    """Sizes, latency, peak RSS, session load and stems of two files, labelled: the first
    against the second (the ratios are first / second)."""
    (first, path), (second, other) = files.items()
    if path.resolve() == other.resolve():
        raise UserError(f"{path} is compared with itself: pass a different file")
    result: dict = {
        "labels": [first, second],
        "files": {
            name: {"bytes": p.stat().st_size, "gzip_bytes": gzip_bytes(p)}
            for name, p in files.items()
        },
        "configs": {},
    }
    for config in COMPARED_CONFIGS:
        latency = run_child(
            "pair_latency",
            files={name: str(p) for name, p in files.items()},
            config=config,
            runs=runs,
            threads=threads,
        )
        memory: dict[str, list[dict]] = {name: [] for name in files}
        for round_ in range(ROUNDS):
            order = list(files.items())
            for name, p in order if round_ % 2 == 0 else reversed(order):
                memory[name].append(
                    run_child("pair_memory", path=str(p), config=config, threads=threads)
                )
        per_file = {
            name: {
                "interface": latency["interfaces"][name],
                "median_s": statistics.median(latency["latencies_s"][name]),
                "graph_median_s": statistics.median(latency["graph_latencies_s"][name]),
                "latencies_s": latency["latencies_s"][name],
                "peak_rss_mb": max(m["peak_rss_mb"] for m in memory[name]),
                "session_s": statistics.median(m["session_s"] for m in memory[name]),
            }
            for name in files
        }
        a, b = per_file[first], per_file[second]
        result["configs"][config] = {
            **per_file,
            "latency_ratio": a["median_s"] / b["median_s"],
            "peak_rss_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
            **{k: latency[k] for k in ("stems_mse", "stems_max_abs", "stems_identical")},
        }
    return result


def table_lines(
    result: dict, fp32_weight_bytes: int, title: str, stems_bound: float | None = None
) -> list[str]:
    """Markdown: the first file against the second, under `title`; `stems_bound` is the MSE the
    two files' stems may differ by, where one applies (storage changes no arithmetic)."""
    labels, files = result["labels"], result["files"]
    lines = [
        "",
        title,
        "",
        "| file | MB | gzip'd MB | / fp32 weights |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {name} | {files[name]['bytes'] / 1e6:.1f} | {files[name]['gzip_bytes'] / 1e6:.1f} | "
        f"{files[name]['bytes'] / fp32_weight_bytes:.3f} |"
        for name in labels
    ]
    pair = " / ".join(labels)
    lines += [
        "",
        (
            f"| session options | s / segment {pair} | ratio (≤ {LATENCY_RATIO}) | peak RSS GB "
            f"{pair} | ratio (≤ {RSS_RATIO}) | session load s {pair} | stems MSE"
            + (f" (≤ {stems_bound:g}) |" if stems_bound is not None else " |")
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config, c in result["configs"].items():
        a, b = (c[name] for name in labels)
        same = "identical" if c["stems_identical"] else f"{c['stems_mse']:.1e}"
        lines.append(
            f"| {config} | {a['median_s']:.2f} / {b['median_s']:.2f} | {c['latency_ratio']:.3f} | "
            f"{a['peak_rss_mb'] / 1024:.2f} / {b['peak_rss_mb'] / 1024:.2f} | "
            f"{c['peak_rss_ratio']:.3f} | {a['session_s']:.2f} / {b['session_s']:.2f} | {same} |"
        )
    spectral = [
        f"{name}, {config}: {c[name]['graph_median_s']:.2f} s"
        for config, c in result["configs"].items()
        for name in labels
        if c[name].get("interface") == SPECTRAL_CORE
    ]
    if spectral:
        lines += [
            "",
            "A spectral-core file's s / segment include the numpy STFT/ISTFT; its graph alone: "
            + "; ".join(spectral)
            + ".",
        ]
    return lines
