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
`HTDemucs._ispec(HTDemucs._mask(None, x), length)`; see docs/demucs-facts.md.
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


def _factors(a: int, b: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three stages of W_N^{nk}, n = BC·a + C·b + c and k = p + A·q + AB·r (r < C/2):

        W_N^{nk} = W_A^{ap} · W_{AB}^{bp} W_B^{bq} · W_N^{c(p+Aq)} W_C^{cr}

    as complex arrays indexed [p, a], [p, q, b] and [p, q, r, c]; each stage's twiddle rides on
    its matrix. The inverse transform uses their conjugates.
    """
    n_a, n_b, n_c, n_r = np.arange(a), np.arange(b), np.arange(c), np.arange(c // 2)
    p, q = n_a[:, None, None, None], n_b[None, :, None, None]
    w_a = _unit(np.outer(n_a, n_a), a)
    w_b = _unit(np.outer(n_b, n_b), b)[None] * _unit(np.outer(n_a, n_b), a * b)[:, None, :]
    w_c = _unit(n_r[:, None] * n_c, c) * _unit(n_c * (p + a * q), a * b * c)
    return w_a, w_b, w_c


def _as_real(w: np.ndarray) -> np.ndarray:
    """Complex [..., M, K] as the real [..., 2M, 2K] matrix on (re/im, k) -> (re/im, m)."""
    return np.concatenate(
        [np.concatenate([w.real, -w.imag], -1), np.concatenate([w.imag, w.real], -1)], -2
    )


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
    """[B, C, L] waveform -> [B, 2C, n_fft/2, ceil(L/hop)] spectrogram, channels (C, re/im).

    The mirror of `Istft`: frames are laid out [sample, signal, frame] so the frame axis stays
    innermost, the digits are contracted a, b, c by left matrix products, and the twiddles sit
    in per-(p, q) stage-3 matrices.
    """

    def __init__(self, n_fft: int, length: int):
        super().__init__(n_fft, length)
        a, b, c = self.radices
        w_a, w_b, w_c = _factors(a, b, c)  # X[k] = Σ_n x[n] W_N^{nk}
        # Stage 1 (a -> p): rows (p, re/im).
        stage1 = np.stack([w_a.real, w_a.imag], 1).reshape(2 * a, a)
        # Stage 2 (b -> q) for every p: rows (q, re/im), columns (re/im, b).
        stage2 = np.stack(
            [np.concatenate([w_b.real, -w_b.imag], 2), np.concatenate([w_b.imag, w_b.real], 2)], 2
        ).reshape(a, 2 * b, 2 * b)
        # Stage 3 (c -> r < C/2) for every (p, q): rows (re/im, r), columns (re/im, c).
        stage3 = _as_real(w_c).reshape(a * b, c, 2 * c)
        # The window and the 1/sqrt(N) of `normalized=True`, per sample of the frame.
        window = _hann(n_fft) / math.sqrt(n_fft)
        self.register_buffer("window", _tensor(window.reshape(n_fft, 1, 1)))
        self.register_buffer("stage1", _tensor(stage1))
        self.register_buffer("stage2", _tensor(stage2))
        self.register_buffer("stage3", _tensor(stage3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        assert length == self.length, (length, self.length)
        hop, frames = self.hop, self.frames
        a, b, c = self.radices
        signals = batch * channels
        columns = signals * frames
        # demucs re-pads so frame t starts at t·hop of the padded signal (see `_spec`); the
        # center padding of torch.stft only touches the two dropped frames on each side.
        pad = hop // 2 * 3
        x = F.pad(x, (pad, pad + frames * hop - length), mode="reflect")
        blocks = x.reshape(signals, frames + 3, hop).permute(2, 0, 1)  # [hop, signals, t]
        # Frame t = hop blocks t..t+3: sample n = m·hop + j of every frame, [n, signals, frames].
        framed = torch.cat([blocks[:, :, m : m + frames] for m in range(4)]) * self.window
        y = torch.matmul(self.stage1, framed.reshape(a, -1))  # [(p, ri), (b, c, M)]
        y = torch.matmul(self.stage2, y.reshape(a, 2 * b, c * columns))  # [p, (q, ri), (c, M)]
        y = torch.matmul(self.stage3, y.reshape(a * b, 2 * c, columns))  # [p, q, (ri, r), M]
        y = y.reshape(a, b, 2, c // 2, batch, channels, frames)
        y = y.permute(4, 5, 2, 3, 1, 0, 6)  # [B, C, ri, r, q, p, T]: k = p + A q + A B r
        return y.reshape(batch, 2 * channels, self.n_fft // 2, frames)


class Istft(_Framing):
    """[B, S, 2C, n_fft/2, T] spectrogram, channels (C, re/im) -> [B, S, C, length] waveform.

    The Nyquist bin is taken as zero, as in `HTDemucs._ispec`; like torch.istft (a C2R FFT),
    the imaginary part of the DC bin is ignored.

    The digits are contracted r, q, p, each stage a left matrix product over the axes that
    already lead, so the frame axis stays innermost and the only data movement is one
    block-wise transpose in (frames stay contiguous) and one of the output out. The twiddles,
    the DC weight and the scale ride on per-(p, q) stage-3 matrices rather than on passes over
    the data.
    """

    def __init__(self, n_fft: int, length: int):
        super().__init__(n_fft, length)
        a, b, c = self.radices
        # x[n] = (2/sqrt(N)) Re Σ_{k<N/2} d_k Z_k W_N^{-nk}, d_0 = 1/2 and d_k = 1: the real
        # output of a Hermitian spectrum, with the conjugates of `_factors`.
        w_a, w_b, w_c = (np.conj(w) for w in _factors(a, b, c))
        n_a, n_b, n_r = np.arange(a), np.arange(b), np.arange(c // 2)
        k = n_a[:, None, None, None] + a * n_b[None, :, None, None] + a * b * n_r[:, None]
        weight = np.where(k == 0, 0.5, 1.0) * 2.0 / math.sqrt(n_fft)  # [p, q, r, 1]
        # Stage 3 (r -> c) for every (p, q): rows (re/im, c), columns (re/im, r).
        stage3 = _as_real((weight * w_c).swapaxes(2, 3)).reshape(a * b, 2 * c, c)
        # Stage 2 (q -> b) for every p: rows (re/im, b), columns (q, re/im).
        w_b = w_b.transpose(0, 2, 1)  # [p, b, q]
        stage2 = np.stack(
            [np.stack([w_b.real, -w_b.imag], -1), np.stack([w_b.imag, w_b.real], -1)], 1
        ).reshape(a, 2 * b, 2 * b)  # [p, (ri', b), (q, ri)]
        # Stage 1 (p -> a), real part only: columns (p, re/im).
        stage1 = np.stack([w_a.real, -w_a.imag], -1).reshape(a, 2 * a)
        # torch.istft divides the overlap-add by the summed squared window, which is the constant
        # 1.5 for a periodic Hann window at hop N/4 wherever four frames overlap: all kept samples.
        window = _hann(n_fft) / 1.5
        self.register_buffer("stage3", _tensor(stage3))
        self.register_buffer("stage2", _tensor(stage2))
        self.register_buffer("stage1", _tensor(stage1))
        self.register_buffer("window", _tensor(window.reshape(4, self.hop, 1, 1)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, sources, channels2, bins, frames = z.shape
        assert bins == self.n_fft // 2 and frames == self.frames, (z.shape, self.frames)
        channels = channels2 // 2
        a, b, c = self.radices
        hop = self.hop
        signals = batch * sources * channels
        columns = signals * frames
        z = z.reshape(signals, 2, c // 2, b, a, frames).permute(4, 3, 1, 2, 0, 5)  # [p,q,ri,r,M]
        y = torch.matmul(self.stage3, z.reshape(a * b, c, columns))  # [p, q, (ri, c), M]
        y = torch.matmul(self.stage2, y.reshape(a, 2 * b, c * columns))  # [p, (ri, b), (c, M)]
        y = torch.matmul(self.stage1, y.reshape(2 * a, -1))  # [a, (b, c, M)]: sample n, frames
        y = y.reshape(4, hop, signals, frames) * self.window
        # Overlap-add: quarter m of frame t lands in hop block t + m.
        out = F.pad(y[:1], (0, 3))
        for m in range(1, 4):
            out = out + F.pad(y[m : m + 1], (m, 3 - m))  # Slice, not Gather: [1, hop, M']
        pad = hop // 2 * 3
        out = out.permute(0, 2, 3, 1).reshape(signals, (frames + 3) * hop)[
            :, pad : pad + self.length
        ]
        return out.reshape(batch, sources, channels, self.length)
