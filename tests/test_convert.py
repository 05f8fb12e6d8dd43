"""`convert` / `validate` end to end on small random-weight repos in demucs' format."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from converter import metadata as meta
from converter.build.export import bag_plan
from converter.build.fakerepo import model_kwargs, write_bag, write_checkpoint
from converter.errors import UserError
from converter.facts import walk_model
from converter.gate import accuracy, validation
from converter.gate.fingerprint import fingerprint_report
from converter.gate.validation import (
    CONTRACT_INPUTS,
    ValidationError,
    fixed_inputs,
    reference,
    session,
)
from converter.metadata import toolchain_versions
from converter.pipeline import convert, validate

STEMS = {
    "htdemucs": ["drums", "bass", "other", "vocals"],
    "htdemucs_ft": ["drums", "bass", "other", "vocals"],
    "htdemucs_6s": ["drums", "bass", "other", "vocals", "guitar", "piano"],
}


@pytest.mark.parametrize("name", sorted(STEMS))
def test_converted_file_interface_metadata_and_sidecar(small_models, name):
    path = small_models[name]
    model = onnx.load(path)
    length = int(model_kwargs(name, "small")["segment"] * 44100)
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, dims(inp)) == ("audio", [1, 2, length])
    assert (out.name, dims(out)) == ("stems", [1, len(STEMS[name]), 2, length])
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    assert model.ir_version <= 9
    nodes = [node for _, node in walk_model(model)]  # the If bodies included
    assert not [n for n in nodes if n.domain.startswith("com.microsoft.nchwc")]
    assert {n.op_type for n in nodes}.isdisjoint({"STFT", "DFT"})

    stamped = meta.read_metadata(model)
    assert set(meta.REQUIRED_KEYS) <= set(stamped)
    assert stamped[meta.CACHE_KEY] == meta.fingerprint(model)
    assert stamped[meta.OPTIMIZED_BY] == "onnxruntime"
    assert stamped[meta.STEMS].split(",") == STEMS[name]
    assert stamped[meta.SEGMENT_SAMPLES] == str(length)
    provenance = json.loads(stamped[meta.PROVENANCE])
    assert provenance["model"] == name
    assert provenance["toolchain"] == toolchain_versions()
    assert provenance["optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert [c["signature"] for c in provenance["checkpoints"]] == provenance["signatures"]
    assert all(len(c["sha256"]) == 64 and c["checksum"] for c in provenance["checkpoints"])

    digest, file_name = meta.read_sidecar(path)
    assert file_name == path.name and digest == meta.sha256_file(path)
    assert path.with_name(f"{name}.onnx.sha256").read_text().endswith(f"  {name}.onnx\n")
    assert fingerprint_report(path)[1]


def test_ft_provenance_lists_every_member_and_the_weights(small_models):
    provenance = meta.provenance(onnx.load(small_models["htdemucs_ft"]))
    assert provenance["signatures"] == ["f7e0c4bc", "d12395a8", "92cfc3b6", "04573f0d"]
    assert provenance["weights"] == [[float(i == j) for j in range(4)] for i in range(4)]


def test_reference_npz_holds_demucs_float64_output_and_the_gate(small_models, small_repo):
    from converter.build.loading import load

    path = small_models["htdemucs"]
    recorded = np.load(path.with_name("htdemucs.reference.npz"))
    bag = load("htdemucs", small_repo)
    assert list(recorded["inputs"]) == list(CONTRACT_INPUTS)
    assert recorded["stems"].dtype == np.float64
    inputs = fixed_inputs(bag.models[0].audio_channels, bag.segment_samples, bag.samplerate)
    for k, name in enumerate(CONTRACT_INPUTS):
        audio = recorded["audio"][k]
        assert np.array_equal(audio, inputs[name])
        truth = reference(bag, audio, double=True)
        assert np.array_equal(recorded["stems"][k], truth)
        pytorch = accuracy.stem_mse(reference(bag, audio), truth)
        assert np.array_equal(recorded["max_mse"][k], [accuracy.allowed_mse(m) for m in pytorch])
        got = session(path).run(None, {"audio": audio})[0]
        assert (accuracy.stem_mse(got, truth) <= recorded["max_mse"][k]).all()


def test_one_hot_bag_takes_each_stem_from_its_own_model(small_repo, small_models):
    """Stem k of htdemucs_ft must equal model k's stem k alone (not an average of the bag)."""
    from demucs.apply import apply_model

    from converter.build.loading import load

    bag = load("htdemucs_ft", small_repo)
    audio = validation.fixed_inputs(2, bag.segment_samples, 44100)["0.1 noise"]
    got = session(small_models["htdemucs_ft"]).run(None, {"audio": audio})[0]
    with torch.no_grad():
        for k, model in enumerate(bag.models):
            alone = apply_model(model, torch.from_numpy(audio), split=False, shifts=0).numpy()
            power = np.mean(alone[:, k].astype(np.float64) ** 2)
            assert accuracy.snr_db(power, np.mean((got[:, k] - alone[:, k]) ** 2)) > 100
        average = (
            sum(apply_model(m, torch.from_numpy(audio), split=False, shifts=0) for m in bag.models)
            / 4
        ).numpy()
    power = np.mean(average.astype(np.float64) ** 2)
    assert accuracy.snr_db(power, np.mean((got - average) ** 2)) < 20


