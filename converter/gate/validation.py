"""The validation gate: the shipped file in ONNX Runtime against demucs itself in PyTorch.

The truth is `demucs.apply.apply_model(bag, x, split=False, shifts=0)` on the loaded bag run in
float64, never a re-implementation, so a flaw in how the converter combines a bag cannot hide in
the reference too. demucs in float32 is the bar: per stem, the file's error against the truth
may exceed PyTorch float32's own by at most MARGIN_DB, above an absolute floor so that silence
and exact zeros pass. Being relative to the stem's own float32 error, the gate does not scale
with loudness. Inputs cover what songs throw at the model: noise, tones, a sweep, digital
silence (the model divides by the segment's std), a DC offset, a clipped full-scale signal and
loud clipped noise. A spectral-core file is held to the same gate on its composed stems
(`ortcheck.run_stems`: the contract's STFT/ISTFT in float64 around the file, as the app does).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from demucs.apply import apply_model
from tqdm import tqdm

from converter.build.loading import LoadedBag
from converter.errors import UserError
from converter.facts import WAVEFORM
from converter.gate.accuracy import FLOOR_RMS, MARGIN_DB, allowed_mse, snr_db, stem_mse
from converter.gate.contract import expected_io
from converter.gate.ortcheck import open_session, run_stems
from converter.metadata import TENSOR_INTERFACE, atomic_path
from converter.progress import release_memory

log = logging.getLogger(__name__)

# The inputs recorded with demucs' float64 output beside the file, for `nox -s contract`: the
# ones where float32 arithmetic goes wrong first (noise, tones, a DC offset, loud clipping), so
# every ORT version and platform is held to the gate where it is hardest to meet.
CONTRACT_INPUTS = ("0.1 noise", "stereo sines", "dc offset", "loud clipped noise")


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
    dc = 0.5 + 0.05 * sines  # a DC offset 10x the signal: the input statistics' worst case
    loud = np.clip(np.random.default_rng(1).standard_normal((channels, length)), -1, 1)
    signals = {
        "0.1 noise": noise,
        "stereo sines": sines,
        "chirp": chirp,
        "silence": silence,
        "clipped full scale": clipped,
        "dc offset": dc,
        "loud clipped noise": loud,
    }
    return {name: s[None].astype(np.float32) for name, s in signals.items()}


def reference(bag: LoadedBag, audio: np.ndarray, double: bool = False) -> np.ndarray:
    """demucs' output for `audio`, in float32 (the bar) or, with `double`, float64 (the truth)."""
    model = copy.deepcopy(bag.bag).double() if double else bag.bag
    mix = torch.from_numpy(audio.astype(np.float64) if double else audio)
    with torch.no_grad():
        out = apply_model(model, mix, split=False, shifts=0)
    return out.numpy()


def session(path: Path):
    """A CPU session configured as OpenKara runs our files: ORT's own optimizer disabled.

    The memory arena is off: it changes no arithmetic, and with it the session's RSS grows from
    run to run (it doubled over two htdemucs runs), which would dominate the peak of a bag
    conversion.
    """
    return open_session(path, arena=False)


@dataclass(frozen=True)
class StemError:
    """One stem on one input: squared errors against the float64 truth."""

    signal: str
    stem: str
    power: float  # mean square of the truth
    mse: float  # the file's
    pytorch_mse: float  # demucs float32's
    vs_pytorch_mse: float  # the file against demucs float32
    max_abs: float  # the file's largest error
    finite: bool

    @property
    def allowed(self) -> float:
        return allowed_mse(self.pytorch_mse)

    @property
    def ok(self) -> bool:
        return self.finite and self.mse <= self.allowed

    @property
    def snr(self) -> float:
        return snr_db(self.power, self.mse)

    @property
    def pytorch_snr(self) -> float:
        return snr_db(self.power, self.pytorch_mse)


def compare(
    signal: str, stems: list[str], got: np.ndarray, truth: np.ndarray, pytorch: np.ndarray
) -> list[StemError]:
    """Rows for `got` (the file) and `pytorch` (demucs float32) against `truth` (float64)."""
    if got.shape != truth.shape:
        raise ValidationError(f"{signal}: output shape {got.shape}, demucs gives {truth.shape}")
    finite = np.isfinite(got).all(axis=(0, 2, 3))
    mse = np.where(finite, stem_mse(np.nan_to_num(got), truth), np.inf)
    pytorch_mse, vs_pytorch = stem_mse(pytorch, truth), stem_mse(np.nan_to_num(got), pytorch)
    power = np.mean(truth * truth, axis=(0, 2, 3))
    max_abs = np.max(np.abs(got.astype(np.float64) - truth), axis=(0, 2, 3))
    return [
        StemError(
            signal,
            stem,
            float(power[s]),
            float(mse[s]),
            float(pytorch_mse[s]),
            float(vs_pytorch[s]),
            float(max_abs[s]),
            bool(finite[s]),
        )
        for s, stem in enumerate(stems)
    ]


def _log_table(rows: list[StemError]) -> None:
    log.info(
        "%-20s %-8s %9s %9s %9s %12s %12s",
        "input",
        "stem",
        "SNR dB",
        "PyTorch",
        "gate",
        "MSE vs f32",
        "max |err|",
    )
    for row in rows:
        gate = snr_db(row.power, row.allowed)
        log.info(
            "%-20s %-8s %9.1f %9.1f %9.1f %12.3e %12.3e %s",
            row.signal,
            row.stem,
            row.snr,
            row.pytorch_snr,
            gate,
            row.vs_pytorch_mse,
            row.max_abs,
            "ok" if row.ok else "FAIL",
        )


