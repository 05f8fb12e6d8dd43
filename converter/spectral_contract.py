"""openkara.spectral-contract/v1 in float64 numpy: the STFT and ISTFT around a spectral-core file.

These are demucs' `HTDemucs._spec` / `_ispec` (docs/spectral-core.md), restated with numpy only so
that validation, `invoke separate` and the load test in a bare onnxruntime + numpy venv compute
exactly what OpenKara computes natively. Layout: audio [..., C, L] <-> spectrum
[..., C, 2 (re, im), F = n_fft / 2, T = ceil(L / hop)]. Contract v1 is n_fft 4096; `n_fft`
parameters exist only for the small test-size models (same framing, hop n_fft / 4).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

N_FFT = 4096
HOP = N_FFT // 4
# Frames kept from the centred STFT of the padded signal: [FIRST_FRAME : FIRST_FRAME + T].
FIRST_FRAME = 2
# The outer reflect pad, 3/2 hop on the left (demucs' `hl // 2 * 3`).
OUTER_PAD = HOP // 2 * 3
# The inverse divides by the window envelope, floored here (torch checks > 1e-11; never reached).
ENVELOPE_FLOOR = 1e-8


def frames(length: int, n_fft: int = N_FFT) -> int:
    """T: the number of frames the contract keeps for `length` samples (336 for 343980)."""
    return math.ceil(length / (n_fft // 4))


def _window(n_fft: int = N_FFT) -> np.ndarray:
    """Periodic Hann of n_fft points (torch.hann_window's default)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)


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


# Work arrays kept between calls, one scratch dict per concurrent worker: fresh megabytes cost
# page faults, and numpy asks for transparent huge pages on large arrays, whose faults can stall
# on memory compaction for longer than the FFTs take once an ONNX Runtime session has run.
_SCRATCH: list[dict] = []
_SCRATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _scratch() -> Iterator[dict]:
    """One worker's scratch dict, taken from the kept ones and given back after."""
    with _SCRATCH_LOCK:
        scratch = _SCRATCH.pop() if _SCRATCH else {}
    try:
        yield scratch
    finally:
        with _SCRATCH_LOCK:
            _SCRATCH.append(scratch)


def _each(count: int, work: Callable[[int, dict], None]) -> None:
    """work(0, scratch) .. work(count - 1, scratch) on up to one thread per core: numpy's FFTs
    and array arithmetic release the GIL, so independent signals run in parallel. Each thread
    passes one kept `scratch` dict to every signal it takes (`_SCRATCH`)."""
    workers = max(1, min(count, os.cpu_count() or 1))

    def rows(first: int) -> None:
        with _scratch() as scratch:
            for index in range(first, count, workers):
                work(index, scratch)

    if workers == 1:
        rows(0)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(rows, range(workers)):
            pass


def _buffer(scratch: dict, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A work array of `shape` and `dtype` from `scratch`, kept per name and precision and
    replaced when the shape changes (test-size models), so it never grows past one of each."""
    key = (name, np.dtype(dtype).str)
    kept = scratch.get(key)
    if kept is None or kept.shape != shape:
        kept = scratch[key] = np.empty(shape, dtype=dtype)
    return kept


# numpy 2 computes FFTs in the input's precision and writes into `out=`; numpy 1 (the contract
# venvs of ORT 1.17 and 1.18) always returns a new float64 array.
_FFT_OUT = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


def _fft_out(scratch: dict, name: str, shape: tuple[int, ...], dtype: type) -> dict:
    """The `out=` keyword for an FFT writing into a reused buffer, where numpy supports it."""
    return {"out": _buffer(scratch, name, shape, dtype)} if _FFT_OUT else {}


def spec(audio: np.ndarray, n_fft: int = N_FFT, dtype: type = np.float64) -> np.ndarray:
    """[..., C, L] real -> [..., C, 2, n_fft/2, T] in `dtype`, the contract's `spectral` input.
    float64 for the gate; float32 is what an app's native FFT computes (separate, bench)."""
    x = np.asarray(audio, dtype=dtype)
    length = x.shape[-1]
    hop, count, bins = n_fft // 4, frames(length, n_fft), n_fft // 2
    outer = hop // 2 * 3
    signals = x.reshape(-1, length)
    out = np.empty((len(signals), 2, bins, count), dtype=dtype)
    window = _window(n_fft).astype(dtype)

    def one(row: int, scratch: dict) -> None:
        padded = _reflect_pad(signals[row], outer, outer + count * hop - length)
        centred = _reflect_pad(padded, n_fft // 2, n_fft // 2)
        windows = np.lib.stride_tricks.sliding_window_view(centred, n_fft)[::hop]
        framed = _buffer(scratch, "framed", (count, n_fft), dtype)
        np.multiply(windows[FIRST_FRAME : FIRST_FRAME + count], window, out=framed)
        spectrum_shape = (count, n_fft // 2 + 1)
        z = np.fft.rfft(
            framed, axis=-1, **_fft_out(scratch, "z", spectrum_shape, np.result_type(dtype, 1j))
        )
        # numpy divides a complex by a real as a product with its reciprocal: the same bits
        # here, written straight into the transposed output.
        scale = 1 / math.sqrt(n_fft)
        np.multiply(z.real[:, :bins].T, scale, out=out[row, 0])
        np.multiply(z.imag[:, :bins].T, scale, out=out[row, 1])

    _each(len(signals), one)
    return out.reshape(*x.shape[:-1], 2, bins, count)


@functools.lru_cache(maxsize=8)
def _synthesis(n_fft: int, total: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(√n_fft · window, 1 / the clamped window envelope of `total` frames): the inverse's
    data-independent factors, computed once per shape (read-only)."""
    hop = n_fft // 4
    parts = n_fft // hop
    window = _window(n_fft)
    squared = (window**2).reshape(parts, hop)
    envelope = np.zeros((total + parts - 1, hop))
    for k in range(parts):
        envelope[k : k + total] += squared[k]
    factors = tuple(
        factor.astype(dtype)
        for factor in (
            window * math.sqrt(n_fft),
            1 / np.maximum(envelope.reshape(-1), ENVELOPE_FLOOR),
        )
    )
    for factor in factors:
        factor.setflags(write=False)
    return factors


def ispec(
    spectrum: np.ndarray, length: int, n_fft: int = N_FFT, dtype: type = np.float64
) -> np.ndarray:
    """[..., C, 2, n_fft/2, T] -> [..., C, length] in `dtype` (as for `spec`), its inverse."""
    z = np.asarray(spectrum)
    bins, count = z.shape[-2], z.shape[-1]
    hop = n_fft // 4
    if bins != n_fft // 2 or count != frames(length, n_fft):
        raise ValueError(
            f"spectrum of {bins} bins x {count} frames does not match "
            f"{n_fft // 2} bins x {frames(length, n_fft)} frames for {length} samples"
        )
    total = count + 2 * FIRST_FRAME
    parts = n_fft // hop
    window, inverse_envelope = _synthesis(n_fft, total, np.dtype(dtype).type)
    start = n_fft // 2 + hop // 2 * 3
    spectra = z.reshape(-1, 2, bins, count)
    out = np.empty((len(spectra), length), dtype=dtype)

    def one(row: int, scratch: dict) -> None:
        # Frame-major, so each inverse FFT reads contiguous memory; irfft supplies the zero
        # Nyquist bin, and the two zero edge frames each side add nothing to the overlap-add.
        full = _buffer(scratch, "full", (count, bins), np.result_type(dtype, 1j))
        full.real = spectra[row, 0].T
        full.imag = spectra[row, 1].T
        chunks = np.fft.irfft(
            full, n=n_fft, axis=-1, **_fft_out(scratch, "chunks", (count, n_fft), dtype)
        )
        chunks *= window
        # Overlap-add: frame t covers hops t .. t+3; sum the four quarter-frames into hop blocks.
        chunks = chunks.reshape(count, parts, hop)
        blocks = _buffer(scratch, "blocks", (total + parts - 1, hop), chunks.dtype)
        blocks.fill(0)
        for k in range(parts):
            blocks[FIRST_FRAME + k : FIRST_FRAME + k + count] += chunks[:, k]
        signal = blocks.reshape(-1)[start : start + length]
        np.multiply(signal, inverse_envelope[start : start + length], out=out[row])

    _each(len(spectra), one)
    return out.reshape(*z.shape[:-3], length)
