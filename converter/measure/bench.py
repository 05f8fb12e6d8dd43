"""`invoke bench`: PyTorch eager demucs vs onnxruntime on the converted file, in one run.

Every engine is measured in its own child process (`python -m converter.measure.bench KIND ARGS
OUT`), so each peak RSS belongs to that engine alone and no engine warms caches for another. Each
child loads its model, runs 2 warm-up segments (the peak RSS of "load + two segments" is read then,
what an app holds once its memory pattern is in place), then N timed segments. The children run
in `rounds`, alternating engines (every other round in reverse order), because shared machines
change speed within minutes and only ratios taken side by side mean anything. onnxruntime is
measured at its default session options and at the options apps choose (OpenKara and `invoke
separate` disable graph optimization for pre-optimized files), and with the memory pattern or
the memory arena off, whose peak RSS differs by large factors. The arithmetic is counted from
the graph (GMAC, spectral vs network) and divided by this machine's measured SGEMM throughput:
the time no implementation of this graph can beat here.

A spectral-core file (`openkara.tensor_interface=spectral-core`) is run as OpenKara runs it: the
contract's STFT in float32 numpy (`converter.spectral_contract`), the graph, then the ISTFT and
the sum with `time_out`. Each segment's time is taken whole (graph + numpy transforms, what an
app pays) and for the graph alone; the waveform file of the same model, found beside it or
given with `--baseline`, is timed against it in the same run.

`bench_song` times whole processes on a whole song: `invoke separate` against demucs' own CLI
with the same segment, overlap and shifts, alternating, and reports seconds of audio separated
per second.

Every timing child probes numpy's SGEMM throughput before and after its runs, and the parent
measures SGEMM at the start and the end and warns when the two differ.
"""

from __future__ import annotations

import json
import logging
import math
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

from converter.errors import UserError
from converter.facts import (
    IR_VERSION,
    OPSET,
    REPO_ROOT,
    SPECTRAL_CORE,
    WAVEFORM,
    file_stem,
)
from converter.gate.ortcheck import open_session
from converter.measure import pair_bench
from converter.measure.segment import (
    APP_CONFIG,
    DEFAULT_CONFIG,
    ORT_CONFIGS,
    WARMUPS,
    graph_feeds,
    interface_of,
    ort_session,
    run_segment,
    segment_input,
    test_audio,
)
from converter.progress import peak_rss_mb

log = logging.getLogger(__name__)

PROFILED_CONFIG = APP_CONFIG
# The targets (issue 13), each at both settings apps use: ORT's defaults and optimization off.
TARGET_CONFIGS = (APP_CONFIG, DEFAULT_CONFIG)
TARGET_RATIO = 0.55  # s / segment, vs PyTorch eager
TARGET_LOAD_S = 1.0  # session creation
TARGET_SONG_RATIO = 0.5  # whole-process wall time vs demucs' CLI on a whole song
SGEMM_SIZE = 2048
# Before/after SGEMM throughput ratio beyond which the run is flagged as not comparable.
SPEED_TOLERANCE = 1.15


