"""Float16 weight storage: exact or not at all, the same outputs, and undone bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from demucs.htdemucs import HTDemucs
from demucs.states import save_with_checksum, serialize_model
from omegaconf import OmegaConf
from onnx import TensorProto, helper, numpy_helper

from converter import metadata as meta
from converter.build import storage
from converter.build.fakerepo import model_kwargs, write_bag
from converter.build.graph_pass import AppliedTwice
from converter.errors import UserError
from converter.facts import walk_model
from converter.pipeline import convert

rng = np.random.default_rng(0)


def half_values(*shape: int) -> np.ndarray:
    """float32 values that are float16 values, as in a demucs checkpoint."""
    return rng.standard_normal(shape).astype(np.float16).astype(np.float32)


def test_exact_in_float16_is_a_bitwise_round_trip():
    assert storage.exact_in_float16(np.array([0.0, -0.0, 1.5, -65504.0, 2.0**-24], np.float32))
    assert not storage.exact_in_float16(np.array([0.1], np.float32))  # rounds
    assert not storage.exact_in_float16(np.array([70000.0], np.float32))  # would become inf
    assert not storage.exact_in_float16(np.array([2.0**-26], np.float32))  # would become 0
    assert not storage.exact_in_float16(np.array([np.nan, np.inf], np.float32))


@pytest.mark.parametrize("axis", [0, 1])
def test_a_folded_product_factors_into_its_float16_weight_and_scale(axis):
    weight = half_values(64, 48)
    scale = half_values(weight.shape[axis])
    product = weight * (scale[:, None] if axis == 0 else scale)
    assert not storage.exact_in_float16(product)
    decoy = half_values(weight.shape[axis])
    half, found = storage.factorize(product, [np.float32(0.125), decoy, scale])
    assert half.dtype == np.float16 and np.array_equal(half.astype(np.float32), weight)
    assert found.shape == ((weight.shape[0], 1) if axis == 0 else (weight.shape[1],))
    again = half.astype(np.float32) * found
    assert np.array_equal(again.view(np.uint32), product.view(np.uint32))


def test_query_scale_products_factor_even_where_float16_would_underflow():
    """head_dim**-0.5 = 1/8 takes small float16 weights below float16's subnormal range."""
    weight = (half_values(64, 64) * 2.0**-10).astype(np.float16).astype(np.float32)
    product = weight * np.float32(0.125)
    assert not storage.exact_in_float16(product)
    half, scale = storage.factorize(product, [np.float32(0.125)])
    assert scale.shape == () and np.array_equal(half.astype(np.float32) * scale, product)


def test_no_factorization_rounds_or_overflows():
    twiddles = rng.standard_normal((32, 16)).astype(np.float32)
    assert (
        storage.factorize(twiddles, [half_values(16), half_values(32), np.float32(0.125)]) is None
    )
    big = half_values(8, 16) * np.float32(60000.0)  # product / 1e-3 exceeds float16's range
    assert storage.factorize(big, [np.full(16, 1e-3, np.float32)]) is None
    zero = half_values(8, 16)
    assert storage.factorize(zero * 0, [np.zeros(16, np.float32)]) is None


