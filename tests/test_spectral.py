"""The factorized STFT/ISTFT against torch.stft / torch.istft, and its cost in the graph."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from converter.build.export import trace
from converter.build.spectral import Istft, Stft, dft_factors
from converter.measure.graphstats import constant_bytes_by_part, macs_by_part, simplified


def torch_spec(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    """HTDemucs' framing (facts.md) spelled with torch.stft: [B, 2C, n_fft/2, frames]."""
    hop = n_fft // 4
    frames = math.ceil(x.shape[-1] / hop)
    pad = hop // 2 * 3
    padded = F.pad(x, (pad, pad + frames * hop - x.shape[-1]), mode="reflect")
    z = torch.stft(
        padded.reshape(-1, padded.shape[-1]),
        n_fft,
        hop,
        window=torch.hann_window(n_fft),
        normalized=True,
        center=True,
        return_complex=True,
        pad_mode="reflect",
    )[:, :-1, 2 : 2 + frames]
    z = torch.view_as_real(z).permute(0, 3, 1, 2)  # [B*C, re/im, F, T]
    return z.reshape(x.shape[0], -1, n_fft // 2, frames)


def torch_ispec(spec: torch.Tensor, length: int) -> torch.Tensor:
    """HTDemucs' inverse framing with torch.istft: [B, S, 2C, F, T] -> [B, S, C, length]."""
    b, s, c2, bins, frames = spec.shape
    n_fft = 2 * bins
    hop = n_fft // 4
    z = torch.view_as_complex(
        spec.reshape(b, s, c2 // 2, 2, bins, frames).permute(0, 1, 2, 4, 5, 3).contiguous()
    )
    z = F.pad(z.reshape(-1, bins, frames), (2, 2, 0, 1))
    pad = hop // 2 * 3
    full = torch.istft(
        z,
        n_fft,
        hop,
        window=torch.hann_window(n_fft),
        normalized=True,
        length=hop * frames + 2 * pad,
        center=True,
    )
    return full[:, pad : pad + length].reshape(b, s, c2 // 2, length)


@pytest.mark.parametrize(
    "n_fft, length", [(4096, 343980), (512, 22050), (1024, 10001), (256, 4096)]
)
def test_stft_matches_torch_stft(n_fft, length):
    x = torch.randn(1, 2, length, generator=torch.Generator().manual_seed(1))
    want = torch_spec(x, n_fft)
    got = Stft(n_fft, length)(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-6, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize(
    "n_fft, length", [(4096, 343980), (512, 22050), (1024, 10001), (256, 4096)]
)
def test_istft_matches_torch_istft(n_fft, length):
    frames = math.ceil(length / (n_fft // 4))
    spec = torch.randn(1, 3, 4, n_fft // 2, frames, generator=torch.Generator().manual_seed(2))
    want = torch_ispec(spec, length)
    got = Istft(n_fft, length)(spec)
    assert got.shape == want.shape == (1, 3, 2, length)
    assert torch.allclose(got, want, atol=5e-6, rtol=0), (got - want).abs().max()


def test_istft_ignores_imaginary_dc_like_a_c2r_fft():
    n_fft, length = 512, 4000
    frames = math.ceil(length / 128)
    spec = torch.randn(1, 1, 4, n_fft // 2, frames, generator=torch.Generator().manual_seed(3))
    changed = spec.clone()
    changed[:, :, 1::2, 0] += 5.0  # imaginary part of the DC bin
    istft = Istft(n_fft, length)
    assert torch.allclose(istft(spec), istft(changed), atol=1e-6)


def test_round_trip_reconstructs_the_interior():
    """demucs keeps only frames that start inside the padded signal, so the first and last
    1.5 hops are covered by fewer than four frames, and it drops the Nyquist bin; elsewhere,
    for a signal without Nyquist content, STFT -> ISTFT is the identity."""
    n_fft, length = 4096, 343980
    hop = n_fft // 4
    t = torch.arange(length) / 44100
    x = torch.stack([torch.sin(2 * math.pi * 440 * t), 0.5 * torch.sin(2 * math.pi * 97 * t)])[None]
    y = Istft(n_fft, length)(Stft(n_fft, length)(x)[:, None])[:, 0]
    interior = slice(hop * 3 // 2, math.ceil(length / hop) * hop - hop * 3 // 2)
    assert torch.allclose(y[..., interior], x[..., interior], atol=1e-5)


def test_factors_are_balanced_powers_of_two():
    assert dft_factors(4096) == (16, 16, 16)
    assert dft_factors(512) == (8, 8, 8)
    for n in (8, 256, 1024, 2048, 8192):
        a, b, c = dft_factors(n)
        assert a * b * c == n and c % 2 == 0
    with pytest.raises(ValueError, match="power of two"):
        dft_factors(3000)


def test_exported_spectral_graph_is_small_cheap_and_standard():
    """Full-size htdemucs: analysis of 2 channels + synthesis of 4 stems x 2 channels."""
    n_fft, length = 4096, 343980
    stft = Stft(n_fft, length)
    istft = Istft(n_fft, length)
    audio = torch.zeros(1, 2, length)
    graphs = [
        trace(stft, (audio,), ["audio"], ["mag"]),
        trace(istft, (torch.zeros(1, 4, 4, n_fft // 2, stft.frames),), ["spec"], ["wave"]),
    ]
    allowed = {"MatMul", "Mul", "Add", "Sub", "Reshape", "Transpose", "Pad", "Slice", "Concat"}
    for graph in graphs:
        ops = {n.op_type for n in simplified(graph).graph.node}
        assert ops <= allowed, ops - allowed
        assert not ops & {"STFT", "DFT"}
    macs = sum(sum(macs_by_part(g).values()) for g in graphs)
    constants = sum(sum(constant_bytes_by_part(g).values()) for g in graphs)
    assert macs <= 2e9, macs
    # Per-(p, q) stage-3 matrices (512 KB each way) replace passes of twiddle multiplies; a
    # dense DFT basis would be 67 MB.
    assert constants <= 1_500_000, constants
