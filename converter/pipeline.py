"""`invoke convert` and `invoke validate` end to end: load, export, optimize, stamp, gate, write.

Everything is built in a staging folder inside `--out-dir` (`converter.staging`) and moved under
the final names only after the validation and contract gates pass, so a failed or stopped run
(Ctrl-C, SIGTERM) never leaves a partial or unvalidated `NAME.onnx` (or a sidecar that belongs
to another file) behind.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import onnx

from converter import __version__
from converter import metadata as meta
from converter.build import accelerate, partition, storage
from converter.build.export import OPSET, export_bag
from converter.build.exportable import fold_factors
from converter.build.graph_pass import GraphPass
from converter.build.loading import LoadedBag, load
from converter.build.optimize import LEVEL, Optimize
from converter.build.runtime_shapes import Anchor, Settle
from converter.errors import UserError, disk_space
from converter.facts import (
    INPUT_NAME,
    INTERFACES,
    MIX_INPUT,
    TARGET_STORAGE,
    WAVEFORM,
    file_stem,
)
from converter.gate import oplist
from converter.gate.contract import gate
from converter.gate.ortcheck import reference_path
from converter.gate.validation import validate_file
from converter.progress import peak_rss_mb, release_memory, step
from converter.staging import Staging, check_targets

log = logging.getLogger(__name__)


def file_paths(model: str, out_dir: Path, interface: str = WAVEFORM) -> tuple[Path, ...]:
    """(NAME.onnx, its .sha256, its reference npz, its operator list) in `out_dir`, NAME being
    `facts.file_stem(model, interface)`."""
    onnx_path = out_dir / f"{file_stem(model, interface)}.onnx"
    return (
        onnx_path,
        meta.sidecar_path(onnx_path),
        reference_path(onnx_path),
        oplist.config_path(onnx_path),
    )


def check_interface(interface: str) -> None:
    if interface not in INTERFACES:
        raise UserError(f"--interface {interface!r} is not one of {', '.join(INTERFACES)}")


def metadata_entries(
    bag: LoadedBag,
    ir_version: int,
    weight_storage: str = storage.FLOAT32,
    stored: storage.StorageReport | None = None,
    interface: str = WAVEFORM,
    target: str = accelerate.CPU,
) -> dict[str, str]:
    provenance = {
        "model": bag.name,
        "signatures": bag.signatures,
        "checkpoints": bag.checkpoints,
        "weights": bag.weights,
        "stems": bag.sources,
        "sample_rate": bag.samplerate,
        "segment_samples": bag.segment_samples,
        "audio_channels": bag.models[0].audio_channels,
        "toolchain": meta.toolchain_versions(),
        "opset": OPSET,
        "ir_version": ir_version,
        "optimization_level": LEVEL,
        "converter": __version__,
        "tensor_interface": interface,
        "n_fft": bag.models[0].nfft,
        "target": target,
    }
    if stored is not None:
        provenance["weight_storage"] = stored.summary()
    channels = bag.models[0].audio_channels
    interface_entries = (
        {meta.TENSOR_INTERFACE: WAVEFORM}
        if interface == WAVEFORM
        else meta.spectral_entries(
            bag.sources, channels, bag.segment_samples, bag.samplerate, bag.models[0].nfft
        )
    )
    return {
        **interface_entries,
        meta.OPTIMIZED_BY: meta.OPTIMIZED_BY_VALUE,
        meta.MODEL_NAME: bag.name,
        meta.STEMS: ",".join(bag.sources),
        meta.SAMPLE_RATE: str(bag.samplerate),
        meta.SEGMENT_SAMPLES: str(bag.segment_samples),
        meta.AUDIO_CHANNELS: str(bag.models[0].audio_channels),
        meta.WEIGHT_STORAGE: weight_storage,
        meta.PROVENANCE: json.dumps(provenance, sort_keys=True, separators=(",", ":")),
        **({} if target == accelerate.CPU else {meta.TARGET: target}),
    }


def passes(
    interface: str,
    target: str = accelerate.CPU,
    weight_storage: str | None = None,
    workdir: Path | None = None,
    scales: Sequence = (),
) -> list[GraphPass]:
    """The graph passes `build` applies to the export, in order (DEVELOPERS.md, "Graph
    passes"). The CPU graph hides its shapes from ORT's folding and planner (anchors, the If
    split); the accelerators' graph makes every shape static instead. `weight_storage`
    defaults to the target's."""
    weight_storage = weight_storage or TARGET_STORAGE[target]
    cpu = target == accelerate.CPU
    listed: list[GraphPass] = [
        Anchor(INPUT_NAME if interface == WAVEFORM else MIX_INPUT) if cpu else Settle(),
        Optimize(workdir, fusions=cpu),
    ]
    if not cpu:
        listed.append(accelerate.Rewrite())
    if weight_storage == storage.FLOAT16:
        # After the offline optimization: its constant folding would undo the Casts.
        listed.append(storage.StoreHalf(scales, hold=cpu))
    if cpu:  # last: every pass before it reads and rewrites the main graph
        listed.append(partition.Split())
    return listed


