"""Metadata stamped into every shipped file, the cache-key fingerprint and the `.sha256` sidecar.

OpenKara keys its compiled-session cache on `openkara.model_cache_key` and skips ONNX Runtime's
own graph optimization when `openkara.optimized_by == onnxruntime`, so both must be exact: the
key is a SHA-256 over the model and every metadata entry but the key and the provenance, which
anyone can recompute from the released file with `invoke fingerprint FILE`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx

from converter import facts
from converter.facts import sha256_file  # noqa: F401 - re-exported: metadata.sha256_file
from converter.spectral_contract import N_FFT, frames

CACHE_KEY = "openkara.model_cache_key"
OPTIMIZED_BY = "openkara.optimized_by"
OPTIMIZED_BY_VALUE = "onnxruntime"
MODEL_NAME = "openkara.model_name"
STEMS = "openkara.stems"
SAMPLE_RATE = "openkara.sample_rate"
SEGMENT_SAMPLES = "openkara.segment_samples"
AUDIO_CHANNELS = "openkara.audio_channels"
PROVENANCE = "openkara.provenance"
# "float16": exact float16 initializers Cast to float32 in the graph (`converter.build.storage`).
WEIGHT_STORAGE = "openkara.weight_storage"
# facts.WAVEFORM or facts.SPECTRAL_CORE; spectral-core files also name their contract
# (facts.SPECTRAL_CONTRACT) and stem profile, as OpenKara dispatches on these keys alone.
TENSOR_INTERFACE = "openkara.tensor_interface"
SPECTRAL_CONTRACT = "openkara.spectral_contract"
STEM_PROFILE = "openkara.stem_profile"
INPUT_SEMANTICS = "openkara.input_semantics"
OUTPUT_SEMANTICS = "openkara.output_semantics"
# facts.ACCELERATORS_TARGET on files built with `--target accelerators`; absent on the CPU EP's
# files (their bytes unchanged), as `stamped_target` reads it. Keyed: the catalog marks a file's
# execution providers by it (converter/ship/catalog.py).
TARGET = "openkara.target"

# What the cache key does not cover: itself, and the record of how the file was made.
UNKEYED = frozenset({CACHE_KEY, PROVENANCE})

REQUIRED_KEYS = (
    CACHE_KEY,
    OPTIMIZED_BY,
    MODEL_NAME,
    STEMS,
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    AUDIO_CHANNELS,
    PROVENANCE,
    WEIGHT_STORAGE,
    TENSOR_INTERFACE,
)
# What spectral-core files carry on top, with values `spectral_entries` computes.
SPECTRAL_KEYS = (SPECTRAL_CONTRACT, STEM_PROFILE, INPUT_SEMANTICS, OUTPUT_SEMANTICS)
# Stem count -> openkara-models' stem profile name (today's OpenKara loads four-stem only).
STEM_PROFILES = {4: "four-stem", 6: "six-stem"}


def _dims(shape: list[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def spectral_entries(
    stems: list[str], channels: int, segment: int, sample_rate: int, n_fft: int = N_FFT
) -> dict:
    """The spectral-core keys and their exact values for a file of `stems` (ValueError for a
    stem count without a profile). The semantics strings are the ones openkara-models' own
    exporter writes for htdemucs, with this file's shapes and stem names."""
    if len(stems) not in STEM_PROFILES:
        raise ValueError(f"no stem profile for {len(stems)} stems ({', '.join(stems)})")
    spectral = [channels, 2, n_fft // 2, frames(segment, n_fft)]
    names = "/".join(stems)
    rate = f"{sample_rate / 1000:g} kHz"
    return {
        TENSOR_INTERFACE: facts.SPECTRAL_CORE,
        SPECTRAL_CONTRACT: facts.SPECTRAL_CONTRACT,
        STEM_PROFILE: STEM_PROFILES[len(stems)],
        INPUT_SEMANTICS: f"spectral={_dims([1, *spectral])} contract-v1 spec(mix); "
        f"mix={_dims([1, channels, segment])} stereo {rate} waveform",
        OUTPUT_SEMANTICS: f"spectral_out={_dims([1, len(stems), *spectral])} pre-ISTFT "
        f"(de-normalized) {names}; time_out={_dims([1, len(stems), channels, segment])} "
        f"time-branch waveform; stems[s] = ispec(spectral_out[:,s], {segment}) + time_out[:,s]",
    }


# The installed packages that determine the output bytes, recorded in the provenance.
TOOLCHAIN = ("demucs", "torch", "onnx", "onnxruntime", "numpy")


def public_version(name: str) -> str:
    """`name`'s installed version without its local label (`2.13.0+cpu` -> `2.13.0`).

    The label says which index a wheel came from (PyTorch's CPU index, a CUDA build), not what
    it computes on the CPU; stamped, it would make one commit's bytes differ between machines.
    """
    try:
        return importlib.metadata.version(name).split("+", 1)[0]
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def toolchain_versions() -> dict[str, str]:
    return {name: public_version(name) for name in TOOLCHAIN}


def fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of the model serialized with its metadata sorted, less the key and provenance.

    The entries the app and `invoke separate` act on (stems, sample rate, interface...) are in
    it, so a file whose metadata was edited no longer matches its stamp; the provenance only
    records how the file was made. Serialization is deterministic (fields in tag order, no maps
    in the ONNX schema), so the same graph, weights and entries always give the same key.
    """
    entries = sorted((p.key, p.value) for p in model.metadata_props if p.key not in UNKEYED)
    return _digest(model, entries)


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of the model without any metadata: whether two files compute the same thing
    (and the cache key of files converted before the key covered their metadata)."""
    return _digest(model, [])


def _digest(model: onnx.ModelProto, entries: list[tuple[str, str]]) -> str:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _replace(copy, entries)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _replace(model: onnx.ModelProto, entries: list[tuple[str, str]]) -> None:
    del model.metadata_props[:]
    for name, value in entries:
        model.metadata_props.add(key=name, value=value)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def stamped_target(entries: Mapping[str, str]) -> str:
    """The file's `--target`; files without the key are the CPU EP's (facts.CPU_TARGET)."""
    return entries.get(TARGET, facts.CPU_TARGET)


def stamp(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Replace all metadata with `entries` plus the cache key computed over the result."""
    rest = {name: value for name, value in entries.items() if name != CACHE_KEY}
    _replace(model, sorted(rest.items()))
    _replace(model, sorted({**rest, CACHE_KEY: fingerprint(model)}.items()))


def provenance(model: onnx.ModelProto) -> dict:
    return json.loads(read_metadata(model).get(PROVENANCE, "{}"))


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sidecar_text(path: Path, digest: str) -> str:
    """The `sha256sum` line format: `<hex>  <file name>` (two spaces: binary-agnostic mode)."""
    return f"{digest}  {path.name}\n"


def parse_sidecar(text: str, where: str) -> tuple[str, str]:
    """(hex digest, file name) of a `sha256sum` line; ValueError naming `where` if malformed."""
    digest, sep, name = text.strip().partition("  ")
    if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{where} is not a `sha256sum` line ('<64 hex>  <name>'): {text!r}")
    return digest, name


def read_sidecar(path: Path) -> tuple[str, str]:
    """Return (hex digest, file name) from `path`'s sidecar; ValueError if malformed."""
    side = sidecar_path(path)
    return parse_sidecar(side.read_text(encoding="utf-8"), str(side))


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it over `final` only if the block succeeds.

    A crash or exception leaves no partial file under the final name (rename is atomic on one
    file system), and the temp file is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make published files private
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with_sidecar(model: onnx.ModelProto, path: Path) -> str:
    """Save `model` to `path` and its `sha256sum` sidecar (atomically); return the digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    digest = sha256_file(path)
    write_text_atomic(sidecar_path(path), sidecar_text(path, digest))
    return digest
