"""`invoke bench`: PyTorch eager demucs vs onnxruntime on the converted file, in one run.

Every engine is measured in its own child process (`python -m converter.bench KIND ARGS OUT`),
so each peak RSS belongs to that engine alone and no engine warms caches for another. Latency
is the median of N runs after 2 warm-ups, on one segment, with as many threads as cores for
both engines. onnxruntime is measured at its default session options and at the options apps
actually choose (OpenKara and `invoke separate` disable graph optimization for pre-optimized
files), and with the memory pattern or the memory arena off, because their peak RSS differs by
large factors. The arithmetic is counted from the graph (GMAC, spectral vs network) and divided
by this machine's measured SGEMM throughput: the time no implementation of this graph can beat
here.

Shared and throttled machines change speed by 2x within minutes, so every timing child probes
numpy's SGEMM throughput before and after its runs, and the parent measures SGEMM at the start
and the end and warns when the two differ: ratios are only meaningful between engines that ran
at the same speed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from . import storage_bench
from .errors import UserError

log = logging.getLogger(__name__)

WARMUPS = 2
# Session options compared, by label: (graph optimization on, CPU memory arena on, memory
# pattern on). The memory pattern is ORT's one block for all activations of a run, sized from
# the first run's trace: its best-fit layout costs more than the arena needs (docs/performance.md).
ORT_CONFIGS = {
    "default options": (True, True, True),
    "graph optimization off (OpenKara, separate)": (False, True, True),
    "optimization + memory pattern off": (False, True, False),
    "memory arena off": (True, False, True),
    "optimization + arena off": (False, False, True),
}
DEFAULT_CONFIG = "default options"
PROFILED_CONFIG = "graph optimization off (OpenKara, separate)"
# The targets for htdemucs on a 2-core x86-64 machine, at ORT's default options.
TARGET_RATIO = 0.70
TARGET_RSS_GB = 2.5
SGEMM_SIZE = 2048
# Before/after SGEMM throughput ratio beyond which the run is flagged as not comparable.
SPEED_TOLERANCE = 1.15


def _input(channels: int, length: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal((1, channels, length))).astype(np.float32)


def _timed(call, runs: int) -> list[float]:
    """Seconds of each of `runs` calls after WARMUPS untimed ones."""
    for _ in range(WARMUPS):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _speed_probe(size: int = 1024) -> float:
    """numpy SGEMM GFLOP/s right now: shows the speed the machine ran an engine at."""
    a = np.ones((size, size), np.float32)
    return 2 * size**3 / min(_timed(lambda: a @ a, 5)) / 1e9


def _measured(call, runs: int) -> dict:
    before = _speed_probe()
    times = _timed(call, runs)
    return {"latencies_s": times, "probe_gflops": [before, _speed_probe()]}


# --- children: each runs in its own process and returns a JSON-able dict ---------------------


def child_convert(model: str, repo: str | None, out_dir: str) -> dict:
    from .pipeline import convert

    path = convert(model, repo=Path(repo) if repo else None, out_dir=Path(out_dir))
    return {"path": str(path)}


def child_torch(model: str, repo: str | None, runs: int, threads: int) -> dict:
    import torch
    from demucs.apply import apply_model

    from .loading import load

    torch.set_num_threads(threads)
    bag = load(model, Path(repo) if repo else None)
    audio = torch.from_numpy(_input(bag.models[0].audio_channels, bag.segment_samples))

    def call():
        # Exactly what the validation gate compares the file with: one segment, no chunking.
        with torch.no_grad():
            apply_model(bag.bag, audio, split=False, shifts=0)

    return {**_measured(call, runs), "threads": torch.get_num_threads()}


def child_accuracy(model: str, repo: str | None, path: str) -> dict:
    from .loading import load
    from .validation import snr_by_input

    return {"inputs": snr_by_input(Path(path), load(model, Path(repo) if repo else None))}


def child_stats(model: str, repo: str | None) -> dict:
    from .export import export_bag
    from .graphstats import macs_by_part
    from .loading import load

    bag = load(model, Path(repo) if repo else None)
    params = sum(p.numel() for m in bag.models for p in m.parameters())
    macs = macs_by_part(export_bag(bag))
    return {
        "fp32_weight_bytes": 4 * params,
        "gmac_spectral": macs.get("spectral", 0) / 1e9,
        "gmac_network": macs.get("network", 0) / 1e9,
    }


def _ort_session(
    path: str, optimize: bool, arena: bool, pattern: bool, threads: int, profile: str | None = None
):  # fmt: skip
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = pattern
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def child_ort(path: str, config: str, runs: int, threads: int) -> dict:
    start = time.perf_counter()
    session = _ort_session(path, *ORT_CONFIGS[config], threads)
    load_s = time.perf_counter() - start
    shape = session.get_inputs()[0].shape
    audio = _input(shape[1], shape[2])
    return {**_measured(lambda: session.run(["stems"], {"audio": audio}), runs), "session_s": load_s}


def profile_summary(events: list[dict], top: int) -> dict:
    """Kernel time of the last `model_run` in an ORT profile, by op type and by graph part.

    Only the last run counts: the first ones pay one-off allocations that a long song does not.
    """
    from .graphstats import part

    run = [e for e in events if e.get("name") == "model_run"][-1]
    lo, hi = run["ts"], run["ts"] + run["dur"]
    by_op: dict[str, list[float]] = {}
    by_part: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not lo <= e["ts"] <= hi:
            continue
        seconds = e["dur"] / 1e6
        entry = by_op.setdefault(e["args"]["op_name"], [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
        name = e["name"].removesuffix("_kernel_time")
        by_part[part(name)] = by_part.get(part(name), 0.0) + seconds
    kernels = sum(s for s, _ in by_op.values())
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1][0])
    return {
        "run_s": run["dur"] / 1e6,
        "kernel_s": kernels,
        "by_part_s": by_part,
        "top_ops": [{"op": op, "s": s, "nodes": n, "share": s / kernels} for op, (s, n) in ranked[:top]],
    }


def child_profile(path: str, config: str, threads: int, top: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        session = _ort_session(path, *ORT_CONFIGS[config], threads, profile=str(Path(tmp) / "ort"))
        shape = session.get_inputs()[0].shape
        audio = _input(shape[1], shape[2])
        for _ in range(WARMUPS + 1):
            session.run(["stems"], {"audio": audio})
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    return {"config": config, **profile_summary(events, top)}


CHILDREN = {
    "convert": child_convert, "torch": child_torch, "stats": child_stats, "ort": child_ort,
    "profile": child_profile,
    "accuracy": child_accuracy,
    **storage_bench.CHILDREN,
}  # fmt: skip


def run_child(kind: str, **kwargs) -> dict:
    """Run one child; return its result plus wall time and the child's own peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result = Path(tmp) / "result.json"
        log.info("bench: %s %s", kind, " ".join(f"{k}={v}" for k, v in kwargs.items()))
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "converter.bench", kind, json.dumps(kwargs), str(result)],
            cwd=Path(__file__).resolve().parent.parent,
        )
        wall = time.perf_counter() - start
        if done.returncode != 0 or not result.is_file():
            raise UserError(f"bench step {kind!r} failed (exit status {done.returncode}); see its log above")
        return {**json.loads(result.read_text(encoding="utf-8")), "wall_s": wall}


