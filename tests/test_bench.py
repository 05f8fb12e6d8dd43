"""`invoke bench` on a small random-weight model: every field present and sane, no timing gates.

Timings depend on the machine; the performance targets are checked by reading `invoke bench`'s
output, never by a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.errors import UserError
from converter.gate import accuracy, validation
from converter.measure import bench, graphstats, pair_bench


@pytest.fixture(scope="module")
def results(small_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    produced = bench.bench("htdemucs", repo=small_repo, runs=1, rounds=2, profile=5, out_dir=out)
    written = json.loads((out / "htdemucs.json").read_text())
    assert written == json.loads(json.dumps(produced))  # the JSON is the whole result
    return produced


def test_latency_rss_and_load_of_every_engine_in_alternating_rounds(results):
    assert results["threads"] >= 1 and results["runs"] == 1 and results["warmups"] == 2
    assert results["rounds"] == 2
    torch_run = results["torch"]
    assert len(torch_run["latencies_s"]) == 2 and torch_run["median_s"] > 0
    assert torch_run["threads"] == results["threads"]
    assert set(results["onnxruntime"]) == set(bench.ORT_CONFIGS)
    for run in [torch_run, *results["onnxruntime"].values()]:
        assert len(run["rounds"]) == 2
        for child in run["rounds"]:
            # Each engine ran in its own process: its peak is its own, not the parent's; the
            # peak after load + two segments is read before the timed runs.
            assert 50 < child["peak_rss_two_segments_mb"] <= child["peak_rss_mb"] < 8000
            assert child["wall_s"] > max(child["latencies_s"]) and child["load_s"] > 0
            assert len(child["probe_gflops"]) == 2 and min(child["probe_gflops"]) > 1
        assert run["peak_rss_mb"] == max(c["peak_rss_mb"] for c in run["rounds"])
    for run in results["onnxruntime"].values():
        assert run["ratio_vs_torch"] == pytest.approx(run["median_s"] / torch_run["median_s"])
        assert len(run["round_ratios"]) == 2 and min(run["round_ratios"]) > 0


def test_targets_at_both_app_settings(results):
    names = [t["name"] for t in results["targets"]]
    assert len(names) == 3 * len(bench.TARGET_CONFIGS) == len(set(names))
    for config in bench.TARGET_CONFIGS:
        run = results["onnxruntime"][config]
        by_name = {t["name"]: t for t in results["targets"] if t["name"].endswith(config)}
        ratio, rss, load = by_name.values()
        assert ratio["value"] == run["ratio_vs_torch"] and ratio["target"] == bench.TARGET_RATIO
        assert rss["value"] == pytest.approx(run["peak_rss_two_segments_mb"] / 1024)
        assert rss["target"] == pytest.approx(results["torch"]["peak_rss_two_segments_mb"] / 1024)
        assert load["value"] == run["load_s"] and load["target"] == bench.TARGET_LOAD_S
        assert all(t["met"] == (t["value"] <= t["target"]) for t in (ratio, rss, load))


def test_sizes_macs_conversion_and_bound(results):
    assert results["file_bytes"] > 0 and results["fp32_weight_bytes"] > 0
    # Small htdemucs: ~1.2 GMAC of network per segment, the DFT matmuls well below that.
    assert 0 < results["gmac_spectral"] < results["gmac_network"] < 10
    assert results["conversion"]["wall_s"] > 0 and results["conversion"]["peak_rss_mb"] > 100
    sgemm = results["sgemm_gflops"]
    assert set(sgemm) == {"before", "after"}
    assert all(set(g) == {"numpy", "onnxruntime"} and min(g.values()) > 1 for g in sgemm.values())
    best = max(g for when in sgemm.values() for g in when.values())
    gmac = results["gmac_spectral"] + results["gmac_network"]
    assert results["bound_s"] == pytest.approx(gmac / (best / 2))
    assert results["speed_drift"] > 0
    assert results["machine"]["cores"] and results["machine"]["versions"]["onnxruntime"]


def test_profile_breakdown(results):
    profile = results["profile"]
    assert profile["config"] == bench.PROFILED_CONFIG
    assert len(profile["top_ops"]) == 5
    shares = [op["share"] for op in profile["top_ops"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    assert set(profile["by_part_s"]) == {"spectral", "network"}
    assert 0 < profile["kernel_s"] <= profile["run_s"] * 1.01
    assert sum(profile["by_part_s"].values()) == pytest.approx(profile["kernel_s"])
    gemm = sum(op["s"] for op in profile["top_ops"] if op["op"] in graphstats.GEMM_OPS)
    assert gemm <= profile["gemm_s"] and 0 < profile["gemm_s"] < profile["kernel_s"]
    assert profile["gemm_vs_torch"] == pytest.approx(
        profile["gemm_s"] / results["torch"]["median_s"]
    )
    gmac = results["gmac_spectral"] + results["gmac_network"]
    assert profile["gemm_gflops"] == pytest.approx(2 * gmac / profile["gemm_s"])
    left = bench.TARGET_RATIO * results["torch"]["median_s"] - profile["run_s"] + profile["gemm_s"]
    assert (
        profile["gemm_gflops_for_target"] == pytest.approx(2 * gmac / left)
        if left > 0
        else profile["gemm_gflops_for_target"] is None
    )


def test_table_shows_every_engine_target_and_the_profile(results):
    text = bench.table(results)
    for label in [
        *bench.ORT_CONFIGS,
        "PyTorch eager",
        "GMAC per segment",
        "physical bound",
        "Matrix-product kernels alone",
        "conversion",
        *(t["name"] for t in results["targets"]),
        *(op["op"] for op in results["profile"]["top_ops"]),
    ]:
        assert label in text


def test_measures_a_given_file_without_converting(small_repo, small_models, tmp_path):
    file = small_models["htdemucs"]
    produced = bench.bench(
        "htdemucs", repo=small_repo, runs=1, rounds=1, profile=0, out_dir=tmp_path, file=file
    )
    assert produced["conversion"] is None and produced["file"] == str(file)
    assert "profile" not in produced and "not timed (--file)" in bench.table(produced)


def test_refuses_zero_runs_or_rounds_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="--runs"):
        bench.bench("htdemucs", runs=0, out_dir=tmp_path)
    with pytest.raises(UserError, match="--rounds"):
        bench.bench("htdemucs", rounds=0, out_dir=tmp_path)
    with pytest.raises(UserError, match="--song"):
        bench.bench_song("htdemucs", song=tmp_path / "missing.wav", out_dir=tmp_path)


def test_test_song_is_deterministic_stereo_of_the_asked_length(tmp_path):
    import soundfile as sf

    first = bench.write_test_song(tmp_path / "a.wav", 3.0)
    second = bench.write_test_song(tmp_path / "b.wav", 3.0)
    data, rate = sf.read(first)
    assert rate == 44100 and data.shape == (3 * 44100, 2) and 0.5 < abs(data).max() <= 1
    assert first.read_bytes() == second.read_bytes()


def test_song_mode_times_both_whole_processes(small_repo, small_models, tmp_path):
    produced = bench.bench_song(
        "htdemucs",
        seconds=12.0,
        repo=small_repo,
        runs=2,
        out_dir=tmp_path,
        file=small_models["htdemucs"],
    )
    written = json.loads((tmp_path / "htdemucs-song.json").read_text())
    assert written == json.loads(json.dumps(produced))
    assert produced["song"]["seconds"] == pytest.approx(12.0)
    separators = produced["separators"]
    assert set(separators) == {"invoke separate", "demucs.separate"}
    for run in separators.values():
        assert len(run["wall_s"]) == 2 and run["peak_rss_mb"] > 50
        assert run["audio_s_per_s"] == pytest.approx(12.0 / run["median_s"])
    assert produced["ratio"] == pytest.approx(
        separators["invoke separate"]["median_s"] / separators["demucs.separate"]["median_s"]
    )
    assert "--shifts 0 --overlap 0.25 -d cpu" in produced["commands"]["demucs.separate"]
    assert f"--repo {small_repo}" in produced["commands"]["demucs.separate"]
    text = bench.song_table(produced)
    assert "s of audio / s" in text and "wall time vs demucs' CLI" in text


def test_accuracy_against_float64_per_input(results):
    rows = results["accuracy"]["inputs"]
    assert [r["input"] for r in rows] == list(validation.fixed_inputs(2, 100, 44100))
    for row in rows:
        if row["input"] == "silence":  # exact zeros everywhere
            continue
        assert set(row["file_snr_db"]) == {"default options", "optimization off"}
        assert 90 < row["pytorch_snr_db"] < 200
        # The gate's margin, or its absolute floor (2**-24 RMS) where PyTorch sits far above it:
        # at these output levels the floor is below 110 dB of SNR.
        bound = min(row["pytorch_snr_db"] - accuracy.MARGIN_DB, 110)
        assert all(snr > bound for snr in row["file_snr_db"].values())
    assert "| dc offset |" in bench.table(results)


def test_weight_storage_compares_the_shipped_file_with_its_float32_twin(results):
    storage = results["weight_storage"]
    files = storage["files"]
    assert results["file_bytes"] == files["float16"]["bytes"] < files["float32"]["bytes"]
    assert all(0 < f["gzip_bytes"] < f["bytes"] for f in files.values())
    assert set(storage["configs"]) == set(bench.pair_bench.COMPARED_CONFIGS)
    for config in storage["configs"].values():
        assert config["stems_mse"] <= bench.pair_bench.STEMS_MSE
        for run in (config["float16"], config["float32"]):
            assert len(run["latencies_s"]) == 1 and run["session_s"] > 0 and run["peak_rss_mb"] > 50
        assert config["latency_ratio"] == pytest.approx(
            config["float16"]["median_s"] / config["float32"]["median_s"]
        )
    assert "| float16 |" in bench.table(results)


def test_baseline_times_another_build_of_the_same_model_in_one_run(small_models, tmp_path):
    path = small_models["htdemucs"]
    other = bench.pair_bench.float32_twin(path, tmp_path / "htdemucs.onnx")  # "another build"
    result = bench._baseline(path, other, runs=1, threads=1)
    assert result["labels"] == ["this build", "baseline"] and result["file"] == str(other)
    assert set(result["configs"]) == set(bench.pair_bench.COMPARED_CONFIGS)
    for config in result["configs"].values():
        assert config["latency_ratio"] == pytest.approx(
            config["this build"]["median_s"] / config["baseline"]["median_s"]
        )
    lines = bench.pair_bench.table_lines(result, 1, "title")
    assert any(line.startswith("| this build |") for line in lines)


@pytest.mark.parametrize("case", ["missing", "itself", "other model"])
def test_baseline_refuses_what_it_cannot_compare(small_models, tmp_path, case):
    path = small_models["htdemucs"]
    baseline = {
        "missing": tmp_path / "nothing.onnx",
        "itself": path,
        "other model": small_models["htdemucs_6s"],
    }[case]
    with pytest.raises(UserError, match="--baseline|compared with itself"):
        bench._baseline(path, baseline, runs=1, threads=1)


def test_accuracy_and_storage_can_be_skipped(small_repo, small_models, tmp_path):
    produced = bench.bench(
        "htdemucs",
        repo=small_repo,
        file=small_models["htdemucs"],
        runs=1,
        rounds=1,
        profile=0,
        out_dir=tmp_path,
        accuracy=False,
        storage=False,
    )
    assert not {"accuracy", "weight_storage", "profile", "baseline"} & set(produced)
    assert "| PyTorch eager |" in bench.table(produced)


def test_pair_latency_flips_the_order_every_turn(monkeypatch):
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [type("Input", (), {"name": "audio", "shape": [1, 2, 8]})()]

        def run(self, outputs, feeds):
            calls.append(self.name)
            return [np.zeros((1, 4, 2, 8), np.float32)]

    monkeypatch.setattr(pair_bench, "ort_session", lambda path, *args: Fake(path))
    result = pair_bench.child_latency({"a": "a", "b": "b"}, bench.APP_CONFIG, 2, 1)
    assert calls == ["a", "b", "b", "a"] * ((bench.WARMUPS + 2) // 2) + ["a", "b"] * (
        (bench.WARMUPS + 2) % 2
    )
    assert {name: len(times) for name, times in result["latencies_s"].items()} == {"a": 2, "b": 2}
    assert result["stems_identical"]


def test_bench_children_run_without_onnx_or_torch():
    """The contract venvs hold only onnxruntime and numpy; `python -m converter.measure.bench
    ort ...` must run there to measure a file on each ORT version (docs/runtime-contract.md)."""
    blocked = "import sys; sys.modules['onnx'] = sys.modules['torch'] = None; "
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            blocked + "import converter.measure.bench, converter.measure.pair_bench",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


# --- spectral-core files (issue 23) ------------------------------------------------------------


def write_spectral_standin(path: Path, length: int, stems: int = 4, gain: float = 1.0) -> Path:
    """A tiny file with the spectral-core interface: spectral_out = gain * spectral per stem,
    time_out = 0, stamped as htdemucs; so its composed stems are gain * ispec(spec(mix))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from converter import facts, metadata

    frames = bench.math.ceil(length / 1024)
    value = helper.make_tensor_value_info
    scale = numpy_helper.from_array(np.full((1, stems, 1, 1, 1, 1), gain, np.float32), "gain")
    silence = numpy_helper.from_array(np.zeros((1, stems, 1, 1), np.float32), "silence")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", [facts.SPECTRAL_INPUT, "axes"], ["z"]),
            helper.make_node("Mul", ["z", "gain"], [facts.SPECTRAL_OUTPUT]),
            helper.make_node("Unsqueeze", [facts.MIX_INPUT, "axes"], ["m"]),
            helper.make_node("Mul", ["m", "silence"], [facts.TIME_OUTPUT]),
        ],
        "spectral-standin",
        [
            value(facts.SPECTRAL_INPUT, TensorProto.FLOAT, [1, 2, 2, 2048, frames]),
            value(facts.MIX_INPUT, TensorProto.FLOAT, [1, 2, length]),
        ],
        [
            value(facts.SPECTRAL_OUTPUT, TensorProto.FLOAT, [1, stems, 2, 2, 2048, frames]),
            value(facts.TIME_OUTPUT, TensorProto.FLOAT, [1, stems, 2, length]),
        ],
        [scale, silence, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", facts.OPSET)])
    model.ir_version = 8
    metadata.stamp(
        model,
        {
            metadata.MODEL_NAME: "htdemucs",
            metadata.TENSOR_INTERFACE: facts.SPECTRAL_CORE,
            metadata.SPECTRAL_CONTRACT: facts.SPECTRAL_CONTRACT,
        },
    )
    onnx.save(model, path)
    return path


def test_a_spectral_segment_is_composed_as_the_app_does(tmp_path):
    """run_segment feeds the contract's STFT, then ISTFT + time_out: with gain 0.5 and a
    silent time_out, every stem is half of ispec(spec(mix)) (the Nyquist bin is dropped)."""
    import onnxruntime as ort

    from converter.spectral_contract import ispec, spec

    path = write_spectral_standin(tmp_path / "htdemucs.spectral.onnx", 22050, gain=0.5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert bench.interface_of(session) == "spectral-core"
    audio = bench.segment_input(session)
    assert audio.shape == (1, 2, 22050)
    graph_s: list[float] = []
    stems = bench.run_segment(session, audio, graph_s)
    assert stems.shape == (1, 4, 2, 22050) and len(graph_s) == 1 and graph_s[0] > 0
    want = 0.5 * ispec(spec(audio).astype(np.float32), 22050)
    assert np.abs(stems - want[:, None]).max() < 1e-6


def test_bench_times_a_spectral_file_against_pytorch_and_its_waveform_twin(
    small_repo, small_models, tmp_path
):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "htdemucs.onnx").write_bytes(small_models["htdemucs"].read_bytes())
    path = write_spectral_standin(folder / "htdemucs.spectral.onnx", 22050)
    produced = bench.bench(
        "htdemucs",
        repo=small_repo,
        file=path,
        runs=1,
        rounds=1,
        profile=3,
        out_dir=tmp_path,
        storage=False,
    )
    assert json.loads((tmp_path / "htdemucs.spectral.json").read_text())["interface"] == (
        "spectral-core"
    )
    assert "accuracy" not in produced  # the float64 gate is `invoke validate`'s
    for run in produced["onnxruntime"].values():
        assert 0 < run["graph_median_s"] < run["median_s"]  # the numpy transforms cost time
        assert run["graph_ratio_vs_torch"] == pytest.approx(
            run["graph_median_s"] / produced["torch"]["median_s"]
        )
    baseline = produced["baseline"]  # the waveform file beside it, found without --baseline
    assert baseline["file"] == str(folder / "htdemucs.onnx")
    for config in baseline["configs"].values():
        assert config["this build"]["interface"] == "spectral-core"
        assert config["baseline"]["interface"] == "waveform"
        assert config["this build"]["graph_median_s"] < config["this build"]["median_s"]
    assert set(produced["profile"]["by_part_s"]) == {"network"}
    text = bench.table(produced)
    assert "graph alone s" in text and "its graph alone:" in text


@pytest.mark.parametrize("seconds", [0.0, -5.0, float("nan"), float("inf")])
def test_song_seconds_that_are_no_length_are_refused_before_any_timing(
    monkeypatch, tmp_path, seconds
):
    monkeypatch.setattr(bench, "sgemm_gflops", lambda *a: pytest.fail("timed before checking"))
    with pytest.raises(UserError, match="--song-seconds .*positive number"):
        bench.bench_song("htdemucs", seconds=seconds, out_dir=tmp_path)


@pytest.mark.parametrize("content", [b"not audio at all\n", b""])
def test_a_song_that_is_not_audio_is_refused_before_any_timing(monkeypatch, tmp_path, content):
    monkeypatch.setattr(bench, "sgemm_gflops", lambda *a: pytest.fail("timed before checking"))
    song = tmp_path / "song.wav"
    song.write_bytes(content)
    with pytest.raises(UserError, match="is not audio libsndfile can read"):
        bench.bench_song("htdemucs", song=song, out_dir=tmp_path)
    with pytest.raises(UserError, match="not a file"):
        bench.bench_song("htdemucs", song=tmp_path, out_dir=tmp_path)


def test_cli_refuses_a_nan_song_length_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "bench", "--song-seconds", "nan"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --song-seconds nan")


def test_children_do_not_ask_numpy_for_huge_pages(monkeypatch):
    """Each bench child runs with numpy's huge-page requests off (`bench.CHILD_ENV`), so a
    spectral file's transforms are not timed through the kernel's memory compaction."""
    seen = {}

    def run(argv, cwd, env):
        seen.update(env)
        Path(argv[-1]).write_text("{}", encoding="utf-8")
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(bench.subprocess, "run", run)
    bench.run_child("pair_latency", files={}, config="x", runs=1, threads=1)
    assert seen["NUMPY_MADVISE_HUGEPAGE"] == "0"
    assert seen["PATH"] == os.environ["PATH"]
