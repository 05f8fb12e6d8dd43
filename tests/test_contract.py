"""The static runtime-contract gate (converter.gate.contract) and the load-test helpers it shares.

Built on hand-made models (`contract_selftest.tiny_model`) so the suite stays fast; the
per-ORT-version load tests through nox are in test_nox_contract.py.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import metadata
from converter.build import optimize
from converter.errors import UserError
from converter.gate import contract, contract_selftest, ortcheck

ROOT = Path(__file__).resolve().parent.parent


def _rules(model: onnx.ModelProto, path: Path | None = None) -> set[str]:
    return {violation.rule for violation in contract.violations(model, path)}


def _write(model: onnx.ModelProto, path: Path) -> Path:
    contract_selftest.write_model(model, path)
    return path


def test_compliant_tiny_model_passes_every_rule(tmp_path):
    path = _write(contract_selftest.tiny_model(), tmp_path / "tiny.onnx")
    assert contract.violations(onnx.load(str(path)), path) == []
    contract.gate(path)


def test_six_stem_model_with_short_segment_takes_shapes_from_metadata(tmp_path):
    stems = ("drums", "bass", "other", "vocals", "guitar", "piano")
    model = contract_selftest.tiny_model(stems=stems, segment=1000, channels=2)
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 6
    contract.gate(_write(model, tmp_path / "six.onnx"))


ALL_CASES = {
    name: (factory, case)
    for factory, cases in contract_selftest.SELF_TESTS
    for name, case in cases.items()
}


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_each_self_test_case_trips_exactly_its_own_rule(tmp_path, case):
    factory, (rule, break_model, break_files) = ALL_CASES[case]
    model = factory()
    if break_model:
        break_model(model)
    path = _write(model, tmp_path / f"{case}.onnx")
    if break_files:
        break_files(path)
    assert _rules(onnx.load(str(path)), path) == {rule}
    with pytest.raises(contract.ContractError, match=rf"\[{rule}\]"):
        contract.gate(path)


@pytest.mark.parametrize(
    ("case", "offender"),
    [
        ("nchwc_node", "com.microsoft.nchwc:ReorderOutput (node 'nchwc_reorder' in main graph)"),
        ("nchwc_in_function", "in function openkara.selftest:Reorder"),
        ("stray_opset_import", "'ai.onnx.ml' v5"),
        ("ir_version_11", "ir_version 11 > 9"),
        ("opset_18", "ai.onnx v18, must be 17"),
        ("missing_metadata", "'openkara.provenance'"),
        ("wrong_shape", "[1, 2, 'time']"),
    ],
)
def test_violation_names_the_offending_node_or_value(case, offender):
    rule, break_model, _ = contract_selftest.SELF_TEST_CASES[case]
    model = contract_selftest.tiny_model()
    break_model(model)
    details = [violation.detail for violation in contract.violations(model)]
    assert any(offender in detail for detail in details), details


def test_self_test_refuses_every_violation_and_passes_the_compliant_model(tmp_path):
    report = contract_selftest.self_test(tmp_path)
    waveform = len(contract_selftest.SELF_TEST_CASES)
    assert report[0] == "compliant tiny_model: passes"
    assert report[waveform + 1] == "compliant tiny_spectral_model: passes"
    assert len(report) == 2 + len(ALL_CASES)
    assert all("refused, [" in line for line in report if not line.startswith("compliant"))
    assert (tmp_path / "nchwc_node.onnx").is_file()


def test_self_test_fails_loudly_when_a_rule_stops_refusing(tmp_path, monkeypatch):
    # A gate that forgot the IR rule must make the self-test fail, naming the case.
    monkeypatch.setattr(contract, "MAX_IR_VERSION", 11)
    with pytest.raises(contract.ContractError, match="ir_version_11: expected only"):
        contract_selftest.self_test(tmp_path)


def test_gate_lists_every_violation_in_one_error(tmp_path):
    model = contract_selftest.tiny_model()
    model.ir_version = 11
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 5))
    path = _write(model, tmp_path / "bad.onnx")  # also stale: stamped before the edits
    with pytest.raises(contract.ContractError) as info:
        contract.gate(path)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    for expected in ("[ir_version]", "[opset_import]", "[cache_key]", "3 violation(s)"):
        assert expected in message


def test_nchwc_node_inside_a_nested_subgraph_is_refused():
    model = contract_selftest.tiny_model()
    gelu = model.graph.node[-1]
    gelu.output[0] = "gelu_out"
    branch_shape = [1, 4, 2, 4096]

    def branch(name: str, nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, branch_shape)
        return helper.make_graph(nodes, name, [], [out])

    then_branch = branch(
        "then",
        [
            helper.make_node(
                "ReorderOutput", ["gelu_out"], ["then_out"], "hidden", "", "com.microsoft.nchwc"
            )
        ],
    )
    else_branch = branch("else", [helper.make_node("Identity", ["gelu_out"], ["else_out"])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    model.graph.node.append(
        helper.make_node(
            "If",
            ["flag"],
            [contract.OUTPUT_NAME],
            name="branchy",
            then_branch=then_branch,
            else_branch=else_branch,
        )
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft.nchwc", 1))
    found = [v for v in contract.violations(model) if v.rule == "domain"]
    assert len(found) == 1
    assert "'hidden'" in found[0].detail and "If 'branchy'.then_branch" in found[0].detail
    # The optimizer's own guard sees it too, before anything is written.
    assert optimize.forbidden_domains(model) == ["com.microsoft.nchwc"]
    assert optimize.forbidden_domains(contract_selftest.tiny_model()) == []


def test_com_microsoft_op_off_the_allow_list_is_refused_and_allowed_one_passes():
    model = contract_selftest.tiny_model()
    assert model.graph.node[-1].domain == "com.microsoft"  # Gelu: allowed
    assert "domain" not in _rules(model)
    model.graph.node[-1].op_type = "MatMulFpQ4"  # registered on x86 builds, not allow-listed
    details = [v.detail for v in contract.violations(model) if v.rule == "domain"]
    assert details and "com.microsoft:MatMulFpQ4" in details[0] and "allow-list" in details[0]


def test_allow_list_has_cpu_kernels_in_the_installed_onnxruntime():
    assert ortcheck.missing_allowed_kernels() == []


def test_metadata_values_are_checked():
    model = contract_selftest.tiny_model()
    entries = metadata.read_metadata(model)
    entries.pop(metadata.CACHE_KEY)
    metadata.stamp(
        model,
        {**entries, metadata.STEMS: "drums,drums,other,vocals", metadata.SEGMENT_SAMPLES: "x"},
    )
    details = [v.detail for v in contract.violations(model) if v.rule == "metadata"]
    assert any("openkara.stems='drums,drums,other,vocals'" in d for d in details)
    assert any("openkara.segment_samples='x' is not a positive integer" in d for d in details)


def test_shape_that_disagrees_with_metadata_is_refused():
    model = contract_selftest.tiny_model(segment=4096)
    entries = metadata.read_metadata(model)
    entries.pop(metadata.CACHE_KEY)
    metadata.stamp(model, {**entries, metadata.SEGMENT_SAMPLES: "343980"})
    details = [v.detail for v in contract.violations(model)]
    assert details == [
        "input 'audio' has shape [1, 2, 4096], metadata says [1, 2, 343980]",
        "output 'stems' has shape [1, 4, 2, 4096], metadata says [1, 4, 2, 343980]",
    ]


def test_missing_and_misnamed_sidecars_are_refused(tmp_path):
    path = _write(contract_selftest.tiny_model(), tmp_path / "tiny.onnx")
    side = metadata.sidecar_path(path)
    side.write_text(metadata.sidecar_text(tmp_path / "other.onnx", metadata.sha256_file(path)))
    assert [v.detail for v in contract.violations(onnx.load(str(path)), path)] == [
        "tiny.onnx.sha256 names 'other.onnx', not 'tiny.onnx'"
    ]
    side.unlink()
    assert _rules(onnx.load(str(path)), path) == {"sidecar"}


def test_unreadable_and_absent_files_are_user_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00 not protobuf")
    with pytest.raises(contract.ContractError, match="is not an ONNX file"):
        contract.gate(junk)
    with pytest.raises(contract.ContractError, match="no such file"):
        contract.gate(tmp_path / "absent.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(contract.ContractError, match=r"empty \(0 bytes\), not an ONNX file"):
        contract.gate(tmp_path / "empty.onnx")
    with pytest.raises(contract.ContractError, match="is a directory"):
        contract.gate(tmp_path)


def test_gate_files_takes_absolute_globs_like_relative_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _write(contract_selftest.tiny_model(), Path("models/good.onnx"))
    assert contract.gate_files([str(tmp_path / "models" / "*.onnx")]) == [tmp_path / good]
    assert contract.gate_files(["models/*.onnx"]) == [good]


def test_gate_files_expands_globs_and_reports_every_bad_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _write(contract_selftest.tiny_model(), Path("models/good.onnx"))
    assert contract.gate_files(None) == [good]
    bad = contract_selftest.tiny_model()
    bad.ir_version = 10
    _write(bad, Path("models/bad.onnx"))
    with pytest.raises(contract.ContractError) as info:
        contract.gate_files(["models/*.onnx"])
    assert "models/bad.onnx breaks" in str(info.value) and "good.onnx" not in str(info.value)
    with pytest.raises(contract.ContractError, match="invoke convert --model htdemucs"):
        contract.gate_files(["nothing/*.onnx"])


def _conv_model() -> onnx.ModelProto:
    """A 2-D Conv+Relu net big enough for ORT's NCHWc layout transform (16 channels)."""
    weight = np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32, 32])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _saved_by_ort(model: onnx.ModelProto, level: str, tmp_path: Path) -> onnx.ModelProto:
    source, saved = tmp_path / "in.onnx", tmp_path / f"{level}.onnx"
    onnx.save(model, str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(saved))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="ORT inserts NCHWc nodes only on x86-64",
)
def test_file_saved_at_ort_enable_all_is_refused(tmp_path):
    saved = _saved_by_ort(_conv_model(), "ORT_ENABLE_ALL", tmp_path)
    found = contract.violations(saved)
    nchwc = [v for v in found if v.rule == "domain" and "com.microsoft.nchwc:" in v.detail]
    assert nchwc, [str(v) for v in found]
    # ORT also writes every domain it knows into opset_import.
    assert any(v.rule == "opset_import" and "'ai.onnx.ml'" in v.detail for v in found)


