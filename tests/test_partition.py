"""The graph split into `If` bodies (`converter.build.partition`): exact, undoable, and kept
by ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converter import metadata as meta
from converter.build import partition
from converter.build.graph_pass import AppliedTwice


@pytest.fixture(scope="module")
def shipped(small_models) -> onnx.ModelProto:
    return onnx.load(small_models["htdemucs"])


def _bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    return [
        a.g
        for n in model.graph.node
        if n.op_type == "If"
        for a in n.attribute
        if a.name == "then_branch"
    ]


def test_converted_files_are_split_into_bodies_of_bounded_size(shipped):
    bodies = _bodies(shipped)
    assert len(bodies) >= 2
    assert all(len(body.node) <= partition.MAX_NODES for body in bodies)
    # The main graph holds the condition and the Ifs, nothing else.
    assert all(n.name.startswith(partition.PREFIX) for n in shipped.graph.node)


def test_join_and_split_are_exact_inverses(shipped):
    joined = onnx.ModelProto()
    joined.CopyFrom(shipped)
    assert partition.join(joined) == len(_bodies(shipped))
    assert not any(n.op_type == "If" for n in joined.graph.node)
    assert not any(t.name.startswith(partition.PREFIX) for t in joined.graph.initializer)
    assert partition.join(joined) == 0  # nothing left to join
    again = onnx.ModelProto()
    again.CopyFrom(joined)
    assert partition.split(again) == len(_bodies(shipped))
    assert meta.fingerprint(again) == meta.fingerprint(shipped)
    with pytest.raises(AppliedTwice, match="split already"):
        partition.Split().apply(again)


def test_a_small_graph_is_left_whole(shipped):
    joined = onnx.ModelProto()
    joined.CopyFrom(shipped)
    partition.join(joined)
    count = len(joined.graph.node)
    assert partition.split(joined, max_nodes=count) == 0
    assert len(joined.graph.node) == count


def _session(model: onnx.ModelProto, optimize: bool, saved: str = "") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if saved:
        options.optimized_model_filepath = saved
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(model: onnx.ModelProto, audio: np.ndarray, optimize: bool, saved: str = "") -> np.ndarray:
    return _session(model, optimize, saved).run(["stems"], {"audio": audio})[0]


def test_the_split_graph_computes_the_same_bits_and_survives_an_apps_optimizer(shipped, tmp_path):
    joined = onnx.ModelProto()
    joined.CopyFrom(shipped)
    partition.join(joined)
    shape = [d.dim_value for d in shipped.graph.input[0].type.tensor_type.shape.dim]
    audio = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.1
    assert np.array_equal(_run(shipped, audio, False), _run(joined, audio, False))
    saved = tmp_path / "optimized.onnx"
    _run(shipped, audio, True, str(saved))
    # ORT's default level (an app's session) neither folds the condition nor inlines a body.
    kept = onnx.load(saved)
    assert sum(n.op_type == "If" for n in kept.graph.node) == len(_bodies(shipped))


def _toy() -> onnx.ModelProto:
    """Nine nodes with what a split must carry across bodies: an int64 shape, a rank-0 sum, a
    graph output read later, left-out optional outputs and inputs, and a stored weight's Cast."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full([1, 2, 8], 0.5, np.float16), "w16")
    top = numpy_helper.from_array(np.array(2.0, np.float32), "top")
    nodes = [
        helper.make_node("Shape", ["audio"], ["shape"], name="shape"),
        helper.make_node("ReduceSum", ["audio"], ["total"], name="total", keepdims=0),
        helper.make_node("Cast", ["w16"], ["w"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["audio", "w"], ["scaled"], name="scaled"),
        helper.make_node("Dropout", ["scaled"], ["relu", ""], name="relu"),  # no mask
        helper.make_node("Clip", ["relu", "", "top"], ["clipped"], name="clipped"),
        helper.make_node("Reshape", ["clipped", "shape"], ["back"], name="back"),
        helper.make_node("Add", ["back", "total"], ["sum"], name="sum"),
        helper.make_node("Neg", ["sum"], ["stems"], name="stems"),
    ]
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 2, 8])
    outputs = [
        helper.make_tensor_value_info("stems", TensorProto.FLOAT, [1, 2, 8]),
        helper.make_tensor_value_info("relu", TensorProto.FLOAT, [1, 2, 8]),
    ]
    graph = helper.make_graph(nodes, "toy", [audio], outputs, [weight, top])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _outputs(model: onnx.ModelProto, audio: np.ndarray, optimize: bool) -> list[np.ndarray]:
    return _session(model, optimize).run(None, {"audio": audio})


def test_a_split_carries_every_kind_of_value_and_joins_back_to_the_same_bytes():
    original = _toy()
    model = onnx.ModelProto()
    model.CopyFrom(original)
    assert partition.split(model, max_nodes=3) >= 3
    onnx.checker.check_model(model, full_check=True)
    bodies = _bodies(model)
    # The Cast of the stored weight stays in the body of the Mul that reads it.
    home = {n.name: b for b, body in enumerate(bodies) for n in body.node}
    assert home["cast"] == home["scaled"]
    audio = np.random.default_rng(1).standard_normal([1, 2, 8]).astype(np.float32)
    for optimize in (False, True):
        got, want = _outputs(model, audio, optimize), _outputs(original, audio, False)
        assert len(got) == len(want) == 2
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert partition.join(model) == len(bodies)
    assert model.SerializeToString() == original.SerializeToString()


def test_what_the_split_cannot_carry_is_refused():
    from onnx import helper

    nested = _toy()
    branch = helper.make_graph([], "branch", [], [nested.graph.output[0]])
    nested.graph.node.append(
        helper.make_node(
            "If", ["cond"], ["late"], name="nested", then_branch=branch, else_branch=branch
        )
    )
    with pytest.raises(ValueError, match="subgraphs"):
        partition.split(nested, max_nodes=3)
    model = _toy()
    partition.split(model, max_nodes=3)
    model.graph.node.append(onnx.helper.make_node("Identity", ["stems"], ["copy"], name="late"))
    with pytest.raises(ValueError, match="added after the split"):
        partition.join(model)
