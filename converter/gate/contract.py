"""The static runtime-contract gate: what a shipped file may contain, checked without running it.

Released files must load on official, pre-built ONNX Runtime 1.17+ with the CPU execution
provider on Linux x64, Windows x64 and macOS x64/arm64. An earlier converter shipped files saved
at ORT_ENABLE_ALL whose `com.microsoft.nchwc` nodes exist only in x86 builds, and they failed on
Apple Silicon. This gate refuses that class of file before it is written or released: node
domains (allow-listed `com.microsoft` ops only, also inside functions and subgraphs), opset
imports, IR version, the documented I/O of the file's tensor interface (waveform or
spectral-core), metadata, cache key, `.sha256` sidecar and the ONNX checker; `check_app`
checks a spectral-core file the way today's OpenKara does before it creates a session.
`convert` and the release call `gate`; `invoke contract --self-test`
(`converter.gate.contract_selftest`) proves every rule refuses a model built to break it. Policy
and rationale: docs/runtime-contract.md and docs/spectral-core.md.
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from converter import metadata
from converter.errors import UserError
from converter.facts import (
    ACCELERATORS_TARGET,
    COM_MICROSOFT,
    COM_MICROSOFT_ALLOWED,
    COM_MICROSOFT_OPSET,
    DEFAULT_MODELS,
    HOW_TO_MAKE_A_MODEL,
    INPUT_NAME,
    INTERFACES,
    MAX_IR_VERSION,
    MIX_INPUT,
    OPSET,
    OUTPUT_NAME,
    SPECTRAL_CONTRACT,
    SPECTRAL_CORE,
    SPECTRAL_INPUT,
    SPECTRAL_OUTPUT,
    TARGETS,
    TIME_OUTPUT,
    WAVEFORM,
    WEIGHT_STORAGES,
    is_ai_onnx,
    walk_model,
    walk_nodes,
)
from converter.gate.fingerprint import read_model
from converter.spectral_contract import N_FFT, frames

log = logging.getLogger(__name__)

RULES = (
    "domain",
    "opset_import",
    "opset_version",
    "ir_version",
    "io",
    "metadata",
    "cache_key",
    "target",
    "sidecar",
    "checker",
)


class ContractError(UserError):
    """A file breaks the runtime contract; the message lists every violation."""


@dataclass(frozen=True)
class Violation:
    rule: str  # one of RULES
    detail: str  # names the offending node, domain, key or value

    def __str__(self) -> str:
        return f"[{self.rule}] {self.detail}"


def _node_label(where: str, node: onnx.NodeProto) -> str:
    return f"{node.domain or 'ai.onnx'}:{node.op_type} (node {node.name!r} in {where})"


def _domain_violations(model: onnx.ModelProto) -> list[Violation]:
    local = {(function.domain, function.name) for function in model.functions}
    found = []
    for where, node in walk_model(model):
        if is_ai_onnx(node.domain) or (node.domain, node.op_type) in local:
            continue
        if node.domain == COM_MICROSOFT and node.op_type in COM_MICROSOFT_ALLOWED:
            continue
        if node.domain == COM_MICROSOFT:
            why = "is not on the com.microsoft allow-list (converter.facts.COM_MICROSOFT_ALLOWED)"
        else:
            why = f"is in domain {node.domain!r}, which official CPU builds do not all register"
        found.append(Violation("domain", f"{_node_label(where, node)} {why}"))
    return found


def _opset_violations(
    imports: list[onnx.OperatorSetIdProto], used: set[str], owner: str
) -> list[Violation]:
    """`imports` of the model or one function against the domains its nodes use."""
    found = []
    versions = {
        ("" if is_ai_onnx(entry.domain) else entry.domain): entry.version for entry in imports
    }
    for domain, version in sorted(versions.items()):
        if domain and domain not in used:
            # Older ORT refuses imports it does not know ("ai.onnx.ml is till opset 4").
            found.append(
                Violation(
                    "opset_import", f"{owner} imports {domain!r} v{version}, which no node uses"
                )
            )
    if versions.get("", OPSET) != OPSET:
        found.append(
            Violation("opset_version", f"{owner} imports ai.onnx v{versions['']}, must be {OPSET}")
        )
    if versions.get(COM_MICROSOFT, COM_MICROSOFT_OPSET) != COM_MICROSOFT_OPSET:
        found.append(
            Violation(
                "opset_version",
                f"{owner} imports com.microsoft v{versions[COM_MICROSOFT]}, "
                f"must be {COM_MICROSOFT_OPSET}",
            )
        )
    return found


def _import_violations(model: onnx.ModelProto) -> list[Violation]:
    main_used = {node.domain for _, node in walk_nodes(model.graph.node)}
    function_used = [
        (function, {node.domain for _, node in walk_nodes(function.node)})
        for function in model.functions
    ]
    found = []
    if not any(is_ai_onnx(entry.domain) for entry in model.opset_import):
        found.append(Violation("opset_version", f"model does not import ai.onnx v{OPSET}"))
    everything = main_used.union(*(used for _, used in function_used))
    found += _opset_violations(list(model.opset_import), everything, "model")
    for function, used in function_used:
        owner = f"function {function.domain}:{function.name}"
        found += _opset_violations(list(function.opset_import), used, owner)
    if model.ir_version > MAX_IR_VERSION:
        found.append(
            Violation(
                "ir_version", f"ir_version {model.ir_version} > {MAX_IR_VERSION} (ORT 1.17's limit)"
            )
        )
    return found


def _positive_int(meta: dict[str, str], key: str) -> int | None:
    try:
        value = int(meta.get(key, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def _metadata_violations(meta: dict[str, str]) -> list[Violation]:
    found = [
        Violation("metadata", f"required key {key!r} missing or empty")
        for key in metadata.REQUIRED_KEYS
        if not meta.get(key)
    ]
    for key in (metadata.SAMPLE_RATE, metadata.SEGMENT_SAMPLES, metadata.AUDIO_CHANNELS):
        if meta.get(key) and _positive_int(meta, key) is None:
            found.append(Violation("metadata", f"{key}={meta[key]!r} is not a positive integer"))
    storage_kind = meta.get(metadata.WEIGHT_STORAGE)
    if storage_kind and storage_kind not in WEIGHT_STORAGES:
        found.append(
            Violation(
                "metadata",
                f"{metadata.WEIGHT_STORAGE}={storage_kind!r} is not one of "
                f"{', '.join(WEIGHT_STORAGES)}",
            )
        )
    if meta.get(metadata.STEMS):
        names = meta[metadata.STEMS].split(",")
        if any(not name.strip() for name in names) or len(set(names)) != len(names):
            found.append(
                Violation(
                    "metadata",
                    f"{metadata.STEMS}={meta[metadata.STEMS]!r} needs unique, non-empty names",
                )
            )
    if meta.get(metadata.PROVENANCE):
        try:
            json.loads(meta[metadata.PROVENANCE])
        except json.JSONDecodeError as exc:
            found.append(Violation("metadata", f"{metadata.PROVENANCE} is not JSON: {exc}"))
    interface = meta.get(metadata.TENSOR_INTERFACE)
    if interface and interface not in INTERFACES:
        found.append(
            Violation(
                "metadata",
                f"{metadata.TENSOR_INTERFACE}={interface!r} is not one of {', '.join(INTERFACES)}",
            )
        )
    target = meta.get(metadata.TARGET)
    if target is not None and target not in TARGETS:
        found.append(
            Violation(
                "metadata", f"{metadata.TARGET}={target!r} is not one of {', '.join(TARGETS)}"
            )
        )
    if interface == SPECTRAL_CORE:
        found += _spectral_metadata_violations(meta)
    return found


# What the accelerators' providers cannot run: CoreML skips control-flow bodies, and CoreML and
# XNNPACK have no com.microsoft kernels (docs/runtime-contract.md).
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def _target_violations(model: onnx.ModelProto, meta: dict[str, str]) -> list[Violation]:
    """A file stamped for the accelerators (the catalog gives it their providers) holds no
    control flow and standard operators only."""
    if metadata.stamped_target(meta) != ACCELERATORS_TARGET:
        return []
    return [
        Violation("target", f"{_node_label(where, node)} in a file stamped {ACCELERATORS_TARGET}")
        for where, node in walk_model(model)
        if not is_ai_onnx(node.domain) or node.op_type in CONTROL_FLOW
    ]


def _n_fft(meta: dict[str, str]) -> int:
    """Contract v1's n_fft, or the one test-size models record in their provenance."""
    try:
        return int(json.loads(meta.get(metadata.PROVENANCE, "{}")).get("n_fft", N_FFT))
    except (ValueError, TypeError, AttributeError):
        return N_FFT


