"""Weight storage: float16 initializers wherever that loses nothing, Cast to float32 in the graph.

demucs ships its checkpoints in float16 (`serialize_model(..., half=True)`), so every parameter
is a float16 value in a float32 slot, and half of a float32 file is zeros. This pass runs after
the offline ONNX Runtime optimization (whose constant folding would turn any Cast of a constant
back into a float32 initializer) and rewrites the optimized graph:

- an initializer whose values survive float32 -> float16 -> float32 bit for bit is stored as
  float16 and Cast to float32 in the graph;
- a product the converter folded (a LayerScale or the query scale times a projection matrix,
  see `converter.build.exportable.fold_factors`) is stored as its float16 factor and a Mul by the
  float32 scale, when that Mul reproduces the folded product bit for bit;
- everything else (DFT twiddles, windows, a float32 fine-tune, computed constants) stays float32.

Nothing is ever rounded: the graph computes the exact float32 values of the float32 file, so
its outputs are the same. With graph optimization off the Casts and Muls run on every call. At
ORT's default options an app's session folds them back at load, except for the weights that
only matrix products read: those reach their Cast through a Reshape to a shape computed from
the input, so they stay float16 in every session. Folded, ORT would hold each of them in
float32 and again prepacked, which cost htdemucs_ft 0.6 GB at default options for no measurable
speed (docs/weight-storage.md). `restore_float32` undoes the pass exactly, which the tests use
to prove it lossless.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.build import partition
from converter.build.graph_pass import GraphPass
from converter.build.runtime_shapes import zero_nodes
from converter.facts import WEIGHT_STORAGES, walk_model

log = logging.getLogger(__name__)

FLOAT16, FLOAT32 = STORAGES = WEIGHT_STORAGES  # their one home: converter.facts

PREFIX = "weight_storage/"
HALF_SUFFIX = "/float16"
SCALE_PREFIX = PREFIX + "scale/"
HELD_PREFIX = PREFIX + "held/"
_CAST, _PRODUCT, _HOLD = PREFIX + "cast/", PREFIX + "product/", PREFIX + "hold/"
# Readers whose float32 weight ORT would keep twice once folded (as is and prepacked).
HELD_READERS = frozenset({"MatMul", "Gemm", "FusedMatMul"})
# A Cast node costs ~100 bytes of file and a kernel launch per run in a session without graph
# optimization; below this many elements the float16 copy saves too little to pay for it.
MIN_ELEMENTS = 256
_SAMPLE = 4096  # elements checked before a candidate factorization is tried on a whole tensor


@dataclass
class StorageReport:
    """What `store_half` did: initializer names by outcome, and float32 bytes before/after."""

    half: list[str] = field(default_factory=list)
    products: list[str] = field(default_factory=list)
    float32: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # of half + products: never folded
    bytes_before: int = 0
    bytes_after: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "float16_initializers": len(self.half),
            "unfolded_products": len(self.products),
            "float32_initializers": len(self.float32),
            "held_float16": len(self.held),
            "initializer_bytes": self.bytes_after,
        }


def exact_in_float16(values: np.ndarray) -> bool:
    """True when float32 `values` survive a round trip through float16 bit for bit (NaN never)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        back = values.astype(np.float16).astype(np.float32)
    return bool(
        np.isfinite(values).all() and np.array_equal(back.view(np.uint32), values.view(np.uint32))
    )


def _broadcast_shape(ndim: int, axis: int, length: int) -> list[int]:
    """Shape of a 1-D factor along `axis` of an `ndim`-D tensor, numpy/ONNX broadcasting."""
    return [length] + [1] * (ndim - 1 - axis)


