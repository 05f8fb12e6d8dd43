"""Keep the graph's shape arithmetic a run-time computation, so no ONNX Runtime folds it.

The TorchScript exporter writes every `reshape(x.shape ...)` as Shape -> Gather -> Concat ->
Reshape. Our input shape is fixed, so ONNX Runtime's ConstantFolding turns all of those into
constants whenever it optimizes the graph, which every app session does at ORT's default level.
With every intermediate shape known up front, ORT plans static buffer reuse, and its memory
pattern (a single block sized from the first run, allocated on the second beside what the arena
already holds) grows with it: folded, a session's peak memory more than tripled at the same
speed (figures: CHANGELOG.md, 0.2.0).

So the converter adds a zero that depends on the input audio to every Shape output. The value
is exactly the same shape; what changes is that no optimizer can prove it, in our offline pass
or in any app's session. The zero is `Cast(audio[0,0,0] < -inf)`: false for every float,
NaN and infinities included, so it never turns a bad sample into a bad shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from converter.build.graph_pass import GraphPass
from converter.facts import is_ai_onnx, walk_model

log = logging.getLogger(__name__)

PREFIX = "runtime_shapes/"
ZERO = PREFIX + "zero"


def never(
    source: onnx.ValueInfoProto, prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """(nodes, initializers, name): `prefix + "never"`, a bool tensor of ones in `source`'s rank
    that is always false but computed from graph input `source`, so no optimizer can fold it or
    what depends on it."""
    rank = len(source.type.tensor_type.shape.dim)
    if rank < 1:
        raise ValueError(f"{source.name!r} needs a known rank of at least 1")
    constants = {
        "starts": np.zeros(rank, np.int64),
        "ends": np.ones(rank, np.int64),
        "minus_inf": np.array(-np.inf, np.float32),
    }
    initializers = [numpy_helper.from_array(v, prefix + k) for k, v in constants.items()]
    nodes = [
        helper.make_node(
            "Slice",
            [source.name, prefix + "starts", prefix + "ends"],
            [prefix + "first"],
            name=prefix + "first",
        ),
        helper.make_node(
            "Less",
            [prefix + "first", prefix + "minus_inf"],
            [prefix + "never"],
            name=prefix + "never",
        ),
    ]
    return nodes, initializers, prefix + "never"


def zero_nodes(
    source: onnx.ValueInfoProto, prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing `prefix + "zero"`, an int64 [1] tensor equal to 0 that depends on graph
    input `source`: added to a constant, it makes a value no optimizer can fold."""
    nodes, initializers, false = never(source, prefix)
    initializers.append(numpy_helper.from_array(np.ones(1, np.int64), prefix + "length_one"))
    nodes += [
        helper.make_node(
            "Cast", [false], [prefix + "zero3"], to=TensorProto.INT64, name=prefix + "cast"
        ),
        helper.make_node(
            "Reshape",
            [prefix + "zero3", prefix + "length_one"],
            [prefix + "zero"],
            name=prefix + "zero",
        ),
    ]
    return nodes, initializers


def anchor_shapes(model: onnx.ModelProto, source: str) -> int:
    """Make every Shape output of `model`'s main graph depend on graph input `source`, in place.

    Returns how many Shape nodes were anchored. The values computed are unchanged.
    """
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if source not in inputs:
        raise ValueError(f"{source!r} is not an input of the graph")
    nodes, initializers = zero_nodes(inputs[source], PREFIX)
    anchored = 0
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Shape" or not is_ai_onnx(node.domain):
            continue
        value = node.output[0]
        node.output[0] = f"{PREFIX}{value}/static"
        nodes.append(
            helper.make_node("Add", [node.output[0], ZERO], [value], name=f"{PREFIX}{node.name}")
        )
        anchored += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    log.info(
        "anchored %d Shape nodes to the input, so no optimizer folds them into constants", anchored
    )
    return anchored


def _never_nodes(graph: onnx.GraphProto) -> list[int]:
    """Indices of `graph`'s always-false `x < -inf` nodes (a constant -inf bound)."""
    values = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Less" or not is_ai_onnx(node.domain) or node.input[1] not in values:
            continue
        bound = numpy_helper.to_array(values[node.input[1]])
        if bound.size == 1 and np.isneginf(bound).all():
            found.append(index)
    return found


def settle(model: onnx.ModelProto) -> int:
    """Replace every always-false `x < -inf` of `model`'s main graph by a constant false, in place.

    The exporter's run-time zeros (`converter.build.exportable._unplanned`) and `anchor_shapes` hide
    static shapes from optimizers behind such a comparison. Settled, constant folding turns every
    shape input into an initializer and every shape static, which accelerators need (CoreML
    cuts a partition at each computed Reshape/Slice shape). Returns how many were replaced.
    """
    graph = model.graph
    found = _never_nodes(graph)
    for index in found:
        node = graph.node[index]
        false = numpy_helper.from_array(np.zeros((), np.bool_))
        node.CopyFrom(
            helper.make_node("Constant", [], [node.output[0]], name=node.name, value=false)
        )
    log.info("settled %d run-time zeros into constants: every shape becomes static", len(found))
    return len(found)


@dataclass
class Anchor(GraphPass):
    """`anchor_shapes` to graph input `source`: the CPU graph's shapes hidden from every
    optimizer. Seen by its nodes' names, in the main graph or split into `If` bodies."""

    source: str
    name: ClassVar[str] = "anchor shapes"

    def applied(self, model: onnx.ModelProto) -> bool:
        return any(node.name.startswith(PREFIX) for _, node in walk_model(model))

    def transform(self, model: onnx.ModelProto) -> None:
        anchor_shapes(model, self.source)


@dataclass
class Settle(GraphPass):
    """`settle`: every shape static, for accelerators. Settled means no `x < -inf` is left
    in the main graph (the offline optimization then folds the constants it wrote)."""

    name: ClassVar[str] = "settle shapes"

    def applied(self, model: onnx.ModelProto) -> bool:
        return not _never_nodes(model.graph)

    def transform(self, model: onnx.ModelProto) -> None:
        settle(model)


def inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` after ONNX shape inference (values of small constants propagated), weights
    entering as typed inputs so the hundreds of MB are not copied."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    big = [t for t in light.graph.initializer if t.ByteSize() > 4096]
    keep = [t for t in light.graph.initializer if t.ByteSize() <= 4096]
    del light.graph.initializer[:]
    light.graph.initializer.extend(keep)
    light.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in big
    )
    return shape_inference.infer_shapes(light, data_prop=True)
