"""The spectral-core interface: files today's OpenKara loads, their composed stems and operators.

Small random-weight models (n_fft 512: contract v1's framing at a test size) convert to
`NAME.spectral.onnx`; the app-like check accepts them, their stems composed as the app does
pass the float64 gate at both ORT settings and agree with the waveform file's, and the numpy
contract STFT/ISTFT equals demucs' own `_spec` / `_ispec`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from converter import metadata as meta
from converter import spectral_contract
from converter.build.fakerepo import model_kwargs, write_bag, write_checkpoint
from converter.build.loading import load
from converter.errors import UserError
from converter.facts import (
    MIX_INPUT,
    SPECTRAL_CONTRACT,
    SPECTRAL_CORE,
    SPECTRAL_INPUT,
    SPECTRAL_OUTPUT,
    TIME_OUTPUT,
    is_ai_onnx,
)
from converter.gate import accuracy, contract, contract_selftest, oplist, ortcheck
from converter.gate.validation import fixed_inputs, reference, session
from converter.pipeline import convert, validate

STEMS = {
    "htdemucs": ["drums", "bass", "other", "vocals"],
    "htdemucs_ft": ["drums", "bass", "other", "vocals"],
    "htdemucs_6s": ["drums", "bass", "other", "vocals", "guitar", "piano"],
}
SMALL_SEGMENT, SMALL_N_FFT = 22050, 512


def _io(values) -> list[tuple[str, list[int], int]]:
    return [
        (v.name, [d.dim_value for d in v.type.tensor_type.shape.dim], v.type.tensor_type.elem_type)
        for v in values
    ]


@pytest.mark.parametrize("name", sorted(STEMS))
def test_spectral_file_has_the_contract_interface_and_metadata(small_spectral_models, name):
    path = small_spectral_models[name]
    assert path.name == f"{name}.spectral.onnx"
    model = onnx.load(path)
    stems = len(STEMS[name])
    contract.check_app(model, path.name, SMALL_SEGMENT, (stems,), SMALL_N_FFT)
    spec = [2, 2, 256, 173]  # frames = ceil(22050 / 128)
    float32 = onnx.TensorProto.FLOAT
    assert _io(model.graph.input) == [
        (SPECTRAL_INPUT, [1, *spec], float32),
        (MIX_INPUT, [1, 2, SMALL_SEGMENT], float32),
    ]
    assert _io(model.graph.output) == [
        (SPECTRAL_OUTPUT, [1, stems, *spec], float32),
        (TIME_OUTPUT, [1, stems, 2, SMALL_SEGMENT], float32),
    ]
    stamped = meta.read_metadata(model)
    assert stamped[meta.TENSOR_INTERFACE] == SPECTRAL_CORE
    assert stamped[meta.SPECTRAL_CONTRACT] == SPECTRAL_CONTRACT
    assert stamped[meta.STEM_PROFILE] == ("four-stem" if stems == 4 else "six-stem")
    assert stamped[meta.INPUT_SEMANTICS] == (
        "spectral=[1,2,2,256,173] contract-v1 spec(mix); mix=[1,2,22050] stereo 44.1 kHz waveform"
    )
    assert stamped[meta.OUTPUT_SEMANTICS].startswith(
        f"spectral_out=[1,{stems},2,2,256,173] pre-ISTFT (de-normalized) {'/'.join(STEMS[name])}"
    )
    assert stamped[meta.STEMS] == ",".join(STEMS[name])
    assert stamped[meta.WEIGHT_STORAGE] == "float16"
    assert stamped[meta.CACHE_KEY] == meta.fingerprint(model)
    provenance = json.loads(stamped[meta.PROVENANCE])
    assert provenance["tensor_interface"] == SPECTRAL_CORE and provenance["n_fft"] == SMALL_N_FFT
    assert meta.read_sidecar(path) == (meta.sha256_file(path), path.name)
    recorded = np.load(path.with_name(f"{name}.spectral.reference.npz"))
    assert str(recorded["interface"]) == SPECTRAL_CORE
    # No transform left inside: the app computes the STFT and ISTFT.
    ops = {node.op_type for _, node in ortcheck.facts.walk_model(model)}
    assert not ops & {"STFT", "DFT", "HannWindow"}


def test_waveform_files_are_stamped_waveform(small_models):
    stamped = meta.read_metadata(onnx.load(small_models["htdemucs"], load_external_data=False))
    assert stamped[meta.TENSOR_INTERFACE] == "waveform"
    assert meta.SPECTRAL_CONTRACT not in stamped


def test_app_check_refuses_a_waveform_file_and_wrong_values_in_one_line(small_models):
    waveform = onnx.load(small_models["htdemucs"])
    with pytest.raises(UserError, match="waveform-interface file .*--interface spectral-core"):
        contract.check_app(waveform, "htdemucs.onnx")
    for key, value, message in (
        (meta.TENSOR_INTERFACE, "spectral", "OpenKara loads only spectral-core files"),
        (meta.SPECTRAL_CONTRACT, "openkara.spectral-contract/v2", "needs 'openkara.spectral-"),
    ):
        model = contract_selftest.tiny_spectral_model()
        contract_selftest._with_entry(key, value)(model)
        with pytest.raises(UserError, match=message) as caught:
            contract.check_app(model, "x.onnx", 4096, (4,), 512)
        assert "\n" not in str(caught.value)
    six = contract_selftest.tiny_spectral_model(stems=tuple(STEMS["htdemucs_6s"]))
    with pytest.raises(UserError, match="6 stems, OpenKara takes 4"):
        contract.check_app(six, "six.onnx", 4096, n_fft=512)
    # At the app's own segment the stand-in's shapes are wrong, and it says which.
    with pytest.raises(UserError, match=r"inputs .* OpenKara needs \[\('spectral', \[1, 2, 2,"):
        contract.check_app(contract_selftest.tiny_spectral_model(), "tiny.onnx")


def _drop_time_out(model: onnx.ModelProto) -> None:
    del model.graph.output[1]


def _symbolic_batch(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"


def _float16_time_out(model: onnx.ModelProto) -> None:
    model.graph.output[1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_time_out, r"outputs \[\('spectral_out', .*\)\], OpenKara needs .*'time_out'"),
        (_symbolic_batch, r"inputs \[\('spectral', \['batch', 2, 2, 256, 32\]\)"),
        (_float16_time_out, "'time_out' is FLOAT16, OpenKara needs float32"),
    ],
)
def test_app_check_refuses_what_the_app_refuses(damage, message):
    model = contract_selftest.tiny_spectral_model()
    contract.check_app(model, "tiny.onnx", 4096, n_fft=512)
    damage(model)
    with pytest.raises(UserError, match=message) as caught:
        contract.check_app(model, "tiny.onnx", 4096, n_fft=512)
    assert "\n" not in str(caught.value)


def test_gate_refuses_a_waveform_stamp_on_a_spectral_graph(tmp_path):
    model = contract_selftest.tiny_spectral_model()
    contract_selftest._with_entry(meta.TENSOR_INTERFACE, "waveform")(model)
    path = tmp_path / "x.onnx"
    contract_selftest.write_model(model, path)
    with pytest.raises(contract.ContractError, match=r"\[io\] graph inputs are \['spectral'"):
        contract.gate(path)


@pytest.mark.parametrize("name", sorted(STEMS))
def test_composed_stems_pass_the_float64_gate_at_both_settings(small_spectral_models, name):
    row = ortcheck.check_model(small_spectral_models[name], ort.__version__)
    assert row["status"] == "ok", row["status"]
    assert row["load_s"] is not None and row["default_load_s"] is not None
    assert row["margin_db"] > 0


def test_spectral_and_waveform_stems_agree_within_the_gate_on_every_input(
    small_repo, small_models, small_spectral_models
):
    bag = load("htdemucs", small_repo)
    spectral, waveform = (session(m["htdemucs"]) for m in (small_spectral_models, small_models))
    for signal, audio in fixed_inputs(2, bag.segment_samples, bag.samplerate).items():
        truth = reference(bag, audio, double=True)
        bound = [accuracy.allowed_mse(m) for m in accuracy.stem_mse(reference(bag, audio), truth)]
        composed = ortcheck.run_stems(spectral, audio)
        direct = ortcheck.run_stems(waveform, audio)
        assert composed.shape == direct.shape == truth.shape
        assert (accuracy.stem_mse(composed, direct) <= bound).all(), signal


@pytest.mark.integration  # converts or runs the CLI without a model fixture
def test_non_one_hot_bag_mixes_both_outputs_with_demucs_weights(tmp_path):
    """Two models, weights not one-hot: the conversion's gate compares with demucs' bag."""
    repo = tmp_path / "repo"
    repo.mkdir()
    kwargs = model_kwargs("htdemucs_ft", "small")
    for sig in ("aaaa0001", "bbbb0002"):
        write_checkpoint(repo, sig, kwargs)
    weights = [[1.0, 0.0, 2.0, 0.5], [3.0, 1.0, 0.0, 0.5]]
    write_bag(repo, "htdemucs_ft", ["aaaa0001", "bbbb0002"], weights)
    path = convert("htdemucs_ft", repo=repo, out_dir=tmp_path / "out", interface=SPECTRAL_CORE)
    model = onnx.load(path)
    assert meta.provenance(model)["weights"] == weights
    contract.check_app(model, path.name, SMALL_SEGMENT, n_fft=SMALL_N_FFT)
    # Both outputs are the weighted bag: the time branch alone already differs from model 0's.
    bag = load("htdemucs_ft", repo)
    audio = fixed_inputs(2, bag.segment_samples, 44100)["0.1 noise"]
    got = ortcheck.run_stems(session(path), audio)
    truth = reference(bag, audio, double=True)
    assert (
        accuracy.stem_mse(got, truth)
        <= np.load(path.with_name("htdemucs_ft.spectral.reference.npz"))["max_mse"][0]
    ).all()


def _graph_operators(model: onnx.ModelProto) -> set[tuple[str, int, str]]:
    """(domain, opset, op) of every node, walked here independently of converter.gate.oplist."""
    versions = {
        ("ai.onnx" if is_ai_onnx(i.domain) else i.domain): i.version for i in model.opset_import
    }
    found = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = "ai.onnx" if is_ai_onnx(node.domain) else node.domain
            found.add((domain, versions[domain], node.op_type))
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def _config_operators(text: str) -> set[tuple[str, int, str]]:
    return {(d, v, op) for (d, v), ops in oplist.parse_config(text).items() for op in ops}


@pytest.mark.parametrize("interface", ["waveform", SPECTRAL_CORE])
def test_operator_list_holds_exactly_the_graphs_operators(
    small_models, small_spectral_models, interface
):
    path = (small_models if interface == "waveform" else small_spectral_models)["htdemucs"]
    model = onnx.load(path)
    written = oplist.config_path(path).read_text(encoding="utf-8")
    assert path.name in written.splitlines()[0] and meta.sha256_file(path) in written
    expected = _graph_operators(model)
    assert _config_operators(written) == expected
    # The graph's nodes live in `If` bodies: a walk of the main graph alone would miss them.
    main = {node.op_type for node in model.graph.node}
    assert "If" in main and {op for _, _, op in expected} - main


def test_invoke_operators_writes_the_union_of_files(small_models, small_spectral_models, tmp_path):
    files = [small_models["htdemucs_6s"], small_spectral_models["htdemucs"]]
    out = tmp_path / "release.required_operators.config"
    args = [sys.executable, "-m", "invoke", "operators", "--out", str(out)]
    for path in files:
        args += ["--file", str(path)]
    run = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    union = set().union(*(_graph_operators(onnx.load(path)) for path in files))
    assert _config_operators(out.read_text(encoding="utf-8")) == union
    bad = subprocess.run(
        [sys.executable, "-m", "invoke", "operators", "--file", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert "is a directory" in bad.stderr


# --- the numpy contract STFT/ISTFT against demucs' own _spec / _ispec ---


def _golden(length: int) -> dict[str, np.ndarray]:
    t = np.arange(length) / 44100
    rng = np.random.default_rng(7)
    impulse = np.zeros((2, length))
    impulse[:, length // 3] = 1.0
    sweep = np.sin(2 * np.pi * 20 * length / 44100 / np.log(1000) * (1000 ** (t / t[-1]) - 1))
    return {
        "silence": np.zeros((2, length)),
        "impulse": impulse,
        "tone": np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.cos(2 * np.pi * 1000 * t)]),
        "sweep": np.stack([sweep, -sweep]),
        "noise": rng.standard_normal((2, length)),
        "dc offset": 0.5 + 0.01 * rng.standard_normal((2, length)),
    }


def _demucs(n_fft: int = spectral_contract.N_FFT) -> SimpleNamespace:
    """What `HTDemucs._spec` / `_ispec` read from `self`."""
    return SimpleNamespace(nfft=n_fft, hop_length=n_fft // 4)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """demucs builds its Hann window in float32: agreement to ~1e-6 of the signal's scale."""
    scale = max(np.max(np.abs(want)), 1e-12)
    assert np.max(np.abs(got - want)) <= 2e-6 * scale


