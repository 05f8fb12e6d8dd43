"""Multiply-accumulate counts and constant sizes read off an exported graph.

Counts are taken on the graph as exported, simplified by ONNX Runtime at ORT_ENABLE_BASIC:
that level folds the exporter's Shape/Gather/Concat chains (which onnx's shape inference cannot
follow) while keeping standard ops only, unlike EXTENDED, whose `com.microsoft` fusions onnx
cannot infer either. Fusion does not change the arithmetic. Node names carry the piece they came
from (`stft/`, `istft/`, `m0/` ... see `converter.build.export`), which splits spectral from network
cost.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import numpy_helper, shape_inference

from converter.build.runtime_shapes import settle

SPECTRAL_PREFIXES = ("stft/", "istft/")
# Op types whose ORT CPU kernels are matrix products (MLAS SGEMM), fused forms included.
GEMM_OPS = frozenset(
    {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Conv", "FusedConv", "ConvTranspose"}
)


def simplified(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` after ORT's BASIC level (constant folding; standard ops only)."""
    # onnxruntime here: `invoke release` imports this module (through compare) without it
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="graphstats-") as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(target)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    if node.op_type in ("MatMul", "Gemm"):
        a, out = shapes[node.input[0]], shapes[node.output[0]]
        trans_a = any(x.name == "transA" and x.i for x in node.attribute)
        inner = a[-2] if trans_a and node.op_type == "Gemm" else a[-1]
        return math.prod(out) * inner
    if node.op_type == "Conv":
        weight, out = shapes[node.input[1]], shapes[node.output[0]]
        return math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        weight, inp = shapes[node.input[1]], shapes[node.input[0]]
        return math.prod(inp) * math.prod(weight[1:])
    return 0


def part(name: str) -> str:
    """'spectral' for STFT/ISTFT nodes, else 'network'."""
    return "spectral" if name.startswith(SPECTRAL_PREFIXES) else "network"


def _fold_never(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose run-time zeros are constants (`runtime_shapes.settle`): the
    shapes are the same, and shape inference needs them here."""
    model = copy.deepcopy(model)
    settle(model)
    return model


def macs_by_part(model: onnx.ModelProto) -> dict[str, int]:
    """{'spectral': MACs, 'network': MACs} for one run of the exported graph `model`."""
    model = simplified(_fold_never(model))
    shapes = _shapes(model)
    totals: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        totals[part(node.name)] += _node_macs(node, shapes)
    return dict(totals)


def constant_bytes_by_part(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of initializers and Constant nodes, split like `macs_by_part`."""
    totals: dict[str, int] = defaultdict(int)
    for init in model.graph.initializer:
        totals[part(init.name)] += numpy_helper.to_array(init).nbytes
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    totals[part(node.name)] += numpy_helper.to_array(attr.t).nbytes
    return dict(totals)
