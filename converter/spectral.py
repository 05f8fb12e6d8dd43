"""HTDemucs' STFT and inverse STFT as real-valued matrix products that export to standard ONNX ops.

`torch.stft` exports to complex ops (or the ONNX `STFT` op) that ONNX Runtime builds handle
unevenly, and a dense DFT basis costs 67 MB of constants and 56 GMAC per segment. Instead the
DFT of size N = A·B·C is factorized Cooley–Tukey style into three small DFT matrix products with
twiddle multiplies (MatMul / Mul / Add / Reshape / Transpose / Pad / Slice / Concat only):

    n = B·C·a + C·b + c,   k = p + A·q + A·B·r
    X[k] = Σ_c W_N^{c(p+Aq)} W_C^{cr} Σ_b W_B^{bq} W_{AB}^{bp} Σ_a W_A^{ap} x[n]

Only the first N/2 bins are needed (demucs drops the Nyquist bin), i.e. r < C/2, and the input is
real, so the analysis costs 2N(A/2 + B + C/4)·… ≈ 0.5 MMAC per 4096-point frame instead of 16.8.
The synthesis is the transpose of the same chain, keeping only the real part.

Layouts keep the frame axis inside the GEMM's column dimension so every MatMul is a few large
GEMMs rather than thousands of tiny ones. Both modules reproduce demucs bit-for-bit in framing:
`Stft` is `HTDemucs._magnitude(HTDemucs._spec(x))` with cac=True and `Istft` is
`HTDemucs._ispec(HTDemucs._mask(None, x), length)`; see ../shared/reference/facts.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def dft_factors(n_fft: int) -> tuple[int, int, int]:
    """Split a power-of-two `n_fft` into three near-equal radices (A, B, C), C even."""
    exponent = int(math.log2(n_fft))
    if 2**exponent != n_fft or exponent < 3:
        raise ValueError(f"n_fft must be a power of two >= 8, got {n_fft}")
    e_a = exponent // 3
    e_b = (exponent - e_a) // 2
    e_c = exponent - e_a - e_b
    return 2**e_a, 2**e_b, 2**e_c


def _unit(exponent: np.ndarray, n: int) -> np.ndarray:
    """W_n^exponent = exp(-2πi·exponent/n), in float64 until the final cast."""
    return np.exp(-2j * np.pi * (exponent % n) / n)


def _twiddle(a: int, b: int, c: int) -> np.ndarray:
    """W_N^{c(p + A q)} indexed [p, q, c]: the coupling left between the last digit pair."""
    k_low = np.arange(a)[:, None] + a * np.arange(b)[None, :]
    return _unit(k_low[:, :, None] * np.arange(c), a * b * c)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _frame_count(length: int, hop: int) -> int:
    return int(math.ceil(length / hop))


def _hann(n_fft: int) -> np.ndarray:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float64).numpy()


class _Framing(nn.Module):
    """HTDemucs' framing: hop n_fft/4, ceil(length/hop) frames, the DFT radices."""

    def __init__(self, n_fft: int, length: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop = n_fft // 4
        self.length = length
        self.frames = _frame_count(length, self.hop)
        self.radices = dft_factors(n_fft)


class Stft(_Framing):
    """[B, C, L] waveform -> [B, 2C, n_fft/2, ceil(L/hop)] spectrogram, channels (C, re/im)."""

    def __init__(self, n_fft: int, length: int):
        super().__init__(n_fft, length)
        a, b, c = self.radices
        n_a, n_b, n_c = np.arange(a), np.arange(b), np.arange(c)
        # Stage 1 (a -> p), rows (re/im, p); the window and 1/sqrt(N) of `normalized=True` ride
        # on the input multiply instead, as the window depends on all three digits of n.
        w_a = _unit(np.outer(n_a, n_a), a)
        stage1 = np.concatenate([w_a.real, w_a.imag])  # [2A, A]
        # Stage 2 (b -> q) per p, with the twiddle W_{AB}^{bp} folded in: [A, 2B, 2B].
        w_b = _unit(np.outer(n_b, n_b), b)[None] * _unit(np.outer(n_a, n_b), a * b)[:, None, :]
        stage2 = np.block([[w_b.real, -w_b.imag], [w_b.imag, w_b.real]])
        # Twiddle W_N^{c(p + A q)} indexed [p, q, 1, c] to broadcast over frames.
        twiddle = _twiddle(a, b, c)
        # Stage 3 (c -> r < C/2), right-multiplied: [(re/im, c), (re/im, r)].
        w_c = _unit(np.outer(n_c, np.arange(c // 2)), c)
        stage3 = np.block([[w_c.real, w_c.imag], [-w_c.imag, w_c.real]])
        window = _hann(n_fft) / math.sqrt(n_fft)
        self.register_buffer("window", _tensor(window.reshape(a, 1, b * c)))
        self.register_buffer("stage1", _tensor(stage1))
        self.register_buffer("stage2", _tensor(stage2))
        self.register_buffer("twiddle_re", _tensor(twiddle.real[:, None, :, None, :]))
        self.register_buffer("twiddle_im", _tensor(twiddle.imag[:, None, :, None, :]))
        self.register_buffer("stage3", _tensor(stage3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        assert length == self.length, (length, self.length)
        hop, frames = self.hop, self.frames
        a, b, c = self.radices
        signals = batch * channels
        # demucs re-pads so frame t starts at t·hop of the padded signal (see `_spec`); the
        # center padding of torch.stft only touches the two dropped frames on each side.
        pad = hop // 2 * 3
        x = F.pad(x, (pad, pad + frames * hop - length), mode="reflect")
        blocks = x.reshape(signals, frames + 3, hop)  # frame t = hop blocks t..t+3
        framed = torch.cat([blocks[:, m : m + frames] for m in range(4)], dim=2)
        framed = framed.reshape(signals * frames, a, b * c).transpose(0, 1) * self.window
        y = torch.matmul(self.stage1, framed.reshape(a, -1))  # [(ri, p), (M, b, c)]
        y = y.reshape(2, a, signals * frames, b, c).permute(1, 0, 3, 2, 4)
        y = torch.matmul(self.stage2, y.reshape(a, 2 * b, -1))  # [p, (ri, q), (M, c)]
        y = y.reshape(a, 2, b, signals * frames, c)
        re, im = y[:, :1], y[:, 1:]  # Slice, not Gather: [p, 1, q, M, c]
        re, im = (
            re * self.twiddle_re - im * self.twiddle_im,
            re * self.twiddle_im + im * self.twiddle_re,
        )
        y = torch.matmul(torch.cat([re, im], dim=-1), self.stage3)  # [p, 1, q, M, (ri, r)]
        y = y.reshape(a, b, batch, channels, frames, 2, c // 2)
        y = y.permute(2, 3, 5, 6, 1, 0, 4)  # [B, C, ri, r, q, p, T]: k = p + A q + A B r
        return y.reshape(batch, 2 * channels, self.n_fft // 2, frames)


class Istft(_Framing):
    """[B, S, 2C, n_fft/2, T] spectrogram, channels (C, re/im) -> [B, S, C, length] waveform.

    The Nyquist bin is taken as zero, as in `HTDemucs._ispec`; like torch.istft (a C2R FFT),
    the imaginary part of the DC bin is ignored.
    """

    def __init__(self, n_fft: int, length: int):
        super().__init__(n_fft, length)
        a, b, c = self.radices
        n_a, n_b, n_c = np.arange(a), np.arange(b), np.arange(c)
        # x[n] = Re Σ_{k<N/2} d_k Z_k W_N^{-nk} / sqrt(N), d_0 = 1 and d_k = 2: the real output of
        # a Hermitian spectrum. The 2/sqrt(N) sits in stage 3, the d_0 = 1 in `dc_weight`.
        scale = 2.0 / math.sqrt(n_fft)
        w_c = np.conj(_unit(np.outer(np.arange(c // 2), n_c), c)) * scale  # [r, c]
        stage3 = np.block([[w_c.real, w_c.imag], [-w_c.imag, w_c.real]])  # [(ri,r), (ri,c)]
        twiddle = np.conj(_twiddle(a, b, c))
        w_b = np.conj(
            _unit(np.outer(n_b, n_b), b)[None] * _unit(np.outer(n_a, n_b), a * b)[:, :, None]
        )  # [p, b, q]
        stage2 = np.block([[w_b.real, -w_b.imag], [w_b.imag, w_b.real]])  # [p, (ri,b), (ri,q)]
        w_a = np.conj(_unit(np.outer(n_a, n_a), a))  # [a, p]
        stage1 = np.concatenate([w_a.real, -w_a.imag], axis=1)  # real part only: [a, (ri, p)]
        # torch.istft divides the overlap-add by the summed squared window, which is the constant
        # 1.5 for a periodic Hann window at hop N/4 wherever four frames overlap: all kept samples.
        window = _hann(n_fft) / 1.5
        dc_weight = np.ones((n_fft // 2, 1))
        dc_weight[0] = 0.5
        self.register_buffer("dc_weight", _tensor(dc_weight))
        self.register_buffer("stage3", _tensor(stage3))
        self.register_buffer("twiddle_re", _tensor(twiddle.real[:, :, None, None, :]))
        self.register_buffer("twiddle_im", _tensor(twiddle.imag[:, :, None, None, :]))
        self.register_buffer("stage2", _tensor(stage2))
        self.register_buffer("stage1", _tensor(stage1))
        self.register_buffer("window", _tensor(window.reshape(4, self.hop)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, sources, channels2, bins, frames = z.shape
        assert bins == self.n_fft // 2 and frames == self.frames, (z.shape, self.frames)
        channels = channels2 // 2
        a, b, c = self.radices
        hop = self.hop
        signals = batch * sources * channels
        z = (z * self.dc_weight).reshape(signals, 2, c // 2, b, a, frames)
        z = z.permute(4, 3, 0, 5, 1, 2).reshape(a, b, signals * frames, c)  # [p, q, M, (ri, r)]
        y = torch.matmul(z, self.stage3).reshape(a, b, signals * frames, 2, c)
        re, im = y[:, :, :, :1], y[:, :, :, 1:]  # [p, q, M, 1, c]
        re, im = (
            re * self.twiddle_re - im * self.twiddle_im,
            re * self.twiddle_im + im * self.twiddle_re,
        )
        y = torch.cat([re, im], dim=1).reshape(a, 2 * b, -1)  # [p, (ri, q), (M, c)]
        y = torch.matmul(self.stage2, y)  # [p, (ri, b), (M, c)]
        y = y.reshape(a, 2, b * signals * frames * c).transpose(0, 1).reshape(2 * a, -1)
        y = torch.matmul(self.stage1, y)  # [a, (b, M, c)]: frame samples, real
        y = y.reshape(a, b, signals, frames, c).permute(2, 3, 0, 1, 4)
        y = y.reshape(signals, frames, 4, hop) * self.window
        # Overlap-add: quarter m of frame t lands in hop block t + m.
        out = F.pad(y[:, :, :1], (0, 0, 0, 0, 0, 3))  # [signals, frames + 3, 1, hop]
        for m in range(1, 4):
            out = out + F.pad(y[:, :, m : m + 1], (0, 0, 0, 0, m, 3 - m))
        pad = hop // 2 * 3
        out = out.reshape(signals, (frames + 3) * hop)[:, pad : pad + self.length]
        return out.reshape(batch, sources, channels, self.length)
