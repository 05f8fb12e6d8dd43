"""Exact rewrites of the optimized graph into operators that CoreML's MLProgram builders take.

ORT's CoreML EP (MLProgram, and XNNPACK/DirectML likewise at these points) has no builder for a
Gather with a scalar index, a zero Pad or an Expand, and each one cuts its partition. Each has
an equivalent in operators it does take, computing the same values bit for bit:

- Gather(x, i) with a constant scalar i -> Slice(x, i, i+1) + Squeeze (a copy of the same row);
- Pad(x, pads) in constant mode with value 0 -> Concat of zero blocks around x (stored up to
  ZERO_BLOCK_BYTES, else tiled from one zero), a Slice where a pad is negative;
- Expand(x, shape) with a constant shape -> Reshape to the target rank + Tile;
- Unsqueeze -> Reshape to the static shape (CoreML NeuralNetwork has no Unsqueeze).

Runs on a graph whose every shape is static (`runtime_shapes.settle`, then the offline
optimization), on any interface: it reads only node types and shapes.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .facts import is_ai_onnx

log = logging.getLogger(__name__)

PREFIX = "accelerate/"
# `invoke convert --target`: the CPU EP's graph (anchored shapes, the If split, com.microsoft
# fusions) or the accelerators' (static shapes, no control flow, standard ops only).
CPU = "cpu"
ACCELERATORS = "accelerators"
TARGETS = (CPU, ACCELERATORS)
# A zero block of a Pad up to this size is stored (CoreML NeuralNetwork has no Tile); larger
# ones are tiled from a single zero at run time.
ZERO_BLOCK_BYTES = 64 << 10


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    from .ep_report import inferred

    shaped = inferred(model).graph
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*shaped.value_info, *shaped.input, *shaped.output)
        if all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    }
    shapes |= {t.name: list(t.dims) for t in model.graph.initializer}
    return shapes


class _Writer:
    """New nodes and int64/float initializers under PREFIX, named after the node replaced."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers: list[onnx.TensorProto] = []
        self.values = {t.name: t for t in graph.initializer}

    def constant(self, name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value, PREFIX + name)
        self.initializers.append(tensor)
        return tensor.name

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.values.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def _gather(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    index = w.value(node.input[1])
    data = shapes.get(node.input[0])
    if index is None or index.ndim != 0 or data is None:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(data)
    start = int(index) % data[axis]
    sliced = PREFIX + node.name + "/slice"
    return [
        helper.make_node(
            "Slice",
            [
                node.input[0],
                w.constant(node.name + "/starts", np.array([start], np.int64)),
                w.constant(node.name + "/ends", np.array([start + 1], np.int64)),
                w.constant(node.name + "/axes", np.array([axis], np.int64)),
            ],
            [sliced],
            name=sliced,
        ),
        helper.make_node(
            "Squeeze",
            [sliced, w.constant(node.name + "/squeeze", np.array([axis], np.int64))],
            [node.output[0]],
            name=PREFIX + node.name,
        ),
    ]


def _pad(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    pads = w.value(node.input[1])
    shape = shapes.get(node.input[0])
    fill = w.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    axes = w.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if mode != b"constant" or pads is None or shape is None or fill is None or fill.any():
        return None
    rank = len(shape)
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    before, after = pads[: len(axes)], pads[len(axes) :]
    nodes: list[onnx.NodeProto] = []
    current, dims = node.input[0], list(shape)
    zero = None
    steps = [(a, int(b), int(e)) for a, b, e in zip(axes, before, after, strict=True) if b or e]
    for step, (axis, head, tail) in enumerate(steps):
        name = f"{node.name}/{step}"
        if head < 0 or tail < 0:  # a crop: Slice the negative sides first
            out = PREFIX + name + "/crop"
            nodes.append(
                helper.make_node(
                    "Slice",
                    [
                        current,
                        w.constant(name + "/starts", np.array([max(-head, 0)], np.int64)),
                        w.constant(
                            name + "/ends", np.array([dims[axis] - max(-tail, 0)], np.int64)
                        ),
                        w.constant(name + "/axes", np.array([axis], np.int64)),
                    ],
                    [out],
                    name=out,
                )
            )
            dims[axis] -= max(-head, 0) + max(-tail, 0)
            current, head, tail = out, max(head, 0), max(tail, 0)
        parts = []
        for side, width in (("head", head), ("tail", tail)):
            if not width:
                continue
            dims_block = [*dims[:axis], width, *dims[axis + 1 :]]
            if np.prod(dims_block) * 4 <= ZERO_BLOCK_BYTES:  # both CoreML formats take it
                parts.append((side, w.constant(f"{name}/{side}", np.zeros(dims_block, np.float32))))
                continue
            if zero is None:
                zero = w.constant(node.name + "/zero", np.zeros([1] * rank, np.float32))
            block = PREFIX + f"{name}/{side}"
            nodes.append(
                helper.make_node(
                    "Tile",
                    [zero, w.constant(f"{name}/{side}/repeats", np.array(dims_block, np.int64))],
                    [block],
                    name=block,
                )
            )
            parts.append((side, block))
        inputs = (
            [b for s, b in parts if s == "head"] + [current] + [b for s, b in parts if s == "tail"]
        )
        last = step == len(steps) - 1
        out = node.output[0] if last else PREFIX + name + "/out"
        if len(inputs) > 1:
            nodes.append(helper.make_node("Concat", inputs, [out], axis=axis, name=PREFIX + name))
        dims[axis] += head + tail
        current = out
    if not steps:
        return None
    if nodes[-1].output[0] != node.output[0]:  # the last step only cropped
        nodes[-1].output[0] = node.output[0]
    return nodes


def _expand(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    target = w.value(node.input[1])
    shape = shapes.get(node.input[0])
    if target is None or shape is None:
        return None
    rank = max(len(shape), target.size)
    source = [1] * (rank - len(shape)) + list(shape)
    wanted = [1] * (rank - target.size) + [int(t) for t in target]
    if any(s != 1 and t not in (1, s) for s, t in zip(source, wanted, strict=True)):
        return None
    repeats = [t if s == 1 else 1 for s, t in zip(source, wanted, strict=True)]
    nodes = []
    current = node.input[0]
    if len(shape) != rank:
        current = PREFIX + node.name + "/rank"
        nodes.append(
            helper.make_node(
                "Reshape",
                [node.input[0], w.constant(node.name + "/shape", np.array(source, np.int64))],
                [current],
                name=current,
            )
        )
    nodes.append(
        helper.make_node(
            "Tile",
            [current, w.constant(node.name + "/repeats", np.array(repeats, np.int64))],
            [node.output[0]],
            name=PREFIX + node.name,
        )
    )
    return nodes


def _unsqueeze(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    out = shapes.get(node.output[0])
    if out is None:
        return None
    return [
        helper.make_node(
            "Reshape",
            [node.input[0], w.constant(node.name + "/shape", np.array(out, np.int64))],
            [node.output[0]],
            name=PREFIX + node.name,
        )
    ]


REWRITES = {"Gather": _gather, "Pad": _pad, "Expand": _expand, "Unsqueeze": _unsqueeze}


def rewrite(model: onnx.ModelProto) -> Counter:
    """Apply every rewrite of the module docstring to `model`'s main graph, in place; returns
    {op type: nodes rewritten}."""
    graph = model.graph
    if any(node.name.startswith(PREFIX) for node in graph.node):
        raise ValueError("the graph is rewritten for accelerators already")
    shapes = _static_shapes(model)
    writer = _Writer(graph)
    done: Counter = Counter()
    nodes = []
    for node in graph.node:
        rule = REWRITES.get(node.op_type) if is_ai_onnx(node.domain) else None
        replaced = rule(node, shapes, writer) if rule else None
        if replaced is None:
            nodes.append(node)
            continue
        nodes += replaced
        done[node.op_type] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(writer.initializers)
    log.info(
        "rewrote for accelerators: %s (exact: slices, tiles and concatenations of the same values)",
        ", ".join(f"{op} {n}" for op, n in sorted(done.items())) or "nothing",
    )
    return done
