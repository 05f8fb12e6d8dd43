"""The static runtime-contract gate: what a shipped file may contain, checked without running it.

Released files must load on official, pre-built ONNX Runtime 1.17+ with the CPU execution
provider on Linux x64, Windows x64 and macOS x64/arm64. An earlier converter shipped files saved
at ORT_ENABLE_ALL whose `com.microsoft.nchwc` nodes exist only in x86 builds, and they failed on
Apple Silicon. This gate refuses that class of file before it is written or released: node
domains (allow-listed `com.microsoft` ops only, also inside functions and subgraphs), opset
imports, IR version, the documented I/O, metadata, cache key, `.sha256` sidecar and the ONNX
checker. `convert` and the release call `gate`; `invoke contract --self-test` proves every rule
refuses a model built to break it. Policy and rationale: docs/runtime-contract.md.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter import metadata
from converter.accuracy import allowed_mse, stem_mse
from converter.errors import UserError
from converter.ortcheck import (
    COM_MICROSOFT_ALLOWED,
    DEFAULT_MODELS,
    HOW_TO_MAKE_A_MODEL,
    INPUT_NAME,
    OUTPUT_NAME,
    reference_path,
)

log = logging.getLogger(__name__)

AI_ONNX = ""  # ONNX writes the default domain as "" (or, rarely, "ai.onnx")
COM_MICROSOFT = "com.microsoft"
# ORT 1.17 (the floor) runs opset <= 20 and IR <= 9; opset 17 is what the exporter writes and
# what every supported version implements identically on the CPU EP.
AI_ONNX_OPSET = 17
COM_MICROSOFT_OPSET = 1
MAX_IR_VERSION = 9

RULES = (
    "domain",
    "opset_import",
    "opset_version",
    "ir_version",
    "io",
    "metadata",
    "cache_key",
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


def _is_ai_onnx(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def _walk(nodes: Iterable[onnx.NodeProto], where: str) -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node of `nodes` and of the subgraphs in their attributes (If/Loop/Scan bodies)."""
    for node in nodes:
        yield where, node
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                yield from _walk(sub.node, f"{where} > {node.op_type} {node.name!r}.{attr.name}")


