"""Tiny stand-ins for released files of both interfaces, for the release and catalog tests.

A spectral-core stand-in has the app's exact I/O names and float32 types (small shapes) and
the metadata `invoke convert --interface spectral-core` stamps, so the ship side is tested
without the conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter import metadata, spectral_contract
from converter.facts import (
    MIX_INPUT,
    OPSET,
    SPECTRAL_CONTRACT,
    SPECTRAL_CORE,
    SPECTRAL_INPUT,
    SPECTRAL_OUTPUT,
    TIME_OUTPUT,
    WAVEFORM,
    file_stem,
)
from converter.gate import contract, contract_selftest, oplist

STEMS = ("drums", "bass", "other", "vocals")
SEGMENT = 343980
INPUT_SEMANTICS = "spectral=[1,2,2,2048,336] contract-v1 spec(mix); mix=[1,2,343980] stereo"
OUTPUT_SEMANTICS = "spectral_out=[1,4,2,2,2048,336]; time_out=[1,4,2,343980]"
# The stand-in's tensors: contract v1's layout at a test size (8 bins).
N_FFT, LENGTH = 16, 64


def spectral_model(stems: tuple[str, ...] = STEMS, length: int = LENGTH):
    """spectral [1,2,2,8,T], mix [1,2,L] -> spectral_out [1,S,2,2,8,T], time_out [1,S,2,L]
    (contract v1's framing at n_fft 16): each stem a scaled copy of its input (Unsqueeze + Mul),
    opset 17, IR 8."""
    s = len(stems)
    frames = spectral_contract.frames(length, N_FFT)
    scale = np.linspace(0.25, 1.0, s, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", [SPECTRAL_INPUT, "axis"], ["z"], name="spec_stem"),
            helper.make_node("Mul", ["z", "spec_scale"], [SPECTRAL_OUTPUT], name="spec_mul"),
            helper.make_node("Unsqueeze", [MIX_INPUT, "axis"], ["x"], name="time_stem"),
            helper.make_node("Mul", ["x", "time_scale"], [TIME_OUTPUT], name="time_mul"),
        ],
        "tiny_spectral",
        [
            helper.make_tensor_value_info(
                SPECTRAL_INPUT, TensorProto.FLOAT, [1, 2, 2, N_FFT // 2, frames]
            ),
            helper.make_tensor_value_info(MIX_INPUT, TensorProto.FLOAT, [1, 2, length]),
        ],
        [
            helper.make_tensor_value_info(
                SPECTRAL_OUTPUT, TensorProto.FLOAT, [1, s, 2, 2, N_FFT // 2, frames]
            ),
            helper.make_tensor_value_info(TIME_OUTPUT, TensorProto.FLOAT, [1, s, 2, length]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
            numpy_helper.from_array(scale.reshape(1, s, 1, 1, 1, 1), "spec_scale"),
            numpy_helper.from_array(scale.reshape(1, s, 1, 1), "time_scale"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def write_release_file(
    out_dir: Path,
    model: str,
    interface: str = SPECTRAL_CORE,
    *,
    toolchain: dict[str, str] | None = None,
    seed: int = 0,
    weight_storage: str = "float16",
    stem_profile: str | None = None,
    operators: bool = True,
    **overrides: str,
) -> Path:
    """A stamped file as convert writes it for `model` and `interface`: NAME[.spectral].onnx,
    its sidecar and (with `operators`) its operator list; `seed` varies its bytes; `overrides`
    replace metadata values by key (None deletes)."""
    if interface == SPECTRAL_CORE:
        stems = ("drums", "bass", "other", "vocals", "guitar", "piano")[
            : 6 if model == "htdemucs_6s" else 4
        ]
        proto = spectral_model(stems)
    else:
        stems = STEMS
        proto = contract_selftest.tiny_model()
    weight = np.random.default_rng(seed).standard_normal(3_000).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(weight, "unused"))
    entries = {
        metadata.OPTIMIZED_BY: metadata.OPTIMIZED_BY_VALUE,
        metadata.MODEL_NAME: model,
        metadata.STEMS: ",".join(stems),
        metadata.SAMPLE_RATE: "44100",
        metadata.SEGMENT_SAMPLES: str(SEGMENT),
        metadata.AUDIO_CHANNELS: "2",
        metadata.WEIGHT_STORAGE: weight_storage,
        metadata.PROVENANCE: json.dumps(
            {"model": model, "signatures": ["955717e8"], "toolchain": toolchain or {}}
        ),
        metadata.TENSOR_INTERFACE: interface,
    }
    if interface == SPECTRAL_CORE:
        entries |= {
            metadata.SPECTRAL_CONTRACT: SPECTRAL_CONTRACT,
            metadata.STEM_PROFILE: stem_profile or ("six-stem" if len(stems) == 6 else "four-stem"),
            metadata.INPUT_SEMANTICS: INPUT_SEMANTICS,
            metadata.OUTPUT_SEMANTICS: OUTPUT_SEMANTICS,
        }
    entries |= overrides
    entries = {key: value for key, value in entries.items() if value is not None}
    metadata.stamp(proto, entries)
    path = out_dir / f"{file_stem(model, interface)}.onnx"
    metadata.write_with_sidecar(proto, path)
    if operators:
        ops = oplist.required_operators(proto)
        oplist.config_path(path).write_text(oplist.config_text(ops, ["test"]), encoding="utf-8")
    return path


def app_like_check(path: Path) -> None:
    """What today's OpenKara checks before it creates a session (`contract.check_app`), at the
    stand-in's test size; waveform stand-ins pass, as the release gate takes both."""
    model = onnx.load(str(path), load_external_data=False)
    if metadata.read_metadata(model).get(metadata.TENSOR_INTERFACE, WAVEFORM) != SPECTRAL_CORE:
        return
    contract.check_app(model, path.name, segment=LENGTH, stems=(4, 6), n_fft=N_FFT)
