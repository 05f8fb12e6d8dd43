"""The accelerators' graph (`convert --target accelerators`) and `invoke ep-report`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import accelerate, ep_report, storage
from converter.errors import UserError
from converter.facts import walk_model
from converter.pipeline import convert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accelerated(small_repo, tmp_path_factory) -> Path:
    """Small htdemucs for accelerators, float32 storage (constant weights)."""
    return convert(
        "htdemucs",
        repo=small_repo,
        out_dir=tmp_path_factory.mktemp("accelerated"),
        weight_storage=storage.FLOAT32,
        target=accelerate.ACCELERATORS,
    )


def test_the_accelerators_graph_is_static_standard_and_flat(accelerated):
    model = onnx.load(accelerated)
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
        "big_pads": np.array([0, 0, 0, 0, 0, 20000], np.int64),
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
    shapes = {"g": [1, 5], "p": [1, 3, 7], "q": [1, 3, 20005], "e": [2, 4, 3, 5], "u": [1, 1, 3, 5]}
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
    assert len(tiled) == 2  # the Expand, and the pad block over ZERO_BLOCK_BYTES
    with pytest.raises(ValueError, match="already"):
        accelerate.rewrite(model)


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
