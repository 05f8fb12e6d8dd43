"""Split the main graph into consecutive `If` bodies, which ONNX Runtime plans one at a time.

For every tensor it places, the allocation planner of ORT 1.17-1.31 walks the list of buffers
freed so far, hashing each one's name. Our run-time shapes (`converter.build.runtime_shapes`) keep
nearly every such match from succeeding, so the list grows with the graph and planning grows
with the square of the node count: most of htdemucs_ft's session load on ORT 1.23.2, the
version OpenKara ships. Each `If` body gets its own planner and its own short list.

The condition is always true but computed from the input audio, so neither our offline pass nor
an app's session can fold the split away; the else branch only names constants of the same types
(empty where the rank allows). Values pass between bodies by outer-scope reference, so nothing is
copied. No cut separates a constant chain (a stored weight's Cast and Mul) from its user: ORT
folds constants only within one graph, so an app at default options still prepacks every weight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.build.graph_pass import GraphPass
from converter.build.runtime_shapes import never
from converter.facts import is_ai_onnx

log = logging.getLogger(__name__)

PREFIX = "partition/"
MAX_NODES = 500  # per body: planning cost grows with its square (measured: CHANGELOG.md, 0.5.0)
_CONDITION = PREFIX + "always"
_VALUES_READ = 1024  # initializers up to this size keep their values for shape inference


def _inner(body: int, name: str) -> str:
    return f"{PREFIX}{body}/{name}"


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Element type (and rank where known) of every node output, by ONNX shape inference.

    ONNX does not know ORT's com.microsoft fusions; every one we allow computes float32, so
    their outputs are seeded as float32 and inference carries on past them. Large initializers
    enter as typed inputs: inference reads the values of small ones (shapes, axes), and of the
    weights only their types and shapes, so the model's hundreds of MB are not copied.
    """
    source = model.graph
    seeded = [
        helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
        for node in source.node
        if not is_ai_onnx(node.domain)
        for out in node.output
        if out
    ]
    small = [t for t in source.initializer if math.prod(t.dims) <= _VALUES_READ]
    weights = [
        helper.make_tensor_value_info(t.name, t.data_type, t.dims)
        for t in source.initializer
        if math.prod(t.dims) > _VALUES_READ
    ]
    graph = helper.make_graph(
        source.node, source.name, [*source.input, *weights], source.output, small, value_info=seeded
    )
    bare = helper.make_model(
        graph,
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
        functions=model.functions,
    )
    inferred = onnx.shape_inference.infer_shapes(bare)
    return {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]}


def _bodies(graph: onnx.GraphProto, size: int) -> list[list[onnx.NodeProto]]:
    """Consecutive runs of at most `size` of `graph`'s nodes; a run never ends on a node computed
    from constants alone, so that node stays in the graph of the node that reads it."""
    nodes = graph.node
    constant = {t.name for t in graph.initializer} | {""}
    folds = []
    for node in nodes:
        folds.append(all(i in constant for i in node.input))
        if folds[-1]:
            constant.update(node.output)
    bodies, start = [], 0
    while start < len(nodes):
        end = min(start + size, len(nodes))
        while end < len(nodes) and end - 1 > start and folds[end - 1]:
            end -= 1
        bodies.append(nodes[start:end])
        start = end
    return bodies


