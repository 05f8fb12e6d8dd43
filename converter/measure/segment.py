"""One segment of a converted file in an ONNX Runtime session, as apps run it: the session
options compared by `invoke bench` and `invoke compare`, the file's interface read off its
inputs, the deterministic test segment and its stems (`ortcheck.run_stems`). numpy and
onnxruntime only: `bench`'s and `pair_bench`'s children run in the bare contract venvs.
"""

from __future__ import annotations

import numpy as np

from converter.facts import INPUT_NAME, MIX_INPUT, SPECTRAL_CORE, SPECTRAL_INPUT, WAVEFORM
from converter.gate.ortcheck import open_session, run_stems
from converter.spectral_contract import spec

WARMUPS = 2  # also the "two segments" of the peak-RSS target: load, two runs, read the peak
# Session options compared, by label: (graph optimization on, CPU memory arena on, memory
# pattern on). The memory pattern is ORT's one block for all activations of a run, sized from
# the first run's trace: its best-fit layout costs more than the arena needs (docs/performance.md).
ORT_CONFIGS = {
    "default options": (True, True, True),
    "graph optimization off (OpenKara, separate)": (False, True, True),
    "optimization + memory pattern off": (False, True, False),
    "memory arena off": (True, False, True),
    "optimization + arena off": (False, False, True),
}
DEFAULT_CONFIG = "default options"
APP_CONFIG = "graph optimization off (OpenKara, separate)"


def test_audio(channels: int, length: int) -> np.ndarray:
    """The deterministic test segment [1, C, L]: every engine and file is timed on it."""
    return (0.1 * np.random.default_rng(0).standard_normal((1, channels, length))).astype(
        np.float32
    )


def ort_session(
    path: str, optimize: bool, arena: bool, pattern: bool, threads: int, profile: str | None = None
):
    return open_session(
        path, optimize=optimize, arena=arena, pattern=pattern, threads=threads, profile=profile
    )


def interface_of(session) -> str:
    """The file's tensor interface, read off its inputs: that is how it must be fed."""
    names = {i.name for i in session.get_inputs()}
    return SPECTRAL_CORE if {SPECTRAL_INPUT, MIX_INPUT} <= names else WAVEFORM


def segment_input(session) -> np.ndarray:
    """The deterministic test segment [1, C, L] that `session`'s file takes."""
    shapes = {i.name: i.shape for i in session.get_inputs()}
    shape = shapes[MIX_INPUT if interface_of(session) == SPECTRAL_CORE else INPUT_NAME]
    return test_audio(shape[1], shape[2])


def graph_feeds(session, audio: np.ndarray, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """The graph's inputs for `audio`: itself, or the contract's STFT of it beside the mix."""
    if interface_of(session) == WAVEFORM:
        return {INPUT_NAME: audio}
    return {
        SPECTRAL_INPUT: spec(audio, dtype=dtype).astype(np.float32, copy=False),
        MIX_INPUT: audio,
    }


def run_segment(
    session, audio: np.ndarray, graph_s: list[float] | None = None, dtype: type = np.float32
) -> np.ndarray:
    """Stems [1, S, C, L] of one segment as an app gets them (`ortcheck.run_stems`); a
    spectral-core file's numpy STFT/ISTFT in `dtype`: float32 by default, the precision of the
    graph's own tensors (an app has no reason to pay for float64), float64 for the gate's
    margin. The graph's own seconds are appended to `graph_s`."""
    return run_stems(session, audio, dtype, graph_s)