def _timed(call, runs: int) -> list[float]:
    """Seconds of each of `runs` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _speed_probe(size: int = 1024) -> float:
    """numpy SGEMM GFLOP/s right now: shows the speed the machine ran an engine at."""
    a = np.ones((size, size), np.float32)
    _timed(lambda: a @ a, 2)
    return 2 * size**3 / min(_timed(lambda: a @ a, 5)) / 1e9


def _measured(call, runs: int) -> dict:
    """WARMUPS untimed calls, the peak RSS they reached, then `runs` timed ones between probes."""
    _timed(call, WARMUPS)
    two_segments = peak_rss_mb()
    before = _speed_probe()
    times = _timed(call, runs)
    return {
        "latencies_s": times,
        "probe_gflops": [before, _speed_probe()],
        "peak_rss_two_segments_mb": two_segments,
    }


# --- children: each runs in its own process and returns a JSON-able dict ---------------------


def child_convert(model: str, repo: str | None, out_dir: str) -> dict:
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    from converter.pipeline import convert

    path = convert(model, repo=Path(repo) if repo else None, out_dir=Path(out_dir))
    return {"path": str(path)}


def child_torch(model: str, repo: str | None, runs: int, threads: int) -> dict:
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    import torch
    from demucs.apply import apply_model

    from converter.build.loading import load

    torch.set_num_threads(threads)
    start = time.perf_counter()
    bag = load(model, Path(repo) if repo else None)
    load_s = time.perf_counter() - start
    audio = torch.from_numpy(test_audio(bag.models[0].audio_channels, bag.segment_samples))

    def call():
        # Exactly what the validation gate compares the file with: one segment, no chunking.
        with torch.no_grad():
            apply_model(bag.bag, audio, split=False, shifts=0)

    return {**_measured(call, runs), "threads": torch.get_num_threads(), "load_s": load_s}


def child_accuracy(model: str, repo: str | None, path: str) -> dict:
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    from converter.build.loading import load
    from converter.gate.validation import snr_by_input

    return {"inputs": snr_by_input(Path(path), load(model, Path(repo) if repo else None))}


def child_stats(model: str, repo: str | None) -> dict:
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    from converter.build.export import export_bag
    from converter.build.loading import load
    from converter.measure.graphstats import macs_by_part

    bag = load(model, Path(repo) if repo else None)
    params = sum(p.numel() for m in bag.models for p in m.parameters())
    macs = macs_by_part(export_bag(bag))
    return {
        "fp32_weight_bytes": 4 * params,
        "gmac_spectral": macs.get("spectral", 0) / 1e9,
        "gmac_network": macs.get("network", 0) / 1e9,
    }


def child_ort(path: str, config: str, runs: int, threads: int) -> dict:
    start = time.perf_counter()
    session = ort_session(path, *ORT_CONFIGS[config], threads)
    load_s = time.perf_counter() - start
    audio = segment_input(session)
    graph_s: list[float] = []
    result = _measured(lambda: run_segment(session, audio, graph_s), runs)
    interface = interface_of(session)
    if interface == SPECTRAL_CORE:
        result["graph_latencies_s"] = graph_s[-runs:]
    return {**result, "load_s": load_s, "interface": interface}


def profile_summary(events: list[dict], top: int) -> dict:
    """Kernel time of the last `model_run` in an ORT profile, by op type and by graph part.

    Only the last run counts: the first ones pay one-off allocations that a long song does not.
    An `If` (`converter.build.partition`) is left out: its body's nodes are profiled one by one.
    """
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    from converter.measure.graphstats import GEMM_OPS, part

    run = [e for e in events if e.get("name") == "model_run"][-1]
    lo, hi = run["ts"], run["ts"] + run["dur"]
    by_op: dict[str, list[float]] = {}
    by_part: dict[str, float] = {}
    for e in events:
        if (
            e.get("cat") != "Node"
            or not e["name"].endswith("_kernel_time")
            or not lo <= e["ts"] <= hi
            or e["args"]["op_name"] == "If"
        ):
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
        "gemm_s": sum(s for op, (s, _) in by_op.items() if op in GEMM_OPS),
        "top_ops": [
            {"op": op, "s": s, "nodes": n, "share": s / kernels} for op, (s, n) in ranked[:top]
        ],
    }


def child_profile(path: str, config: str, threads: int, top: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        session = ort_session(path, *ORT_CONFIGS[config], threads, profile=str(Path(tmp) / "ort"))
        feeds = graph_feeds(session, segment_input(session))
        for _ in range(WARMUPS + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    return {"config": config, **profile_summary(events, top)}


CHILDREN = {
    "convert": child_convert,
    "torch": child_torch,
    "stats": child_stats,
    "ort": child_ort,
    "profile": child_profile,
    "accuracy": child_accuracy,
    **pair_bench.CHILDREN,
}


# numpy asks for transparent huge pages on arrays of 4 MiB and more; where the kernel then
# compacts memory on the fault (THP defrag "madvise"), each fresh spectrum a spectral-core
# file's numpy transforms write can stall for longer than the FFT itself once a session has
# run. The transforms stand in for the app's native FFT, so the children do not ask.
CHILD_ENV = {"NUMPY_MADVISE_HUGEPAGE": "0"}


def run_child(kind: str, **kwargs) -> dict:
    """Run one child; return its result plus wall time and the child's own peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result = Path(tmp) / "result.json"
        log.info("bench: %s %s", kind, " ".join(f"{k}={v}" for k, v in kwargs.items()))
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "converter.measure.bench",
                kind,
                json.dumps(kwargs),
                str(result),
            ],
            cwd=REPO_ROOT,
            env={**os.environ, **CHILD_ENV},
        )
        wall = time.perf_counter() - start
        if done.returncode != 0 or not result.is_file():
            raise UserError(
                f"bench step {kind!r} failed (exit status {done.returncode}); see its log above"
            )
        return {**json.loads(result.read_text(encoding="utf-8")), "wall_s": wall}


