"""The facts every part of the converter must agree on, each stated once.

Standard library only: `converter/gate/ortcheck.py` runs in venvs that hold nothing but onnxruntime
and numpy, and loads this file by path. The graph walk is duck-typed over ONNX protos for the
same reason. Sources and rationale: docs/runtime-contract.md and docs/demucs-facts.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# The pretrained bags the converter ships (`invoke convert --model NAME`).
PRODUCTS = ("htdemucs", "htdemucs_ft", "htdemucs_6s")

# The graph's one input and one output: audio [1, channels, segment] -> stems [1, S, channels,
# segment], as OpenKara feeds and reads them.
INPUT_NAME = "audio"
OUTPUT_NAME = "stems"

# The tensor interfaces a file can have (`invoke convert --interface`), stamped as
# `openkara.tensor_interface`. "waveform": the seed's audio -> stems graph, STFT/ISTFT inside.
# "spectral-core": the demucs core between an STFT and ISTFT the app computes itself
# (openkara-models' spectral-contract v1, docs/spectral-core.md); today's OpenKara loads only this.
WAVEFORM = "waveform"
SPECTRAL_CORE = "spectral-core"
INTERFACES = (WAVEFORM, SPECTRAL_CORE)
# `invoke convert --target`: the CPU EP's graph (anchored shapes, the If split, com.microsoft
# fusions) or the accelerators' (static shapes, no control flow, standard ops only), for
# CoreML, DirectML and XNNPACK; stamped as `metadata.TARGET`, named by the release tag.
CPU_TARGET = "cpu"
ACCELERATORS_TARGET = "accelerators"
TARGETS = (CPU_TARGET, ACCELERATORS_TARGET)
SPECTRAL_CONTRACT = "openkara.spectral-contract/v1"

# Spectral-core I/O, as OpenKara checks them at load: spectral [1, C, 2 (re, im), F, T] and
# mix [1, C, L] -> spectral_out [1, S, C, 2, F, T] and time_out [1, S, C, L], all float32.
SPECTRAL_INPUT = "spectral"
MIX_INPUT = "mix"
SPECTRAL_OUTPUT = "spectral_out"
TIME_OUTPUT = "time_out"


def file_stem(model: str, interface: str = WAVEFORM) -> str:
    """The released file's name without `.onnx`: NAME (waveform) or NAME.spectral."""
    if interface not in INTERFACES:
        raise ValueError(f"unknown tensor interface {interface!r}")
    return model if interface == WAVEFORM else f"{model}.spectral"


# ORT 1.17 (the floor) runs opset <= 20 and IR <= 9; opset 17 is what torch's TorchScript
# exporter writes and what every supported version implements identically on the CPU EP.
OPSET = 17
# The IR version the TorchScript exporter writes for opset 17 (a file's, and every test graph's).
IR_VERSION = 8
COM_MICROSOFT_OPSET = 1
MAX_IR_VERSION = 9

# `com.microsoft` ops a shipped file may contain: the fp32 fusions ORT's EXTENDED level applies
# for the CPU EP. Derived by intersecting `get_all_opkernel_def()` (domain com.microsoft,
# CPUExecutionProvider) of the official Linux x64 wheels 1.17.3 ... 1.32.0, then keeping only
# fusion targets that are portable C++ kernels (not `com.microsoft.nchwc`, which is x86-only, nor
# quantized/x86-specific ones such as MatMulFpQ4). Linux x64 alone proves nothing for arm64, so
# the load test (`ortcheck.missing_allowed_kernels`) re-checks the list on every platform and
# version CI runs, and the static gate (`converter.gate.contract`) refuses any other op.
COM_MICROSOFT = "com.microsoft"
COM_MICROSOFT_ALLOWED = frozenset(
    {
        "BiasGelu",
        "FastGelu",
        "FusedConv",
        "FusedGemm",
        "FusedMatMul",
        "Gelu",
        "QuickGelu",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }
)


# Statistics are summed in a tree whose last level adds at most this many terms; every level
# below adds blocks of about sqrt(length). Short rows need it too: one large term followed by
# hundreds of equal small ones (a steady input) rounds the same way at every addition. Used
# by the exported network (`exportable._tree_sum`) and the accelerators' MatMul sums.
SUM_LEAF = 32


def sum_blocks(length: int) -> tuple[int, int]:
    """(blocks, block) with blocks·block >= length and both near sqrt(length), preferring an
    exact divisor (no padding)."""
    root = math.isqrt(length)
    for block in range(root, root // 2, -1):
        if length % block == 0:
            return length // block, block
    block = root + 1
    return -(-length // block), block


def is_ai_onnx(domain: str) -> bool:
    """ONNX writes the default domain as "" (or, rarely, "ai.onnx")."""
    return domain in ("", "ai.onnx")


def walk_nodes(nodes: Iterable[Any], where: str = "main graph") -> Iterator[tuple[str, Any]]:
    """(where, node) for every node of `nodes` and of the subgraphs in their attributes
    (If/Loop/Scan bodies), `where` naming the path to it."""
    for node in nodes:
        yield where, node
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                yield from walk_nodes(
                    sub.node, f"{where} > {node.op_type} {node.name!r}.{attr.name}"
                )


def walk_model(model: Any) -> Iterator[tuple[str, Any]]:
    """Every node of the main graph and of every model-local function, subgraphs included."""
    yield from walk_nodes(model.graph.node)
    for function in model.functions:
        yield from walk_nodes(function.node, f"function {function.domain}:{function.name}")


# The repository checkout this package lies in (requirements/, schemas/, noxfile.py).
REPO_ROOT = Path(__file__).resolve().parents[1]

# Where the gate and the load test look for files by default, and how to make one.
DEFAULT_MODELS = "models/*.onnx"
HOW_TO_MAKE_A_MODEL = (
    "convert one first: `invoke convert --model htdemucs` (offline: `invoke fake-repo --out "
    "/tmp/demucs-repo --size small && invoke convert --model htdemucs --repo /tmp/demucs-repo`)"
)

# How weights are stored (`invoke convert --weight-storage`, `openkara.weight_storage`): float16
# where exact, behind a Cast (the default), or every initializer float32 (docs/weight-storage.md).
FLOAT16_STORAGE = "float16"
FLOAT32_STORAGE = "float32"
WEIGHT_STORAGES = (FLOAT16_STORAGE, FLOAT32_STORAGE)
# Each target's storage, `invoke convert`'s default and what its releases ship: float16 behind
# Cast halves the CPU file; CoreML and XNNPACK take only constant float32 weights (issue 24).
TARGET_STORAGE = {CPU_TARGET: FLOAT16_STORAGE, ACCELERATORS_TARGET: FLOAT32_STORAGE}


def version_key(version: str) -> tuple[int, ...]:
    """ "1.23.2" -> (1, 23, 2): versions compared as numbers, not text."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
