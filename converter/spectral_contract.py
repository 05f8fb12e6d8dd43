"""openkara.spectral-contract/v1 in float64 numpy: the STFT and ISTFT around a spectral-core file.

These are demucs' `HTDemucs._spec` / `_ispec` (docs/spectral-core.md), restated with numpy only so
that validation, `invoke separate` and the load test in a bare onnxruntime + numpy venv compute
exactly what OpenKara computes natively. Layout: audio [..., C, L] <-> spectrum
[..., C, 2 (re, im), F = n_fft / 2, T = ceil(L / hop)].
"""

from __future__ import annotations

import math

import numpy as np

N_FFT = 4096
HOP = N_FFT // 4
# Frames kept from the centred STFT of the padded signal: [FIRST_FRAME : FIRST_FRAME + T].
FIRST_FRAME = 2
# The outer reflect pad, 3/2 hop on the left (demucs' `hl // 2 * 3`).
OUTER_PAD = HOP // 2 * 3
# The inverse divides by the window envelope, floored here (torch checks > 1e-11; never reached).
ENVELOPE_FLOOR = 1e-8


def frames(length: int) -> int:
    """T: the number of frames the contract keeps for `length` samples (336 for 343980)."""
    return math.ceil(length / HOP)


def _window() -> np.ndarray:
    """Periodic Hann of N_FFT points (torch.hann_window's default)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)


def _reflect_pad(x: np.ndarray, left: int, right: int) -> np.ndarray:
    """demucs.hdemucs.pad1d(mode="reflect"): zero-extend first when the signal is too short."""
    length = x.shape[-1]
    widths = [(0, 0)] * (x.ndim - 1)
    if length <= max(left, right):
        extra = max(left, right) - length + 1
        extra_right = min(right, extra)
        extra_left = extra - extra_right
        left, right = left - extra_left, right - extra_right
        x = np.pad(x, widths + [(extra_left, extra_right)])
    return np.pad(x, widths + [(left, right)], mode="reflect")


def spec(audio: np.ndarray) -> np.ndarray:
    """[..., C, L] real -> [..., C, 2, N_FFT/2, T] float64, the contract's `spectral` input."""
    x = np.asarray(audio, dtype=np.float64)
    length = x.shape[-1]
    count = frames(length)
    padded = _reflect_pad(x, OUTER_PAD, OUTER_PAD + count * HOP - length)
    centred = _reflect_pad(padded, N_FFT // 2, N_FFT // 2)
    windows = np.lib.stride_tricks.sliding_window_view(centred, N_FFT, axis=-1)[..., ::HOP, :]
    windows = windows[..., FIRST_FRAME : FIRST_FRAME + count, :]
    z = np.fft.rfft(windows * _window(), axis=-1)[..., : N_FFT // 2] / math.sqrt(N_FFT)
    z = np.swapaxes(z, -1, -2)  # [..., F, T]
    return np.stack([z.real, z.imag], axis=-3)


def ispec(spectrum: np.ndarray, length: int) -> np.ndarray:
    """[..., C, 2, N_FFT/2, T] -> [..., C, length] float64, the inverse of `spec`."""
    z = np.asarray(spectrum, dtype=np.float64)
    z = z[..., 0, :, :] + 1j * z[..., 1, :, :]  # [..., F, T]
    count = z.shape[-1]
    if z.shape[-2] != N_FFT // 2 or count != frames(length):
        raise ValueError(
            f"spectrum of {z.shape[-2]} bins x {count} frames does not match "
            f"{N_FFT // 2} bins x {frames(length)} frames for {length} samples"
        )
    pad_width = [(0, 0)] * (z.ndim - 2)
    z = np.pad(z, pad_width + [(0, 1), (FIRST_FRAME, FIRST_FRAME)])  # Nyquist bin, edge frames
    total = count + 2 * FIRST_FRAME
    window = _window()
    chunks = np.fft.irfft(np.swapaxes(z, -1, -2), n=N_FFT, axis=-1) * math.sqrt(N_FFT) * window
    # Overlap-add: frame t covers hops t .. t+3; sum the four quarter-frames into hop blocks.
    parts = N_FFT // HOP
    chunks = chunks.reshape(*chunks.shape[:-1], parts, HOP)
    blocks = np.zeros((*chunks.shape[:-3], total + parts - 1, HOP))
    envelope = np.zeros((total + parts - 1, HOP))
    squared = (window**2).reshape(parts, HOP)
    for k in range(parts):
        blocks[..., k : k + total, :] += chunks[..., :, k, :]
        envelope[k : k + total] += squared[k]
    signal = blocks.reshape(*blocks.shape[:-2], -1)
    signal = signal / np.maximum(envelope.reshape(-1), ENVELOPE_FLOOR)
    start = N_FFT // 2 + OUTER_PAD
    return signal[..., start : start + length]