def _child_main(kind: str, args: str, out: str) -> None:
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
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    square = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "sgemm",
        [square(name, TensorProto.FLOAT, [size, size]) for name in ("a", "b")],
        [square("c", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    session = open_session(model.SerializeToString(), optimize=True, threads=threads)
    calls = {"numpy": lambda: a @ b, "onnxruntime": lambda: session.run(["c"], {"a": a, "b": b})}
    for call in calls.values():
        _timed(call, WARMUPS)
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
    memory = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    )
    versions = {}
    for name in ("onnxruntime", "torch", "numpy", "demucs"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"  # `invoke compare` runs without torch or demucs
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory / 1e9,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _converted(
    model: str, repo_arg: str | None, file: Path | None, work: str, results: dict
) -> str:
    """The file to measure: `file` as given, or a fresh `invoke convert` (timed) into `work`."""
    if file is not None:
        if not file.is_file():
            raise UserError(f"--file {file} does not exist; convert one with `invoke convert`")
        results["conversion"] = None
        path = str(file)
    else:
        conversion = run_child("convert", model=model, repo=repo_arg, out_dir=work)
        path = conversion.pop("path")
        results["conversion"] = conversion
    results["file"] = path
    results["file_bytes"] = Path(path).stat().st_size
    return path


def _pooled(rounds: list[dict]) -> dict:
    """One engine's child results over the rounds: pooled latencies, worst peaks, median load."""
    latencies = [t for r in rounds for t in r["latencies_s"]]
    return {
        "rounds": rounds,
        "latencies_s": latencies,
        "median_s": statistics.median(latencies),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
        "peak_rss_two_segments_mb": max(r["peak_rss_two_segments_mb"] for r in rounds),
        "load_s": statistics.median(r["load_s"] for r in rounds),
        "probe_gflops": [rounds[0]["probe_gflops"][0], rounds[-1]["probe_gflops"][1]],
        **_graph_alone(rounds),
    }


def _graph_alone(rounds: list[dict]) -> dict:
    """A spectral-core file's graph-alone seconds (its numpy transforms left out), pooled."""
    if "graph_latencies_s" not in rounds[0]:
        return {}
    latencies = [t for r in rounds for t in r["graph_latencies_s"]]
    return {"graph_latencies_s": latencies, "graph_median_s": statistics.median(latencies)}


def gemm_floor(profile: dict, gmac: float, torch_s: float) -> dict:
    """The matrix products against PyTorch's segment: their share, their speed, and the speed
    the per-segment target would need of them with every other op of the profiled run kept
    (None: the other ops alone take longer than the target allows)."""
    gemm_s = profile["gemm_s"]
    left_s = TARGET_RATIO * torch_s - (profile["run_s"] - gemm_s)
    return {
        "gemm_vs_torch": gemm_s / torch_s,
        "gemm_gflops": 2 * gmac / gemm_s if gemm_s else None,  # None: no matrix product
        "gemm_gflops_for_target": 2 * gmac / left_s if left_s > 0 else None,
    }


def _target(name: str, value: float, target: float, unit: str) -> dict:
    return {"name": name, "value": value, "target": target, "unit": unit, "met": value <= target}


def _targets(results: dict) -> list[dict]:
    torch_run = results["torch"]
    targets = []
    for config in TARGET_CONFIGS:
        run = results["onnxruntime"][config]
        targets += [
            _target(f"s / segment vs PyTorch, {config}", run["ratio_vs_torch"], TARGET_RATIO, "x"),
            _target(
                f"peak RSS, load + {WARMUPS} segments, {config}",
                run["peak_rss_two_segments_mb"] / 1024,
                torch_run["peak_rss_two_segments_mb"] / 1024,
                "GB",
            ),
            _target(f"session load, {config}", run["load_s"], TARGET_LOAD_S, "s"),
        ]
    return targets


def bench(
    model: str = "htdemucs",
    repo: Path | None = None,
    runs: int = 5,
    rounds: int = 2,
    profile: int = 10,
    out_dir: Path = Path("bench-results"),
    file: Path | None = None,
    baseline: Path | None = None,
    accuracy: bool = True,
    storage: bool = True,
) -> dict:
    """Measure everything the issue asks for; write `out_dir/MODEL.json`; return the results.

    With `baseline`, another build's file of the same model (say the last release's) is timed
    against this one in the same run. `accuracy` and `storage` can be skipped: for a bag, demucs
    in float64 takes minutes per input, and the float32 twin doubles the timed runs."""
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    from converter.metadata import write_text_atomic

    if runs < 1 or rounds < 1:
        raise UserError(f"--runs {runs} --rounds {rounds}: at least one timed run and round needed")
    threads = os.cpu_count() or 1
    repo_arg = str(repo) if repo else None
    results: dict = {
        "model": model,
        "runs": runs,
        "rounds": rounds,
        "warmups": WARMUPS,
        "threads": threads,
    }
    results["machine"] = machine()
    # Measured before and after: a shared machine whose speed changes meanwhile shows it here.
    sgemm_before = sgemm_gflops(threads)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as work:
        path = _converted(model, repo_arg, file, work, results)
        interface = results["interface"] = file_interface(Path(path))
        if interface == SPECTRAL_CORE:
            baseline = baseline or _waveform_beside(Path(path), model)
            if accuracy:
                accuracy = False
                log.info(
                    "bench: SNR against float64 of a spectral-core file is the gate's job "
                    "(`invoke validate`); skipped here"
                )
        if storage:
            results["weight_storage"] = pair_bench.compare_storage(
                Path(path), runs, threads, run_child
            )
        else:
            log.info("bench: float16 vs float32 storage skipped (--no-storage)")
        if baseline is not None:
            results["baseline"] = _baseline(Path(path), baseline, runs, threads)
        results.update(run_child("stats", model=model, repo=repo_arg))
        contenders = [("torch", None), *(("ort", config) for config in ORT_CONFIGS)]
        done: dict[str | None, list[dict]] = {config: [] for _, config in contenders}
        for round_ in range(rounds):
            log.info("bench: round %d of %d", round_ + 1, rounds)
            for kind, config in contenders if round_ % 2 == 0 else contenders[::-1]:
                if kind == "torch":
                    child = run_child(
                        "torch", model=model, repo=repo_arg, runs=runs, threads=threads
                    )
                else:
                    child = run_child("ort", path=path, config=config, runs=runs, threads=threads)
                done[config].append(child)
        results["torch"] = {**_pooled(done[None]), "threads": done[None][0]["threads"]}
        torch_s = results["torch"]["median_s"]
        results["onnxruntime"] = {}
        for config in ORT_CONFIGS:
            run = _pooled(done[config])
            per_round = [
                statistics.median(o["latencies_s"]) / statistics.median(t["latencies_s"])
                for o, t in zip(done[config], done[None], strict=True)
            ]
            ratio = run["median_s"] / torch_s
            results["onnxruntime"][config] = {
                **run,
                "ratio_vs_torch": ratio,
                "round_ratios": per_round,
            }
            if "graph_median_s" in run:
                results["onnxruntime"][config]["graph_ratio_vs_torch"] = (
                    run["graph_median_s"] / torch_s
                )
        if accuracy:
            results["accuracy"] = run_child("accuracy", model=model, repo=repo_arg, path=path)
        else:
            log.info("bench: SNR against float64 skipped (--no-accuracy)")
        if profile > 0:
            results["profile"] = run_child(
                "profile", path=path, config=PROFILED_CONFIG, threads=threads, top=profile
            )
    sgemm_after = sgemm_gflops(threads)
    results["sgemm_gflops"] = {"before": sgemm_before, "after": sgemm_after}
    gflops = max(*sgemm_before.values(), *sgemm_after.values())
    results["speed_drift"] = _drift(sgemm_before, sgemm_after)
    gmac = results["gmac_spectral"] + results["gmac_network"]
    results["bound_s"] = gmac / (gflops / 2)
    if "profile" in results:
        results["profile"].update(gemm_floor(results["profile"], gmac, torch_s))
    results["targets"] = _targets(results)
    out = out_dir / f"{file_stem(model, interface)}.json"
    write_text_atomic(out, json.dumps(results, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", out)
    return results


def file_interface(path: Path) -> str:
    """`openkara.tensor_interface` of the file (waveform when unstamped, as the seed's files)."""
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    import onnx

    from converter.metadata import TENSOR_INTERFACE, read_metadata

    return read_metadata(onnx.load(str(path), load_external_data=False)).get(
        TENSOR_INTERFACE, WAVEFORM
    )


def _waveform_beside(path: Path, model: str) -> Path | None:
    """The waveform file of `model` in the spectral-core file's folder, to time against it."""
    waveform = path.with_name(f"{file_stem(model, WAVEFORM)}.onnx")
    if waveform.is_file():
        log.info("bench: timing the waveform file %s against this spectral-core file", waveform)
        return waveform
    log.info(
        "bench: no waveform file %s beside %s: pass --baseline to time one against it",
        waveform.name,
        path.name,
    )
    return None


def _baseline(path: Path, baseline: Path, runs: int, threads: int) -> dict:
    """This build's file against `baseline`, another build's file of the same model."""
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    import onnx

    from converter.metadata import MODEL_NAME, read_metadata

    if not baseline.is_file():
        raise UserError(f"--baseline {baseline} does not exist; pass a converted file")
    names = [read_metadata(onnx.load(str(p))).get(MODEL_NAME) for p in (path, baseline)]
    if names[0] != names[1]:
        raise UserError(
            f"--baseline {baseline} is {names[1]!r}, not {names[0]!r}: compare files of one model"
        )
    files = {"this build": path, "baseline": baseline}
    return {**pair_bench.compare(files, runs, threads, run_child), "file": str(baseline)}


def _drift(before: dict[str, float], after: dict[str, float]) -> float:
    drift = max(before.values()) / max(after.values())
    if not 1 / SPEED_TOLERANCE <= drift <= SPEED_TOLERANCE:
        log.warning(
            "SGEMM throughput changed %.2fx during the bench: the machine is shared or throttling, "
            "and the engines' numbers were taken at different speeds; run it again",
            drift,
        )
    return drift


# --- whole songs, whole processes ------------------------------------------------------------


def write_test_song(path: Path, seconds: float, samplerate: int = 44100, seed: int = 0) -> Path:
    """A deterministic stereo test song: a bass line, chords, a kick and noise hats, 16-bit WAV.

    Speed does not depend on what the audio sounds like; this only gives both separators a
    real, music-like file of a chosen length.
    """
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * samplerate)) / samplerate
    beat = 0.5  # 120 bpm
    phase = (t % beat) / beat
    bar = (t // (4 * beat)).astype(int) % 4
    root = np.array([55.0, 73.4, 61.7, 82.4])[bar]
    bass = 0.3 * np.sin(2 * np.pi * root * t) * np.exp(-3 * phase)
    chords = sum(0.08 * np.sin(2 * np.pi * root * 4 * ratio * t) for ratio in (1, 1.26, 1.5))
    kick = 0.6 * np.sin(2 * np.pi * 50 * t * (1 + 2 * np.exp(-30 * phase))) * np.exp(-12 * phase)
    hats = 0.05 * rng.standard_normal(t.size) * np.exp(-60 * ((2 * t / beat) % 1))
    mono = bass + chords + kick + hats
    stereo = np.stack([mono + 0.1 * chords, mono - 0.1 * chords], axis=1)
    stereo *= 0.9 / np.abs(stereo).max()
    sf.write(path, stereo.astype(np.float32), samplerate, subtype="PCM_16")
    return path


def song_commands(
    song: Path, model: str, repo: Path | None, onnx_path: Path, out: Path
) -> dict[str, list[str]]:
    """The two command lines compared: ours and demucs' CLI, same segment, overlap and shifts."""
    repo_args = ["--repo", str(repo)] if repo else []
    return {
        "invoke separate": [
            sys.executable,
            "-m",
            "invoke",
            "separate",
            str(song),
            "--model",
            str(onnx_path),
            "--out-dir",
            str(out),
            "--overlap",
            "0.25",
            "--shifts",
            "0",
        ],
        "demucs.separate": [
            sys.executable,
            "-m",
            "demucs.separate",
            "-n",
            model,
            *repo_args,
            "--shifts",
            "0",
            "--overlap",
            "0.25",
            "-d",
            "cpu",
            "-o",
            str(out),
            str(song),
        ],
    }


def timed_process(command: list[str]) -> dict:
    """Wall seconds and peak RSS (its own, children included) of one whole process."""
    log.info("bench: %s", " ".join(command))
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise UserError(
            f"{command[2]} failed (exit status {process.returncode}); see its log above"
        )
    scale = 1 << 20 if sys.platform == "darwin" else 1024
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / scale}


def _check_song(song: Path | None, seconds: float) -> None:
    """Refuse a song that is not audio, or a length that is no length, before any timing."""
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    import soundfile as sf

    if song is None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise UserError(
                f"--song-seconds {seconds:g}: give the test song's length as a positive number "
                "of seconds (say 60)"
            )
        return
    if not song.is_file():
        raise UserError(f"--song {song} does not exist or is not a file: pass an audio file")
    try:
        info = sf.info(str(song))
    except (RuntimeError, OSError) as exc:  # soundfile's LibsndfileError is a RuntimeError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"--song {song} is not audio libsndfile can read ({detail}): pass a WAV, FLAC, OGG "
            "or MP3 file"
        ) from None
    if info.frames <= 0:
        raise UserError(f"--song {song} holds no audio frames: pass a song")


def bench_song(
    model: str = "htdemucs",
    song: Path | None = None,
    seconds: float = 60.0,
    repo: Path | None = None,
    runs: int = 2,
    out_dir: Path = Path("bench-results"),
    file: Path | None = None,
) -> dict:
    """Time `invoke separate` against demucs' own CLI on one song, alternating; write
    `out_dir/MODEL-song.json`. Without `song`, a `seconds`-long test song is written."""
    # here, not at the top: the ORT children import this module in venvs of numpy + onnxruntime
    import soundfile as sf

    from converter.metadata import write_text_atomic

    if runs < 1:
        raise UserError(f"--runs {runs}: at least one run of each separator is needed")
    _check_song(song, seconds)
    repo_arg = str(repo) if repo else None
    results: dict = {"model": model, "runs": runs, "machine": machine()}
    sgemm_before = sgemm_gflops(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-song-") as work:
        if song is None:
            song = write_test_song(Path(work) / f"test-song-{seconds:g}s.wav", seconds)
        info = sf.info(str(song))
        results["song"] = {"name": song.name, "seconds": info.frames / info.samplerate}
        onnx_path = Path(_converted(model, repo_arg, file, work, results))
        runs_by: dict[str, list[dict]] = {}
        for round_ in range(runs):
            with tempfile.TemporaryDirectory(prefix="stems-", dir=work) as out:
                commands = song_commands(song, model, repo, onnx_path, Path(out))
                order = list(commands) if round_ % 2 == 0 else list(commands)[::-1]
                for name in order:
                    runs_by.setdefault(name, []).append(timed_process(commands[name]))
        shown = song_commands(Path(song.name), model, repo, Path(onnx_path.name), Path("OUT"))
        results["commands"] = {n: " ".join(["python", *c[1:]]) for n, c in shown.items()}
    audio_s = results["song"]["seconds"]
    results["separators"] = {}
    for name, timings in runs_by.items():
        walls = [t["wall_s"] for t in timings]
        median = statistics.median(walls)
        results["separators"][name] = {
            "wall_s": walls,
            "median_s": median,
            "audio_s_per_s": audio_s / median,
            "peak_rss_mb": max(t["peak_rss_mb"] for t in timings),
        }
    ours, theirs = (results["separators"][n] for n in ("invoke separate", "demucs.separate"))
    pairs = zip(runs_by["invoke separate"], runs_by["demucs.separate"], strict=True)
    ratios = [o["wall_s"] / t["wall_s"] for o, t in pairs]
    results["ratio"] = ours["median_s"] / theirs["median_s"]
    results["round_ratios"] = ratios
    results["targets"] = [
        _target("wall time vs demucs' CLI", results["ratio"], TARGET_SONG_RATIO, "x")
    ]
    results["speed_drift"] = _drift(sgemm_before, sgemm_gflops(os.cpu_count() or 1))
    out_file = out_dir / f"{model}-song.json"
    write_text_atomic(out_file, json.dumps(results, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", out_file)
    return results


def _probe(run: dict) -> str:
    return " / ".join(f"{g:.0f}" for g in run["probe_gflops"])


def _targets_table(targets: list[dict]) -> list[str]:
    lines = ["| target | value | bound | |", "| --- | ---: | ---: | --- |"]
    for t in targets:
        unit = t["unit"]
        lines.append(
            f"| {t['name']} | {t['value']:.2f} {unit} | ≤ {t['target']:.2f} {unit} | "
            f"{'met' if t['met'] else 'missed'} |"
        )
    return lines


def _machine_line(results: dict) -> str:
    m = results["machine"]
    return (
        f"`{results['model']}` on {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB RAM, "
        f"{m['platform']}; onnxruntime {m['versions']['onnxruntime']}, "
        f"torch {m['versions']['torch']}"
    )


def table(results: dict) -> str:
    """Markdown tables of `results` (as README.md and docs/performance.md show them)."""
    torch_run = results["torch"]
    torch_s = torch_run["median_s"]
    gmac = results["gmac_spectral"] + results["gmac_network"]
    gb = lambda mb: f"{mb / 1024:.2f}"  # noqa: E731
    lines = [
        f"{_machine_line(results)}; {results['rounds']} round(s) of alternating engines, each "
        f"loading, running {results['warmups']} warm-up segments then {results['runs']} timed "
        f"ones: median of all timed runs, {results['threads']} threads each.",
        "",
        "| engine | session options | s / segment | vs PyTorch (per round) | peak RSS, load + 2 "
        "segments (GB) | peak RSS (GB) | load (s) | numpy GFLOP/s before / after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| PyTorch eager | - | {torch_s:.2f} | 1.00 | "
        f"{gb(torch_run['peak_rss_two_segments_mb'])} | {gb(torch_run['peak_rss_mb'])} | "
        f"{torch_run['load_s']:.1f} | {_probe(torch_run)} |",
    ]
    for config, r in results["onnxruntime"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(
            f"| onnxruntime | {config} | {r['median_s']:.2f} | "
            f"{r['ratio_vs_torch']:.2f} ({rounds}) | "
            f"{gb(r['peak_rss_two_segments_mb'])} | {gb(r['peak_rss_mb'])} | {r['load_s']:.2f} | "
            f"{_probe(r)} |"
        )
    graph_rows = [
        f"| {config} | {r['median_s']:.2f} | {r['graph_median_s']:.2f} | "
        f"{r['median_s'] - r['graph_median_s']:.2f} | {r['ratio_vs_torch']:.2f} / "
        f"{r['graph_ratio_vs_torch']:.2f} |"
        for config, r in results["onnxruntime"].items()
        if "graph_median_s" in r
    ]
    if graph_rows:
        lines += [
            "",
            "Spectral-core file, run as OpenKara runs it (numpy float32 STFT/ISTFT around it):",
            "",
            "| session options | graph + transforms s | graph alone s | transforms s | vs PyTorch "
            "(with / without transforms) |",
            "| --- | ---: | ---: | ---: | ---: |",
            *graph_rows,
        ]
    conv = results["conversion"]
    size, weights = results["file_bytes"], results["fp32_weight_bytes"]
    sgemm = " / ".join(
        ", ".join(f"{lib} {g:.0f}" for lib, g in results["sgemm_gflops"][when].items())
        for when in ("before", "after")
    )
    conversion = "not timed (--file)"
    if conv:
        conversion = f"{conv['wall_s']:.0f} s, peak RSS {gb(conv['peak_rss_mb'])} GB"
    lines += [
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| file size / fp32 weights | {size / 1e6:.1f} MB / {weights / 1e6:.1f} MB = "
        f"{size / weights:.3f} |",
        f"| GMAC per segment | {gmac:.1f} (spectral {results['gmac_spectral']:.2f}, network "
        f"{results['gmac_network']:.1f}) |",
        f"| conversion (`invoke convert`) | {conversion} |",
        f"| SGEMM float32 {SGEMM_SIZE}², GFLOP/s before / after | {sgemm} |",
        f"| physical bound (GMAC / best SGEMM) | {results['bound_s']:.2f} s / segment |",
        "",
        *_targets_table(results["targets"]),
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
        lines += pair_bench.table_lines(
            results["weight_storage"],
            weights,
            "Weight storage: the shipped file (float16 where exact) against its float32 twin, "
            "same conversion.",
            stems_bound=pair_bench.STEMS_MSE,
        )
    if "baseline" in results:
        lines += pair_bench.table_lines(
            results["baseline"],
            weights,
            f"This build against the baseline `{results['baseline']['file']}`, alternated in one "
            "process per setting.",
        )
    if "profile" in results:
        p = results["profile"]
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(p["by_part_s"].items()))
        needed, reach = p["gemm_gflops_for_target"], f"≤ {TARGET_RATIO}x"
        if needed:
            reach += f" with the other ops as they are needs {needed:.0f} GFLOP/s"
        else:
            reach += " is out of reach: the other ops alone take longer"
        lines += [
            "",
            f"ORT profile ({p['config']}, last of {WARMUPS + 1} runs): run {p['run_s']:.2f} s, "
            f"kernels {p['kernel_s']:.2f} s ({parts}). Matrix-product kernels alone "
            f"(MatMul, Conv, their fused forms): {p['gemm_s']:.2f} s, "
            f"{p['gemm_vs_torch']:.2f}x PyTorch's segment, {p['gemm_gflops'] or 0:.0f} GFLOP/s "
            f"on average; {reach}.",
            "",
            "| op type | s | share of kernel time | nodes |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {o['op']} | {o['s']:.3f} | {100 * o['share']:.1f}% | {o['nodes']} |"
            for o in p["top_ops"]
        ]
    return "\n".join(lines)


def song_table(results: dict) -> str:
    """Markdown table of `bench_song`'s results."""
    song = results["song"]
    lines = [
        f"{_machine_line(results)}; `{song['name']}` ({song['seconds']:.1f} s), whole processes, "
        f"{results['runs']} run(s) each, alternating.",
        "",
        "| separator | command | wall s (median) | s of audio / s | peak RSS (GB) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, r in results["separators"].items():
        lines.append(
            f"| {name} | `{results['commands'][name]}` | {r['median_s']:.1f} | "
            f"{r['audio_s_per_s']:.2f} | {r['peak_rss_mb'] / 1024:.2f} |"
        )
    rounds = ", ".join(f"{x:.2f}" for x in results["round_ratios"])
    lines += ["", f"Wall-time ratio per round: {rounds}.", "", *_targets_table(results["targets"])]
    return "\n".join(lines)


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