def _spectral_metadata_violations(meta: dict[str, str]) -> list[Violation]:
    """The keys OpenKara dispatches spectral-core files on, with their exact values."""
    channels = _positive_int(meta, metadata.AUDIO_CHANNELS)
    segment = _positive_int(meta, metadata.SEGMENT_SAMPLES)
    rate = _positive_int(meta, metadata.SAMPLE_RATE)
    stems = [name for name in meta.get(metadata.STEMS, "").split(",") if name]
    want = {metadata.SPECTRAL_CONTRACT: SPECTRAL_CONTRACT}
    found = []
    if len(stems) not in metadata.STEM_PROFILES:
        found.append(Violation("metadata", f"{len(stems)} stems: no stem profile (4 or 6 stems)"))
    elif channels and segment and rate:
        want = metadata.spectral_entries(stems, channels, segment, rate, _n_fft(meta))
    for key in metadata.SPECTRAL_KEYS:
        if key in want and meta.get(key) != want[key]:
            found.append(
                Violation(
                    "metadata",
                    f"{key}={meta.get(key)!r}, a {SPECTRAL_CORE} file needs {want[key]!r}",
                )
            )
    return found


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    """Dims as ints when static, else the symbolic name (or '?')."""
    return [
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
        for dim in value.type.tensor_type.shape.dim
    ]