@pytest.mark.parametrize("length", [8 * 1024, 10_000, 1000, 343_980])
def test_contract_spec_and_ispec_equal_demucs(length):
    from demucs.htdemucs import HTDemucs

    for name, audio in _golden(length).items():
        x = torch.from_numpy(audio[None])
        z = HTDemucs._spec(_demucs(), x).numpy()  # complex [1, C, F, T]
        want = np.stack([z.real, z.imag], axis=-3)
        got = spectral_contract.spec(audio[None])
        assert got.shape == want.shape == (1, 2, 2, 2048, spectral_contract.frames(length))
        _close(got, want)
        # The inverse of an arbitrary spectrum, and the round trip (not the identity: the
        # Nyquist bin is dropped).
        spectrum = np.random.default_rng(len(name)).standard_normal(got.shape)
        complex_spectrum = torch.from_numpy(spectrum[..., 0, :, :] + 1j * spectrum[..., 1, :, :])
        back = HTDemucs._ispec(_demucs(), complex_spectrum, length).numpy()
        _close(spectral_contract.ispec(spectrum, length), back)
        round_trip = HTDemucs._ispec(_demucs(), torch.from_numpy(z), length).numpy()
        _close(spectral_contract.ispec(got, length), round_trip)


def test_contract_transforms_at_a_test_size_equal_demucs():
    from demucs.htdemucs import HTDemucs

    audio = _golden(SMALL_SEGMENT)["noise"][None]
    z = HTDemucs._spec(_demucs(SMALL_N_FFT), torch.from_numpy(audio)).numpy()
    _close(spectral_contract.spec(audio, SMALL_N_FFT), np.stack([z.real, z.imag], axis=-3))
    back = HTDemucs._ispec(_demucs(SMALL_N_FFT), torch.from_numpy(z), SMALL_SEGMENT).numpy()
    spectrum = spectral_contract.spec(audio, SMALL_N_FFT)
    _close(spectral_contract.ispec(spectrum, SMALL_SEGMENT, SMALL_N_FFT), back)


