"""`nox -s contract`: session names, pinned versions, and one real run on an official wheel.

The real runs build fresh venvs holding only onnxruntime + numpy from the package index (seconds
with a warm cache), so they are marked slow and index; CI runs every version on every platform
through nox itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converter.facts import version_key
from converter.gate import contract_selftest, ortcheck
from converter.gate.evidence import contract_pins

ROOT = Path(__file__).resolve().parent.parent
# Their one home is requirements/contract.txt; the test checks its rule, not a copy of it.
VERSIONS = list(contract_pins())


def _nox(*args: str, envdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "nox",
            "--noxfile",
            str(ROOT / "noxfile.py"),
            "--envdir",
            str(envdir),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_one_session_per_pinned_version_selectable_by_name(tmp_path):
    listed = _nox("--list", envdir=tmp_path).stdout
    for version in VERSIONS:
        assert f"contract(ort='{version}')" in listed
    pins = (ROOT / "requirements/contract.txt").read_text().split("\n")
    pairs = [line.split() for line in pins if line.startswith("onnxruntime==")]
    assert [ort.removeprefix("onnxruntime==") for ort, _ in pairs] == VERSIONS
    # One version per minor, every minor from 1.17 (the floor) on, in order.
    minors = [version_key(v)[:2] for v in VERSIONS]
    assert minors == [(1, minor) for minor in range(17, 17 + len(VERSIONS))]
    # ORT 1.17/1.18 are built against numpy 1 (1.17 fails to import under numpy 2).
    numpy = {ort.removeprefix("onnxruntime=="): np for ort, np in pairs}
    assert numpy["1.17.3"] == numpy["1.18.1"] == "numpy==1.26.4"
    newer = [np for ort, np in numpy.items() if tuple(map(int, ort.split("."))) >= (1, 19)]
    assert all(np.startswith("numpy==2.") for np in newer)


@pytest.mark.slow
@pytest.mark.index
def test_contract_session_loads_and_checks_a_model_on_the_official_wheel(tmp_path):
    good = contract_selftest.write_tiny(tmp_path / "models/tiny.onnx")
    # Composed as the app does, with converter/spectral_contract.py loaded by path.
    spectral = contract_selftest.write_tiny_spectral(tmp_path / "models/tiny.spectral.onnx")
    orphan = tmp_path / "models/orphan.onnx"
    # No reference npz beside this one.
    contract_selftest.write_model(contract_selftest.tiny_model(), orphan)
    results = tmp_path / "models"

    run = _nox(
        "-s",
        "contract(ort='1.32.0')",
        "--",
        "--results-dir",
        str(results),
        str(good),
        str(spectral),
        str(orphan),
        envdir=tmp_path / "nox",
    )

    assert run.returncode == 1, run.stdout + run.stderr  # the orphan fails, and so does the run
    output = run.stdout + run.stderr
    assert "ONNX Runtime 1.32.0" in output
    assert "Runtime contract load tests, every result so far" in output  # contract_summary ran
    summary = json.loads((results / ortcheck.SUMMARY_NAME).read_text())
    by_model = {row["model"]: row for row in summary}
    assert by_model["tiny.onnx"]["ort"] == "1.32.0" and by_model["tiny.onnx"]["status"] == "ok"
    assert (
        by_model["tiny.onnx"]["load_s"] is not None and by_model["tiny.onnx"]["run_s"] is not None
    )
    assert by_model["tiny.spectral.onnx"]["status"] == "ok"
    assert by_model["orphan.onnx"]["status"].startswith("no reference output orphan.reference.npz")
    # The venv held only onnxruntime and numpy: the loader needs nothing else. (A virtualenv venv
    # is also seeded with pip; a uv one is not.)
    python = next((tmp_path / "nox").glob("contract*/bin/python"), None) or next(
        (tmp_path / "nox").glob("contract*/Scripts/python.exe")
    )
    listing = "import importlib.metadata as m; print(*(d.name for d in m.distributions()))"
    names = subprocess.run(
        [str(python), "-c", listing], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(set(names) - {"pip", "setuptools", "wheel"}) == ["numpy", "onnxruntime"]


@pytest.mark.slow
@pytest.mark.index
def test_converted_models_run_on_the_oldest_pinned_wheel_at_default_options(
    small_models, small_spectral_models, tmp_path
):
    """ORT 1.17-1.23 fuse at session load what newer versions leave alone: a LayerNormalization
    with a [T, C] scale after an Add passed every check on 1.32 and failed at run time on the
    older wheels as a SkipLayerNormalization. So converted files are proven on the oldest wheel
    too, at default session options, where those fusions happen. Spectral-core files too."""
    files = [*small_models.values(), *small_spectral_models.values()]
    run = _nox(
        "-s",
        f"contract(ort='{VERSIONS[0]}')",
        "--",
        "--results-dir",
        str(tmp_path),
        *map(str, files),
        envdir=tmp_path / "nox",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / ortcheck.SUMMARY_NAME).read_text())
    assert sorted(row["model"] for row in summary) == sorted(p.name for p in files)
    assert {(row["ort"], row["status"]) for row in summary} == {(VERSIONS[0], "ok")}
