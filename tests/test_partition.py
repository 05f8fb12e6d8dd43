"""The graph split into `If` bodies (`converter.partition`): exact, undoable, and kept by ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converter import metadata as meta
from converter import partition


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
    with pytest.raises(ValueError, match="split already"):
        partition.split(again)


def test_a_small_graph_is_left_whole(shipped):
    joined = onnx.ModelProto()
    joined.CopyFrom(shipped)
    partition.join(joined)
    count = len(joined.graph.node)
    assert partition.split(joined, max_nodes=count) == 0
    assert len(joined.graph.node) == count


def _run(model: onnx.ModelProto, audio: np.ndarray, optimize: bool, saved: str = "") -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if saved:
        options.optimized_model_filepath = saved
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["stems"], {"audio": audio})[0]


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
