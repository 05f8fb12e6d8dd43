"""The contract gate's fixtures: compliant stand-in models and one violation per rule.

`invoke contract --self-test` builds the compliant models (one per tensor interface: waveform
and spectral-core) and, for every rule, a copy broken in exactly one way, and proves the gate
refuses each for that reason alone. The load tests (nox, tests) use the same stand-ins, written
with the float64 reference output ortcheck compares to.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter import metadata, spectral_contract
from converter.facts import (
    ACCELERATORS_TARGET,
    COM_MICROSOFT,
    COM_MICROSOFT_OPSET,
    FLOAT32_STORAGE,
    INPUT_NAME,
    IR_VERSION,
    MIX_INPUT,
    OPSET,
    OUTPUT_NAME,
    SPECTRAL_INPUT,
    SPECTRAL_OUTPUT,
    TIME_OUTPUT,
    WAVEFORM,
    is_ai_onnx,
)
from converter.gate.accuracy import allowed_mse, stem_mse
from converter.gate.contract import ContractError, violations
from converter.gate.ortcheck import reference_path

log = logging.getLogger(__name__)


def tiny_model(
    stems: tuple[str, ...] = ("drums", "bass", "other", "vocals"),
    segment: int = 4096,
    channels: int = 2,
) -> onnx.ModelProto:
    """A stamped, contract-compliant stand-in for a converted file: `audio` -> `stems`.

    stems[k] = Gelu(scale[k] * audio), with Gelu from `com.microsoft` so the allow-list path is
    exercised on every ORT version. Small enough for the self-test and the fast test suite.
    """
    scale = np.linspace(0.5, 2.0, len(stems), dtype=np.float32).reshape(1, len(stems), 1, 1)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Unsqueeze", [INPUT_NAME, "stem_axis"], ["mono_stem"], name="unsqueeze"
            ),
            helper.make_node("Mul", ["mono_stem", "scale"], ["scaled"], name="mul"),
            helper.make_node("Gelu", ["scaled"], [OUTPUT_NAME], name="gelu", domain=COM_MICROSOFT),
        ],
        "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, channels, segment])],
        [
            helper.make_tensor_value_info(
                OUTPUT_NAME, TensorProto.FLOAT, [1, len(stems), channels, segment]
            )
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "stem_axis"),
            numpy_helper.from_array(scale, "scale"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", OPSET),
            helper.make_opsetid(COM_MICROSOFT, COM_MICROSOFT_OPSET),
        ],
        producer_name="openkara-demucs-onnx contract self-test",
    )
    model.ir_version = IR_VERSION
    metadata.stamp(model, _tiny_metadata(stems, segment, channels))
    return model


def _tiny_metadata(stems: tuple[str, ...], segment: int, channels: int) -> dict[str, str]:
    return {
        metadata.OPTIMIZED_BY: metadata.OPTIMIZED_BY_VALUE,
        metadata.MODEL_NAME: "tiny",
        metadata.STEMS: ",".join(stems),
        metadata.SAMPLE_RATE: "44100",
        metadata.SEGMENT_SAMPLES: str(segment),
        metadata.AUDIO_CHANNELS: str(channels),
        metadata.PROVENANCE: json.dumps(
            {"built_by": "converter.gate.contract_selftest.tiny_model"}
        ),
        metadata.WEIGHT_STORAGE: FLOAT32_STORAGE,
        metadata.TENSOR_INTERFACE: WAVEFORM,
    }


# The spectral stand-in's STFT size: contract v1's framing at a test size (F = 256 bins).
TINY_N_FFT = 512
FOUR_STEMS = ("drums", "bass", "other", "vocals")


def _spectral_scales(stems: int) -> tuple[np.ndarray, np.ndarray]:
    spectral = np.linspace(0.5, 1.5, stems, dtype=np.float32).reshape(1, stems, 1, 1, 1, 1)
    time = np.linspace(0.25, 1.0, stems, dtype=np.float32).reshape(1, stems, 1, 1)
    return spectral, time


def tiny_spectral_model(
    stems: tuple[str, ...] = FOUR_STEMS, segment: int = 4096, channels: int = 2
) -> onnx.ModelProto:
    """A stamped, contract-compliant spectral-core stand-in: `spectral`, `mix` ->
    `spectral_out` = a[s] * spectral, `time_out` = Gelu(b[s] * mix) (com.microsoft Gelu)."""
    n_fft = TINY_N_FFT
    spec = [channels, 2, n_fft // 2, spectral_contract.frames(segment, n_fft)]
    a, b = _spectral_scales(len(stems))
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", [SPECTRAL_INPUT, "stem_axis"], ["z1"], name="unsq_z"),
            helper.make_node("Mul", ["z1", "spectral_scale"], [SPECTRAL_OUTPUT], name="mul_z"),
            helper.make_node("Unsqueeze", [MIX_INPUT, "stem_axis"], ["x1"], name="unsq_x"),
            helper.make_node("Mul", ["x1", "time_scale"], ["xs"], name="mul_x"),
            helper.make_node("Gelu", ["xs"], [TIME_OUTPUT], name="gelu", domain=COM_MICROSOFT),
        ],
        "tiny-spectral",
        [
            helper.make_tensor_value_info(SPECTRAL_INPUT, TensorProto.FLOAT, [1, *spec]),
            helper.make_tensor_value_info(MIX_INPUT, TensorProto.FLOAT, [1, channels, segment]),
        ],
        [
            helper.make_tensor_value_info(
                SPECTRAL_OUTPUT, TensorProto.FLOAT, [1, len(stems), *spec]
            ),
            helper.make_tensor_value_info(
                TIME_OUTPUT, TensorProto.FLOAT, [1, len(stems), channels, segment]
            ),
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "stem_axis"),
            numpy_helper.from_array(a, "spectral_scale"),
            numpy_helper.from_array(b, "time_scale"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", OPSET),
            helper.make_opsetid(COM_MICROSOFT, COM_MICROSOFT_OPSET),
        ],
        producer_name="openkara-demucs-onnx contract self-test",
    )
    model.ir_version = IR_VERSION
    entries = _tiny_metadata(stems, segment, channels)
    entries[metadata.PROVENANCE] = json.dumps(
        {"built_by": "converter.gate.contract_selftest.tiny_spectral_model", "n_fft": n_fft}
    )
    entries.update(metadata.spectral_entries(list(stems), channels, segment, 44100, n_fft))
    metadata.stamp(model, entries)
    return model


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def write_tiny_spectral(path: Path, segment: int = 4096) -> Path:
    """Write `tiny_spectral_model()` with sidecar and a float64 reference of its composed stems
    (ispec(a[s] spec(x)) + Gelu(b[s] x)); the bound is the same arithmetic in float32."""
    model = tiny_spectral_model(segment=segment)
    write_model(model, path)
    n_fft = TINY_N_FFT
    a, b = _spectral_scales(4)
    audio = np.random.default_rng(0).uniform(-1, 1, (1, 2, segment)).astype(np.float32)
    x = audio.astype(np.float64)[:, None]
    spec = spectral_contract.spec(audio, n_fft)[:, None]
    stems = spectral_contract.ispec(a * spec, segment, n_fft) + _gelu(b * x)
    single = spectral_contract.ispec(a * spec.astype(np.float32), segment, n_fft) + _gelu(
        b * audio[:, None]
    ).astype(np.float32)
    max_mse = np.array([allowed_mse(m) for m in stem_mse(single, stems)])
    np.savez(
        reference_path(path),
        interface=np.array(metadata.read_metadata(model)[metadata.TENSOR_INTERFACE]),
        inputs=np.array(["uniform noise"]),
        audio=audio[None],
        stems=stems[None],
        max_mse=max_mse[None],
    )
    log.info("wrote %s with sidecar and reference %s", path, reference_path(path).name)
    return path


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` with a correct `.sha256` sidecar (what convert ships)."""
    metadata.write_with_sidecar(model, path)


