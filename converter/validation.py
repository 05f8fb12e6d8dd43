"""The validation gate: the shipped file in ONNX Runtime against demucs itself in PyTorch.

The reference is `demucs.apply.apply_model(bag, x, split=False, shifts=0)` on the loaded bag,
never a re-implementation, so a flaw in how the converter combines a bag cannot hide in the
reference too. Inputs cover what songs throw at the model: noise, tones, a sweep, digital
silence (the model divides by the segment's std) and a clipped full-scale signal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .loading import LoadedBag
from .metadata import atomic_path
from .progress import release_memory

log = logging.getLogger(__name__)

MAX_MSE = 1e-10
# The input recorded with its PyTorch output beside the file, for `nox -s contract`.
CONTRACT_INPUT = "stereo sines"


class ValidationError(UserError):
    """The file's output differs from demucs' beyond the gate."""


def fixed_inputs(channels: int, length: int, samplerate: int) -> dict[str, np.ndarray]:
    """Deterministic [1, channels, length] float32 test signals (PCG64 is stable across numpy)."""
    t = np.arange(length) / samplerate
    noise = 0.1 * np.random.default_rng(0).standard_normal((channels, length))
    freqs = 220.0 * (1.5 ** np.arange(channels))
    sines = 0.5 * np.sin(2 * np.pi * freqs[:, None] * t)
    duration = length / samplerate
    sweep = 20.0 * duration / np.log(1000.0) * (np.exp(t / duration * np.log(1000.0)) - 1)
    chirp = np.tile(0.5 * np.sin(2 * np.pi * sweep), (channels, 1))
    silence = np.zeros((channels, length))
    clipped = np.clip(2.0 * np.sin(2 * np.pi * 110.0 * t + np.arange(channels)[:, None]), -1, 1)
    signals = {
        "0.1 noise": noise, CONTRACT_INPUT: sines, "chirp": chirp,
        "silence": silence, "clipped full scale": clipped,
    }  # fmt: skip
    return {name: s[None].astype(np.float32) for name, s in signals.items()}


def reference(bag: LoadedBag, audio: np.ndarray) -> np.ndarray:
    import torch
    from demucs.apply import apply_model

    with torch.no_grad():
        out = apply_model(bag.bag, torch.from_numpy(audio), split=False, shifts=0)
    return out.numpy()


def session(path: Path):
    """A CPU session configured as OpenKara runs our files: ORT's own optimizer disabled.

    The memory arena is off: it changes no arithmetic, and with it the session's RSS grows from
    run to run (it doubled over two htdemucs runs), which would dominate the peak of a bag
    conversion.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class StemError:
    signal: str
    stem: str
    mse: float
    max_abs: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.mse <= MAX_MSE


def compare(signal: str, stems: list[str], got: np.ndarray, want: np.ndarray) -> list[StemError]:
    if got.shape != want.shape:
        raise ValidationError(f"{signal}: output shape {got.shape}, demucs gives {want.shape}")
    rows = []
    for s, stem in enumerate(stems):
        diff = got[:, s].astype(np.float64) - want[:, s]
        finite = bool(np.isfinite(got[:, s]).all())
        mse = float(np.mean(diff**2)) if finite else float("inf")
        rows.append(StemError(signal, stem, mse, float(np.max(np.abs(diff))), finite))
    return rows


def validate_file(path: Path, bag: LoadedBag, reference_out: Path | None = None) -> list[StemError]:
    """Run every fixed input through `path` and demucs; raise ValidationError past the gate.

    With `reference_out`, the contract input and demucs' output for it are saved there (npz).
    """
    from tqdm import tqdm

    channels, length = bag.models[0].audio_channels, bag.segment_samples
    inputs = fixed_inputs(channels, length, bag.samplerate)
    # All PyTorch runs first: their activations are freed before ONNX Runtime allocates its
    # own, which keeps a four-model bag's conversion peak well below the sum of both.
    wanted = {name: reference(bag, audio) for name, audio in tqdm(inputs.items(), desc="demucs", unit="input")}
    release_memory()
    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    want_in, want_out = [1, channels, length], [1, len(bag.sources), channels, length]
    if inp.name != "audio" or list(inp.shape) != want_in or out.name != "stems" or list(out.shape) != want_out:
        raise ValidationError(
            f"{path.name}: interface {inp.name}{inp.shape} -> {out.name}{out.shape}, "
            f"expected audio{want_in} -> stems{want_out}"
        )
    rows: list[StemError] = []
    for signal, audio in tqdm(inputs.items(), desc="onnxruntime", unit="input"):
        want = wanted[signal]
        got = sess.run(["stems"], {"audio": audio})[0]
        rows += compare(signal, bag.sources, got, want)
        if reference_out is not None and signal == CONTRACT_INPUT:
            with atomic_path(reference_out) as tmp:
                with open(tmp, "wb") as file:
                    np.savez(file, audio=audio, stems=want.astype(np.float32))
    log.info("%-20s %-8s %12s %12s", "input", "stem", "MSE", "max |err|")
    for row in rows:
        log.info("%-20s %-8s %12.3e %12.3e %s", row.signal, row.stem, row.mse, row.max_abs,
                 "ok" if row.ok else "FAIL")  # fmt: skip
    failures = [r for r in rows if not r.ok]
    if failures:
        worst = max(failures, key=lambda r: r.mse)
        raise ValidationError(
            f"{path.name} fails the validation gate (MSE <= {MAX_MSE:g}, finite) on "
            f"{len(failures)} stem(s); worst: stem {worst.stem!r} on input {worst.signal!r}: "
            f"MSE {worst.mse:.3e}, max |err| {worst.max_abs:.3e}"
            + ("" if worst.finite else ", non-finite output")
        )
    log.info("validation gate passed: worst MSE %.3e (gate %g)", max(r.mse for r in rows), MAX_MSE)
    return rows
