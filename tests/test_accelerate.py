"""The accelerators' graph (`convert --target accelerators`) and `invoke ep-report`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.build import accelerate, storage
from converter.build.graph_pass import AppliedTwice
from converter.errors import UserError
from converter.facts import SUM_LEAF, sum_blocks, walk_model
from converter.measure import ep_report
from converter.metadata import WEIGHT_STORAGE, read_metadata
from converter.pipeline import convert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accelerated(small_repo, tmp_path_factory) -> Path:
    """Small htdemucs for accelerators, its storage the target's default (float32)."""
    return convert(
        "htdemucs",
        repo=small_repo,
        out_dir=tmp_path_factory.mktemp("accelerated"),
        target=accelerate.ACCELERATORS,
    )


def test_the_accelerators_graph_is_static_standard_and_flat(accelerated):
    model = onnx.load(accelerated)
    # --target accelerators without --weight-storage: constant float32 weights, as released
    assert read_metadata(model)[WEIGHT_STORAGE] == storage.FLOAT32
    assert TensorProto.FLOAT16 not in {i.data_type for i in model.graph.initializer}
    assert ep_report.nodes_in_subgraphs(model) == 0
    assert not {n.op_type for _, n in walk_model(model)} & {"If", "Loop", "Scan"}
    assert {n.domain for _, n in walk_model(model)} <= {"", "ai.onnx"}  # no FusedConv
    assert ep_report.computed_shape_inputs(model) == []
    assert ep_report.dynamic_values(model) == []
    assert ep_report.computed_weights(model) == []


def test_float16_storage_puts_weights_behind_casts_without_run_time_shapes(accelerated):
    model = onnx.load(accelerated)
    storage.store_half(model, hold=False)
    halves = ep_report.computed_weights(model)
    assert halves and all(w.split()[0] in ep_report.MATRIX_PRODUCTS for w in halves)
    assert ep_report.computed_shape_inputs(model) == []


def test_the_cpu_graph_is_what_accelerators_cannot_take(small_models):
    model = onnx.load(small_models["htdemucs"])
    assert ep_report.nodes_in_subgraphs(model) > 0
    assert ep_report.computed_shape_inputs(model)


def test_ep_report_reads_placements_and_the_checker(accelerated):
    result = ep_report.report(accelerated)
    assert result["nodes_in_subgraphs"] == 0 and result["com_microsoft"] == []
    verdicts = {v["format"]: v for v in result["checker"]}
    assert set(verdicts) == {"NeuralNetwork", "MLProgram"}
    ml = verdicts["MLProgram"]
    assert ml["nodes_in_subgraphs"] == 0
    assert ml["partitions"] <= 20 and ml["supported_nodes"] >= 0.9 * ml["nodes"]
    nn = verdicts["NeuralNetwork"]  # the app's default format: only the position embedding cuts
    assert nn["partitions"] <= 3 and set(nn["unsupported_ops"]) <= {"ai.onnx:Sin", "ai.onnx:Cos"}
    (cpu,) = result["providers"][ep_report.CPU]
    assert cpu["nodes"] == cpu["total_nodes"] > 0
    assert cpu["macs"] == cpu["total_macs"] > 0
    available = set(ort.get_available_providers())
    assert set(result["missing"]) == set(ep_report.PROVIDERS) - available
    text = ep_report.lines(result)
    for provider in result["missing"]:
        assert f"{provider}: not in this onnxruntime build, skipped" in text


def test_placements_of_an_accelerator_come_from_orts_log():
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Relu", ["x"], ["a"], name="a"),
                helper.make_node("Erf", ["a"], ["b"], name="b"),
                helper.make_node("Relu", ["b"], ["y"], name="c"),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )
    log = "\n".join(
        [
            "[V:onnxruntime:, session_state.cc:1601 VerifyEachNodeIsAssignedToAnEp]  Node(s) "
            "placed on [CoreMLExecutionProvider]. Number of nodes: 2",
            "[V:onnxruntime:, session_state.cc:1603 VerifyEachNodeIsAssignedToAnEp]   "
            "CoreML_1_0 (CoreMLExecutionProvider_CoreML_1_0_0)",
            "[V:onnxruntime:, session_state.cc:1603 VerifyEachNodeIsAssignedToAnEp]   "
            "CoreML_1_1 (CoreMLExecutionProvider_CoreML_1_1_0)",
            "[V:onnxruntime:, session_state.cc:1601 VerifyEachNodeIsAssignedToAnEp]  Node(s) "
            "placed on [CPUExecutionProvider]. Number of nodes: 1",
            "[V:onnxruntime:, session_state.cc:1603 VerifyEachNodeIsAssignedToAnEp]   Erf (b)",
            "[I:onnxruntime:, x.cc:1 GetCapability] CoreMLExecutionProvider::GetCapability, "
            "number of partitions supported by CoreML: 2 number of nodes in the graph: 3 "
            "number of nodes supported by CoreML: 2",
        ]
    )
    coreml, cpu = ep_report.placements(model, log, "CoreMLExecutionProvider", {"b": 6, "a": 2})
    assert (coreml.partitions, coreml.nodes, coreml.macs, coreml.total_macs) == (2, 2, 2, 8)
    assert coreml.coreml_log == "2 partitions, 2 nodes"
    assert (cpu.partitions, cpu.nodes, cpu.macs) == (1, 1, 6)


