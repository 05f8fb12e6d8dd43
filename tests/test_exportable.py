"""The restated demucs layers in `converter.exportable` against demucs' own modules."""

from __future__ import annotations

import pytest
import torch
from demucs.demucs import DConv

from converter.exportable import _conv_tr_freq, _dconv_rows
from converter.export import trace


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
    GroupNorm and LayerScale are folded into two per-row MatMuls, so no Split either."""
    dconv = _random_dconv(16)
    x = torch.randn(5, 16, 37)
    proto = trace(_Rows(dconv), (x,), ["x"], ["y"])
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == ops.count("LayerNormalization") == 2
    assert not {"InstanceNormalization", "Split"} & set(ops)
    weights = sum(p.numel() for p in dconv.parameters())
    stored = sum(
        int(torch.tensor(list(t.dims)).prod()) for t in proto.graph.initializer if t.data_type == 1
    )
    assert stored < weights + 2 * 37, (stored, weights)


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
