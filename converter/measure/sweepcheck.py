"""Files of a seed sweep against demucs, on the ONNX Runtime of the running interpreter.

Run as a script in a venv holding only onnxruntime and numpy (as `converter/gate/ortcheck.py` is),
so one sweep is measured on every ORT version: `python converter/measure/sweepcheck.py
--out ROWS.json FILE.onnx ...`. Beside each `NAME.onnx` lies `NAME.sweep.npz`
(`converter.measure.sweep.record`): every input of the validation gate, demucs' float64 output
(the truth) and its float32 output (the bar). Each file runs at both session settings (graph
optimization off, ORT's default); a row per setting, input and stem holds the file's and PyTorch
float32's MSE against the truth.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]  # as in ortcheck.py: no sibling may shadow a standard module

import argparse  # noqa: E402 - after the sys.path fix above
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SUFFIX = ".sweep.npz"
SETTINGS = {"optimization off": False, "default options": True}


def _ortcheck():
    """`converter.gate.ortcheck` (session settings, the gate's arithmetic), by path in a bare
    venv."""
    if __package__:
        return importlib.import_module("converter.gate.ortcheck")
    spec = importlib.util.spec_from_file_location(
        "converter_ortcheck", Path(__file__).resolve().parents[1] / "gate" / "ortcheck.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ortcheck = _ortcheck()


def record_path(model: Path) -> Path:
    """`DIR/NAME.onnx` -> `DIR/NAME.sweep.npz`."""
    return model.with_name(model.name.removesuffix(".onnx") + SUFFIX)


def check(model: Path) -> list[dict]:
    """Rows (setting, input, stem, power, mse, pytorch_mse) for one file of the sweep."""
    with np.load(record_path(model)) as rec:
        inputs, stems = [str(n) for n in rec["inputs"]], [str(s) for s in rec["stems"]]
        audio, truth, pytorch = rec["audio"], rec["truth"], rec["pytorch"]
    rows = []
    for setting, optimize in SETTINGS.items():
        session = ortcheck.load_session(model, optimize)
        for k, name in enumerate(inputs):
            (got,) = session.run([ortcheck.OUTPUT_NAME], {ortcheck.INPUT_NAME: audio[k]})
            finite = np.isfinite(got).all(axis=(0, 2, 3))
            mse = ortcheck.accuracy.stem_mse(np.nan_to_num(got), truth[k])
            bar = ortcheck.accuracy.stem_mse(pytorch[k], truth[k])
            power = np.mean(truth[k] ** 2, axis=(0, 2, 3))
            for s, stem in enumerate(stems):
                rows.append(
                    {
                        "setting": setting,
                        "input": name,
                        "stem": stem,
                        "power": float(power[s]),
                        "mse": float(mse[s]) if finite[s] else float("inf"),
                        "pytorch_mse": float(bar[s]),
                    }
                )
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sweepcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("models", type=Path, nargs="+", help="NAME.onnx files of a sweep")
    args = parser.parse_args(argv)
    # after parsing: `--help` works in a venv whose onnxruntime fails to import
    import onnxruntime as ort

    results = {"ort": ort.__version__, "files": {}}
    for model in args.models:
        results["files"][str(model)] = check(model)
        print(f"{model}: measured on ORT {ort.__version__}", file=sys.stderr, flush=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(results), encoding="utf-8")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
