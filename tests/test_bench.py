"""`invoke bench` on a small random-weight model: every field present and sane, no timing gates.

Timings depend on the machine; the performance targets are checked by reading `invoke bench`'s
output, never by a test.
"""

from __future__ import annotations

import json

import pytest

from converter import bench, validation
from converter.errors import UserError


@pytest.fixture(scope="module")
def results(small_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    produced = bench.bench("htdemucs", repo=small_repo, runs=1, profile=5, out_dir=out)
    written = json.loads((out / "htdemucs.json").read_text())
    assert written == json.loads(json.dumps(produced))  # the JSON is the whole result
    return produced


def test_latency_and_rss_of_every_engine(results):
    assert results["threads"] >= 1 and results["runs"] == 1 and results["warmups"] == 2
    torch_run = results["torch"]
    assert len(torch_run["latencies_s"]) == 1 and torch_run["median_s"] > 0
    assert torch_run["threads"] == results["threads"]
    assert set(results["onnxruntime"]) == set(bench.ORT_CONFIGS)
    for run in [torch_run, *results["onnxruntime"].values()]:
        # Each engine ran in its own process: its peak is its own, not the parent's.
        assert 50 < run["peak_rss_mb"] < 8000
        assert run["wall_s"] > run["median_s"]
        assert len(run["probe_gflops"]) == 2 and min(run["probe_gflops"]) > 1
    for run in results["onnxruntime"].values():
        assert run["ratio_vs_torch"] == pytest.approx(run["median_s"] / torch_run["median_s"])
        assert run["session_s"] > 0


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
    default = results["onnxruntime"][bench.DEFAULT_CONFIG]
    assert results["targets"]["ratio"]["value"] == default["ratio_vs_torch"]
    assert results["targets"]["ort_peak_rss_gb"]["value"] == pytest.approx(default["peak_rss_mb"] / 1024)
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


def test_table_shows_every_engine_and_the_profile(results):
    text = bench.table(results)
    for label in [*bench.ORT_CONFIGS, "PyTorch eager", "GMAC per segment", "physical bound",
                  "conversion", *(op["op"] for op in results["profile"]["top_ops"])]:  # fmt: skip
        assert label in text


def test_refuses_zero_runs(tmp_path):
    with pytest.raises(UserError, match="--runs"):
        bench.bench("htdemucs", runs=0, out_dir=tmp_path)


def test_accuracy_against_float64_per_input(results):
    rows = results["accuracy"]["inputs"]
    assert [r["input"] for r in rows] == list(validation.fixed_inputs(2, 100, 44100))
    for row in rows:
        if row["input"] == "silence":  # exact zeros everywhere
            continue
        assert set(row["file_snr_db"]) == {"default options", "optimization off"}
        assert 90 < row["pytorch_snr_db"] < 200
        assert all(snr > row["pytorch_snr_db"] - 6 for snr in row["file_snr_db"].values())
    assert "| dc offset |" in bench.table(results)


def test_weight_storage_compares_the_shipped_file_with_its_float32_twin(results):
    storage = results["weight_storage"]
    files = storage["files"]
    assert results["file_bytes"] == files["float16"]["bytes"] < files["float32"]["bytes"]
    assert all(0 < f["gzip_bytes"] < f["bytes"] for f in files.values())
    assert set(storage["configs"]) == set(bench.storage_bench.COMPARED_CONFIGS)
    for config in storage["configs"].values():
        assert config["stems_mse"] <= bench.storage_bench.STEMS_MSE
        for run in (config["float16"], config["float32"]):
            assert len(run["latencies_s"]) == 1 and run["session_s"] > 0 and run["peak_rss_mb"] > 50
        assert config["latency_ratio"] == pytest.approx(
            config["float16"]["median_s"] / config["float32"]["median_s"]
        )
    assert "| float16 |" in bench.table(results)
