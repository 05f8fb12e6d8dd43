"""Rewrites of the optimized graph into operators both CoreML formats take (MLProgram, NN).

ORT's CoreML EP (MLProgram, and XNNPACK/DirectML likewise at these points) has no builder for a
Gather with a scalar index, a zero Pad or an Expand, and each one cuts its partition. Each has
an equivalent in operators it does take, computing the same values bit for bit:

- Gather(x, i) with a constant scalar i -> Slice(x, i, i+1) + Squeeze (a copy of the same row);
- Pad(x, pads) in constant mode with value 0 -> Concat of zero blocks around x (stored up to
  ZERO_BLOCK_BYTES, else tiled from one zero), a Slice where a pad is negative;
- Expand(x, shape) with a constant shape -> Reshape to the target rank + Mul by ones of the
  expanded axes (x * 1 is x);
- Unsqueeze -> Reshape to the static shape (CoreML NeuralNetwork has no Unsqueeze).

CoreML NeuralNetwork (the app's default format) also lacks ReduceMean, LayerNormalization, Erf,
Tile and ConvTranspose in ORT's checker table (which misspells ReduceSum), so these become
operators both tables list, equal to float32 rounding (summation order) or, for Erf, to a few
float32 ulps:

- ReduceSum/ReduceMean -> [Transpose] + Reshape to 2-D + MatMuls by constant ones columns in
  the exported network's summation tree (blocks of about sqrt(length), a Slice for a
  remainder) [+ Div by the count] + Reshape (NeuralNetwork's MatMul takes 2-D inputs, B
  constant);
- LayerNormalization -> those means, Sub, Mul, Add, Sqrt, Div, Mul, Add;
- Erf -> tanh(x P(x^2) / Q(x^2)) on x clipped to +-ERF_CLIP (ERF_P, ERF_Q: a rational fit of
  atanh(erf x), relative error 6e-9 in float64, a few float32 ulps evaluated in float32);
- ConvTranspose (1-D, group 1, kernel a multiple of the stride) -> one Conv computing every
  output phase + Reshape/Transpose/Reshape interleaving them + Slice.

Then Reshape chains collapse to one Reshape and initializers no node reads any more go.

Runs on a graph whose every shape is static (`runtime_shapes.settle`, then the offline
optimization), on any interface: it reads only node types and shapes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converter.build.graph_pass import GraphPass
from converter.build.runtime_shapes import inferred
from converter.facts import SUM_LEAF, is_ai_onnx, sum_blocks, walk_model
from converter.facts import TARGETS as TARGETS  # re-exported: convert's --target check

log = logging.getLogger(__name__)

PREFIX = "accelerate/"
# `invoke convert --target`: the CPU EP's graph (anchored shapes, the If split, com.microsoft
# fusions) or the accelerators' (static shapes, no control flow, standard ops only).
CPU, ACCELERATORS = TARGETS  # one home: facts.TARGETS
# A zero block of a Pad up to this size is stored (CoreML NeuralNetwork has no Tile); larger
# ones are tiled from a single zero at run time.
ZERO_BLOCK_BYTES = 256 << 10
# Erf(x) = tanh(x P(x^2) / Q(x^2)) for |x| <= ERF_CLIP, +-1 beyond (erf(4) rounds to 1 in
# float32): a weighted least-squares rational fit of atanh(erf x) / x in x^2 (coefficients from
# the constant term up; tests/test_accelerate.py checks the error against math.erf).
ERF_CLIP = 4.0
ERF_P = (1.1283791644949996, 0.27982558351658676, 0.042677987130541814, 0.0021820159525024765)
ERF_Q = (1.0, 0.15690914490418006, 0.023716400595982536, 0.0003257013212080297)


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every value's static shape; float32 values only for ops whose rewrite is float32."""
    shaped = inferred(model).graph
    values = (*shaped.value_info, *shaped.input, *shaped.output)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in values
        if all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    }
    shapes |= {t.name: list(t.dims) for t in model.graph.initializer}
    shapes[FLOAT32] = {  # type: ignore[assignment]
        v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    } | {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return shapes


FLOAT32 = "\0float32"  # the key of the set of float32 value names in _static_shapes


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

    def node(self, nodes: list, op: str, inputs: list[str], name: str, **attrs) -> str:
        """Append `op` to `nodes`; returns its output's name."""
        out = PREFIX + name
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


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
    ones = np.ones(repeats, np.float32)
    if node.input[0] not in shapes[FLOAT32]:
        return None
    nodes.append(
        helper.make_node(
            "Mul",
            [current, w.constant(node.name + "/ones", ones)],
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


def _attr(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _sum(
    w: _Writer, nodes: list, x: str, shape: list[int], axes: list[int], name: str, mean: bool
) -> str:
    """x summed (or averaged) over `axes` with keepdims, as MatMuls by ones columns."""
    rank = len(shape)
    kept = [a for a in range(rank) if a not in axes]
    perm = kept + sorted(axes)
    if perm != list(range(rank)):
        x = w.node(nodes, "Transpose", [x], name + "/transpose", perm=perm)
    inner = int(np.prod([shape[a] for a in axes]))
    outer = int(np.prod([shape[a] for a in kept]))
    flat = w.constant(name + "/2d_shape", np.array([outer, inner], np.int64))
    x = _row_sums(w, nodes, w.node(nodes, "Reshape", [x, flat], name + "/2d"), outer, inner, name)
    if mean:
        count = w.constant(name + "/count", np.array(inner, np.float32))
        x = w.node(nodes, "Div", [x, count], name + "/mean")
    kept_shape = [1 if a in axes else d for a, d in enumerate(shape)]
    back = w.constant(name + "/keepdims_shape", np.array(kept_shape, np.int64))
    return w.node(nodes, "Reshape", [x, back], name + "/keepdims")


def _row_sums(w: _Writer, nodes: list, x: str, outer: int, inner: int, name: str) -> str:
    """[outer, inner] -> [outer, 1] row sums in the exported network's tree (`sum_blocks`):
    one long MatMul by ones adds its inner dimension naively, which trained statistics expose.
    The whole blocks are a Reshape + MatMul; a short remainder, split off, gets its own MatMul."""

    def ones(count: int, tag: str) -> str:
        return w.constant(f"{name}/{tag}ones", np.ones((count, 1), np.float32))

    if inner <= SUM_LEAF:
        return w.node(nodes, "MatMul", [x, ones(inner, "")], name + "/sum")
    _, block = sum_blocks(inner)
    whole = inner // block
    rest = inner - whole * block

    head, tail = x, None
    if rest:  # one Split, not two Slices: ORT 1.18's Slice fusion names every Split "splits"
        sizes = w.constant(name + "/split_sizes", np.array([whole * block, rest], np.int64))
        head, tail = PREFIX + name + "/whole", PREFIX + name + "/rest"
        nodes.append(
            helper.make_node("Split", [x, sizes], [head, tail], name=head + "_split", axis=1)
        )
    rows = w.constant(name + "/blocks_shape", np.array([outer * whole, block], np.int64))
    blocked = w.node(nodes, "Reshape", [head, rows], name + "/blocks")
    sums = w.node(nodes, "MatMul", [blocked, ones(block, "block_")], name + "/block_sums")
    back = w.constant(name + "/sums_shape", np.array([outer, whole], np.int64))
    sums = w.node(nodes, "Reshape", [sums, back], name + "/sums")
    total = _row_sums(w, nodes, sums, outer, whole, name + "/level")
    if tail is not None:
        rest_sum = w.node(nodes, "MatMul", [tail, ones(rest, "rest_")], name + "/rest_sum")
        total = w.node(nodes, "Add", [total, rest_sum], name + "/with_rest")
    return total


def _reduce(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    shape, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if shape is None or out is None or node.input[0] not in shapes[FLOAT32]:
        return None
    if len(node.input) > 1 and node.input[1]:
        axes = w.value(node.input[1])
        if axes is None:
            return None
        axes = [int(a) for a in axes]
    else:
        axes = list(_attr(node, "axes", []))
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return None
        axes = list(range(len(shape)))
    axes = sorted({a % len(shape) for a in axes})
    nodes: list[onnx.NodeProto] = []
    summed = _sum(w, nodes, node.input[0], shape, axes, node.name, node.op_type == "ReduceMean")
    final = w.constant(node.name + "/out", np.array(out, np.int64))
    nodes.append(
        helper.make_node("Reshape", [summed, final], [node.output[0]], name=PREFIX + node.name)
    )
    return nodes


def _layer_norm(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    x = node.input[0]
    shape = shapes.get(x)
    if shape is None or x not in shapes[FLOAT32] or any(node.output[1:]):
        return None
    rank = len(shape)
    axes = list(range(_attr(node, "axis", -1) % rank, rank))
    eps = w.constant(node.name + "/epsilon", np.array(_attr(node, "epsilon", 1e-5), np.float32))
    nodes: list[onnx.NodeProto] = []
    n = node.name
    mean = _sum(w, nodes, x, shape, axes, n + "/mean", True)
    centred = w.node(nodes, "Sub", [x, mean], n + "/centred")
    square = w.node(nodes, "Mul", [centred, centred], n + "/square")
    var = _sum(w, nodes, square, shape, axes, n + "/variance", True)
    std = w.node(nodes, "Sqrt", [w.node(nodes, "Add", [var, eps], n + "/eps")], n + "/std")
    y = w.node(nodes, "Div", [centred, std], n + "/normed")
    has_bias = len(node.input) > 2 and node.input[2]
    y = w.node(nodes, "Mul", [y, node.input[1]], n + "/scaled")
    if has_bias:
        y = w.node(nodes, "Add", [y, node.input[2]], n + "/biased")
    nodes[-1].output[0] = node.output[0]
    return nodes


def _erf(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    x, n = node.input[0], node.name
    if x not in shapes[FLOAT32]:
        return None
    nodes: list[onnx.NodeProto] = []

    def scalar(tag: str, value: float) -> str:
        return w.constant(f"{n}/{tag}_value", np.array(value, np.float32))

    c = w.node(nodes, "Clip", [x, scalar("lo", -ERF_CLIP), scalar("hi", ERF_CLIP)], n + "/clip")
    s = w.node(nodes, "Mul", [c, c], n + "/square")
    horner = {}
    for tag, coefficients in (("p", ERF_P), ("q", ERF_Q)):
        scale = 0.5 if tag == "p" else 1.0  # P/2: the Tanh takes half the argument
        acc = scalar(f"{tag}{len(coefficients) - 1}", scale * coefficients[-1])
        for k in range(len(coefficients) - 2, -1, -1):
            acc = w.node(nodes, "Mul", [acc, s], f"{n}/{tag}{k}/mul")
            term = scalar(f"{tag}{k}", scale * coefficients[k])
            acc = w.node(nodes, "Add", [acc, term], f"{n}/{tag}{k}")
        horner[tag] = acc
    ratio = w.node(nodes, "Div", [horner["p"], horner["q"]], n + "/ratio")
    half = w.node(nodes, "Mul", [ratio, c], n + "/half")
    # tanh(2u) = 2 tanh(u) / (1 + tanh(u)^2): ORT's float32 Tanh is off by a few ulps near
    # saturation, and this form damps an error in tanh(u) by (1 - tanh(2u)^2) / (1 - tanh(u)^2)
    t = w.node(nodes, "Tanh", [half], n + "/tanh")
    one_plus = w.node(
        nodes, "Add", [w.node(nodes, "Mul", [t, t], n + "/t2"), scalar("one", 1.0)], n + "/1+t2"
    )
    twice = w.node(nodes, "Add", [t, t], n + "/2t")
    nodes.append(helper.make_node("Div", [twice, one_plus], [node.output[0]], name=PREFIX + n))
    return nodes


def _conv_transpose(node, shapes, w: _Writer) -> list[onnx.NodeProto] | None:
    """y[n*s + p] = sum_j x[n - j] W[j*s + p]: phase p is a Conv with the taps W[p::s] flipped."""
    x, n = node.input[0], node.name
    weight, shape, out = w.value(node.input[1]), shapes.get(x), shapes.get(node.output[0])
    bias = w.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if weight is None or shape is None or out is None or weight.ndim != 3:
        return None
    (stride,) = _attr(node, "strides", [1])
    kernel = weight.shape[2]
    if (
        _attr(node, "group", 1) != 1
        or _attr(node, "dilations", [1]) != [1]
        or _attr(node, "auto_pad", b"NOTSET") != b"NOTSET"
        or any(_attr(node, "output_padding", [0]))
        or kernel % stride
        or weight.dtype != np.float32
    ):
        return None
    begin, _ = _attr(node, "pads", [0, 0])
    taps = kernel // stride
    cin, cout = weight.shape[:2]
    # phases[p * cout + o, i, t] = W[i, o, (taps - 1 - t) * stride + p]
    phases = weight.reshape(cin, cout, taps, stride)[:, :, ::-1, :].transpose(3, 1, 0, 2)
    phases = np.ascontiguousarray(phases.reshape(stride * cout, cin, taps))
    length = shape[2] + taps - 1
    inputs = [x, w.constant(n + "/phases", phases)]
    if bias is not None:
        inputs.append(w.constant(n + "/bias", np.tile(bias, stride)))
    nodes: list[onnx.NodeProto] = []
    y = w.node(nodes, "Conv", inputs, n + "/conv", kernel_shape=[taps], pads=[taps - 1, taps - 1])
    split = w.constant(n + "/phased_shape", np.array([shape[0], stride, cout, length], np.int64))
    y = w.node(nodes, "Reshape", [y, split], n + "/phased")
    y = w.node(nodes, "Transpose", [y], n + "/interleave", perm=[0, 2, 3, 1])
    joined = w.constant(n + "/joined_shape", np.array([shape[0], cout, length * stride], np.int64))
    y = w.node(nodes, "Reshape", [y, joined], n + "/joined")
    starts = w.constant(n + "/starts", np.array([begin], np.int64))
    ends = w.constant(n + "/ends", np.array([begin + out[2]], np.int64))
    axes = w.constant(n + "/axes", np.array([2], np.int64))
    nodes.append(
        helper.make_node("Slice", [y, starts, ends, axes], [node.output[0]], name=PREFIX + n)
    )
    return nodes


REWRITES = {
    "Gather": _gather,
    "Pad": _pad,
    "Expand": _expand,
    "Unsqueeze": _unsqueeze,
    "ReduceSum": _reduce,
    "ReduceMean": _reduce,
    "LayerNormalization": _layer_norm,
    "Erf": _erf,
    "ConvTranspose": _conv_transpose,
}


def drop_unread_initializers(model: onnx.ModelProto) -> None:
    """What only the replaced nodes read (a ConvTranspose's weights, a ReduceSum's axes) goes."""
    graph = model.graph
    used = {name for _, node in walk_model(model) for name in node.input}
    used |= {value.name for value in graph.output}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    if len(kept) < len(graph.initializer):
        log.info("dropped %d initializers no node reads", len(graph.initializer) - len(kept))
        del graph.initializer[:]
        graph.initializer.extend(kept)


def collapse_reshapes(model: onnx.ModelProto) -> int:
    """Reshape(Reshape(x)) -> Reshape(x) where the inner one feeds nothing else: the same
    values, fewer nodes for every provider to place (the rewrites above write such chains).
    Returns the number of Reshapes removed."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers = Counter(name for _, node in walk_model(model) for name in node.input)
    readers.update(value.name for value in graph.output)
    values = {t.name: t for t in graph.initializer}
    gone: set[str] = set()
    for node in graph.node:
        if node.op_type != "Reshape" or not is_ai_onnx(node.domain):
            continue
        shape = values.get(node.input[1])
        if shape is None or 0 in numpy_helper.to_array(shape) or _attr(node, "allowzero", 0):
            continue  # a 0 copies a dimension of the input: only right for the input it has
        inner = producer.get(node.input[0])
        if (
            inner is None
            or inner.op_type != "Reshape"
            or not is_ai_onnx(inner.domain)
            or readers[inner.output[0]] != 1
        ):
            continue
        node.input[0] = inner.input[0]
        gone.add(inner.output[0])
    if gone:
        kept = [node for node in graph.node if node.output[0] not in gone]
        del graph.node[:]
        graph.node.extend(kept)
        log.info("collapsed %d Reshape chains", len(gone))
    return len(gone)


def rewrite(model: onnx.ModelProto) -> Counter:
    """Apply every rewrite of the module docstring to `model`'s main graph, in place; returns
    {op type: nodes rewritten}."""
    graph = model.graph
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
    collapse_reshapes(model)
    drop_unread_initializers(model)
    log.info(
        "rewrote for accelerators: %s (equal values in operators both CoreML formats take)",
        ", ".join(f"{op} {n}" for op, n in sorted(done.items())) or "nothing",
    )
    return done


@dataclass
class Rewrite(GraphPass):
    """`rewrite`: operators both CoreML formats take. Seen by its nodes' names (a graph with
    nothing to rewrite reads as never rewritten, and a second pass changes nothing in it)."""

    name: ClassVar[str] = "accelerator rewrites"

    def applied(self, model: onnx.ModelProto) -> bool:
        return any(node.name.startswith(PREFIX) for node in model.graph.node)

    def transform(self, model: onnx.ModelProto) -> None:
        rewrite(model)