def test_file_saved_at_extended_has_only_allowed_domains_but_stray_imports(tmp_path):
    saved = _saved_by_ort(_conv_model(), "ORT_ENABLE_EXTENDED", tmp_path)
    assert any(node.domain == "com.microsoft" for node in saved.graph.node)  # FusedConv
    rules = {v.rule for v in contract.violations(saved)}
    assert "domain" not in rules
    assert "opset_import" in rules  # until the optimize step prunes them


def test_invoke_contract_cli(tmp_path):
    good = _write(contract_selftest.tiny_model(), tmp_path / "good.onnx")
    bad = contract_selftest.tiny_model()
    bad.opset_import.append(helper.make_opsetid("com.ms.internal.nhwc", 1))
    bad_path = _write(bad, tmp_path / "bad.onnx")

    def invoke(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "invoke", "contract", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )

    passed = invoke("--file", str(good))
    assert passed.returncode == 0 and f"{good}: ok" in passed.stdout
    refused = invoke("--file", str(good), "--file", str(bad_path))
    assert refused.returncode == 1
    assert (
        "error:" in refused.stderr
        and "'com.ms.internal.nhwc' v1, which no node uses" in refused.stderr
    )
    self_test = invoke("--self-test")
    assert self_test.returncode == 0, self_test.stderr
    assert "every rule refuses its violation" in self_test.stdout


