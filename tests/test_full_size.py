"""One end-to-end conversion of the full-size htdemucs architecture: random weights with
trained-like statistics, through the float64 validation gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from converter import metadata as meta
from converter.build.loading import load
from converter.facts import SPECTRAL_CORE
from converter.gate import contract
from converter.pipeline import convert

pytestmark = pytest.mark.slow

HTDEMUCS_PARAMETERS = 41_984_456


def test_full_size_htdemucs_converts_within_budget(full_repo, tmp_path):
    bag = load("htdemucs", full_repo)
    assert sum(p.numel() for p in bag.models[0].parameters()) == HTDEMUCS_PARAMETERS
    assert bag.segment_samples == 343980

    path = convert("htdemucs", repo=full_repo, out_dir=tmp_path)  # validation gate included

    assert path.stat().st_size <= 0.52 * HTDEMUCS_PARAMETERS * 4  # float16 storage (issue 12)
    model = onnx.load(path)
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 4, 2, 343980]
    assert meta.read_metadata(model)[meta.CACHE_KEY] == meta.fingerprint(model)
    assert meta.read_sidecar(path)[0] == meta.sha256_file(path)
    recorded = np.load(path.with_name("htdemucs.reference.npz"))
    assert recorded["stems"].dtype == np.float64 and recorded["max_mse"].shape == (4, 4)


def test_full_size_spectral_htdemucs_is_what_the_app_loads(full_repo, tmp_path):
    path = convert("htdemucs", repo=full_repo, out_dir=tmp_path, interface=SPECTRAL_CORE)

    assert path.name == "htdemucs.spectral.onnx"
    assert path.stat().st_size <= 0.52 * HTDEMUCS_PARAMETERS * 4  # no DFT constants either
    model = onnx.load(path)
    contract.check_app(model, path.name)  # the app's literal shapes, four stems, contract v1
    recorded = np.load(path.with_name("htdemucs.spectral.reference.npz"))
    assert str(recorded["interface"]) == SPECTRAL_CORE and recorded["max_mse"].shape == (4, 4)