def _try_factor(product: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray | None:
    """float16 `half` with float32(half * scale along `axis`) == `product` bit for bit, or None."""
    shape = _broadcast_shape(product.ndim, axis, scale.size) if scale.ndim else []
    scale = scale.reshape(shape)
    flat = product.reshape(-1)
    # Most candidates fail; a prefix of the flat tensor tells cheaply.
    stride = int(np.prod(product.shape[axis + 1 :])) if scale.ndim else 1
    index = np.arange(min(_SAMPLE, flat.size))
    prefix_scale = scale.reshape(-1)[(index // stride) % scale.size] if scale.ndim else scale
    for values, factor in ((flat[: index.size], prefix_scale), (product, scale)):
        with np.errstate(all="ignore"):
            half = (values.astype(np.float64) / factor).astype(np.float16)
        if not np.isfinite(half).all():
            return None
        again = half.astype(np.float32) * factor.astype(np.float32)
        if not np.array_equal(again.view(np.uint32), values.view(np.uint32)):
            return None
    return half


def factorize(
    product: np.ndarray, scales: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(float16 factor, float32 scale in broadcast shape) whose float32 product is `product`
    bit for bit, trying each of `scales` (scalars, or 1-D along any axis of matching length)."""
    for scale in scales:
        scale = np.asarray(scale, dtype=np.float32)
        if not np.isfinite(scale).all() or not scale.all():
            continue
        axes = (
            [None]
            if scale.size == 1
            else [a for a, n in enumerate(product.shape) if n == scale.size]
        )
        for axis in axes:
            candidate = scale.reshape(()) if axis is None else scale.reshape(-1)
            half = _try_factor(product, candidate, axis or 0)
            if half is not None:
                shape = [] if axis is None else _broadcast_shape(product.ndim, axis, scale.size)
                return half, candidate.reshape(shape)
    return None


def _referenced(graph: onnx.GraphProto) -> tuple[dict[str, int], set[str], dict[str, set[str]]]:
    """{name: index of the first main-graph node reading it}, names read inside subgraphs, and
    {name: op types of the main-graph nodes reading it}."""
    first: dict[str, int] = {}
    nested: set[str] = set()
    readers: dict[str, set[str]] = {}

    def walk_subgraph(sub: onnx.GraphProto) -> None:
        for node in sub.node:
            nested.update(node.input)
            for attr in node.attribute:
                for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    walk_subgraph(g)

    for index, node in enumerate(graph.node):
        for name in node.input:
            first.setdefault(name, index)
            readers.setdefault(name, set()).add(node.op_type)
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                walk_subgraph(g)
    return first, nested, readers


def _unique_scales(scales: Iterable[np.ndarray]) -> list[np.ndarray]:
    seen, unique = set(), []
    for scale in scales:
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        key = (scale.shape, scale.tobytes())
        if key not in seen:
            seen.add(key)
            unique.append(scale)
    return unique


def store_half(
    model: onnx.ModelProto, scales: Iterable[np.ndarray] = (), hold: bool = True
) -> StorageReport:
    """Rewrite `model`'s float32 initializers in place as described in the module docstring.

    `scales` are the factors the converter folded into weight matrices; each folded product
    that one of them reproduces exactly is stored as its float16 factor times that scale.
    Without `hold`, no weight reaches its Cast through a run-time Reshape (accelerators need
    every shape input constant).
    """
    graph = model.graph
    candidates = _unique_scales(scales)
    first_use, nested, readers = _referenced(graph)
    protected = nested | {i.name for i in graph.input} | {o.name for o in graph.output}
    report = StorageReport()
    before: dict[int, list[onnx.NodeProto]] = {}
    scale_names: dict[tuple, str] = {}
    shape_names: dict[tuple, str] = {}
    new_initializers = []

    def half_source(name: str, dims: tuple, nodes: list[onnx.NodeProto]) -> str:
        """The float16 initializer's name, or a zero-copy Reshape of it that no session folds."""
        if not hold or not readers[name] <= HELD_READERS:
            return name + HALF_SUFFIX
        if dims not in shape_names:
            shape_names[dims] = f"{PREFIX}shape/{len(shape_names)}"
        held = name + HALF_SUFFIX + "/held"
        nodes.append(
            helper.make_node(
                "Reshape",
                [name + HALF_SUFFIX, shape_names[dims]],
                [held],
                name=_HOLD + name,
            )
        )
        report.held.append(name)
        return held

    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT:
            new_initializers.append(tensor)
            continue
        values = numpy_helper.to_array(tensor)
        report.bytes_before += values.nbytes
        name = tensor.name
        if name not in first_use or name in protected or values.size < MIN_ELEMENTS:
            new_initializers.append(tensor)
            report.bytes_after += values.nbytes
            continue
        nodes = before.setdefault(first_use[name], [])
        if exact_in_float16(values):
            new_initializers.append(
                numpy_helper.from_array(values.astype(np.float16), name + HALF_SUFFIX)
            )
            source = half_source(name, values.shape, nodes)
            nodes.append(
                helper.make_node(
                    "Cast",
                    [source],
                    [name],
                    to=TensorProto.FLOAT,
                    name=_CAST + name,
                )
            )
            report.half.append(name)
            report.bytes_after += values.size * 2
            continue
        factored = factorize(values, candidates)
        if factored is None:
            new_initializers.append(tensor)
            report.float32.append(name)
            report.bytes_after += values.nbytes
            continue
        half, scale = factored
        key = (scale.shape, scale.tobytes())
        if key not in scale_names:
            scale_names[key] = f"{SCALE_PREFIX}{len(scale_names)}"
            report.bytes_after += scale.nbytes
        new_initializers.append(numpy_helper.from_array(half, name + HALF_SUFFIX))
        source = half_source(name, values.shape, nodes)
        nodes += [
            helper.make_node(
                "Cast",
                [source],
                [name + "/factor"],
                to=TensorProto.FLOAT,
                name=_CAST + name,
            ),
            helper.make_node(
                "Mul", [name + "/factor", scale_names[key]], [name], name=_PRODUCT + name
            ),
        ]
        report.products.append(name)
        report.bytes_after += values.size * 2
    for (shape, data), scale_name in scale_names.items():
        scale = np.frombuffer(data, dtype=np.float32).reshape(shape)
        new_initializers.append(numpy_helper.from_array(scale, scale_name))
    nodes = []
    if shape_names:
        nodes, zero_initializers = zero_nodes(graph.input[0], HELD_PREFIX)
        new_initializers += zero_initializers
        for dims, shape_name in shape_names.items():
            static = numpy_helper.from_array(np.array(dims, np.int64), shape_name + "/static")
            new_initializers.append(static)
            nodes.append(
                helper.make_node(
                    "Add", [static.name, HELD_PREFIX + "zero"], [shape_name], name=shape_name
                )
            )
    for index, node in enumerate(graph.node):
        nodes += before.get(index, [])
        nodes.append(node)
    del graph.initializer[:]
    graph.initializer.extend(new_initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    log.info(
        "weight storage: %d initializers as float16, %d folded products as float16 factor x scale, "
        "%d stay float32; initializers %.1f -> %.1f MB; %d read only by matrix products stay "
        "float16 in every session",
        len(report.half),
        len(report.products),
        len(report.float32),
        report.bytes_before / 1e6,
        report.bytes_after / 1e6,
        len(report.held),
    )
    for name in report.float32:
        log.info("stays float32 (not exact in float16): %s", name)
    return report


def restore_float32(model: onnx.ModelProto) -> None:
    """Undo `store_half` in place: the float32 initializers back, computed as the graph would.
    A split graph (`converter.build.partition`) is joined first and split again after."""
    was_split = partition.join(model)
    _restore_joined(model)
    if was_split:
        partition.split(model)


def _restore_joined(model: onnx.ModelProto) -> None:
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    produced: dict[str, np.ndarray] = {}
    for node in graph.node:
        if not node.name.startswith((_HOLD, _CAST, _PRODUCT)):
            continue  # the graph's own nodes, and the held shapes' zero
        source = node.input[0]
        if source in produced:
            value = produced.pop(source)
        else:
            value = numpy_helper.to_array(tensors[source])
        if node.name.startswith(_CAST):
            value = value.astype(np.float32)
        elif node.name.startswith(_PRODUCT):
            value = value * numpy_helper.to_array(tensors[node.input[1]])
        produced[node.output[0]] = value
    restored = []
    for tensor in graph.initializer:
        if tensor.name.endswith(HALF_SUFFIX):
            name = tensor.name[: -len(HALF_SUFFIX)]
            tensor = numpy_helper.from_array(produced[name], name)
        elif tensor.name.startswith(PREFIX):
            continue  # scales, held shapes and their zero
        restored.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(restored)
    nodes = [node for node in graph.node if not node.name.startswith(PREFIX)]
    del graph.node[:]
    graph.node.extend(nodes)


def storage_of(model: onnx.ModelProto) -> str:
    """FLOAT16 when `store_half` rewrote the graph, else FLOAT32 (read off the graph itself)."""
    stored = any(node.name.startswith(PREFIX) for _, node in walk_model(model))
    return FLOAT16 if stored else FLOAT32


@dataclass
class StoreHalf(GraphPass):
    """`store_half` with the folded factors' `scales`, `hold` as there; `restore_float32`
    undoes it. `report` holds what it did once applied. Seen as `storage_of` sees it."""

    scales: Sequence[np.ndarray] = ()
    hold: bool = True
    report: StorageReport | None = None
    name: ClassVar[str] = "weight storage"

    def applied(self, model: onnx.ModelProto) -> bool:
        return storage_of(model) == FLOAT16

    def transform(self, model: onnx.ModelProto) -> None:
        self.report = store_half(model, self.scales, self.hold)

    def inverse(self, model: onnx.ModelProto) -> None:
        restore_float32(model)