Shapes = list[tuple[str, list[int]]]


def expected_io(
    interface: str, stems: int, channels: int, segment: int, n_fft: int = N_FFT
) -> tuple[Shapes, Shapes]:
    """([(input name, shape)], [(output name, shape)]) of a file of `interface`, in order."""
    if interface == WAVEFORM:
        return [(INPUT_NAME, [1, channels, segment])], [
            (OUTPUT_NAME, [1, stems, channels, segment])
        ]
    spectral = [channels, 2, n_fft // 2, frames(segment, n_fft)]
    return (
        [(SPECTRAL_INPUT, [1, *spectral]), (MIX_INPUT, [1, channels, segment])],
        [
            (SPECTRAL_OUTPUT, [1, stems, *spectral]),
            (TIME_OUTPUT, [1, stems, channels, segment]),
        ],
    )


def _io_violations(model: onnx.ModelProto, meta: dict[str, str]) -> list[Violation]:
    channels = _positive_int(meta, metadata.AUDIO_CHANNELS)
    segment = _positive_int(meta, metadata.SEGMENT_SAMPLES)
    stems = len(meta[metadata.STEMS].split(",")) if meta.get(metadata.STEMS) else None
    interface = meta.get(metadata.TENSOR_INTERFACE, WAVEFORM)
    if interface not in INTERFACES:
        return []  # the metadata rule reports it; which I/O to expect is unknown
    # Without the metadata the expected shapes are unknown; the metadata rule reports that.
    known = bool(stems and channels and segment)
    want = expected_io(interface, stems or 1, channels or 1, segment or 1, _n_fft(meta))
    found = []
    for kind, values, expected in (
        ("input", model.graph.input, want[0]),
        ("output", model.graph.output, want[1]),
    ):
        names = [value.name for value in values]
        if names != [name for name, _ in expected]:
            found.append(
                Violation(
                    "io",
                    f"graph {kind}s are {names}, a {interface} file's must be exactly "
                    f"{[name for name, _ in expected]}",
                )
            )
            continue
        for value, (name, shape_wanted) in zip(values, expected, strict=True):
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                dtype = TensorProto.DataType.Name(value.type.tensor_type.elem_type)
                found.append(Violation("io", f"{kind} {name!r} is {dtype}, must be FLOAT"))
            shape = _shape(value)
            if not all(isinstance(dim, int) and dim > 0 for dim in shape):
                found.append(Violation("io", f"{kind} {name!r} has shape {shape}, must be static"))
            elif known and shape != shape_wanted:
                found.append(
                    Violation(
                        "io", f"{kind} {name!r} has shape {shape}, metadata says {shape_wanted}"
                    )
                )
    return found


def _cache_key_violations(model: onnx.ModelProto, meta: dict[str, str]) -> list[Violation]:
    stamped = meta.get(metadata.CACHE_KEY)
    actual = metadata.fingerprint(model)
    if stamped and stamped != actual:
        return [
            Violation(
                "cache_key",
                f"{metadata.CACHE_KEY} is {stamped}, the model fingerprints to {actual}",
            )
        ]
    return []


def _sidecar_violations(path: Path) -> list[Violation]:
    side = metadata.sidecar_path(path)
    if not side.is_file():
        return [Violation("sidecar", f"{side.name} is missing")]
    try:
        digest, name = metadata.read_sidecar(path)
    except ValueError as exc:
        return [Violation("sidecar", str(exc))]
    found = []
    if name != path.name:
        found.append(Violation("sidecar", f"{side.name} names {name!r}, not {path.name!r}"))
    actual = metadata.sha256_file(path)
    if digest != actual:
        found.append(
            Violation("sidecar", f"{side.name} says {digest}, the file hashes to {actual}")
        )
    return found


def _checker_violations(model: onnx.ModelProto) -> list[Violation]:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return [Violation("checker", " ".join(str(exc).split()))]
    return []


def violations(model: onnx.ModelProto, path: Path | None = None) -> list[Violation]:
    """Every contract violation of `model`; the sidecar is checked only when `path` is given."""
    meta = metadata.read_metadata(model)
    found = _domain_violations(model) + _import_violations(model)
    found += _io_violations(model, meta) + _metadata_violations(meta)
    found += _cache_key_violations(model, meta)
    found += _target_violations(model, meta)
    if path is not None:
        found += _sidecar_violations(path)
    return found + _checker_violations(model)


def gate(path: Path) -> None:
    """Raise ContractError listing every violation of the file at `path` (and its sidecar)."""
    model = read_model(path, ContractError)
    found = violations(model, path)
    if found:
        lines = "\n".join(f"  - {violation}" for violation in found)
        raise ContractError(
            f"{path} breaks the runtime contract (docs/runtime-contract.md), "
            f"{len(found)} violation(s):\n{lines}"
        )
    meta = metadata.read_metadata(model)
    if meta.get(metadata.TENSOR_INTERFACE) == SPECTRAL_CORE:
        # The app's own check, at this file's segment and with six stems allowed.
        segment = int(meta[metadata.SEGMENT_SAMPLES])
        try:
            check_app(model, str(path), segment, tuple(metadata.STEM_PROFILES), _n_fft(meta))
        except UserError as exc:
            raise ContractError(str(exc)) from None
    log.info("contract: %s passes every static rule (%s)", path, ", ".join(RULES))


def gate_files(patterns: list[str] | None = None) -> list[Path]:
    """Gate every file matching `patterns` (paths or globs; default `models/*.onnx`).

    Checks them all before failing, so one run reports every bad file; returns the files passed.
    """
    patterns = patterns or [DEFAULT_MODELS]
    paths: list[Path] = []
    for pattern in patterns:
        # glob.glob, unlike Path.glob, takes absolute patterns too ('/abs/path/*.onnx').
        matches = (
            [Path(match) for match in sorted(glob.glob(pattern, recursive=True))]
            if glob.has_magic(pattern)
            else [Path(pattern)]
        )
        if not matches:
            raise ContractError(
                f"no ONNX file matches {pattern!r}; {HOW_TO_MAKE_A_MODEL}, "
                "or pass files: `invoke contract --file PATH`"
            )
        paths += matches
    log.info("contract: checking %d file(s): %s", len(paths), ", ".join(map(str, paths)))
    errors = []
    for path in paths:
        try:
            gate(path)
        except ContractError as exc:
            errors.append(str(exc))
    if errors:
        raise ContractError("\n".join(errors))
    return paths


# What today's OpenKara accepts: stereo 343980-sample segments, four stems (six-stem files are
# correct but have no place in it yet).
APP_CHANNELS = 2
APP_SEGMENT = 343980
APP_STEMS = (4,)


def check_app(
    model: onnx.ModelProto,
    label: str,
    segment: int = APP_SEGMENT,
    stems: tuple[int, ...] = APP_STEMS,
    n_fft: int = N_FFT,
) -> None:
    """Check `model` as today's OpenKara does before it creates a session: metadata dispatch
    (spectral-core, contract v1), then the exact I/O (names, order, float32, literal dims,
    batch 1, S in `stems`); UserError in one line naming the first problem and the fix.
    `segment`, `stems` and `n_fft` differ from the app's only for test-size models and six
    stems."""
    meta = metadata.read_metadata(model)
    interface = meta.get(metadata.TENSOR_INTERFACE)
    if interface != SPECTRAL_CORE:
        what = "a waveform-interface file" if interface in (None, WAVEFORM) else "a file"
        raise UserError(
            f"{label} is {what} ({metadata.TENSOR_INTERFACE}={interface!r}); OpenKara loads only "
            f"{SPECTRAL_CORE} files: convert with `invoke convert --interface {SPECTRAL_CORE}`"
        )
    if meta.get(metadata.SPECTRAL_CONTRACT) != SPECTRAL_CONTRACT:
        raise UserError(
            f"{label}: {metadata.SPECTRAL_CONTRACT}={meta.get(metadata.SPECTRAL_CONTRACT)!r}, "
            f"OpenKara needs {SPECTRAL_CONTRACT!r}; convert it again"
        )
    outputs = {value.name: _shape(value) for value in model.graph.output}
    shape = outputs.get(SPECTRAL_OUTPUT) or []
    count = shape[1] if len(shape) == 6 else None
    if isinstance(count, int) and count not in stems:
        raise UserError(
            f"{label}: {count} stems, OpenKara takes {' or '.join(map(str, stems))}; "
            "use a four-stem model (htdemucs, htdemucs_ft)"
        )
    count = count if count in stems else stems[0]  # otherwise the I/O check below says why
    want = expected_io(SPECTRAL_CORE, count, APP_CHANNELS, segment, n_fft)
    for kind, values, expected in (
        ("inputs", model.graph.input, want[0]),
        ("outputs", model.graph.output, want[1]),
    ):
        got = [(value.name, _shape(value)) for value in values]
        if got != expected:
            raise UserError(f"{label}: {kind} {got}, OpenKara needs {expected}; convert it again")
        for value in values:
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                dtype = TensorProto.DataType.Name(value.type.tensor_type.elem_type)
                raise UserError(f"{label}: {value.name!r} is {dtype}, OpenKara needs float32")
