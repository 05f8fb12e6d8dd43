"""Load-test ONNX files on the ONNX Runtime of the running interpreter (CPU EP), standalone.

`nox -s contract` runs this file once per supported ORT version, each time in a venv that holds
only that official `onnxruntime` wheel and a pinned numpy, so it imports nothing but numpy,
onnxruntime and the standard library and is run as a script: `python converter/gate/ortcheck.py
[--results-dir DIR] [MODEL.onnx ...]` (default: every `models/*.onnx`).

For each model it creates a CPU session twice, with graph optimization disabled (what OpenKara
does for files marked `openkara.optimized_by=onnxruntime`) and at ORT's default level, runs one
inference on each reference input recorded at conversion time (`NAME.reference.npz` beside
`NAME.onnx`: the inputs, demucs' float64 output for each and each stem's allowed MSE, all
written by `converter.gate.validation`, which owns the gate), composes the stems of spectral-core
files as the app does (`run_stems`: contract STFT in float64, the file, ISTFT + time branch in
float64, `converter/spectral_contract.py` loaded by path) and applies the validation gate (per-stem
MSE against the float64 output within the recorded bound, all finite). It also checks
that every `com.microsoft` op of the static gate's allow-list has a CPU kernel in this build, so
CI proves the list on every platform and version rather than only on the machine that wrote it.

Rows go to `DIR/contract-results/<ort version>.json`, each naming the tested file's SHA-256 and
the platform: `invoke release` reads these records from every runner (converter/gate/evidence.py).
`--summary` (nox's `contract_summary` session, queued after every `contract(...)` session)
merges them into `DIR/contract-summary.json` and prints the table of every version, so that
table ends the run.
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts converter/ first on sys.path, where a sibling module named like a
# standard or numpy module (say a future converter/platform.py) would shadow it in the bare venv.
if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402 - after the sys.path fix above
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

log = logging.getLogger("ortcheck")


def _package_module(name: str):
    """`converter/NAME.py` (dotted below the package; standard library and numpy only): imported
    normally when this file is `converter.gate.ortcheck`, by path when it runs as a script in a
    bare venv. `facts` is the one home of the names and limits below, `accuracy` that of the
    gate's arithmetic."""
    if __package__:
        return importlib.import_module(f"converter.{name}")
    path = Path(__file__).resolve().parents[1].joinpath(*name.split(".")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(f"converter_{name.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


facts = _package_module("facts")
accuracy = _package_module("gate.accuracy")
spectral_contract = _package_module("spectral_contract")
COM_MICROSOFT_ALLOWED = facts.COM_MICROSOFT_ALLOWED
INPUT_NAME = facts.INPUT_NAME
OUTPUT_NAME = facts.OUTPUT_NAME
sha256_file = facts.sha256_file
REFERENCE_SUFFIX = ".reference.npz"
RESULTS_SUBDIR = "contract-results"
SUMMARY_NAME = "contract-summary.json"
DEFAULT_MODELS = facts.DEFAULT_MODELS
HOW_TO_MAKE_A_MODEL = facts.HOW_TO_MAKE_A_MODEL


def reference_path(model: Path) -> Path:
    """`models/NAME.onnx` -> `models/NAME.reference.npz`, written by the conversion's validation."""
    return model.with_name(model.name.removesuffix(".onnx") + REFERENCE_SUFFIX)


def platform_name() -> str:
    return f"{platform.system()} {platform.machine()}"


def missing_allowed_kernels() -> list[str]:
    """Allow-listed `com.microsoft` ops that have no CPU kernel in the running ORT build."""
    # onnxruntime here: `invoke contract` (onnx + numpy only) imports this module
    from onnxruntime.capi import _pybind_state

    registered = {
        kernel.op_name
        for kernel in _pybind_state.get_all_opkernel_def()
        if kernel.domain == facts.COM_MICROSOFT and kernel.provider == "CPUExecutionProvider"
    }
    return sorted(COM_MICROSOFT_ALLOWED - registered)


def run_stems(
    session, audio: np.ndarray, dtype: type = np.float64, graph_s: list[float] | None = None
) -> np.ndarray:
    """Stems [1, S, C, L] of `audio` [1, C, L] from a waveform file's graph, or composed from a
    spectral-core file as OpenKara does: spec(audio) in `dtype` -> float32 inputs -> the file ->
    ispec(spectral_out) + time_out in `dtype` (float64: the gate's). The interface is read off
    the input names; the graph's own seconds are appended to `graph_s` (bench)."""
    names = [value.name for value in session.get_inputs()]
    if names == [INPUT_NAME]:
        start = time.perf_counter()
        stems = session.run([OUTPUT_NAME], {INPUT_NAME: audio})[0]
        if graph_s is not None:
            graph_s.append(time.perf_counter() - start)
        return stems
    if names == [facts.SPECTRAL_INPUT, facts.MIX_INPUT]:
        n_fft = 2 * session.get_inputs()[0].shape[3]  # 4096 but in test-size models
        spectral = spectral_contract.spec(audio, n_fft, dtype=dtype).astype(np.float32, copy=False)
        start = time.perf_counter()
        spectral_out, time_out = session.run(
            [facts.SPECTRAL_OUTPUT, facts.TIME_OUTPUT],
            {facts.SPECTRAL_INPUT: spectral, facts.MIX_INPUT: audio},
        )
        if graph_s is not None:
            graph_s.append(time.perf_counter() - start)
        stems = spectral_contract.ispec(spectral_out, audio.shape[-1], n_fft, dtype=dtype)
        stems += time_out
        return stems
    raise ValueError(f"inputs {names} are neither interface's ({', '.join(facts.INTERFACES)})")


def compare(output: np.ndarray, reference: np.ndarray, max_mse: np.ndarray) -> str | None:
    """None if `output` passes the validation gate against `reference`, else the reason.

    `max_mse` holds each stem's allowed MSE, recorded by the conversion's gate
    (`converter.gate.validation.allowed_mse`), so both gates are one.
    """
    if output.shape != reference.shape:
        return f"output shape {list(output.shape)} != reference {list(reference.shape)}"
    if not np.isfinite(output).all():
        return "output has non-finite values"
    mse = accuracy.stem_mse(output, reference)
    worst = int(np.argmax(mse / max_mse))
    if mse[worst] > max_mse[worst]:
        return f"stem {worst} MSE {mse[worst]:.3e} > {max_mse[worst]:.3e} (the recorded gate)"
    return None


def margin_db(output: np.ndarray, reference: np.ndarray, max_mse: np.ndarray) -> float:
    """How far the worst stem stays inside its recorded bound, in dB (negative: outside)."""
    ratio = float(np.max(accuracy.stem_mse(output, reference) / max_mse))
    return float("inf") if ratio == 0 else -10 * float(np.log10(ratio))


def session_options(
    optimize: bool = False,
    arena: bool = True,
    pattern: bool = True,
    threads: int = 0,
    profile: str | None = None,
):
    """The one place session options are built: OpenKara's (graph optimization off: the files
    are optimized offline) unless `optimize` (ORT's default level), with the knobs `invoke bench`
    compares (memory arena, memory pattern), `threads` (0: ORT's choice) and a profile prefix."""
    # onnxruntime here: `invoke contract` (onnx + numpy only) imports this module
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
    return options


def open_session(model: Path | str | bytes, **options):
    """A CPU-EP session of `model` (path or serialized bytes), `session_options(**options)`."""
    # onnxruntime here: `invoke contract` (onnx + numpy only) imports this module
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source, session_options(**options), providers=["CPUExecutionProvider"]
    )


def load_session(path: Path, optimize: bool):
    """A CPU-EP session, graph optimization disabled (OpenKara) or at ORT's default level."""
    return open_session(path, optimize=optimize)


def read_reference(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(input names, audio [K, 1, C, L], float64 stems [K, 1, S, C, L], max_mse [K, S])."""
    with np.load(path) as ref:
        if "max_mse" not in ref or "inputs" not in ref:
            raise ValueError(f"{path.name} predates the float64 gate on several inputs")
        return [str(n) for n in ref["inputs"]], ref["audio"], ref["stems"], ref["max_mse"]


def check_model(path: Path, ort_version: str) -> dict:
    """One summary row for `path`: status "ok" or the first failure, with timings.

    Every recorded input runs at both settings; `margin_db` is the smallest distance, over
    inputs, stems and settings, between the file's error and the recorded bound.
    """
    row = {
        "ort": ort_version,
        "platform": platform_name(),
        "model": path.name,
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "status": "ok",
        "inputs": [],
        "margin_db": None,
        "load_s": None,
        "run_s": None,
        "default_load_s": None,
        "default_run_s": None,
    }
    ref_path = reference_path(path)
    if not ref_path.is_file():
        row["status"] = f"no reference output {ref_path.name} (written by `invoke convert`)"
        log.error("%s: %s", path.name, row["status"])
        return row
    try:
        names, audios, expected, max_mse = read_reference(ref_path)
    except ValueError as exc:
        row["status"] = f"{exc}: convert the model again"
        log.error("%s: %s", path.name, row["status"])
        return row
    row["inputs"] = names
    margins = []
    # OpenKara's mode first (the one that matters), then ORT's default optimization level.
    for mode, optimize, prefix in (("disabled", False, ""), ("default", True, "default_")):
        try:
            start = time.perf_counter()
            session = load_session(path, optimize)
            load_s = time.perf_counter() - start
            run_s = []
            for name, audio, truth, bound in zip(names, audios, expected, max_mse, strict=True):
                start = time.perf_counter()
                stems = run_stems(session, audio)
                run_s.append(time.perf_counter() - start)
                reason = compare(stems, truth, bound)
                if reason:
                    row["status"] = f"[{mode}] {name}: {reason}"
                    log.error("%s on ORT %s: %s", path.name, ort_version, row["status"])
                    return row
                margins.append(margin_db(stems, truth, bound))
        except Exception as exc:  # noqa: BLE001 - any ORT failure is this row's verdict
            row["status"] = f"[{mode}] {type(exc).__name__}: {_one_line(str(exc))}"
            log.error("%s on ORT %s: %s", path.name, ort_version, row["status"])
            return row
        row[prefix + "load_s"], row[prefix + "run_s"] = round(load_s, 3), round(min(run_s), 3)
        log.info(
            "%s on ORT %s, optimization %s: ok on %d inputs (load %.2f s, run %.2f s)",
            path.name,
            ort_version,
            mode,
            len(names),
            load_s,
            min(run_s),
        )
    row["margin_db"] = round(min(margins), 2)
    return row


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def merge_results(results_dir: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """Rows of every `results_dir/contract-results/*.json` whose model file is unchanged, and
    the allow-listed kernels each version lacked.

    Rows for a file that has since been rewritten or removed are dropped, so the summary the
    release reads never vouches for bytes that were not tested.
    """
    rows, missing = [], {}
    for result in sorted((results_dir / RESULTS_SUBDIR).glob("*.json")):
        record = json.loads(result.read_text(encoding="utf-8"))
        if record.get("missing_kernels"):
            missing[record["ort"]] = record["missing_kernels"]
        for row in record["rows"]:
            model = Path(row["path"])
            if model.is_file() and sha256_file(model) == row["sha256"]:
                rows.append(row)
            else:
                log.info("dropping stale result: ORT %s, %s changed or gone", row["ort"], model)
    rows.sort(key=lambda row: (facts.version_key(row["ort"]), row["path"]))
    return rows, missing


def _display_path(path: str) -> str:
    """Relative to the cwd when below it: CI tests several files of the same name."""
    try:
        return str(Path(path).relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def format_table(rows: list[dict]) -> str:
    """Plain-text table: ORT version x model -> ok / reason, load and run seconds (both modes)."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def margin(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    header = (
        "ORT",
        "platform",
        "model",
        "load s",
        "run s",
        "load s (default)",
        "run s (default)",
        "gate margin dB",
    )
    lines = [
        (
            row["ort"],
            row["platform"],
            _display_path(row["path"]),
            seconds(row["load_s"]),
            seconds(row["run_s"]),
            seconds(row["default_load_s"]),
            seconds(row["default_run_s"]),
            margin(row.get("margin_db")),
            row["status"],
        )
        for row in rows
    ]
    header = (*header, "status")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    widths[-1] = 0  # the status column is last and may be long: no padding
    render = [
        " | ".join(
            str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in (header, *lines)
    ]
    render.insert(1, "-+-".join("-" * (width or len("status")) for width in widths))
    return "\n".join(render)


def resolve_models(names: list[str]) -> list[Path]:
    """The files to test: the given ones, or every `models/*.onnx` (cwd = repo root under nox)."""
    if names:
        paths = [Path(name) for name in names]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise SystemExit(f"ortcheck: no such model file: {', '.join(missing)}")
        return paths
    paths = sorted(Path().glob(DEFAULT_MODELS))
    if not paths:
        raise SystemExit(
            f"ortcheck: no model to test in {DEFAULT_MODELS}; {HOW_TO_MAKE_A_MODEL}, "
            "or pass files: `nox -s contract -- path/to/model.onnx`"
        )
    log.info("no model given: testing every %s (%d files)", DEFAULT_MODELS, len(paths))
    return paths


def run_version(models: list[Path], results_dir: Path, expect: str | None) -> int:
    """Load-test `models` on the installed ORT; record and print its rows; 1 if any failed."""
    # onnxruntime here: `invoke contract` (onnx + numpy only) imports this module
    import onnxruntime as ort

    version = ort.__version__
    log.info(
        "ONNX Runtime %s, numpy %s, %s, Python %s",
        version,
        np.__version__,
        platform_name(),
        platform.python_version(),
    )
    if expect and version != expect:
        raise SystemExit(f"ortcheck: expected onnxruntime {expect}, found {version}")
    missing = missing_allowed_kernels()
    if missing:
        log.error("allow-listed com.microsoft ops without a CPU kernel here: %s", missing)
    else:
        log.info(
            "all %d allow-listed com.microsoft ops have CPU kernels", len(COM_MICROSOFT_ALLOWED)
        )
    rows = [check_model(path, version) for path in models]

    results = results_dir / RESULTS_SUBDIR
    results.mkdir(parents=True, exist_ok=True)
    record_path = results / f"{version}.json"
    kept = _other_files_rows(record_path, rows)
    record = {
        "ort": version,
        "platform": platform_name(),
        "missing_kernels": missing,
        "rows": kept + rows,
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(format_table(rows))
    failed = [row for row in rows if row["status"] != "ok"]
    if missing or failed:
        kernels = f", allow-listed kernels missing: {', '.join(missing)}" if missing else ""
        print(f"ORT {version}: FAILED ({len(failed)} of {len(rows)} models{kernels})")
        return 1
    print(f"ORT {version}: all {len(rows)} models ok")
    return 0


def _other_files_rows(record_path: Path, rows: list[dict]) -> list[dict]:
    """Rows an earlier run on this version and platform recorded for other files: testing one
    file after another keeps both (`merge_results` still drops rows of changed files)."""
    if not record_path.is_file():
        return []
    earlier = json.loads(record_path.read_text(encoding="utf-8"))
    if earlier.get("platform") != platform_name():
        return []
    tested = {row["path"] for row in rows}
    kept = [row for row in earlier["rows"] if row["path"] not in tested]
    if kept:
        log.info("keeping %d earlier row(s) of other files in %s", len(kept), record_path)
    return kept


def summarize(results_dir: Path) -> int:
    """Merge every version's rows into contract-summary.json, print the table; 1 if any failed."""
    rows, missing = merge_results(results_dir)
    summary_path = results_dir / SUMMARY_NAME
    summary_path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s (%d rows)", summary_path, len(rows))
    print(f"\nRuntime contract load tests, every result so far ({summary_path}):")
    print(format_table(rows))
    for version, ops in missing.items():
        print(
            f"ORT {version}: allow-listed com.microsoft ops without a CPU kernel: {', '.join(ops)}"
        )
    failed = [row for row in rows if row["status"] != "ok"]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed or missing or not rows else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ortcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help=f"ONNX files (default: {DEFAULT_MODELS})")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=Path("models"),
        help="where contract-results/ and contract-summary.json go (default: models/)",
    )
    parser.add_argument(
        "--expect-ort",
        help="fail unless the installed onnxruntime is this version (guards the nox venv)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="only merge every version's results into the summary and print the table",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if args.summary:
        return summarize(args.results_dir)
    return run_version(resolve_models(args.models), args.results_dir, args.expect_ort)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