def write_tiny(path: Path, segment: int = 4096) -> Path:
    """Write `tiny_model()` as a shippable file: model, sidecar and reference npz.

    The reference is computed here in float64 (exact erf Gelu), independently of ONNX Runtime,
    so the load test compares each ORT version against ground truth rather than against itself.
    """
    model = tiny_model(segment=segment)
    write_model(model, path)
    meta = metadata.read_metadata(model)
    scale = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    channels = int(meta[metadata.AUDIO_CHANNELS])
    audio = np.random.default_rng(0).uniform(-1, 1, (1, channels, segment)).astype(np.float32)
    scaled = scale * audio.astype(np.float64)[:, None]
    erf = np.vectorize(math.erf)(scaled / math.sqrt(2))
    stems = 0.5 * scaled * (1 + erf)
    # The bound the conversion's gate records, with float32 rounding standing in for PyTorch.
    max_mse = np.array([allowed_mse(m) for m in stem_mse(stems.astype(np.float32), stems)])
    np.savez(
        reference_path(path),
        inputs=np.array(["uniform noise"]),
        audio=audio[None],
        stems=stems[None],
        max_mse=max_mse[None],
    )
    log.info("wrote %s with sidecar and reference %s", path, reference_path(path).name)
    return path


def _restamp(model: onnx.ModelProto) -> None:
    metadata.stamp(
        model, {k: v for k, v in metadata.read_metadata(model).items() if k != metadata.CACHE_KEY}
    )