def _padded_gathered() -> onnx.ModelProto:
    """Gather with a scalar (negative) index, zero Pads (grow, crop), Expand, Unsqueeze."""
    consts = {
        "index": np.array(-1, np.int64),
        "pads": np.array([0, 1, 0, 0, -1, 2], np.int64),
        "big_pads": np.array([0, 0, 0, 0, 0, 30000], np.int64),
        "shape": np.array([2, 4, 3, 5], np.int64),
        "axes": np.array([0], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["x", "index"], ["g"], axis=1, name="gather"),
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
        helper.make_node("Pad", ["x", "big_pads"], ["q"], name="big"),
        helper.make_node("Expand", ["x", "shape"], ["e"], name="expand"),
        helper.make_node("Unsqueeze", ["x", "axes"], ["u"], name="unsqueeze"),
    ]
    shapes = {"g": [1, 5], "p": [1, 3, 7], "q": [1, 3, 30005], "e": [2, 4, 3, 5], "u": [1, 1, 3, 5]}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in shapes.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5])],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {"x": x})


def test_rewrites_compute_the_same_values_in_operators_coreml_takes():
    x = np.random.default_rng(0).standard_normal((1, 3, 5)).astype(np.float32)
    model = _padded_gathered()
    before = _run(model, x)
    done = accelerate.rewrite(model)
    assert done == {"Gather": 1, "Pad": 2, "Expand": 1, "Unsqueeze": 1}
    onnx.checker.check_model(model)
    assert not {n.op_type for n in model.graph.node} & {"Gather", "Pad", "Expand", "Unsqueeze"}
    for want, got in zip(before, _run(model, x), strict=True):
        assert want.shape == got.shape and np.array_equal(want, got)
    tiled = [n for n in model.graph.node if n.op_type == "Tile"]
    assert len(tiled) == 1  # the pad block over ZERO_BLOCK_BYTES (the Expand is a Mul by ones)
    with pytest.raises(AppliedTwice, match="accelerator rewrites already"):
        accelerate.Rewrite().apply(model)


def _model(nodes, inputs, outputs, consts) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_reductions_norms_and_transposed_convs_become_operators_neuralnetwork_takes():
    rng = np.random.default_rng(1)
    consts = {
        "axes": np.array([0, 2], np.int64),
        "scale": rng.standard_normal((4, 6)).astype(np.float32),
        "bias": rng.standard_normal((4, 6)).astype(np.float32),
        "w": rng.standard_normal((4, 3, 8)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
    }
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0, name="sum"),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], name="mean"),
        helper.make_node("ReduceMean", ["x"], ["all"], keepdims=0, name="all"),
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["ln"], axis=-2, name="ln"),
        helper.make_node("LayerNormalization", ["x", "b6"], ["ln1"], name="ln1"),
        helper.make_node(
            "ConvTranspose", ["x", "w", "b"], ["up"], strides=[4], pads=[2, 3], name="up"
        ),
        helper.make_node("ConvTranspose", ["x", "w"], ["up0"], strides=[4], name="up0"),
    ]
    consts["b6"] = rng.standard_normal(6).astype(np.float32)
    outputs = {
        "sum": [4],
        "mean": [2, 1, 6],
        "all": [],
        "ln": [2, 4, 6],
        "ln1": [2, 4, 6],
        "up": [2, 3, 23],
        "up0": [2, 3, 28],
    }
    model = _model(nodes, {"x": [2, 4, 6]}, outputs, consts)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32) * 3 + 1
    before = _run(model, x)
    assert accelerate.rewrite(model) == {
        "ReduceSum": 1,
        "ReduceMean": 2,
        "LayerNormalization": 2,
        "ConvTranspose": 2,
    }
    onnx.checker.check_model(model)
    names = {t.name for t in model.graph.initializer}
    assert not names & {"axes", "w"}  # read by the replaced nodes only
    ops = {n.op_type for n in model.graph.node}
    assert ops <= {"Transpose", "Reshape", "MatMul", "Div", "Sub", "Mul", "Add", "Sqrt"} | {
        "Conv",
        "Slice",
    }
    for want, got in zip(before, _run(model, x), strict=True):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_reshape_chains_collapse_where_nothing_else_reads_the_middle():
    consts = {
        "s1": np.array([6, 4], np.int64),
        "s2": np.array([2, 12], np.int64),
        "s3": np.array([-1], np.int64),
        "keep": np.array([0, -1], np.int64),  # 0: copies a dimension of its own input
    }
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["a"], name="a"),
        helper.make_node("Reshape", ["a", "s2"], ["b"], name="b"),
        helper.make_node("Reshape", ["b", "s3"], ["c"], name="c"),
        helper.make_node("Reshape", ["x", "s2"], ["d"], name="d"),
        helper.make_node("Reshape", ["d", "s1"], ["e"], name="e"),  # d is also an output
        helper.make_node("Reshape", ["x", "s1"], ["f"], name="f"),
        helper.make_node("Reshape", ["f", "keep"], ["g"], name="g"),
    ]
    outputs = {"c": [24], "d": [2, 12], "e": [6, 4], "g": [6, 4]}
    model = _model(nodes, {"x": [2, 3, 4]}, outputs, consts)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    before = _run(model, x)
    assert accelerate.collapse_reshapes(model) == 2  # a and b; d feeds an output, g has a 0
    assert [n.name for n in model.graph.node] == ["c", "d", "e", "f", "g"]
    assert model.graph.node[0].input[0] == "x"
    for want, got in zip(before, _run(model, x), strict=True):
        assert np.array_equal(want, got)