def check_session_interface(sess, path: Path, bag: LoadedBag) -> str:
    """The file's stamped tensor interface, after checking its I/O is that interface's for
    `bag` (names, order, static shapes); ValidationError naming both otherwise."""
    interface = sess.get_modelmeta().custom_metadata_map.get(TENSOR_INTERFACE, WAVEFORM)
    channels, length = bag.models[0].audio_channels, bag.segment_samples
    want = expected_io(interface, len(bag.sources), channels, length, bag.models[0].nfft)
    got = (
        [(v.name, list(v.shape)) for v in sess.get_inputs()],
        [(v.name, list(v.shape)) for v in sess.get_outputs()],
    )
    if got != want:
        raise ValidationError(
            f"{path.name}: {interface} interface {got[0]} -> {got[1]}, "
            f"expected {want[0]} -> {want[1]}"
        )
    return interface


def validate_file(
    path: Path, bag: LoadedBag, reference_out: Path | None = None, outputs: dict | None = None
) -> list[StemError]:
    """Run every fixed input through `path` and demucs; raise ValidationError past the gate.

    With `reference_out`, the CONTRACT_INPUTS, demucs' float64 output for them and each stem's
    allowed MSE are saved there (npz, one leading axis per input), for the load test on other
    ORT versions (ortcheck). `outputs` receives every input and demucs' float64 and float32
    output for it (the seed sweep records them rather than running demucs again).
    """
    channels, length = bag.models[0].audio_channels, bag.segment_samples
    inputs = fixed_inputs(channels, length, bag.samplerate)
    # All PyTorch runs first: their activations are freed before ONNX Runtime allocates its
    # own, which keeps a four-model bag's conversion peak well below the sum of both.
    truths, pytorch = {}, {}
    for name, audio in tqdm(inputs.items(), desc="demucs float32 + float64", unit="input"):
        pytorch[name] = reference(bag, audio)
        truths[name] = reference(bag, audio, double=True)
    if outputs is not None:
        outputs.update(inputs=inputs, truth=truths, pytorch=pytorch)
    release_memory()
    sess = session(path)
    interface = check_session_interface(sess, path, bag)
    rows: list[StemError] = []
    for signal, audio in tqdm(inputs.items(), desc="onnxruntime", unit="input"):
        got = run_stems(sess, audio)
        rows += compare(signal, bag.sources, got, truths[signal], pytorch[signal])
    if reference_out is not None:
        allowed = {(r.signal, r.stem): r.allowed for r in rows}
        with atomic_path(reference_out) as tmp:
            with open(tmp, "wb") as file:
                np.savez(
                    file,
                    interface=np.array(interface),
                    inputs=np.array(CONTRACT_INPUTS),
                    audio=np.stack([inputs[name] for name in CONTRACT_INPUTS]),
                    stems=np.stack([truths[name] for name in CONTRACT_INPUTS]),
                    max_mse=np.array(
                        [[allowed[name, stem] for stem in bag.sources] for name in CONTRACT_INPUTS]
                    ),
                )
    _log_table(rows)
    failures = [r for r in rows if not r.ok]
    if failures:
        worst = max(failures, key=lambda r: r.mse / r.allowed)
        raise ValidationError(
            f"{path.name} fails the validation gate (per stem, error against demucs in float64 "
            f"at most {MARGIN_DB:g} dB above demucs float32's, finite) on {len(failures)} "
            f"stem(s); worst: stem {worst.stem!r} on input {worst.signal!r}: SNR "
            f"{worst.snr:.1f} dB, PyTorch float32 {worst.pytorch_snr:.1f} dB, MSE {worst.mse:.3e} "
            f"(allowed {worst.allowed:.3e}), max |err| {worst.max_abs:.3e}"
            + ("" if worst.finite else ", non-finite output")
        )
    worst = max(rows, key=lambda r: r.mse / r.allowed)
    log.info(
        "validation gate passed: closest stem %s on %s, file %.1f dB vs PyTorch float32 %.1f dB "
        "(gate: at most %g dB worse, floor %.1e RMS)",
        worst.stem,
        worst.signal,
        worst.snr,
        worst.pytorch_snr,
        MARGIN_DB,
        FLOOR_RMS,
    )
    return rows


def _worst_snr(out: np.ndarray, truth: np.ndarray) -> float:
    power = np.mean(truth * truth, axis=(0, 2, 3))
    return min(snr_db(p, m) for p, m in zip(power, stem_mse(out, truth), strict=True))


def snr_by_input(path: Path, bag: LoadedBag) -> list[dict]:
    """Worst-stem SNR (dB) against demucs in float64, per fixed input: the file at ORT's
    default options and with graph optimization off, and demucs in float32 (`invoke bench`)."""
    channels, length = bag.models[0].audio_channels, bag.segment_samples
    sessions = {
        "optimization off": session(path),
        "default options": open_session(path, optimize=True),
    }
    rows = []
    for signal, audio in fixed_inputs(channels, length, bag.samplerate).items():
        truth = reference(bag, audio, double=True)
        outputs = {name: run_stems(s, audio) for name, s in sessions.items()}
        files = {name: _worst_snr(out, truth) for name, out in outputs.items()}
        pytorch = _worst_snr(reference(bag, audio), truth)
        rows.append({"input": signal, "pytorch_snr_db": pytorch, "file_snr_db": files})
        shown = ", ".join(f"{k} {v:.1f} dB" for k, v in files.items())
        log.info(
            "%s: worst SNR vs float64: PyTorch float32 %.1f dB, file %s", signal, pytorch, shown
        )
    return rows