# --- self-test: one model per rule, each built compliant and then broken in exactly one way ---


def _with_nchwc_node(model: onnx.ModelProto) -> None:
    """What ORT_ENABLE_ALL leaves behind: an x86-only NCHWc node (here after the Gelu)."""
    model.graph.node[-1].output[0] = "gelu_out"
    model.graph.node.append(
        helper.make_node(
            "ReorderOutput",
            ["gelu_out"],
            [OUTPUT_NAME],
            name="nchwc_reorder",
            domain="com.microsoft.nchwc",
        )
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft.nchwc", 1))
    _restamp(model)


def _with_nchwc_in_function(model: onnx.ModelProto) -> None:
    """The same node hidden in a model-local function that the main graph calls."""
    domain = "openkara.selftest"
    model.functions.append(
        helper.make_function(
            domain,
            "Reorder",
            ["x"],
            ["y"],
            [helper.make_node("ReorderOutput", ["x"], ["y"], domain="com.microsoft.nchwc")],
            [helper.make_opsetid("com.microsoft.nchwc", 1)],
        )
    )
    model.graph.node[-1].output[0] = "gelu_out"
    model.graph.node.append(
        helper.make_node("Reorder", ["gelu_out"], [OUTPUT_NAME], name="call", domain=domain)
    )
    model.opset_import.append(helper.make_opsetid(domain, 1))
    _restamp(model)


def _with_stray_import(model: onnx.ModelProto) -> None:
    """ORT writes every domain it knows into saved files; ORT 1.17 refuses ai.onnx.ml v5."""
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 5))
    _restamp(model)


def _with_ir_11(model: onnx.ModelProto) -> None:
    model.ir_version = 11
    _restamp(model)


def _with_opset_18(model: onnx.ModelProto) -> None:
    for entry in model.opset_import:
        if is_ai_onnx(entry.domain):
            entry.version = 18
    _restamp(model)


def _without_provenance(model: onnx.ModelProto) -> None:
    entries = metadata.read_metadata(model)
    del entries[metadata.PROVENANCE], entries[metadata.CACHE_KEY]
    metadata.stamp(model, entries)


def _with_unknown_weight_storage(model: onnx.ModelProto) -> None:
    """An app reads the storage to know what it downloads; only the converter's kinds exist."""
    entries = metadata.read_metadata(model)
    entries[metadata.WEIGHT_STORAGE] = "int8"
    del entries[metadata.CACHE_KEY]
    metadata.stamp(model, entries)


def _with_stale_cache_key(model: onnx.ModelProto) -> None:
    """Weights edited after stamping: OpenKara would reuse a compiled session of other weights."""
    scale = model.graph.initializer[1]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))


def _with_dynamic_time_axis(model: onnx.ModelProto) -> None:
    """A dynamic-axes export: consistent for the checker, but not the documented static shape."""
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[-1].dim_param = "time"
    _restamp(model)


def _with_entry(key: str, value: str | None) -> Callable[[onnx.ModelProto], None]:
    """Set (or, with None, drop) one metadata entry and re-stamp."""

    def change(model: onnx.ModelProto) -> None:
        entries = metadata.read_metadata(model)
        del entries[metadata.CACHE_KEY]
        if value is None:
            del entries[key]
        else:
            entries[key] = value
        metadata.stamp(model, entries)

    return change


def _with_swapped_inputs(model: onnx.ModelProto) -> None:
    """`mix` before `spectral`: the app feeds inputs by position."""
    first, second = (onnx.ValueInfoProto(), onnx.ValueInfoProto())
    first.CopyFrom(model.graph.input[1])
    second.CopyFrom(model.graph.input[0])
    del model.graph.input[:]
    model.graph.input.extend([first, second])
    _restamp(model)


def _with_nyquist_bin(model: onnx.ModelProto) -> None:
    """n_fft/2 + 1 bins, as torch.stft returns them: the contract drops the Nyquist bin."""
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[-2]
        dim.dim_value += 1
    _restamp(model)


def _break_sidecar(path: Path) -> None:
    metadata.sidecar_path(path).write_text(metadata.sidecar_text(path, "0" * 64), encoding="utf-8")