def test_erf_becomes_a_tanh_of_a_rational_function_to_float32_accuracy():
    model = _model(
        [helper.make_node("Erf", ["x"], ["y"], name="erf")], {"x": [None]}, {"y": [None]}, {}
    )
    x = np.concatenate(
        [np.linspace(-7, 7, 400001), np.geomspace(1e-30, 1, 2001), -np.geomspace(1e-30, 1, 2001)]
    ).astype(np.float32)
    x = np.concatenate([x, [0.0, np.inf, -np.inf]]).astype(np.float32)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = x.size
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = x.size
    (ort_erf,) = _run(model, x)
    assert accelerate.rewrite(model) == {"Erf": 1}
    assert {n.op_type for n in model.graph.node} == {"Clip", "Mul", "Add", "Div", "Tanh"}
    (got,) = _run(model, x)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    error = np.abs(got - exact)
    assert error.max() <= 2e-7  # ORT's float32 Tanh is a few ulps off; Abramowitz-Stegun: 1.5e-7
    assert (error / ulp).max() <= 7  # a few float32 ulps, relative near 0 too
    assert np.array_equal(np.sign(got), np.sign(exact))
    assert got[-2] == -got[-1] >= np.float32(1 - 2**-24)  # +-inf: within an ulp of +-1
    assert np.abs(ort_erf - exact).max() <= 1.5e-7  # ORT's own float32 Erf, for scale


def test_unknown_target_is_one_clear_error(small_repo, tmp_path):
    with pytest.raises(UserError, match="--target 'gpu' is not one of cpu, accelerators"):
        convert("htdemucs", repo=small_repo, out_dir=tmp_path, target="gpu")


def test_ep_report_task_refuses_a_non_onnx_file_in_one_line(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_text("not a model")
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "ep-report", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"error: {bad} is not an ONNX file" in done.stderr


def _block(length: int) -> int:
    return sum_blocks(length)[1] if length > SUM_LEAF else length


def _levels(length: int) -> list[int]:
    """The row lengths of the levels above the first in the accelerators' sums."""
    levels = []
    while length > SUM_LEAF:
        length = length // _block(length)
        levels.append(length)
    return levels


@pytest.mark.parametrize("length", [346, 2758, 4096])
def test_reductions_sum_uneven_rows_in_a_tree_not_one_long_matmul(length):
    # A steady input after a norm: one large term, then hundreds of equal small ones. A single
    # MatMul by ones adds them one at a time, each addition rounding the same way.
    x = np.full((3, length), -0.137, np.float32)
    x[:, 0] = 22.5 * math.sqrt(length)
    x[1] *= np.float32(1.7)
    x[2, 1::2] = 0.251
    model = _model(
        [helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0, name="sum")],
        {"x": [3, length]},
        {"sum": [3]},
        {"axes": np.array([1], np.int64)},
    )
    assert accelerate.rewrite(model) == {"ReduceSum": 1}
    ops = [n.op_type for n in model.graph.node]
    assert "ReduceSum" not in ops
    # A remainder is split off by one Split: ORT 1.18.1 fuses Slices that partition a tensor
    # into a Split whose sizes it names "splits" twice, and the session fails to load.
    assert "Slice" not in ops
    assert ops.count("Split") == sum(1 for n in (length, *_levels(length)) if n % _block(n))
    (got,) = _run(model, x)
    exact = x.astype(np.float64).sum(axis=1)
    one_at_a_time = np.cumsum(x, axis=1, dtype=np.float32)[:, -1]
    error = np.abs(got - exact).max()
    assert error <= np.abs(one_at_a_time - exact).max() / 8
    assert error <= math.sqrt(length) * np.spacing(np.float32(np.abs(exact).max()))


def test_trained_like_statistics_pass_the_gate_through_the_accelerators_rewrites(
    small_trained_repo, tmp_path
):
    # Conversion runs the float64 validation gate: a single long MatMul per reduction left the
    # small trained-like htdemucs 9 dB under PyTorch float32 on loud clipped noise.
    written = convert(
        "htdemucs",
        repo=small_trained_repo,
        out_dir=tmp_path,
        weight_storage=storage.FLOAT32,
        target=accelerate.ACCELERATORS,
    )
    assert written.is_file()