# --- ortcheck helpers (the standalone load test), run here against the installed ORT ---


def test_compare_applies_the_recorded_gate():
    ref = np.zeros((1, 4, 2, 8), dtype=np.float64)
    bound = np.array([1e-10, 1e-10, 1e-9, 1e-10])
    assert ortcheck.compare(ref.copy(), ref, bound) is None
    assert "shape" in ortcheck.compare(ref[:, :2], ref, bound)
    broken = ref.copy()
    broken[0, 3, 0, 0] = np.nan
    assert ortcheck.compare(broken, ref, bound) == "output has non-finite values"
    off = ref.copy()
    off[0, 2] = 3e-5  # MSE 9e-10 on stem 2: within its own bound
    assert ortcheck.compare(off, ref, bound) is None
    off[0, 1] = 9e-6  # MSE 8.1e-11 on stem 1: within its bound
    assert ortcheck.compare(off, ref, bound) is None
    off[0, 2] = 1e-4  # MSE 1e-8 on stem 2 only
    assert ortcheck.compare(off, ref, bound).startswith("stem 2 MSE 1.000e-08 > 1.000e-09")


def test_check_model_runs_both_optimization_levels_against_the_reference(tmp_path):
    path = contract_selftest.write_tiny(tmp_path / "tiny.onnx")
    row = ortcheck.check_model(path, ort.__version__)
    assert row["status"] == "ok" and row["inputs"] == ["uniform noise"]
    assert row["load_s"] is not None and row["default_run_s"] is not None
    assert row["margin_db"] > 0
    assert row["sha256"] == metadata.sha256_file(path)