def build(
    bag: LoadedBag,
    interface: str,
    weight_storage: str,
    workdir: Path,
    timings: dict[str, float] | None = None,
    target: str = accelerate.CPU,
) -> tuple[onnx.ModelProto, storage.StorageReport | None]:
    """The export, then `passes` in order. Returns the unstamped graph and the storage report."""
    with step("export", timings):
        graph = export_bag(bag, timings, interface)
    scales = [f.numpy() for m in bag.models for f in fold_factors(m)]
    listed = passes(interface, target, weight_storage, workdir, scales)
    for graph_pass in listed:
        with step(graph_pass.name, timings):
            graph = graph_pass.apply(graph)
    stored = [p.report for p in listed if isinstance(p, storage.StoreHalf)]
    return graph, stored[0] if stored else None


def operator_list(graph: onnx.ModelProto, path: Path, digest: str) -> str:
    """The reduced-build operator config of the file written at `path` (a release asset)."""
    header = [
        f"operators of {path.name} (sha256 {digest}), ONNX Runtime reduced-build format",
        f"written by openkara-demucs-onnx {__version__}",
    ]
    return oplist.config_text(oplist.required_operators(graph), header)


def convert(
    model: str,
    repo: Path | None = None,
    out_dir: Path = Path("models"),
    weight_storage: str | None = None,
    interface: str = WAVEFORM,
    target: str = accelerate.CPU,
    outputs: dict | None = None,
) -> Path:
    """Build, validate and write `out_dir/NAME.onnx` (+ `.sha256`, reference npz, operator
    list; NAME per `facts.file_stem`); `target` 'accelerators' builds for CoreML/DirectML/
    XNNPACK; `weight_storage` defaults to the target's (`facts.TARGET_STORAGE`); `outputs`
    receives the gate's inputs and demucs' outputs (`validation.validate_file`)."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if target not in accelerate.TARGETS:
        raise UserError(f"--target {target!r} is not one of {', '.join(accelerate.TARGETS)}")
    if weight_storage is None:
        weight_storage = TARGET_STORAGE[target]
        log.info("weight storage %s: --target %s's default", weight_storage, target)
    if weight_storage not in storage.STORAGES:
        raise UserError(
            f"--weight-storage {weight_storage!r} is not one of {', '.join(storage.STORAGES)}"
        )
    check_interface(interface)
    finals = list(file_paths(model, out_dir, interface))
    with (
        disk_space(out_dir, "--out-dir"),
        Staging(finals, "--out-dir") as staging,  # refuses an unwritable folder before any work
    ):
        with step("load", timings):
            bag = load(model, repo)
        graph, stored = build(bag, interface, weight_storage, staging.path, timings, target)
        entries = metadata_entries(bag, graph.ir_version, weight_storage, stored, interface, target)
        meta.stamp(graph, entries)
        log.info("cache key %s", meta.read_metadata(graph)[meta.CACHE_KEY])
        staged = [staging.staged(p) for p in finals]
        digest = meta.write_with_sidecar(graph, staged[0])
        meta.write_text_atomic(staged[3], operator_list(graph, finals[0], digest))
        del graph  # hundreds of MB of protobuf, not needed by the gates
        release_memory()
        with step("validate", timings):
            validate_file(staged[0], bag, reference_out=staged[2], outputs=outputs)
        with step("contract gate", timings):
            gate(staged[0])
        staging.commit()
    size = finals[0].stat().st_size
    log.info(
        "wrote %s (%.1f MB, sha256 %s) in %.1f s, peak RSS %.0f MB",
        finals[0],
        size / 1e6,
        digest,
        time.perf_counter() - started,
        peak_rss_mb(),
    )
    return finals[0]


def validate(
    model: str,
    repo: Path | None = None,
    out_dir: Path = Path("models"),
    interface: str = WAVEFORM,
) -> None:
    """Re-run the validation and contract gates on an existing `out_dir/NAME.onnx`."""
    check_interface(interface)
    onnx_path, _, reference, _ = file_paths(model, out_dir, interface)
    if onnx_path.is_dir():
        raise UserError(f"{onnx_path} is a directory, not a converted file; move it away")
    if not onnx_path.is_file():
        flag = "" if interface == WAVEFORM else f" --interface {interface}"
        raise UserError(
            f"{onnx_path} does not exist; run `invoke convert --model {model}{flag}` first"
        )
    gate(onnx_path)
    bag = load(model, repo)
    stamped = meta.read_metadata(onnx.load(onnx_path, load_external_data=False))
    if stamped.get(meta.MODEL_NAME) != model:
        raise UserError(f"{onnx_path} holds {stamped.get(meta.MODEL_NAME)!r}, not {model!r}")
    check_targets([reference])
    # Staged: a failed gate (another --repo, a broken file) keeps the reference that was there.
    with (
        disk_space(out_dir, "--out-dir"),
        step("validate"),
        meta.atomic_path(reference) as staged,
    ):
        validate_file(onnx_path, bag, reference_out=staged)