def _function_nodes(function: onnx.FunctionProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    return _walk(function.node, f"function {function.domain}:{function.name}")


def _node_label(where: str, node: onnx.NodeProto) -> str:
    return f"{node.domain or 'ai.onnx'}:{node.op_type} (node {node.name!r} in {where})"


def _domain_violations(model: onnx.ModelProto) -> list[Violation]:
    local = {(function.domain, function.name) for function in model.functions}
    nodes = list(_walk(model.graph.node, "main graph"))
    for function in model.functions:
        nodes.extend(_function_nodes(function))
    found = []
    for where, node in nodes:
        if _is_ai_onnx(node.domain) or (node.domain, node.op_type) in local:
            continue
        if node.domain == COM_MICROSOFT and node.op_type in COM_MICROSOFT_ALLOWED:
            continue
        if node.domain == COM_MICROSOFT:
            why = (
                "is not on the com.microsoft allow-list (converter.ortcheck.COM_MICROSOFT_ALLOWED)"
            )
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
        ("" if _is_ai_onnx(entry.domain) else entry.domain): entry.version for entry in imports
    }
    for domain, version in sorted(versions.items()):
        if domain and domain not in used:
            # Older ORT refuses imports it does not know ("ai.onnx.ml is till opset 4").
            found.append(
                Violation(
                    "opset_import", f"{owner} imports {domain!r} v{version}, which no node uses"
                )
            )
    if versions.get("", AI_ONNX_OPSET) != AI_ONNX_OPSET:
        found.append(
            Violation(
                "opset_version", f"{owner} imports ai.onnx v{versions['']}, must be {AI_ONNX_OPSET}"
            )
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
    main_used = {node.domain for _, node in _walk(model.graph.node, "main graph")}
    function_used = [
        (function, {node.domain for _, node in _function_nodes(function)})
        for function in model.functions
    ]
    found = []
    if not any(_is_ai_onnx(entry.domain) for entry in model.opset_import):
        found.append(Violation("opset_version", f"model does not import ai.onnx v{AI_ONNX_OPSET}"))
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
    return found


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    """Dims as ints when static, else the symbolic name (or '?')."""
    return [
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
        for dim in value.type.tensor_type.shape.dim
    ]


def _io_violations(model: onnx.ModelProto, meta: dict[str, str]) -> list[Violation]:
    channels = _positive_int(meta, metadata.AUDIO_CHANNELS)
    segment = _positive_int(meta, metadata.SEGMENT_SAMPLES)
    stems = len(meta[metadata.STEMS].split(",")) if meta.get(metadata.STEMS) else None
    # Without the metadata the expected shape is unknown; the metadata rule reports that.
    expected = {
        INPUT_NAME: [1, channels, segment] if channels and segment else None,
        OUTPUT_NAME: [1, stems, channels, segment] if stems and channels and segment else None,
    }
    found = []
    for kind, values, name in (
        ("input", model.graph.input, INPUT_NAME),
        ("output", model.graph.output, OUTPUT_NAME),
    ):
        names = [value.name for value in values]
        if names != [name]:
            found.append(Violation("io", f"graph {kind}s are {names}, must be exactly [{name!r}]"))
            continue
        value = values[0]
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            dtype = TensorProto.DataType.Name(value.type.tensor_type.elem_type)
            found.append(Violation("io", f"{kind} {name!r} is {dtype}, must be FLOAT"))
        shape = _shape(value)
        if not all(isinstance(dim, int) and dim > 0 for dim in shape):
            found.append(Violation("io", f"{kind} {name!r} has shape {shape}, must be static"))
        elif expected[name] is not None and shape != expected[name]:
            found.append(
                Violation(
                    "io", f"{kind} {name!r} has shape {shape}, metadata says {expected[name]}"
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
    if path is not None:
        found += _sidecar_violations(path)
    return found + _checker_violations(model)


def gate(path: Path) -> None:
    """Raise ContractError listing every violation of the file at `path` (and its sidecar)."""
    if not path.is_file():
        raise ContractError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file at all
        raise ContractError(f"{path}: not a readable ONNX file ({exc})") from exc
    found = violations(model, path)
    if found:
        lines = "\n".join(f"  - {violation}" for violation in found)
        raise ContractError(
            f"{path} breaks the runtime contract (docs/runtime-contract.md), "
            f"{len(found)} violation(s):\n{lines}"
        )
    log.info("contract: %s passes every static rule (%s)", path, ", ".join(RULES))


def gate_files(patterns: list[str] | None = None) -> list[Path]:
    """Gate every file matching `patterns` (paths or globs; default `models/*.onnx`).

    Checks them all before failing, so one run reports every bad file; returns the files passed.
    """
    patterns = patterns or [DEFAULT_MODELS]
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path().glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
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
            helper.make_opsetid(AI_ONNX, AI_ONNX_OPSET),
            helper.make_opsetid(COM_MICROSOFT, 1),
        ],
        producer_name="openkara-demucs-onnx contract self-test",
    )
    model.ir_version = 8
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
        metadata.PROVENANCE: json.dumps({"built_by": "converter.contract.tiny_model"}),
    }


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` with a correct `.sha256` sidecar (what convert ships)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    metadata.write_text_atomic(
        metadata.sidecar_path(path), metadata.sidecar_text(path, metadata.sha256_file(path))
    )


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
    np.savez(reference_path(path), audio=audio, stems=stems, max_mse=max_mse)
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
        if _is_ai_onnx(entry.domain):
            entry.version = 18
    _restamp(model)


def _without_provenance(model: onnx.ModelProto) -> None:
    entries = metadata.read_metadata(model)
    del entries[metadata.PROVENANCE], entries[metadata.CACHE_KEY]
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
    "stale_cache_key": ("cache_key", _with_stale_cache_key, None),
    "wrong_sidecar": ("sidecar", None, _break_sidecar),
    "wrong_shape": ("io", _with_dynamic_time_axis, None),
}


def self_test(work_dir: Path | None = None) -> list[str]:
    """Prove each rule refuses its violating model, for that reason alone, and a good one passes.

    Returns one report line per case; raises ContractError naming every case that misbehaved.
    """
    with tempfile.TemporaryDirectory(prefix="contract-self-test-") as tmp:
        root = work_dir or Path(tmp)
        report, failures = [], []
        good = root / "compliant.onnx"
        write_model(tiny_model(), good)
        found = violations(onnx.load(str(good)), good)
        if found:
            failures.append(f"compliant model refused: {'; '.join(map(str, found))}")
        report.append(f"compliant: {'REFUSED' if found else 'passes'}")
        for name, (rule, break_model, break_files) in SELF_TEST_CASES.items():
            model = tiny_model()
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
    if failures:
        raise ContractError(
            "contract self-test failed:\n" + "\n".join(f"  - {f}" for f in failures)
        )
    return report
