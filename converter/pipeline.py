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
from pathlib import Path

import onnx

from . import __version__, partition, storage
from . import metadata as meta
from .errors import UserError, disk_space
from .export import INPUT, OPSET, export_bag
from .exportable import fold_factors
from .loading import LoadedBag, load
from .optimize import LEVEL, optimize
from .progress import peak_rss_mb, release_memory, step
from .runtime_shapes import anchor_shapes
from .staging import Staging, check_targets

log = logging.getLogger(__name__)


def file_paths(model: str, out_dir: Path) -> tuple[Path, Path, Path]:
    """(NAME.onnx, NAME.onnx.sha256, NAME.reference.npz) in `out_dir`."""
    onnx_path = out_dir / f"{model}.onnx"
    return onnx_path, meta.sidecar_path(onnx_path), out_dir / f"{model}.reference.npz"


def metadata_entries(
    bag: LoadedBag,
    ir_version: int,
    weight_storage: str = storage.FLOAT32,
    stored: storage.StorageReport | None = None,
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
    }
    if stored is not None:
        provenance["weight_storage"] = stored.summary()
    return {
        meta.OPTIMIZED_BY: meta.OPTIMIZED_BY_VALUE,
        meta.MODEL_NAME: bag.name,
        meta.STEMS: ",".join(bag.sources),
        meta.SAMPLE_RATE: str(bag.samplerate),
        meta.SEGMENT_SAMPLES: str(bag.segment_samples),
        meta.AUDIO_CHANNELS: str(bag.models[0].audio_channels),
        meta.WEIGHT_STORAGE: weight_storage,
        meta.PROVENANCE: json.dumps(provenance, sort_keys=True, separators=(",", ":")),
    }


def convert(
    model: str,
    repo: Path | None = None,
    out_dir: Path = Path("models"),
    weight_storage: str = storage.DEFAULT,
) -> Path:
    """Build, validate and write `out_dir/MODEL.onnx` (+ `.sha256`, + reference npz), its
    exact float16 weights stored as float16 unless `weight_storage` is 'float32'."""
    from .contract import gate
    from .validation import validate_file

    started = time.perf_counter()
    timings: dict[str, float] = {}
    if weight_storage not in storage.STORAGES:
        raise UserError(
            f"--weight-storage {weight_storage!r} is not one of {', '.join(storage.STORAGES)}"
        )
    finals = list(file_paths(model, out_dir))
    with (
        disk_space(out_dir, "--out-dir"),
        Staging(finals, "--out-dir") as staging,  # refuses an unwritable folder before any work
    ):
        with step("load", timings):
            bag = load(model, repo)
        with step("export", timings):
            graph = export_bag(bag, timings)
        anchor_shapes(graph, INPUT)
        with step("optimize", timings):
            graph = optimize(graph, workdir=staging.path)
        stored = None
        if weight_storage == storage.FLOAT16:
            # After the offline optimization: its constant folding would undo the Casts.
            with step("weight storage", timings):
                scales = [f.numpy() for m in bag.models for f in fold_factors(m)]
                stored = storage.store_half(graph, scales)
        # Last: every pass before it reads and rewrites the main graph.
        with step("split", timings):
            partition.split(graph)
        meta.stamp(graph, metadata_entries(bag, graph.ir_version, weight_storage, stored))
        log.info("cache key %s", meta.read_metadata(graph)[meta.CACHE_KEY])
        staged = [staging.staged(p) for p in finals]
        digest = meta.write_with_sidecar(graph, staged[0])
        del graph  # hundreds of MB of protobuf, not needed by the gates
        release_memory()
        with step("validate", timings):
            validate_file(staged[0], bag, reference_out=staged[2])
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


def validate(model: str, repo: Path | None = None, out_dir: Path = Path("models")) -> None:
    """Re-run the validation and contract gates on an existing `out_dir/MODEL.onnx`."""
    from .contract import gate
    from .validation import validate_file

    onnx_path, _, reference = file_paths(model, out_dir)
    if onnx_path.is_dir():
        raise UserError(f"{onnx_path} is a directory, not a converted file; move it away")
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} does not exist; run `invoke convert --model {model}` first")
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