@pytest.mark.parametrize("length", [10_000, 343_980])
def test_single_precision_transforms_stay_single_and_match_float64(length):
    """bench's app-like path: float32 in, float32 out, within float32 rounding of the contract."""
    for audio in _golden(length).values():
        got = spectral_contract.spec(audio[None], dtype=np.float32)
        want = spectral_contract.spec(audio[None])
        assert got.dtype == np.float32 and got.shape == want.shape
        _close(got, want)
        spectrum = want.astype(np.float32)
        back = spectral_contract.ispec(spectrum, length, dtype=np.float32)
        assert back.dtype == np.float32
        _close(back, spectral_contract.ispec(spectrum, length))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fft_out", [True, False])
def test_transforms_on_reused_per_thread_buffers_equal_one_signal_at_a_time(
    monkeypatch, dtype, fft_out
):
    """Threads that reuse their buffers across signals (and numpy 1's FFTs without `out=`)
    give bit for bit the values of one worker: no signal sees another's leftovers."""
    length = 10_000
    audio = np.random.default_rng(3).standard_normal((3, 2, length))  # 6 signals, ragged on 4
    spectrum = np.random.default_rng(4).standard_normal((1, 5, 2, 2, 2048, 10))  # 10 signals
    monkeypatch.setattr(spectral_contract, "_FFT_OUT", fft_out)
    results = {}
    for workers in (1, 2, 4):
        monkeypatch.setattr(spectral_contract.os, "cpu_count", lambda workers=workers: workers)
        results[workers] = (
            spectral_contract.spec(audio, dtype=dtype),
            spectral_contract.ispec(spectrum, length, dtype=dtype),
        )
    for workers in (2, 4):
        for got, want in zip(results[workers], results[1], strict=True):
            assert got.dtype == want.dtype == dtype
            assert np.array_equal(got, want)