def test_check_model_reports_a_missing_reference_and_a_wrong_one(tmp_path):
    path = contract_selftest.write_tiny(tmp_path / "tiny.onnx")
    reference = ortcheck.reference_path(path)
    names, audio, stems, bound = ortcheck.read_reference(reference)
    np.savez(reference, inputs=names, audio=audio, stems=stems * 1.01, max_mse=bound)
    assert ortcheck.check_model(path, "x")["status"].startswith("[disabled] uniform noise: stem ")
    np.savez(reference, audio=audio[0], stems=stems[0], max_mse=bound[0])  # one input: older
    status = ortcheck.check_model(path, "x")["status"]
    assert "predates the float64 gate on several inputs" in status
    reference.unlink()
    assert ortcheck.check_model(path, "x")["status"].startswith(
        "no reference output tiny.reference.npz"
    )


def test_summary_merges_versions_and_drops_rows_for_changed_files(tmp_path):
    path = contract_selftest.write_tiny(tmp_path / "tiny.onnx")
    results = tmp_path / ortcheck.RESULTS_SUBDIR
    results.mkdir()
    for version, missing in (("1.9.0", ["QuickGelu"]), ("1.17.3", [])):
        row = ortcheck.check_model(path, version)
        record = {"ort": version, "missing_kernels": missing, "rows": [row]}
        (results / f"{version}.json").write_text(json.dumps(record))
    rows, missing = ortcheck.merge_results(tmp_path)
    assert [row["ort"] for row in rows] == ["1.9.0", "1.17.3"]  # numeric, not text, order
    assert missing == {"1.9.0": ["QuickGelu"]}
    table = ortcheck.format_table(rows)
    assert table.splitlines()[0].startswith("ORT ") and "tiny.onnx" in table and "ok" in table
    assert ortcheck.summarize(tmp_path) == 1  # the missing kernel fails the run
    summary = json.loads((tmp_path / ortcheck.SUMMARY_NAME).read_text())
    assert set(summary[0]) >= {"ort", "model", "status", "load_s", "run_s"}
    contract_selftest.write_model(
        contract_selftest.tiny_model(segment=2048), path
    )  # rewritten after the test
    assert ortcheck.merge_results(tmp_path)[0] == []


def test_testing_one_file_after_another_keeps_both_rows(tmp_path):
    first = contract_selftest.write_tiny(tmp_path / "first.onnx")
    second = contract_selftest.write_tiny(tmp_path / "second.onnx")
    for paths in ([first], [second], [second]):  # the second file twice: its row replaced
        assert ortcheck.run_version(paths, tmp_path, None) == 0
    rows, _ = ortcheck.merge_results(tmp_path)
    assert sorted(Path(row["path"]).name for row in rows) == ["first.onnx", "second.onnx"]


def test_no_model_to_test_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="invoke convert --model htdemucs"):
        ortcheck.resolve_models([])
    with pytest.raises(SystemExit, match="no such model file: gone.onnx"):
        ortcheck.resolve_models(["gone.onnx"])