@pytest.mark.integration  # converts or runs the CLI without a model fixture
def test_mixed_weight_bag_follows_demucs_rule(tmp_path):
    """Two models, weights not one-hot: stem s = sum_m w[m][s] out_m / sum_m w[m][s]."""
    repo = tmp_path / "repo"
    repo.mkdir()
    kwargs = model_kwargs("htdemucs", "small")
    for sig in ("aaaa0001", "bbbb0002"):
        write_checkpoint(repo, sig, kwargs)
    weights = [[1.0, 0.0, 2.0, 0.5], [3.0, 1.0, 0.0, 0.5]]
    write_bag(repo, "htdemucs", ["aaaa0001", "bbbb0002"], weights)
    assert [[(c.member, c.scale) for c in stem] for stem in bag_plan(weights, 4)] == [
        [(0, 0.25), (1, 0.75)],
        [(1, 1.0)],
        [(0, 1.0)],
        [(0, 0.5), (1, 0.5)],
    ]
    path = convert("htdemucs", repo=repo, out_dir=tmp_path / "out")  # validates against demucs
    assert meta.provenance(onnx.load(path))["weights"] == weights


def test_zero_total_weight_is_refused():
    with pytest.raises(ValueError, match="stem 1 has zero total weight"):
        bag_plan([[1.0, 0.0], [1.0, 0.0]], 2)


def test_rebuild_is_byte_identical(small_repo, small_models, tmp_path):
    again = convert("htdemucs_6s", repo=small_repo, out_dir=tmp_path)
    assert meta.sha256_file(again) == meta.sha256_file(small_models["htdemucs_6s"])


def test_failed_gate_leaves_no_file_behind(small_repo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "htdemucs.onnx.sha256").write_text("stale\n")
    monkeypatch.setattr(accuracy, "MARGIN_DB", -400.0)
    with pytest.raises(ValidationError, match=r"stem 'drums' on input|stem '\w+' on input"):
        convert("htdemucs", repo=small_repo, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["htdemucs.onnx.sha256"]  # untouched


def test_unwritable_out_dir_is_refused_before_any_work(small_repo, tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/openkara-not-writable")  # root ignores permission bits
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(UserError, match="cannot write to --out-dir .*pass a writable folder"):
        convert("htdemucs", repo=small_repo, out_dir=target)


def test_validate_reruns_the_gate_on_an_existing_file(small_repo, small_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for suffix in (".onnx", ".onnx.sha256", ".reference.npz"):
        shutil.copy(small_models["htdemucs"].with_name("htdemucs" + suffix), out)
    validate("htdemucs", repo=small_repo, out_dir=out)
    with pytest.raises(UserError, match="run `invoke convert --model htdemucs_6s` first"):
        validate("htdemucs_6s", repo=small_repo, out_dir=out)


def test_validation_names_stem_input_and_numbers_on_failure(small_repo, small_models, monkeypatch):
    from converter.build.loading import load

    bag = load("htdemucs", small_repo)
    real = validation.reference

    def shifted(bag, audio, double=False):  # a wrong bag rule or framing bug, to the gate
        out = real(bag, audio, double=double)
        out[:, 2] += 1e-3
        return out

    monkeypatch.setattr(validation, "reference", shifted)
    with pytest.raises(ValidationError) as caught:
        validation.validate_file(small_models["htdemucs"], bag)
    message = str(caught.value)
    assert "stem 'other'" in message and "MSE 1.000e-06" in message and "on input" in message
    # The shift is in both references: demucs float32 keeps its own small error, the file not.
    assert "PyTorch float32 " in message and "(allowed " in message


def _corrupt_one_weight(source: Path, target: Path) -> str:
    """Copy `source` with one element of its largest float initializer off by 1e-3 (relative
    to the tensor's RMS), the smallest defect a bad conversion could introduce."""
    model = onnx.load(source)
    tensor = max(
        (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
        key=lambda t: np.prod(t.dims),
    )
    values = onnx.numpy_helper.to_array(tensor).copy()
    flat = values.reshape(-1)
    flat[flat.size // 2] += 1e-3 * np.sqrt(np.mean(flat.astype(np.float64) ** 2))
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save(model, target)
    return tensor.name


def test_gate_refuses_a_file_with_one_corrupted_weight(
    small_trained_repo, small_trained_models, tmp_path
):
    from converter.build.loading import load

    name = _corrupt_one_weight(small_trained_models["htdemucs"], tmp_path / "htdemucs.onnx")
    bag = load("htdemucs", small_trained_repo)
    with pytest.raises(ValidationError, match="fails the validation gate") as caught:
        validation.validate_file(tmp_path / "htdemucs.onnx", bag)
    assert "SNR" in str(caught.value), name


@pytest.mark.parametrize("name", sorted(STEMS))
def test_trained_like_models_convert_within_the_gate(small_trained_models, name):
    """Biases of 0.5, norm scales far from 1, growing activations: the fixture converts them
    (validation gate included); here the recorded bound holds on the contract input too."""
    path = small_trained_models[name]
    recorded = np.load(path.with_name(f"{name}.reference.npz"))
    recorded = [recorded[key] for key in ("audio", "stems", "max_mse")]
    for audio, truth, bound in zip(*recorded, strict=True):
        got = session(path).run(None, {"audio": audio})[0]
        assert (accuracy.stem_mse(got, truth) <= bound).all()