def test_transform_work_arrays_are_kept_between_calls_one_per_name_and_precision(monkeypatch):
    """The app-like loop (spec, run, ispec per segment) allocates no fresh work arrays after
    the first segment, and a different length replaces, never adds, a kept array."""
    # one worker, so one scratch dict (with more, the pool grows to as many as ran at once)
    monkeypatch.setattr(spectral_contract, "_SCRATCH", [])
    monkeypatch.setattr(spectral_contract.os, "cpu_count", lambda: 1)
    audio = np.random.default_rng(5).standard_normal((1, 2, 10_000)).astype(np.float32)

    def kept() -> dict[int, tuple]:
        return {id(a): a.shape for s in spectral_contract._SCRATCH for a in s.values()}

    spectrum = spectral_contract.spec(audio, dtype=np.float32)
    spectral_contract.ispec(spectrum, 10_000, dtype=np.float32)
    first = kept()
    spectrum = spectral_contract.spec(audio, dtype=np.float32)
    spectral_contract.ispec(spectrum, 10_000, dtype=np.float32)
    assert first and kept() == first
    spectral_contract.spec(audio[..., :5_000], dtype=np.float32)
    assert len(kept()) == len(first)  # the shorter signal's frames replaced the kept ones
    assert any(shape[0] == spectral_contract.frames(5_000) for shape in kept().values())


def test_interface_option_is_checked_and_named_in_errors(tmp_path):
    with pytest.raises(UserError, match="--interface 'spectral' is not one of waveform, spectral"):
        convert("htdemucs", out_dir=tmp_path, interface="spectral")
    with pytest.raises(
        UserError,
        match=r"htdemucs.spectral.onnx does not exist; run `invoke convert --model htdemucs "
        r"--interface spectral-core` first",
    ):
        validate("htdemucs", out_dir=tmp_path, interface=SPECTRAL_CORE)
    assert not any(tmp_path.iterdir())
