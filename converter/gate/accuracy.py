"""The accuracy gate's numbers and arithmetic, with nothing but numpy.

One home for the gate: `converter.gate.validation` applies it at conversion time and records each
stem's bound beside the file, which `converter.gate.ortcheck` reads on every ORT version, and
`converter.gate.contract` computes its stand-in model's bound here without importing torch.
"""

from __future__ import annotations

import math

import numpy as np

# Two float32 implementations that round in different orders land within a few dB of each
# other against the truth; 6 dB (twice the RMS error) allows that, while a real defect (one
# wrong weight, a wrong rewrite) costs tens of dB.
MARGIN_DB = 6.0
# An RMS error under 2^-24 of full scale (float32's resolution there, half a 24-bit LSB) is
# inaudible and below any output file's resolution: the floor under PyTorch's error that lets
# silence and exact zeros pass (and very accurate stems: PyTorch reaches 150 dB on DC offsets).
FLOOR_RMS = 2.0**-24


def allowed_mse(pytorch_mse: float) -> float:
    """The gate: the largest error (MSE against the truth) a stem may have, given PyTorch's."""
    return 10 ** (MARGIN_DB / 10) * max(pytorch_mse, FLOOR_RMS**2)


def snr_db(power: float, mse: float) -> float:
    """10·log10(power / mse); inf for an exact result, -inf for a non-finite one."""
    if not math.isfinite(mse):
        return -math.inf
    if mse == 0:
        return math.inf
    return 10 * math.log10(power / mse) if power > 0 else -math.inf


def stem_mse(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per-stem mean squared difference of [1, S, C, L] outputs, in float64."""
    diff = got.astype(np.float64) - want.astype(np.float64)
    return np.mean(diff * diff, axis=tuple(i for i in range(diff.ndim) if i != 1))