# name -> (rule it must trip, how to break the model, how to break the written files)
SELF_TEST_CASES: dict[
    str, tuple[str, Callable[[onnx.ModelProto], None] | None, Callable[[Path], None] | None]
] = {
    "nchwc_node": ("domain", _with_nchwc_node, None),
    "nchwc_in_function": ("domain", _with_nchwc_in_function, None),
    "stray_opset_import": ("opset_import", _with_stray_import, None),
    "ir_version_11": ("ir_version", _with_ir_11, None),
    "opset_18": ("opset_version", _with_opset_18, None),
    "missing_metadata": ("metadata", _without_provenance, None),
    "unknown_weight_storage": ("metadata", _with_unknown_weight_storage, None),
    "stale_cache_key": ("cache_key", _with_stale_cache_key, None),
    "wrong_sidecar": ("sidecar", None, _break_sidecar),
    "wrong_shape": ("io", _with_dynamic_time_axis, None),
    "unknown_target": ("metadata", _with_entry(metadata.TARGET, "gpu"), None),
    # the stand-in's com.microsoft Gelu, in a file the catalog would give CoreML and XNNPACK
    "accelerators_with_com_microsoft": (
        "target",
        _with_entry(metadata.TARGET, ACCELERATORS_TARGET),
        None,
    ),
}

# The same for the spectral-core stand-in (`tiny_spectral_model`).
SPECTRAL_SELF_TEST_CASES: dict[
    str, tuple[str, Callable[[onnx.ModelProto], None] | None, Callable[[Path], None] | None]
] = {
    "spectral_inputs_swapped": ("io", _with_swapped_inputs, None),
    "spectral_nyquist_bin": ("io", _with_nyquist_bin, None),
    "spectral_stamped_waveform": ("io", _with_entry(metadata.TENSOR_INTERFACE, WAVEFORM), None),
    "spectral_contract_v2": (
        "metadata",
        _with_entry(metadata.SPECTRAL_CONTRACT, "openkara.spectral-contract/v2"),
        None,
    ),
    "spectral_no_stem_profile": ("metadata", _with_entry(metadata.STEM_PROFILE, None), None),
    "spectral_six_stem_profile": (
        "metadata",
        _with_entry(metadata.STEM_PROFILE, metadata.STEM_PROFILES[6]),
        None,
    ),
    "unknown_interface": ("metadata", _with_entry(metadata.TENSOR_INTERFACE, "spectral"), None),
}

# (stand-in factory, its cases), one per tensor interface.
SELF_TESTS = (
    (tiny_model, SELF_TEST_CASES),
    (tiny_spectral_model, SPECTRAL_SELF_TEST_CASES),
)


def self_test(work_dir: Path | None = None) -> list[str]:
    """Prove each rule refuses its violating model, for that reason alone, and a good one passes.

    Returns one report line per case; raises ContractError naming every case that misbehaved.
    """
    with tempfile.TemporaryDirectory(prefix="contract-self-test-") as tmp:
        root = work_dir or Path(tmp)
        report, failures = [], []
        for factory, cases in SELF_TESTS:
            _run_cases(root, factory, cases, report, failures)
    if failures:
        raise ContractError(
            "contract self-test failed:\n" + "\n".join(f"  - {f}" for f in failures)
        )
    return report


def _run_cases(
    root: Path,
    factory: Callable[[], onnx.ModelProto],
    cases: dict,
    report: list[str],
    failures: list[str],
) -> None:
    """The compliant `factory()` model must pass; each case must trip only its own rule."""
    label = factory.__name__
    good = root / f"{label}.onnx"
    write_model(factory(), good)
    found = violations(onnx.load(str(good)), good)
    if found:
        failures.append(f"compliant {label} refused: {'; '.join(map(str, found))}")
    report.append(f"compliant {label}: {'REFUSED' if found else 'passes'}")
    for name, (rule, break_model, break_files) in cases.items():
        model = factory()
        if break_model:
            break_model(model)
        path = root / f"{name}.onnx"
        write_model(model, path)
        if break_files:
            break_files(path)
        found = violations(onnx.load(str(path)), path)
        rules = sorted({violation.rule for violation in found})
        if rules != [rule]:
            failures.append(
                f"{name}: expected only [{rule}], got {[str(v) for v in found] or 'a pass'}"
            )
        report.append(f"{name}: refused, {found[0] if found else 'NOT REFUSED'}")
        log.info("self-test %s: %s", name, "; ".join(map(str, found)) or "not refused")
