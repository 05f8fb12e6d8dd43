"""The graph passes' one shape (`converter.build.graph_pass`): each refuses a second
application, `undo` inverts `apply` where it exists, and `pipeline.passes` runs them in the
order DEVELOPERS.md gives. A hand-built graph, no conversion: part of the fast tier."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import pipeline
from converter.build import accelerate, partition, storage
from converter.build.graph_pass import AppliedTwice, GraphPass
from converter.build.optimize import Optimize
from converter.build.runtime_shapes import Anchor, Settle
from converter.facts import IR_VERSION, OPSET, REPO_ROOT, SPECTRAL_CORE, WAVEFORM

INPUT_OUTPUT = (("x", [1, 2, 16]), ("y", [1, 16]))


def _graph() -> onnx.ModelProto:
    """x [1, 2, 16] through what every pass rewrites: a Constant node, shape arithmetic, an
    exporter's run-time zero (`x < -inf`), a float16-exact weight read by a MatMul, a Gather
    by a scalar index."""
    ints = {"zero": [0], "one": [1], "ones": [1, 1, 1], "zeros": [0, 0, 0]}
    initializers = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    initializers += [
        numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf"),
        numpy_helper.from_array(np.array(1, np.int64), "index"),
        numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(16, 16) / 8, "weight"),
    ]
    rest = numpy_helper.from_array(np.array([-1], np.int64))
    nodes = [
        helper.make_node("Constant", [], ["rest"], name="rest", value=rest),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"], name="batch"),
        helper.make_node("Concat", ["batch", "rest"], ["target"], name="target", axis=0),
        helper.make_node("MatMul", ["x", "weight"], ["mixed"], name="mixed"),
        helper.make_node("Gather", ["mixed", "index"], ["row"], name="row", axis=1),
        helper.make_node("Reshape", ["row", "target"], ["flat"], name="flat"),
        helper.make_node("Slice", ["x", "zeros", "ones"], ["first"], name="first"),
        helper.make_node("Less", ["first", "minus_inf"], ["never"], name="never"),
        helper.make_node("Cast", ["never"], ["nothing"], name="nothing", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["nothing", "one"], ["zero_of_x"], name="zero_of_x"),
        helper.make_node("Add", ["flat", "zero_of_x"], ["y"], name="y"),
    ]
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in INPUT_OUTPUT)
    graph = helper.make_graph(nodes, "passes", [x], [y], initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def _run(model: onnx.ModelProto) -> np.ndarray:
    x = np.linspace(-2, 2, 32, dtype=np.float32).reshape(1, 2, 16)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


PASSES = [
    Anchor("x"),
    Settle(),
    Optimize(),
    Optimize(fusions=False),
    accelerate.Rewrite(),
    storage.StoreHalf(),
    partition.Split(max_nodes=3),
]


@pytest.mark.parametrize("graph_pass", PASSES, ids=repr)
def test_each_pass_refuses_a_second_application(graph_pass: GraphPass):
    fresh = _graph()
    assert not graph_pass.applied(fresh)
    once = graph_pass.apply(fresh)
    assert graph_pass.applied(once)
    onnx.checker.check_model(once, full_check=True)
    np.testing.assert_array_equal(_run(once), _run(_graph()))
    with pytest.raises(AppliedTwice, match=f"went through {graph_pass.name} already"):
        graph_pass.apply(once)


def test_undo_inverts_apply_exactly_where_a_pass_has_one():
    reversible = [p for p in PASSES if p.reversible]
    assert [p.name for p in reversible] == ["weight storage", "split"]
    for graph_pass in reversible:
        once = graph_pass.apply(_graph())
        assert once.SerializeToString() != _graph().SerializeToString()
        undone = graph_pass.undo(once)
        assert undone.SerializeToString() == _graph().SerializeToString()
        with pytest.raises(ValueError, match=f"did not go through {graph_pass.name}"):
            graph_pass.undo(undone)
    with pytest.raises(NotImplementedError, match="optimize has no undo"):
        Optimize().undo(Optimize().apply(_graph()))


def test_the_storage_pass_keeps_its_report():
    graph_pass = storage.StoreHalf()
    graph_pass.apply(_graph())
    assert graph_pass.report is not None and graph_pass.report.half == ["weight"]


def _documented_order() -> dict[str, list[str]]:
    """DEVELOPERS.md's "Graph passes" table: target -> pass names in order."""
    text = (REPO_ROOT / "DEVELOPERS.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| ([a-z →]+) \|$", text, re.MULTILINE)
    return {target: names.split(" → ") for target, names in rows}


@pytest.mark.parametrize("interface", [WAVEFORM, SPECTRAL_CORE])
@pytest.mark.parametrize("weight_storage", storage.STORAGES)
def test_pipeline_runs_the_passes_in_the_documented_order(interface, weight_storage):
    documented = _documented_order()
    assert sorted(documented) == sorted(accelerate.TARGETS)
    for target, names in documented.items():
        if weight_storage == storage.FLOAT32:
            names = [n for n in names if n != storage.StoreHalf.name]
        listed = pipeline.passes(interface, target, weight_storage)
        assert [p.name for p in listed] == names
