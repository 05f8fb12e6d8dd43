"""`invoke convert` and `invoke validate` end to end: load, export, optimize, stamp, gate, write.

Everything is built in a staging folder inside `--out-dir` and moved under the final names only
after the validation and contract gates pass, so a failed run never leaves a partial or
unvalidated `NAME.onnx` (or a sidecar that belongs to another file) behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import onnx

from . import __version__
from . import metadata as meta
from . import storage
from .errors import UserError
from .export import INPUT, OPSET, export_bag
from .exportable import fold_factors
from .loading import LoadedBag, load
from .optimize import LEVEL, optimize
from .progress import peak_rss_mb, release_memory, step
from .runtime_shapes import anchor_shapes

log = logging.getLogger(__name__)

TOOLCHAIN = ("demucs", "torch", "onnx", "onnxruntime", "numpy")


def toolchain_versions() -> dict[str, str]:
    """Installed versions of the packages that determine the output bytes."""
    return {name: importlib_metadata.version(name) for name in TOOLCHAIN}


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
        "toolchain": toolchain_versions(),
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


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write to --out-dir {out_dir} ({exc.strerror or exc}); pass a writable folder"
        ) from None


def write_with_sidecar(model: onnx.ModelProto, path: Path) -> str:
    """Save `model` to `path` and its `sha256sum` sidecar; return the digest."""
    onnx.save(model, path)
    digest = meta.sha256_file(path)
    meta.sidecar_path(path).write_text(meta.sidecar_text(path, digest), encoding="utf-8")
    return digest


def _publish(staged: list[Path], finals: list[Path]) -> None:
    """Move staged files over the final names; the old sidecar goes first so it never vouches
    for a file it does not describe."""
    finals[1].unlink(missing_ok=True)
    for source, target in zip(staged, finals, strict=True):
        os.replace(source, target)


def convert(
    model: str, repo: Path | None = None, out_dir: Path = Path("models"),
    weight_storage: str = storage.DEFAULT,
) -> Path:  # fmt: skip
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
    _check_writable(out_dir)
    with step("load", timings):
        bag = load(model, repo)
    with step("export", timings):
        graph = export_bag(bag, timings)
    anchor_shapes(graph, INPUT)
    with step("optimize", timings):
        graph = optimize(graph, workdir=out_dir)
    stored = None
    if weight_storage == storage.FLOAT16:
        # After the offline optimization: its constant folding would undo the Casts.
        with step("weight storage", timings):
            scales = [f.numpy() for m in bag.models for f in fold_factors(m)]
            stored = storage.store_half(graph, scales)
    meta.stamp(graph, metadata_entries(bag, graph.ir_version, weight_storage, stored))
    log.info("cache key %s", meta.read_metadata(graph)[meta.CACHE_KEY])

    finals = list(file_paths(model, out_dir))
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        staged = [staging / p.name for p in finals]
        digest = write_with_sidecar(graph, staged[0])
        del graph  # hundreds of MB of protobuf, not needed by the gates
        release_memory()
        with step("validate", timings):
            validate_file(staged[0], bag, reference_out=staged[2])
        with step("contract gate", timings):
            gate(staged[0])
        _publish(staged, finals)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = finals[0].stat().st_size
    log.info(
        "wrote %s (%.1f MB, sha256 %s) in %.1f s, peak RSS %.0f MB",
        finals[0], size / 1e6, digest, time.perf_counter() - started, peak_rss_mb(),
    )  # fmt: skip
    return finals[0]


def validate(model: str, repo: Path | None = None, out_dir: Path = Path("models")) -> None:
    """Re-run the validation and contract gates on an existing `out_dir/MODEL.onnx`."""
    from .contract import gate
    from .validation import validate_file

    onnx_path, _, reference = file_paths(model, out_dir)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} does not exist; run `invoke convert --model {model}` first")
    gate(onnx_path)
    bag = load(model, repo)
    stamped = meta.read_metadata(onnx.load(onnx_path, load_external_data=False))
    if stamped.get(meta.MODEL_NAME) != model:
        raise UserError(f"{onnx_path} holds {stamped.get(meta.MODEL_NAME)!r}, not {model!r}")
    with step("validate"):
        validate_file(onnx_path, bag, reference_out=reference)


def fingerprint_report(path: Path) -> str:
    """`<key>  <file>: matches|differs from the stamped openkara.model_cache_key`."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises its own
        raise UserError(f"{path} is not an ONNX model: {exc}") from None
    key = meta.fingerprint(model)
    stamped = meta.read_metadata(model).get(meta.CACHE_KEY)
    verdict = (
        "no stamped key" if stamped is None else "matches" if stamped == key else f"differs from stamped {stamped}"
    )
    return f"{key}  {path.name}: {verdict}"