def _child_main(kind: str, args: str, out: str) -> None:
    from .progress import peak_rss_mb

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = CHILDREN[kind](**json.loads(args))
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out).write_text(json.dumps(result), encoding="utf-8")


# --- the parent -----------------------------------------------------------------------------


def sgemm_gflops(threads: int, size: int = SGEMM_SIZE, repeats: int = 5) -> dict[str, float]:
    """Best float32 matmul throughput, GFLOP/s, of numpy's BLAS and of onnxruntime's MatMul.

    Both, because either library may be the faster on a given CPU, and the bound must use the
    best this machine can do. The best of a few runs after the warm-ups (thread start-up) is the
    sustained peak.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    square = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
        [square("a", TensorProto.FLOAT, [size, size]), square("b", TensorProto.FLOAT, [size, size])],
        [square("c", TensorProto.FLOAT, [size, size])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    calls = {"numpy": lambda: a @ b, "onnxruntime": lambda: session.run(["c"], {"a": a, "b": b})}
    return {name: 2 * size**3 / min(_timed(call, repeats)) / 1e9 for name, call in calls.items()}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform's answer stands
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    versions = {n: importlib_metadata.version(n) for n in ("onnxruntime", "torch", "numpy", "demucs")}
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory / 1e9,
        "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
    }  # fmt: skip


def bench(
    model: str = "htdemucs", repo: Path | None = None, runs: int = 5, profile: int = 10,
    out_dir: Path = Path("bench-results"),
) -> dict:  # fmt: skip
    """Measure everything the issue asks for; write `out_dir/MODEL.json`; return the results."""
    from .metadata import write_text_atomic

    if runs < 1:
        raise UserError(f"--runs {runs}: at least one timed run is needed")
    threads = os.cpu_count() or 1
    repo_arg = str(repo) if repo else None
    results: dict = {"model": model, "runs": runs, "warmups": WARMUPS, "threads": threads}
    results["machine"] = machine()
    # Measured before and after: a shared machine whose speed changes meanwhile shows it here.
    sgemm_before = sgemm_gflops(threads)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as work:
        conversion = run_child("convert", model=model, repo=repo_arg, out_dir=work)
        path = conversion.pop("path")
        results["conversion"] = conversion
        results["file_bytes"] = Path(path).stat().st_size
        results["weight_storage"] = storage_bench.compare(Path(path), runs, threads, run_child)
        results.update(run_child("stats", model=model, repo=repo_arg))
        torch_run = run_child("torch", model=model, repo=repo_arg, runs=runs, threads=threads)
        results["torch"] = {**torch_run, "median_s": statistics.median(torch_run["latencies_s"])}
        results["onnxruntime"] = {}
        for config in ORT_CONFIGS:
            ort_run = run_child("ort", path=path, config=config, runs=runs, threads=threads)
            median = statistics.median(ort_run["latencies_s"])
            ratio = median / results["torch"]["median_s"]
            results["onnxruntime"][config] = {**ort_run, "median_s": median, "ratio_vs_torch": ratio}
        results["accuracy"] = run_child("accuracy", model=model, repo=repo_arg, path=path)
        if profile > 0:
            results["profile"] = run_child(
                "profile", path=path, config=PROFILED_CONFIG, threads=threads, top=profile
            )
    sgemm_after = sgemm_gflops(threads)
    results["sgemm_gflops"] = {"before": sgemm_before, "after": sgemm_after}
    gflops = max(*sgemm_before.values(), *sgemm_after.values())
    drift = max(sgemm_before.values()) / max(sgemm_after.values())
    if not 1 / SPEED_TOLERANCE <= drift <= SPEED_TOLERANCE:
        log.warning(
            "SGEMM throughput changed %.2fx during the bench: the machine is shared or throttling, "
            "and the engines' numbers were taken at different speeds; run it again", drift,
        )  # fmt: skip
    results["speed_drift"] = drift
    gmac = results["gmac_spectral"] + results["gmac_network"]
    results["bound_s"] = gmac / (gflops / 2)
    default = results["onnxruntime"][DEFAULT_CONFIG]
    results["targets"] = {
        "ratio": {"target": TARGET_RATIO, "value": default["ratio_vs_torch"]},
        "ort_peak_rss_gb": {"target": TARGET_RSS_GB, "value": default["peak_rss_mb"] / 1024},
    }
    out = out_dir / f"{model}.json"
    write_text_atomic(out, json.dumps(results, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", out)
    return results


def _probe(run: dict) -> str:
    return " / ".join(f"{g:.0f}" for g in run["probe_gflops"])


def table(results: dict) -> str:
    """Markdown tables of `results` (as README.md and docs/performance.md show them)."""
    m = results["machine"]
    torch_s = results["torch"]["median_s"]
    gmac = results["gmac_spectral"] + results["gmac_network"]
    lines = [
        f"`{results['model']}` on {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB RAM, "
        f"{m['platform']}; onnxruntime {m['versions']['onnxruntime']}, torch "
        f"{m['versions']['torch']}; median of {results['runs']} runs after {results['warmups']} "
        f"warm-ups, {results['threads']} threads each.",
        "",
        "| engine | session options | s / segment | vs PyTorch | peak RSS (GB) | session load (s) "
        "| numpy GFLOP/s before / after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| PyTorch eager | - | {torch_s:.2f} | 1.00 | {results['torch']['peak_rss_mb'] / 1024:.2f} | - "
        f"| {_probe(results['torch'])} |",
    ]
    for config, r in results["onnxruntime"].items():
        lines.append(
            f"| onnxruntime | {config} | {r['median_s']:.2f} | {r['ratio_vs_torch']:.2f} | "
            f"{r['peak_rss_mb'] / 1024:.2f} | {r['session_s']:.1f} | {_probe(r)} |"
        )
    conv, targets = results["conversion"], results["targets"]
    size, weights = results["file_bytes"], results["fp32_weight_bytes"]
    sgemm = " / ".join(
        ", ".join(f"{lib} {g:.0f}" for lib, g in results["sgemm_gflops"][when].items())
        for when in ("before", "after")
    )
    mark = lambda t: "met" if t["value"] <= t["target"] else "missed"  # noqa: E731
    lines += [
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| file size / fp32 weights | {size / 1e6:.1f} MB / {weights / 1e6:.1f} MB = {size / weights:.3f} |",
        f"| GMAC per segment | {gmac:.1f} (spectral {results['gmac_spectral']:.2f}, network "
        f"{results['gmac_network']:.1f}) |",
        f"| conversion (`invoke convert`) | {conv['wall_s']:.0f} s, peak RSS "
        f"{conv['peak_rss_mb'] / 1024:.2f} GB |",
        f"| SGEMM float32 {SGEMM_SIZE}², GFLOP/s before / after | {sgemm} |",
        f"| physical bound (GMAC / best SGEMM) | {results['bound_s']:.2f} s / segment |",
        f"| target: ORT default ≤ {TARGET_RATIO:.2f}× PyTorch | {targets['ratio']['value']:.2f}× "
        f"({mark(targets['ratio'])}) |",
        f"| target: ORT default peak RSS ≤ {TARGET_RSS_GB} GB | "
        f"{targets['ort_peak_rss_gb']['value']:.2f} GB ({mark(targets['ort_peak_rss_gb'])}) |",
    ]
    if "accuracy" in results:
        lines += [
            "",
            "Worst-stem SNR against demucs in float64 (dB):",
            "",
            "| input | PyTorch float32 | file, default options | file, optimization off |",
            "| --- | ---: | ---: | ---: |",
        ]
        for a in results["accuracy"]["inputs"]:
            files = a["file_snr_db"]
            lines.append(
                f"| {a['input']} | {a['pytorch_snr_db']:.1f} | {files['default options']:.1f} "
                f"| {files['optimization off']:.1f} |"
            )
    if "weight_storage" in results:
        lines += storage_bench.table_lines(results["weight_storage"], weights)
    if "profile" in results:
        p = results["profile"]
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(p["by_part_s"].items()))
        lines += [
            "",
            f"ORT profile ({p['config']}, last of {WARMUPS + 1} runs): run {p['run_s']:.2f} s, "
            f"kernels {p['kernel_s']:.2f} s ({parts}).",
            "",
            "| op type | s | share of kernel time | nodes |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {o['op']} | {o['s']:.3f} | {100 * o['share']:.1f}% | {o['nodes']} |"
            for o in p["top_ops"]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
