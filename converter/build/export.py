"""Export a demucs bag to ONE ONNX graph: shared STFT, one network per model, bag mix, ISTFT.

With the spectral-core interface (facts.SPECTRAL_CORE) the STFT and ISTFT pieces are left out:
the app computes them (`converter.spectral_contract`), the graph takes `spectral` and `mix` and
returns the bag-mixed `spectral_out` and `time_out`, laid out as the contract says by Reshapes.

A single TorchScript trace of four full-size HTDemucs peaked near 20 GB, so each piece is traced
on its own (the STFT, every model's network, the ISTFT) and the pieces are joined as ONNX graphs.
Because the ISTFT is linear, the bag's weighted sum is taken on the spectrograms and waveforms
first and synthesized once per stem: demucs' `apply_model` rule

    stem_s = Σ_m w[m][s] · model_m(x)_s / Σ_m w[m][s]

needs one ISTFT per stem, and a model whose weight for a stem is zero contributes nothing to it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import torch
from onnx import TensorProto, compose, helper

from converter.build.exportable import Network
from converter.build.loading import LoadedBag
from converter.build.spectral import Istft, Stft
from converter.facts import (
    INPUT_NAME,
    INTERFACES,
    IR_VERSION,
    MIX_INPUT,
    OPSET,
    OUTPUT_NAME,
    SPECTRAL_CORE,
    SPECTRAL_INPUT,
    SPECTRAL_OUTPUT,
    TIME_OUTPUT,
    WAVEFORM,
)
from converter.progress import step
from converter.spectral_contract import N_FFT

log = logging.getLogger(__name__)

INPUT = INPUT_NAME
OUTPUT = OUTPUT_NAME


@dataclass(frozen=True)
class Contribution:
    """Model `member` supplies stem `stem` with factor `scale` = w / Σ w over the bag."""

    member: int
    stem: int
    scale: float


def bag_plan(weights: list[list[float]], sources: int) -> list[list[Contribution]]:
    """For each stem, the models that contribute to it and their normalized weights.

    Raises ValueError when a stem has zero total weight (demucs would divide by zero).
    """
    plan = []
    for stem in range(sources):
        total = sum(row[stem] for row in weights)
        if total == 0:
            raise ValueError(f"stem {stem} has zero total weight in the bag")
        plan.append(
            [Contribution(m, stem, row[stem] / total) for m, row in enumerate(weights) if row[stem]]
        )
    return plan


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The fused MHA fast path has no ONNX export; the exporter's warnings are noise here."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def trace(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str]):
    """TorchScript-export `module` at opset 17 with static shapes; return the ModelProto."""
    buffer = io.BytesIO()
    with _quiet_export():
        torch.onnx.export(
            module.eval(),
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _embed(
    graph: onnx.GraphProto, sub: onnx.ModelProto, prefix: str, bind: dict[str, str]
) -> dict[str, str]:
    """Copy `sub`'s graph into `graph` under `prefix`, feeding its inputs from `bind`.

    Returns {sub output name: tensor name in `graph`}.
    """
    renamed = compose.add_prefix(sub, prefix)
    inputs = {prefix + name: source for name, source in bind.items()}
    missing = {i.name for i in renamed.graph.input} - set(inputs)
    if missing:
        raise ValueError(f"unbound inputs {sorted(missing)} of {prefix}")
    for node in renamed.graph.node:
        for i, name in enumerate(node.input):
            if name in inputs:
                node.input[i] = inputs[name]
    graph.node.extend(renamed.graph.node)
    graph.initializer.extend(renamed.graph.initializer)
    return {o.name[len(prefix) :]: o.name for o in renamed.graph.output}


def _const(graph: onnx.GraphProto, name: str, values: list[int]) -> str:
    graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    return name


def _mix(
    graph: onnx.GraphProto, outputs: list[str], plan: list[list[Contribution]], kind: str
) -> str:
    """Tensor [1, S, ...] whose stem s is the sum of its contributions (already scaled)."""
    members = sorted({c.member for stem in plan for c in stem})
    # Which stems each member's output holds, in order (see Network.stems).
    held = {
        m: [s for s, stem in enumerate(plan) if any(c.member == m for c in stem)] for m in members
    }
    if len(members) == 1 and len(held[members[0]]) == len(plan):
        return outputs[members[0]]
    pieces = []
    for s, stem in enumerate(plan):
        terms = []
        for c in stem:
            source, index = outputs[c.member], held[c.member].index(s)
            if len(held[c.member]) == 1:
                terms.append(source)
                continue
            name = f"mix/{kind}/m{c.member}_s{s}"
            starts = _const(graph, f"{name}/starts", [index])
            ends = _const(graph, f"{name}/ends", [index + 1])
            axes = _const(graph, f"{name}/axes", [1])
            graph.node.append(helper.make_node("Slice", [source, starts, ends, axes], [name]))
            terms.append(name)
        if len(terms) > 1:
            total = f"mix/{kind}/s{s}"
            graph.node.append(helper.make_node("Sum", terms, [total]))
            terms = [total]
        pieces.append(terms[0])
    mixed = f"mix/{kind}"
    graph.node.append(helper.make_node("Concat", pieces, [mixed], axis=1))
    return mixed


def _reshape(graph: onnx.GraphProto, source: str, shape: list[int], output: str) -> str:
    """`output` = `source` reshaped to the literal `shape` (no data movement)."""
    target = _const(graph, f"{output}/shape", shape)
    graph.node.append(helper.make_node("Reshape", [source, target], [output], name=output))
    return output


def _value(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def export_bag(
    bag: LoadedBag, timings: dict[str, float] | None = None, interface: str = WAVEFORM
) -> onnx.ModelProto:
    """Trace every piece of `bag` and join them into one graph: `audio` -> `stems` (waveform),
    or `spectral`, `mix` -> `spectral_out`, `time_out` (spectral-core, no STFT/ISTFT inside)."""
    if interface not in INTERFACES:
        raise ValueError(f"unknown tensor interface {interface!r}")
    first = bag.models[0]
    length, channels, sources = bag.segment_samples, first.audio_channels, len(bag.sources)
    spectral = interface == SPECTRAL_CORE
    if spectral and first.nfft != N_FFT:
        log.warning("n_fft %d, not contract v1's %d: a test-size model", first.nfft, N_FFT)
    plan = bag_plan(bag.weights, sources)
    log.info(
        "segment: %d samples, %d stems, %d model(s), %s interface",
        length,
        sources,
        len(bag.models),
        interface,
    )
    for s, stem in enumerate(plan):
        log.info(
            "stem %s <- %s",
            bag.sources[s],
            " + ".join(
                f"{c.scale:g} x model {c.member} ({bag.signatures[c.member]})" for c in stem
            ),
        )

    audio = torch.zeros(1, channels, length)
    bins, frames = first.nfft // 2, math.ceil(length / (first.nfft // 4))
    mag = torch.zeros(1, 2 * channels, bins, frames)
    if spectral:
        # Contract layout (batch, channel, {re, im}, freq, frame) is demucs' cac layout
        # [batch, (channel, re/im), freq, frame] split in two: Reshapes only, both ways.
        graph = helper.make_graph(
            [],
            "demucs-spectral-core",
            [
                _value(SPECTRAL_INPUT, [1, channels, 2, bins, frames]),
                _value(MIX_INPUT, [1, channels, length]),
            ],
            [
                _value(SPECTRAL_OUTPUT, [1, sources, channels, 2, bins, frames]),
                _value(TIME_OUTPUT, [1, sources, channels, length]),
            ],
        )
        mix_name = MIX_INPUT
        mag_name = _reshape(graph, SPECTRAL_INPUT, [1, 2 * channels, bins, frames], "mag")
    else:
        graph = helper.make_graph(
            [],
            "demucs",
            [_value(INPUT, [1, channels, length])],
            [_value(OUTPUT, [1, sources, channels, length])],
        )
        mix_name = INPUT
        with step("export: STFT", timings):
            stft = Stft(first.nfft, length)
            stft_proto = trace(stft, (audio,), [INPUT_NAME], ["mag"])
        mag_name = _embed(graph, stft_proto, "stft/", {INPUT_NAME: INPUT})["mag"]
        del stft_proto

    spec_outputs, wave_outputs = {}, {}
    for m, model in enumerate(bag.models):
        contributions = [c for stem in plan for c in stem if c.member == m]
        if not contributions:
            log.info("model %d (%s) has zero weight for every stem: skipped", m, bag.signatures[m])
            continue
        network = Network(model, [c.stem for c in contributions], [c.scale for c in contributions])
        with step(f"export: model {m + 1}/{len(bag.models)} ({bag.signatures[m]})", timings):
            proto = trace(network, (audio, mag), [MIX_INPUT, "mag"], ["spec", "wave"])
            names = _embed(graph, proto, f"m{m}/", {MIX_INPUT: mix_name, "mag": mag_name})
            del proto
        spec_outputs[m], wave_outputs[m] = names["spec"], names["wave"]

    with step("export: bag mix" + ("" if spectral else " and ISTFT"), timings):
        spec = _mix(graph, spec_outputs, plan, "spec")
        wave = _mix(graph, wave_outputs, plan, "wave")
        if spectral:
            _reshape(graph, spec, [1, sources, channels, 2, bins, frames], SPECTRAL_OUTPUT)
            graph.node.append(helper.make_node("Identity", [wave], [TIME_OUTPUT]))
        else:
            istft_proto = trace(
                Istft(first.nfft, length),
                (torch.zeros(1, sources, 2 * channels, bins, frames),),
                ["spec"],
                ["wave"],
            )
            synth = _embed(graph, istft_proto, "istft/", {"spec": spec})["wave"]
            graph.node.append(helper.make_node("Add", [wave, synth], [OUTPUT]))

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="openkara-demucs-onnx",
    )
    model.ir_version = IR_VERSION
    return model
