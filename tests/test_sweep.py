"""The seed sweep (`converter.measure.sweep`, `converter/measure/sweepcheck.py`): the files of many
random draws against demucs at both ORT settings, the worst gap per model and input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from converter.gate.contract_selftest import write_tiny
from converter.gate.ortcheck import reference_path
from converter.measure import sweep
from converter.measure.sweepcheck import SETTINGS, record_path


def _tiny_case(out: Path, error: float) -> Path:
    """A stand-in file where a small sweep puts its htdemucs of seed 1, recorded as if PyTorch
    float32 erred by `error` everywhere."""
    case = sweep.Case("small", 1, "htdemucs")
    path = write_tiny(case.file(out))
    with np.load(reference_path(path)) as ref:
        audio, truth = ref["audio"], ref["stems"]
    np.savez(
        record_path(path),
        inputs=np.array(["uniform noise"]),
        stems=np.array(["drums", "bass", "other", "vocals"]),
        audio=audio,
        truth=truth,
        pytorch=(truth + error).astype(np.float32),
    )
    return path


def test_sweepcheck_runs_each_file_at_both_settings_as_a_script(tmp_path):
    """Through `measure`: the script in a fresh interpreter, as in a bare venv of another ORT."""
    path = _tiny_case(tmp_path, error=1e-3)
    results = sweep.measure(tmp_path, [path])
    assert (tmp_path / f"sweep-ort-{results['ort']}.json").is_file()
    rows = results["files"][str(path)]
    assert {(r["setting"], r["stem"]) for r in rows} == {
        (s, stem) for s in SETTINGS for stem in ("drums", "bass", "other", "vocals")
    }
    for row in rows:
        assert row["pytorch_mse"] == pytest.approx(1e-6, rel=1e-3)
        assert 0 < row["mse"] < 1e-10  # Gelu in float32 against its float64 value


def test_summary_takes_the_worst_over_seeds_and_stems_per_setting(tmp_path):
    files = {
        str(sweep.Case("small", seed, "htdemucs").file(tmp_path)): [
            {
                "setting": s,
                "input": "dc offset",
                "stem": stem,
                "power": 1.0,
                "mse": m,
                "pytorch_mse": 1e-12,
            }
            for s, scale in (("optimization off", 1.0), ("default options", 2.0))
            for stem, m in (("drums", 1e-12 * scale * seed), ("bass", 0.5e-12))
        ]
        for seed in (1, 2)
    }
    built = [sweep.Case("small", seed, "htdemucs") for seed in (1, 2)]
    (row,) = sweep.summary({"ort": "1.32.0", "files": files}, tmp_path, built)
    assert row["model"] == "htdemucs, small" and row["input"] == "dc offset"
    assert row["gap"]["optimization off"] == pytest.approx(10 * math.log10(2))
    assert row["gap"]["default options"] == pytest.approx(10 * math.log10(4))
    assert row["margin"]["default options"] == pytest.approx(6 - 10 * math.log10(4))
    assert row["where"]["optimization off"] == "small-seed2 drums"
    assert "| htdemucs, small | dc offset | +3.0 | +6.0 | 3.0 | -0.0 |" in sweep.table([row], "x")


@pytest.mark.parametrize(
    "mse, pytorch_mse, gap",
    [(0.0, 0.0, 0.0), (1e-12, 0.0, math.inf), (0.0, 1e-12, -math.inf), (math.inf, 1.0, math.inf)],
)
def test_gap_of_exact_and_non_finite_outputs(mse, pytorch_mse, gap):
    assert sweep.gap_db(mse, pytorch_mse) == gap


def test_sweep_refuses_counts_that_make_no_sweep(tmp_path):
    from converter.errors import UserError

    with pytest.raises(UserError, match="counts"):
        sweep.sweep(tmp_path, 0, 0)


@pytest.mark.slow
def test_two_seeds_of_small_trained_like_models_convert_and_stay_inside_the_gate(tmp_path):
    """Two more draws of each small model (the suite's own are seed-default): every file
    converts, and at both settings each stem of each input stays inside the gate."""
    rows = sweep.sweep(tmp_path, seeds=2, full_seeds=0)
    assert {row["model"] for row in rows} == {
        "htdemucs, small",
        "htdemucs_6s, small",
        "htdemucs_ft (2-model bag), small",
    }
    assert all(m >= 0 for row in rows for m in row["margin"].values()), rows
    (results,) = tmp_path.glob("sweep-ort-*.json")
    assert len(json.loads(results.read_text())["files"]) == 6