def tiny_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """x @ (weight) + exact bias, x @ product, x * twiddle, plus a small and an int tensor."""
    weight, scale = half_values(300, 300), half_values(300)
    inits = {
        "weight": weight,
        "product": weight.T * scale,
        "twiddle": rng.standard_normal((300,)).astype(np.float32),
        "small": half_values(300)[:8],
        "shape": np.array([1, 300], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["a"]),
        helper.make_node("MatMul", ["a", "product"], ["b"]),
        helper.make_node("Mul", ["b", "twiddle"], ["c"]),
        helper.make_node("Reshape", ["c", "shape"], ["d"]),
        helper.make_node("Slice", ["d", "zero", "eight", "one"], ["e"]),
        helper.make_node("Add", ["e", "small"], ["y"]),
    ]
    inits |= {
        "zero": np.array([0], np.int64),
        "eight": np.array([8], np.int64),
        "one": np.array([1], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, scale


def run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["y"], {"x": x})[0]


def test_store_half_keeps_the_outputs_and_restore_gives_back_the_same_bytes():
    model, scale = tiny_model()
    original = model.SerializeToString()
    report = storage.store_half(model, [scale])
    onnx.checker.check_model(model, full_check=True)
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    assert report.half == ["weight"] and report.products == ["product"]
    assert report.float32 == ["twiddle"]  # not exact, no factor: stays float32
    assert dtypes["weight/float16"] == dtypes["product/float16"] == TensorProto.FLOAT16
    assert dtypes["twiddle"] == dtypes["small"] == TensorProto.FLOAT  # small: not worth a Cast
    assert dtypes["shape"] == TensorProto.INT64
    assert storage.storage_of(model) == storage.FLOAT16
    assert report.held == ["weight", "product"]  # only MatMuls read them
    x = rng.standard_normal((1, 300)).astype(np.float32)
    before = onnx.load_from_string(original)
    # At either setting the MatMul weights are computed at run time. ORT does not prepack them,
    # and its unpacked kernel sums in another order: float32 rounding apart.
    for optimize in (True, False):
        np.testing.assert_allclose(
            run(model, x, optimize=optimize), run(before, x, optimize=optimize), rtol=1e-5
        )
    with pytest.raises(AppliedTwice, match="weight storage already"):
        storage.StoreHalf().apply(model)
    storage.restore_float32(model)
    assert model.SerializeToString() == original
    assert storage.storage_of(model) == storage.FLOAT32


def float32_initializers(model: onnx.ModelProto) -> set[str]:
    """Float32 initializers the pass looked at and kept (not its own scales)."""
    return {
        t.name
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT
        and np.prod(t.dims) >= storage.MIN_ELEMENTS
        and not t.name.startswith(storage.SCALE_PREFIX)
    }


@pytest.mark.parametrize("name", ["htdemucs", "htdemucs_ft", "htdemucs_6s"])
def test_converted_files_keep_only_spectral_constants_in_float32(small_models, name):
    """demucs' float16 checkpoints: every weight and folded product is stored as float16."""
    model = onnx.load(small_models[name])
    assert meta.read_metadata(model)[meta.WEIGHT_STORAGE] == storage.FLOAT16
    assert storage.storage_of(model) == storage.FLOAT16
    stayed = float32_initializers(model)
    assert {"stft/stage3", "istft/stage3"} <= stayed
    assert all(name.startswith(("stft/", "istft/")) for name in stayed)
    summary = meta.provenance(model)["weight_storage"]
    assert summary["float32_initializers"] == len(stayed) and summary["unfolded_products"] > 0
    # The transformer's projections stay float16 in an app's optimized session too.
    held = [n for _, n in walk_model(model) if n.name.startswith(storage.PREFIX + "hold/")]
    assert summary["held_float16"] == len(held) > 0


def test_float32_storage_is_the_half_file_restored(small_repo, small_models, tmp_path):
    path = convert("htdemucs", repo=small_repo, out_dir=tmp_path, weight_storage="float32")
    full = onnx.load(path)
    assert meta.read_metadata(full)[meta.WEIGHT_STORAGE] == storage.FLOAT32
    assert storage.storage_of(full) == storage.FLOAT32
    half = onnx.load(small_models["htdemucs"])
    storage.restore_float32(half)
    assert meta.graph_fingerprint(half) == meta.graph_fingerprint(full)
    # Small weights: the graph and the float32 spectral constants weigh more here than at full
    # size, where tests/test_full_size.py holds the file to 0.52x its float32 weights.
    assert small_models["htdemucs"].stat().st_size < 0.85 * path.stat().st_size


def test_unknown_storage_is_one_clear_error(small_repo, tmp_path):
    with pytest.raises(
        UserError, match="--weight-storage 'bfloat16' is not one of float16, float32"
    ):
        convert("htdemucs", repo=small_repo, out_dir=tmp_path, weight_storage="bfloat16")


@pytest.mark.integration  # converts or runs the CLI without a model fixture
def test_a_float32_checkpoint_converts_validates_and_keeps_its_weights_float32(tmp_path, caplog):
    """A float32 fine-tune: nothing is rounded; only tensors that are exact in float16 (norms'
    ones and zeros at initialization) are stored as float16."""
    torch.manual_seed(0)
    model = HTDemucs(**model_kwargs("htdemucs", "small"))
    repo = tmp_path / "repo"
    repo.mkdir()
    save_with_checksum(
        serialize_model(model, OmegaConf.create({}), half=False), repo / "f32model.th"
    )
    write_bag(repo, "htdemucs", ["f32model"])
    with caplog.at_level(logging.INFO, logger="converter"):
        path = convert("htdemucs", repo=repo, out_dir=tmp_path / "out")  # validation gate included
    shipped = onnx.load(path)
    restored = onnx.load(path)
    storage.restore_float32(restored)
    values = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    stayed = float32_initializers(shipped)
    halves = [t for t in shipped.graph.initializer if t.name.endswith(storage.HALF_SUFFIX)]
    # Never lossy: what went float16 is exact, and every tensor that stayed float32 had to.
    assert all(
        storage.exact_in_float16(values[t.name.removesuffix(storage.HALF_SUFFIX)]) for t in halves
    )
    assert all(not storage.exact_in_float16(values[n]) for n in stayed)
    # None of the checkpoint's random float32 values went float16: at most constant zeros and
    # the ones and zeros norm layers start from.
    for t in halves:
        assert set(np.unique(values[t.name.removesuffix(storage.HALF_SUFFIX)])) <= {0.0, 1.0}
    assert path.stat().st_size > 0.9 * 4 * sum(p.numel() for p in model.parameters())
    assert "stays float32 (not exact in float16)" in caplog.text


def test_an_apps_optimizer_keeps_the_matmul_weights_float16(tmp_path):
    """Folded, ORT would hold a MatMul weight in float32 and again prepacked."""
    model, scale = tiny_model()
    storage.store_half(model, [scale])
    options = ort.SessionOptions()  # ORT's defaults, as an app opens the file
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    kept = {t.name: t.data_type for t in onnx.load(tmp_path / "optimized.onnx").graph.initializer}
    assert kept["weight/float16"] == kept["product/float16"] == TensorProto.FLOAT16
    assert "weight" not in kept and "product" not in kept
