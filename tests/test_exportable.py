"""The restated demucs layers in `converter.build.exportable` against demucs' own modules: the
algebra in float64, the accuracy of ONNX Runtime's float32 against demucs' float32, both judged by
demucs in float64."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from demucs.demucs import DConv
from demucs.transformer import MyGroupNorm

from converter.build.export import trace
from converter.build.exportable import (
    SHORT_REDUCTION,
    Network,
    _conv_tr_freq,
    _dconv_rows,
    _layer_norm,
    _normalize,
    _standardize,
)
from converter.build.spectral import Stft


def _random_dconv(channels: int, **kwargs) -> DConv:
    torch.manual_seed(0)
    dconv = DConv(channels, compress=8, depth=2, init=1e-3, **kwargs).eval()
    with torch.no_grad():
        for param in dconv.parameters():
            param.normal_(0, 0.3)
    return dconv


class _Rows(torch.nn.Module):
    def __init__(self, dconv: DConv):
        super().__init__()
        self.dconv = dconv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dconv_rows(self.dconv, x, x[0, 0, 0] * 0.0)


def test_dconv_rows_matches_demucs_dconv():
    dconv = _random_dconv(16)
    x = torch.randn(5, 16, 37)
    with torch.no_grad():
        want, got = dconv(x), _Rows(dconv)(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_dconv_rows_exports_without_group_norm_or_the_expanded_conv_output():
    """Per layer: the compressing Conv and a LayerNormalization whose [d, T] scale is built at
    run time, so the file holds no repeated copies of the weights; the expanding conv, its
    GroupNorm and LayerScale are folded into two per-row MatMuls, so no Split either; its
    statistics take no Transpose (a copy of the tensor, unfused with optimization off; T = 36
    needs no zero-padding, whose export transposes the pads)."""
    dconv = _random_dconv(16)
    x = torch.randn(5, 16, 36)
    proto = trace(_Rows(dconv), (x,), ["x"], ["y"])
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == ops.count("LayerNormalization") == 2
    assert not {"InstanceNormalization", "Split", "Transpose"} & set(ops)
    weights = sum(p.numel() for p in dconv.parameters())
    stored = sum(
        int(torch.tensor(list(t.dims)).prod()) for t in proto.graph.initializer if t.data_type == 1
    )
    assert stored < weights + 2 * 36, (stored, weights)


def test_dconv_rows_refuses_branches_it_does_not_restate():
    with pytest.raises(NotImplementedError, match="without attention or LSTM"):
        _Rows(_random_dconv(16, lstm=True))(torch.randn(2, 16, 20))


@pytest.mark.parametrize("c_in, c_out, stride", [(8, 4, 4), (6, 3, 2)])
def test_frequency_conv_transpose_as_conv_and_shuffle(c_in, c_out, stride):
    torch.manual_seed(1)
    conv_tr = torch.nn.ConvTranspose2d(c_in, c_out, (2 * stride, 1), (stride, 1)).eval()
    x = torch.randn(2, c_in, 7, 5)
    with torch.no_grad():
        want, got = conv_tr(x), _conv_tr_freq(conv_tr, x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


# --- accuracy: every restated module against demucs in float64, and ONNX Runtime's float32 ---


def _snr(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2)))


def _onnxruntime(module: torch.nn.Module, *args: torch.Tensor, optimize: bool = False):
    """`module` traced to ONNX and run in float32 by ONNX Runtime (optimization off or default)."""
    names = [f"x{i}" for i in range(len(args))]
    proto = trace(module, args, names, ["y"])
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]


def _trained_like(module: torch.nn.Module) -> torch.nn.Module:
    """Biases of 0.5·N(0, 1), norm scales of 1 + 0.7·N(0, 1), LayerScales of 0.2·N(0, 1)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif "scale" in name:
                param.normal_(0, 0.2)
            elif param.dim() == 1:
                param.normal_(1, 0.7)
            else:
                param.mul_(2.0)
    return module.eval()