def split(model: onnx.ModelProto, max_nodes: int = MAX_NODES) -> int:
    """Move `model`'s main-graph nodes, in order, into `If` bodies of at most `max_nodes` nodes,
    in place. Returns the number of bodies (0: the graph is small enough as it is)."""
    graph = model.graph
    nodes = list(graph.node)
    if len(nodes) <= max_nodes:
        log.info("graph split: %d nodes fit one planner, left as one graph", len(nodes))
        return 0
    graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    nested = [node.name for node in nodes if any(a.type in graphs for a in node.attribute)]
    if nested:
        # Their outer-scope references would need exporting and renaming too.
        raise ValueError(f"cannot split a graph with subgraphs (node {nested[0]!r})")
    types = _value_types(model)
    count = math.ceil(len(nodes) / max_nodes)
    size = math.ceil(len(nodes) / count)
    bodies = _bodies(graph, size)
    body_of = {
        out: b for b, body in enumerate(bodies) for node in body for out in node.output if out
    }
    needed_outside = {o.name for o in graph.output}
    for b, body in enumerate(bodies):
        for node in body:
            needed_outside.update(i for i in node.input if i and body_of.get(i, b) != b)
    outer, initializers, false = never(graph.input[0], PREFIX)
    outer.append(helper.make_node("Not", [false], [PREFIX + "true"], name=PREFIX + "true"))
    outer.append(
        helper.make_node(
            "Reshape", [PREFIX + "true", PREFIX + "scalar"], [_CONDITION], name=_CONDITION
        )
    )
    initializers.append(numpy_helper.from_array(np.zeros(0, np.int64), PREFIX + "scalar"))
    for b, body in enumerate(bodies):
        exported = [out for node in body for out in node.output if out in needed_outside]
        if not exported:
            raise ValueError(f"nodes {body[0].name!r} to {body[-1].name!r} compute nothing used")
        missing = [name for name in exported if name not in types]
        if missing:
            raise ValueError(f"no type inferred for {missing[0]!r}, cannot split the graph")
        renamed = {name: _inner(b, name) for name in exported}
        inner = []
        for node in body:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [renamed.get(i, i) for i in node.input]
            copy.output[:] = [renamed.get(o, o) for o in node.output]
            inner.append(copy)
        then_outputs, else_nodes, else_outputs = [], [], []
        for name in exported:
            tensor = types[name].tensor_type
            then_outputs.append(
                helper.make_tensor_value_info(renamed[name], tensor.elem_type, None)
            )
            rank = len(tensor.shape.dim) if tensor.HasField("shape") else 1
            empty = np.zeros([0] * rank, helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            unused = _inner(b, "unused/" + name)
            else_nodes.append(
                helper.make_node(
                    "Constant", [], [unused], name=unused, value=numpy_helper.from_array(empty)
                )
            )
            else_outputs.append(helper.make_tensor_value_info(unused, tensor.elem_type, None))
        outer.append(
            helper.make_node(
                "If",
                [_CONDITION],
                exported,
                name=f"{PREFIX}{b}",
                then_branch=helper.make_graph(inner, f"{PREFIX}{b}", [], then_outputs),
                else_branch=helper.make_graph(else_nodes, f"{PREFIX}{b}/unused", [], else_outputs),
            )
        )
    del graph.node[:]
    graph.node.extend(outer)
    graph.initializer.extend(initializers)
    log.info(
        "graph split: %d nodes into %d If bodies of at most %d, so ORT 1.17-1.31 plan each on "
        "its own",
        len(nodes),
        len(bodies),
        size,
    )
    return len(bodies)


def join(model: onnx.ModelProto) -> int:
    """Undo `split` in place: the bodies' nodes back in the main graph, in order. Returns the
    number of bodies joined (0: the graph was not split)."""
    graph = model.graph
    bodies = [n for n in graph.node if n.op_type == "If" and n.name.startswith(PREFIX)]
    if not bodies:
        return 0
    foreign = [n.name for n in graph.node if not n.name.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"node {foreign[0]!r} was added after the split, cannot join")
    nodes = []
    for b, node in enumerate(bodies):
        then = next(a.g for a in node.attribute if a.name == "then_branch")
        original = {_inner(b, name): name for name in node.output}
        for inner in then.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            copy.input[:] = [original.get(i, i) for i in inner.input]
            copy.output[:] = [original.get(o, o) for o in inner.output]
            nodes.append(copy)
    kept = [t for t in graph.initializer if not t.name.startswith(PREFIX)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(bodies)


@dataclass
class Split(GraphPass):
    """`split` into bodies of at most `max_nodes`; `join` undoes it. Seen by its `If` nodes (a
    graph small enough to stay whole reads as never split)."""

    max_nodes: int = MAX_NODES
    name: ClassVar[str] = "split"

    def applied(self, model: onnx.ModelProto) -> bool:
        return any(node.name.startswith(PREFIX) for node in model.graph.node)

    def transform(self, model: onnx.ModelProto) -> None:
        split(model, self.max_nodes)

    def inverse(self, model: onnx.ModelProto) -> None:
        join(model)
