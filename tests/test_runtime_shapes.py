"""Shape arithmetic stays a run-time computation: ONNX Runtime cannot fold it, values unchanged."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.build import partition, storage
from converter.build.graph_pass import AppliedTwice
from converter.build.runtime_shapes import PREFIX, Anchor, anchor_shapes
from converter.facts import walk_model
from converter.measure.graphstats import simplified


def _flatten_by_shape() -> onnx.ModelProto:
    """x [1, 2, 8] -> Reshape(x, [Shape(x)[0], -1]): the exporter's way of writing a reshape."""
    consts = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Relu", ["flat"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _reshape_target_is_constant(model: onnx.ModelProto) -> bool:
    reshape = next(
        n for n in model.graph.node if n.op_type == "Reshape" and not n.name.startswith(PREFIX)
    )
    return reshape.input[1] in {i.name for i in model.graph.initializer}


def test_onnxruntime_folds_plain_shape_arithmetic_but_not_anchored():
    plain = _flatten_by_shape()
    assert _reshape_target_is_constant(simplified(plain))

    anchored = _flatten_by_shape()
    assert anchor_shapes(anchored, "x") == 1
    onnx.checker.check_model(anchored, full_check=True)
    assert not _reshape_target_is_constant(simplified(anchored))


@pytest.mark.parametrize("first_sample", [0.5, np.nan, np.inf, -np.inf, -3.4e38])
def test_anchored_graph_computes_the_same_values_for_any_first_sample(first_sample):
    x = np.arange(16, dtype=np.float32).reshape(1, 2, 8) - 4
    x[0, 0, 0] = first_sample
    outputs = []
    for anchor in (False, True):
        model = _flatten_by_shape()
        if anchor:
            anchor_shapes(model, "x")
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        outputs.append(session.run(["y"], {"x": x})[0])
    assert outputs[1].shape == (1, 16)
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_unknown_input_and_second_pass_are_refused():
    model = _flatten_by_shape()
    with pytest.raises(ValueError, match="'audio' is not an input"):
        anchor_shapes(model, "audio")
    Anchor("x").apply(model)
    with pytest.raises(AppliedTwice, match="anchor shapes already"):
        Anchor("x").apply(model)


def test_converted_file_gives_load_time_folding_nothing_to_fold(small_models):
    """At ORT's default options, as apps open it, no shape of the graph becomes a constant."""
    shipped = onnx.load(small_models["htdemucs"])
    folded = simplified(shipped)
    # ORT turns the else branches' empty Constants (`converter.build.partition`) into initializers.
    placeholder = re.compile(re.escape(partition.PREFIX) + r"\d+/unused/")
    new = {n for n in _initializers(folded) - _initializers(shipped) if not placeholder.match(n)}
    # Only the float16 weights' Casts (and factor x scale products) fold back, as they should.
    stored = {n.output[0] for _, n in walk_model(shipped) if n.name.startswith(storage.PREFIX)}
    assert stored and new - stored == set()
    assert any(n.name.startswith(PREFIX) for _, n in walk_model(shipped))


def _initializers(model: onnx.ModelProto) -> set[str]:
    """Names of the initializers of the main graph and of every `If` body."""
    graphs = [model.graph] + [
        a.g
        for _, n in walk_model(model)
        for a in n.attribute
        if a.type == onnx.AttributeProto.GRAPH
    ]
    return {i.name for g in graphs for i in g.initializer}