class _Call(torch.nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn, self.parts = fn, torch.nn.ModuleList(modules)

    def forward(self, *args):
        return self.fn(*self.parts, *args)


def _check_accuracy(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, base=None):
    """Our module in float64 equals demucs' in float64 (the algebra), and ours in ONNX Runtime
    float32, at both optimization settings, is within 6 dB of demucs' float32 against it."""
    ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
    with torch.no_grad():
        truth = theirs64(x.double()).numpy()
        algebra = ours64(x.double()).numpy()
        pytorch = theirs(x).numpy()
    base = 0.0 if base is None else base
    assert _snr(algebra - base, truth - base) > 250
    bar = _snr(pytorch - base, truth - base)
    for optimize in (False, True):
        got = _snr(_onnxruntime(ours, x, optimize=optimize) - base, truth - base)
        assert got > bar - 6, (optimize, got, bar)


def test_long_time_branch_dconv_as_accurate_as_demucs():
    """The time branch's DConv runs over one row of ~86 k frames at full size; with a DC offset
    and trained-like weights, ORT's one-pass LayerNormalization and long sums lost 20 dB."""
    dconv = _trained_like(DConv(16, compress=8, depth=2, init=1e-3))
    x = 3.0 + 2.0 * torch.randn(1, 16, 30011)  # a prime length: padded blocks
    # The residual passes exactly; judge the branch.
    _check_accuracy(_Rows(dconv), dconv, x, base=x.double().numpy())


def test_width_one_dconv_on_steady_rows_as_accurate_as_demucs():
    """A small model's frequency branch is one channel wide (8 / compress 8), so its first norm
    takes each row over time alone; rows zero but for their edge frame become one large value
    and 335 equal small ones, and a covariance taken as one MatMul over T (every addition
    rounding the same way) lost 12 dB against PyTorch at ORT's default options."""
    torch.manual_seed(0)
    dconv = _trained_like(DConv(8, compress=8, depth=2, init=1e-3))
    x = torch.zeros(64, 8, 336)
    x[..., 0] = 3.0 * torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    _check_accuracy(_Rows(dconv), dconv, x, base=x.double().numpy())


def test_frequency_rows_dconv_as_accurate_as_demucs():
    dconv = _trained_like(DConv(16, compress=8, depth=2, init=1e-3))
    x = 3.0 + 2.0 * torch.randn(64, 16, 336)
    _check_accuracy(_Rows(dconv), dconv, x, base=x.double().numpy())


def test_transformer_norm_out_as_accurate_as_demucs():
    norm = _trained_like(MyGroupNorm(1, 64))
    tokens = 5.0 + torch.randn(1, 2688, 64)
    ours = _Call(lambda n, x: _normalize(x, 2, n.weight, n.bias, n.eps), norm)
    _check_accuracy(ours, norm, tokens)


def test_transformer_layer_norm_after_a_residual_add_as_accurate_as_demucs():
    """Tokens whose mean is 100 times their spread: ORT fuses Add + LayerNormalization into
    SkipLayerNormalization (and ORT 1.17's LayerNormalization is no better), both taking
    E[x²] - E[x]² in float32 (unshifted: 88.7 dB at default options, PyTorch 103.8)."""
    norm = _trained_like(torch.nn.LayerNorm(512))
    tokens = 100.0 + torch.randn(1, 1344, 512)
    ours = _Call(lambda n, x: _layer_norm(n, x + x.flip(1)), norm)
    _check_accuracy(ours, _Call(lambda n, x: n(x + x.flip(1)), norm), tokens)


class _DemucsStandardize(torch.nn.Module):
    """HTDemucs.forward's input normalization, verbatim."""

    def forward(self, x):
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        std = x.std(dim=tuple(range(1, x.dim())), keepdim=True)
        return (x - mean) / (1e-5 + std)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 4, 512, 336), (1, 2, 343980)])
def test_input_normalization_as_accurate_as_demucs(shape, seed):
    """A DC offset ten times the signal: a mean good to one ulp (what float32 sums give) cost
    up to 12 dB against PyTorch's, depending on the draw; the refined mean does not."""
    x = 0.5 + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    _check_accuracy(_Call(lambda x: _standardize(x)[2]), _DemucsStandardize(), x)


def test_no_reduction_in_the_network_adds_more_than_a_short_run_of_values(small_repo):
    """Every sum ONNX Runtime takes (reductions, norms, MatMul inner dimensions) covers at most
    SHORT_REDUCTION values, so none accumulates naively over a long axis."""
    from converter.build.loading import load

    bag = load("htdemucs", small_repo)
    model, length = bag.models[0], bag.segment_samples
    audio = torch.zeros(1, 2, length)
    mag = Stft(model.nfft, length)(audio)
    proto = trace(Network(model, [0, 1, 2, 3], [1.0] * 4), (audio, mag), ["mix", "mag"], ["s", "w"])
    graph = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.value_info, *graph.input]
    }
    shapes.update((t.name, list(t.dims)) for t in graph.initializer)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    constants.update(
        (n.output[0], onnx.numpy_helper.to_array(n.attribute[0].t))
        for n in graph.node
        if n.op_type == "Constant"
    )
    lengths = {}
    for node in graph.node:
        shape = shapes.get(node.input[0]) if node.input else None
        if node.op_type in ("ReduceSum", "ReduceMean", "ReduceSumSquare"):
            axes = (
                next(a.ints for a in node.attribute if a.name == "axes")
                if node.op_type != "ReduceSum"
                else constants[node.input[1]]
            )
            lengths[node.name] = math.prod(shape[a] for a in axes)
        elif node.op_type in ("LayerNormalization", "InstanceNormalization"):
            axis = ([a.i for a in node.attribute if a.name == "axis"] or [2])[0]
            lengths[node.name] = math.prod(shape[axis:])
        elif node.op_type in ("MatMul", "Gemm"):
            lengths[node.name] = shape[-1]
    assert len(lengths) > 20 and max(lengths.values()) > 300  # the check sees long ones
    long = {name: n for name, n in lengths.items() if n > SHORT_REDUCTION}
    assert not long, long
