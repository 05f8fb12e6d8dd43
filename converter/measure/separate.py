"""`invoke separate`: a whole song through a converted file, exactly as an app would run it.

Only numpy, onnxruntime, soundfile (and soxr for other sample rates) are used, never torch, so
what this produces is what OpenKara gets from the file. The semantics are demucs 4.1.0's
`Separator.separate_tensor` + `apply_model(split=True)`: track-level normalization, segments of
the file's fixed length with the given overlap and demucs' triangular transition weights, the
"shift trick", centered padding of short chunks. The output is streamed: a chunk only touches
one segment of the output, and once every chunk that starts before a frame is done that frame
is final, so it is written to the stem files at once and memory stays bounded by a few segments
whatever the song length.

Both tensor interfaces run here, chosen by the file's metadata and checked against its I/O: a
waveform file takes the segment and returns stems; for a spectral-core file the contract's STFT
and ISTFT run outside the graph in float64 numpy (`converter.spectral_contract`), as OpenKara
does: stems[s] = ispec(spectral_out[s]) + time_out[s]. `--karaoke` writes vocals and their
complement; for a spectral-core file the complement is one ISTFT of the summed spectra, as the
app computes it (exact by linearity).

Bad input never becomes bad stems: a NaN or Inf sample is refused with its time, a truncated
file is separated as far as it goes with a warning that gives both lengths, a file that loses
audio in the middle or fails to decode is refused at that place, and stems that are not finite
are never written. Other sample rates are resampled as a stream (soxr's `ResampleStream`), so
memory stays at a few segments at any rate. The output folder is locked while a run writes it;
stems and a `separation.json` record are staged and replace the previous set as a whole
(files of a larger previous set included), together or not at all (`converter.staging`), also
on Ctrl-C, SIGTERM or a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from converter import __version__, spectral_contract
from converter import metadata as meta
from converter.errors import UserError
from converter.facts import (
    INPUT_NAME,
    INTERFACES,
    MIX_INPUT,
    OUTPUT_NAME,
    SPECTRAL_CONTRACT,
    SPECTRAL_CORE,
    SPECTRAL_INPUT,
    SPECTRAL_OUTPUT,
    TIME_OUTPUT,
    WAVEFORM,
)
from converter.gate.contract import expected_io
from converter.gate.ortcheck import open_session
from converter.progress import peak_rss_mb
from converter.staging import PREFIX, Staging, check_targets, note_on_interrupt

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/htdemucs.onnx")
# demucs adds this to the track's std so that digital silence does not divide by zero.
STD_EPSILON = 1e-8
# demucs' shift trick pads by half a second and shifts by a random amount up to that.
MAX_SHIFT_SECONDS = 0.5
# Frames per step of the statistics pass (a streamed song holds up to twice this at once).
STAT_BLOCK_FRAMES = 1 << 18
# Source frames decoded (and resampled) per step of a streamed read.
STREAM_BLOCK_FRAMES = 1 << 16
# Frames a streamed read keeps before the one asked for (at least half of any segment).
HISTORY_FRAMES = 1 << 19
# Frames per read when looking for the place a file is damaged (coarse, then fine).
PROBE_FRAMES = (1 << 16, 1 << 10)
METADATA_KEYS = (meta.STEMS, meta.SAMPLE_RATE, meta.SEGMENT_SAMPLES, meta.AUDIO_CHANNELS)
# The provenance records what the runtime metadata said at conversion (`pipeline`).
PROVENANCE_KEYS = {
    meta.STEMS: "stems",
    meta.SAMPLE_RATE: "sample_rate",
    meta.SEGMENT_SAMPLES: "segment_samples",
    meta.AUDIO_CHANNELS: "audio_channels",
}
# Stem names become file names: no separators, no hidden or relative names, short.
STEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")
MAX_STEM_NAME = 64
# The highest rate audio is sold at, twice over; a larger one is an edited file, not a model.
MAX_SAMPLE_RATE = 768_000
# Each shift is one more whole pass, and one more segment-sized buffer per stem.
MAX_SHIFTS = 20
# What a run leaves beside the stems: the song, the file and the options that produced them.
MANIFEST = "separation.json"
VOCALS, ACCOMPANIMENT = "vocals", "accompaniment"
# Free space below which a bare write error is taken for a full disk.
LOW_SPACE_BYTES = 16 << 20


@dataclass(frozen=True)
class ModelInfo:
    """What the separation needs to know about a converted file, all read from its metadata."""

    stems: list[str]
    samplerate: int
    segment: int
    channels: int
    models: int  # members of the bag fused into the file
    interface: str = WAVEFORM


def model_info(metadata: dict[str, str], path: Path) -> ModelInfo:
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise UserError(
            f"{path} lacks the metadata {', '.join(missing)}: it is not a file written by "
            "`invoke convert`; pass one with --model"
        )
    # Files from before the key existed are waveform files.
    interface = metadata.get(meta.TENSOR_INTERFACE, WAVEFORM)
    if interface not in INTERFACES:
        raise UserError(
            f"{path} has {meta.TENSOR_INTERFACE}={interface!r}, not one of "
            f"{', '.join(INTERFACES)}; convert the model again with `invoke convert`"
        )
    contract = metadata.get(meta.SPECTRAL_CONTRACT)
    if interface == SPECTRAL_CORE and contract != SPECTRAL_CONTRACT:
        raise UserError(
            f"{path} is a spectral-core file of {meta.SPECTRAL_CONTRACT}={contract!r}; this "
            f"separator computes {SPECTRAL_CONTRACT} only: convert the model again"
        )
    try:
        provenance = json.loads(metadata.get(meta.PROVENANCE, "{}"))
        signatures = provenance.get("signatures") if isinstance(provenance, dict) else None
        info = ModelInfo(
            stems=metadata[meta.STEMS].split(","),
            samplerate=int(metadata[meta.SAMPLE_RATE]),
            segment=int(metadata[meta.SEGMENT_SAMPLES]),
            channels=int(metadata[meta.AUDIO_CHANNELS]),
            models=len(signatures) if isinstance(signatures, list) and signatures else 1,
            interface=interface,
        )
    except ValueError as exc:
        raise UserError(f"{path} has malformed openkara.* metadata ({exc})") from None
    sizes = {
        meta.SAMPLE_RATE: info.samplerate,
        meta.SEGMENT_SAMPLES: info.segment,
        meta.AUDIO_CHANNELS: info.channels,
    }
    wrong = [f"{key}={value}" for key, value in sizes.items() if value <= 0]
    if info.samplerate > MAX_SAMPLE_RATE:
        wrong.append(f"{meta.SAMPLE_RATE}={info.samplerate} (at most {MAX_SAMPLE_RATE})")
    longest = max(map(len, info.stems))
    if longest > MAX_STEM_NAME:
        wrong.append(f"{meta.STEMS} has a {longest}-character name (at most {MAX_STEM_NAME})")
    elif len(set(info.stems)) != len(info.stems) or not all(map(STEM_NAME.fullmatch, info.stems)):
        names = metadata[meta.STEMS]
        wrong.append(f"{meta.STEMS}={names!r} (distinct names of letters, digits, _+-)")
    if wrong:
        raise UserError(
            f"{path} has impossible openkara.* metadata: {', '.join(wrong)}; it was not written by "
            "`invoke convert` or was edited since: convert the model again"
        )
    edited = [
        f"{key}={metadata[key]!r} (converted as {recorded!r})"
        for key, recorded in recorded_metadata(provenance).items()
        if metadata[key] != recorded
    ]
    if edited:
        raise UserError(
            f"{path}: its metadata {', '.join(edited)} disagrees with the provenance stamped at "
            "conversion, so stems would be mislabeled or resampled wrongly; the file was edited "
            "since `invoke convert`: convert the model again"
        )
    return info


def recorded_metadata(provenance: object) -> dict[str, str]:
    """The runtime metadata as the provenance recorded it at conversion, where it did."""
    if not isinstance(provenance, dict):
        return {}
    recorded = {}
    for key, name in PROVENANCE_KEYS.items():
        value = provenance.get(name)
        if isinstance(value, list):
            recorded[key] = ",".join(map(str, value))
        elif isinstance(value, int | str):
            recorded[key] = str(value)
    return recorded


def check_input(path: Path, what: str, directory: str, missing: str) -> None:
    """Refuse a path that is not a readable regular file, saying what it is instead.

    `directory` and `missing` are the fixes to suggest for a folder and a missing file.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(
                f"{what} {path} is a symbolic link loop (it never reaches a file); point it "
                "at a file"
            ) from None
        if os.path.islink(path):  # False, not an error, where a folder above is unreadable
            raise UserError(
                f"{what} {path} is a broken symbolic link (to {os.readlink(path)}); {missing}"
            ) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UserError(f"{what} {path} does not exist; {missing}") from None
        raise UserError(
            f"{what} {path} cannot be looked at: {exc.strerror} (a folder above it is not "
            "searchable); make it readable or copy the file"
        ) from None
    kinds = {
        stat.S_ISDIR: f"a directory; {directory}",
        stat.S_ISFIFO: "a FIFO (named pipe), not a file: it is read more than once (statistics, "
        "then separation); save it to a file first",
        stat.S_ISCHR: "a character device, not a file (/dev/null reads as nothing); pass a file",
        stat.S_ISBLK: "a block device, not a file; pass a file",
        stat.S_ISSOCK: "a socket, not a file; pass a file",
    }
    for test, kind in kinds.items():
        if test(mode):
            raise UserError(f"{what} {path} is {kind}")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file; pass a file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise UserError(
            f"{what} {path} is not readable: permission denied (mode {stat.filemode(mode)}); "
            "make it readable (chmod a+r) or copy it"
        ) from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be opened: {exc.strerror}") from None


def _io_text(io: tuple[list, list]) -> str:
    def side(values: list) -> str:
        return ", ".join(f"{name}{shape}" for name, shape in values)

    return f"{side(io[0])} -> {side(io[1])}"


class Engine:
    """An onnxruntime session on a converted file: one segment in, every stem (or every group
    of stems summed, `groups`) out, whatever the file's tensor interface."""

    def __init__(self, path: Path):

        check_input(
            path,
            "model file",
            "pass the .onnx file with --model",
            "convert one with `invoke convert`",
        )
        # OpenKara skips ORT's optimizer for files optimized offline (all converted files are);
        # the metadata can only be read from a session, so that is the first one tried.
        try:
            self.session = open_session(path)
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise UserError(f"{path} is not an ONNX model onnxruntime can load: {exc}") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.info = model_info(metadata, path)
        if metadata.get(meta.OPTIMIZED_BY) == meta.OPTIMIZED_BY_VALUE:
            log.info("%s is pre-optimized: graph optimization disabled, as in OpenKara", path.name)
        else:
            log.info("%s is not marked pre-optimized: ORT's default optimization", path.name)
            del self.session
            self.session = open_session(path, optimize=True)
        info = self.info
        got = (
            [(v.name, list(v.shape)) for v in self.session.get_inputs()],
            [(v.name, list(v.shape)) for v in self.session.get_outputs()],
        )
        # The contract's frequency bins give its n_fft (4096 but in test-size models).
        bins = got[0][0][1][3] if got[0] and len(got[0][0][1]) == 5 else 0
        self.n_fft = 2 * bins if isinstance(bins, int) and bins > 0 else 0
        # Imported here: the gate's module loads onnx, which separating needs nowhere else.
        # Without a readable bin count, contract v1's n_fft: the mismatch is then reported.
        n_fft = self.n_fft or spectral_contract.N_FFT
        want = expected_io(info.interface, len(info.stems), info.channels, info.segment, n_fft)
        if got != want:
            raise UserError(
                f"{path}: interface {_io_text(got)} does not match its metadata "
                f"({info.interface}: {_io_text(want)})"
            )
        # None: every stem as it is; else one output per list, the sum of those stems.
        self.groups: list[list[int]] | None = None
        log.info(
            "model %s: %s interface, stems %s, %d Hz, segment %d samples",
            path.name,
            info.interface,
            ",".join(info.stems),
            info.samplerate,
            info.segment,
        )

    def _combine(self, outputs: np.ndarray, dtype: type) -> np.ndarray:
        """[S, ...] -> [G, ...]: each group's stems summed, in `dtype`."""
        if self.groups is None:
            return outputs.astype(dtype, copy=False)
        return np.stack([outputs[group].sum(0, dtype=dtype) for group in self.groups])

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """[channels, segment] -> [stems or groups, channels, segment]."""
        if self.info.interface == WAVEFORM:
            stems = self.session.run([OUTPUT_NAME], {INPUT_NAME: audio[None]})[0][0]
            return self._combine(stems, np.float32)
        spectral = spectral_contract.spec(audio, self.n_fft).astype(np.float32)
        spectral_out, time_out = self.session.run(
            [SPECTRAL_OUTPUT, TIME_OUTPUT], {SPECTRAL_INPUT: spectral[None], MIX_INPUT: audio[None]}
        )
        # One ISTFT per output: a group's spectra are summed first, as OpenKara's karaoke does.
        waves = spectral_contract.ispec(
            self._combine(spectral_out[0], np.float64), audio.shape[-1], self.n_fft
        )
        return (waves + self._combine(time_out[0], np.float64)).astype(np.float32)


def outputs(stems: list[str], karaoke: bool) -> tuple[list[str], list[list[int]] | None]:
    """The names written and the stems summed into each (None: the stems themselves)."""
    if not karaoke:
        return stems, None
    if VOCALS not in stems:
        raise UserError(f"--karaoke needs a {VOCALS!r} stem; this file has {', '.join(stems)}")
    vocals = stems.index(VOCALS)
    return [VOCALS, ACCOMPANIMENT], [[vocals], [i for i in range(len(stems)) if i != vocals]]


def convert_channels(frames: np.ndarray, channels: int) -> np.ndarray:
    """[source channels, n] -> [channels, n] by demucs' `convert_audio_channels` rules."""
    source = frames.shape[0]
    if source == channels:
        return frames
    if channels == 1:
        return frames.mean(0, keepdims=True)
    if source == 1:
        return np.repeat(frames, channels, axis=0)
    if source > channels:
        return frames[:channels]
    raise UserError(f"the audio has {source} channels; the model needs {channels} (or mono)")


@dataclass
class Track:
    """A song at the model's rate and channel count, normalized like `demucs.separate`.

    `read(start, stop)` returns raw frames [channels, stop - start] for 0 <= start < stop <=
    length; `window` adds the normalization and the zero padding outside the track.
    """

    read: Callable[[int, int], np.ndarray]
    length: int
    channels: int
    mean: float = 0.0
    std: float = 1.0

    def window(self, start: int, size: int) -> np.ndarray:
        out = np.zeros((self.channels, size), np.float32)
        lo, hi = max(start, 0), min(start + size, self.length)
        if lo < hi:
            frames = self.read(lo, hi)
            if frames.shape[1] != hi - lo:
                raise UserError(f"the audio file changed while being read (frames {lo}-{hi})")
            out[:, lo - start : hi - start] = (frames - self.mean) / self.std
        return out


def normalize(track: Track) -> Track:
    """Set `track`'s mean/std as demucs does: statistics of the channel-mean signal.

    One streaming pass in float64 (Chan et al.'s pairwise update), so a long file is never held
    in memory just for two numbers; the std is the unbiased one, as torch's `Tensor.std`. A
    short read ends the track there (a truncated file whose header promised more).
    """
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, track.length, STAT_BLOCK_FRAMES):
        stop = min(start + STAT_BLOCK_FRAMES, track.length)
        mono = track.read(start, stop).mean(0, dtype=np.float64)
        if mono.size < stop - start:
            track.length = start + mono.size
        if not mono.size:
            break
        n, block_mean = mono.size, float(mono.mean())
        block_m2 = float(((mono - block_mean) ** 2).sum())
        delta, total = block_mean - mean, count + n
        mean += delta * n / total
        m2 += block_m2 + delta**2 * count * n / total
        count = total
        if start + n < stop:
            break
    std = (m2 / (count - 1)) ** 0.5 if count > 1 else 0.0
    track.mean, track.std = mean, std + STD_EPSILON
    log.info("track normalization: mean %.3g, std %.3g", mean, std)
    return track


class Decoded:
    """The song at the model's rate and channel count, decoded (and resampled) as a stream.

    `read(start, stop)` serves frames from one reused buffer that holds the last request and
    up to one request's length before it; reads move forward (the chunks of a separation
    overlap by at most a segment), and one that starts earlier than that restarts the decoding
    from the top. Resampling is soxr's `ResampleStream` at very high quality, which gives
    exactly `soxr.resample`'s output, so memory stays at a few blocks however long the song is.
    """

    def __init__(self, path: Path, samplerate: int, channels: int):
        self.path, self.samplerate, self.channels = path, samplerate, channels
        self.sound = None
        # One buffer, grown to what the largest read needs and reused: appending by
        # concatenation copied it on every block (peak RSS at 48 kHz 1.3x that at 44.1 kHz).
        self.store = np.zeros((channels, 0), np.float32)
        self.restart()
        self.present = self.declared  # source frames, until the decoding ends early

    def restart(self) -> None:
        if self.sound is not None:
            self.sound.close()
            log.info("decoding %s again from the start", self.path.name)
        self.sound = sf.SoundFile(self.path)
        self.rate, self.declared = self.sound.samplerate, self.sound.frames
        self.stream = None
        if self.rate != self.samplerate:
            self.stream = soxr.ResampleStream(
                self.rate, self.samplerate, self.channels, dtype="float32", quality="VHQ"
            )
        self.used = 0  # frames of `store` in use, from output frame `origin` on
        self.origin = 0
        self.decoded = 0  # source frames decoded
        self.ended = False

    @property
    def length(self) -> int:
        """Output frames the declared source frames give (soxr rounds; a short read corrects)."""
        return math.ceil(self.declared * self.samplerate / self.rate) + 1

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) (fewer at the end): a view, valid until the next read."""
        if start < self.origin:
            self.restart()
        # Forget what no later read needs before decoding more: a later window starts at most
        # half a segment before this one (the centered padding of a short chunk).
        drop = min(max(0, start - min(stop - start, HISTORY_FRAMES) - self.origin), self.used)
        self.used -= drop
        self.store[:, : self.used] = self.store[:, drop : drop + self.used]
        self.origin += drop
        while self.origin + self.used < stop and not self.ended:
            self._pull()
        end = min(stop - self.origin, self.used)
        return self.store[:, min(start - self.origin, end) : end]

    def _append(self, frames: np.ndarray) -> None:
        count = frames.shape[1]
        if self.used + count > self.store.shape[1]:
            grown = np.empty((self.channels, self.used + count), np.float32)
            grown[:, : self.used] = self.store[:, : self.used]
            self.store = grown
        self.store[:, self.used : self.used + count] = frames
        self.used += count

    def _pull(self) -> None:
        try:
            block = self.sound.read(STREAM_BLOCK_FRAMES, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            inspect_damage(self.path, self.declared)
            raise UserError(_decode_error(self.path, self.decoded, self.rate, exc)) from None
        check_finite(block, self.decoded, self.rate, self.path)
        self.decoded += block.shape[0]
        last = block.shape[0] < STREAM_BLOCK_FRAMES
        frames = convert_channels(block.T, self.channels)
        if self.stream is not None:
            chunk = np.ascontiguousarray(frames.T)
            frames = self.stream.resample_chunk(chunk, last=last).T
        self._append(frames)
        if last:
            self.ended = True
            if self.decoded < self.declared:
                self.present = inspect_damage(self.path, self.declared)


class Seeking:
    """The song read from disk where asked (its rate is the model's and it can seek)."""

    def __init__(self, sound, path: Path, channels: int):
        self.sound, self.path, self.channels = sound, path, channels
        self.rate, self.declared = sound.samplerate, sound.frames
        self.length = self.present = sound.frames  # until a read ends early
        self.inspected = False

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            self.sound.seek(start)
            frames = self.sound.read(stop - start, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            inspect_damage(self.path, self.declared)
            raise UserError(_decode_error(self.path, start, self.rate, exc)) from None
        if frames.shape[0] < stop - start and not self.inspected:
            self.inspected = True  # once: the track ends where the file does
            self.present = inspect_damage(self.path, self.declared)
        check_finite(frames, start, self.rate, self.path)
        return convert_channels(frames.T, self.channels)


def _decode_error(path: Path, frame: int, rate: int, exc: Exception) -> str:
    return (
        f"cannot decode {path} at {clock(frame / rate)} (frame {frame}; {exc}): the file is "
        "damaged there; repair or re-encode it"
    )


def inspect_damage(path: Path, declared: int) -> int:
    """Find why `path` decodes short of the `declared` frames; return the frames it holds.

    Decoded straight through in small blocks: a decoding error is reported at its place, and
    so is a gap (audio that resumes after a missing stretch, as a damaged OGG page leaves: every
    later stem would be early); a file that just ends early returns where it ends.
    """
    fine = PROBE_FRAMES[-1]
    with sf.SoundFile(path) as sound:
        rate, done = sound.samplerate, 0
        try:
            while (count := sound.read(fine, dtype="float32").shape[0]) == fine:
                done += count
            done += count
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise UserError(_decode_error(path, done, rate, exc)) from None
        if done >= declared or not sound.seekable() or not _resumes(sound, done, declared):
            return done
    missing = declared - done
    where = _first_gap(path, done)
    place = f"near {clock(where / rate)}" if where is not None else "in the middle"
    raise UserError(
        f"{path} loses {clock(missing / rate)} of audio {place}: decoded it holds {done} frames "
        f"but its timestamps run to {declared} ({clock(declared / rate)}), so every stem after "
        "the gap would be early; repair or re-encode the file"
    )


def _resumes(sound, done: int, declared: int) -> bool:
    """Whether audio can be read at a timestamp past the `done` frames decoded in a row."""
    probe = min(PROBE_FRAMES[-1], declared - done)
    try:
        sound.seek(declared - probe)
        return sound.read(probe, dtype="float32").shape[0] > 0
    except (sf.LibsndfileError, RuntimeError):
        return False


def _first_gap(path: Path, done: int) -> int | None:
    """The first frame where decoding in a row and reading at that timestamp disagree."""
    start, stop = 0, done
    for size in PROBE_FRAMES:
        with sf.SoundFile(path) as straight, sf.SoundFile(path) as seeking:
            for _ in range(start // size):  # decoded in a row up to `start`, never seeked
                straight.read(size, dtype="float32")
            for at in range(start, stop, size):
                block = straight.read(size, dtype="float32")
                seeking.seek(at)
                other = seeking.read(size, dtype="float32")
                if block.shape != other.shape or not np.allclose(block, other, atol=1e-3):
                    start, stop = at, at + size
                    break
            else:
                return None
    return start


def clock(seconds: float) -> str:
    """`m:ss.mmm`, how a user finds a place in a song."""
    minutes, millis = divmod(round(seconds * 1000), 60000)
    return f"{minutes}:{millis / 1000:06.3f}"


def wav_declared_frames(path: Path) -> int | None:
    """Frames the `data` chunk of a RIFF/RF64 WAV header declares, or None if not a WAV.

    libsndfile counts only the frames actually in the file, so a truncated WAV would otherwise
    go unnoticed. 0 and 0xFFFFFFFF (streamed files of unknown length) declare nothing.
    """
    with open(path, "rb") as file:
        head = file.read(12)
        if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return None
        block_align, data64 = 0, 0
        while len(chunk := file.read(8)) == 8:
            name, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if name == b"data":
                size = data64 if size == 0xFFFFFFFF and data64 else size
                return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
            if name == b"fmt ":
                block_align = int.from_bytes(file.read(size)[12:14], "little")
            elif name == b"ds64":
                data64 = int.from_bytes(file.read(size)[8:16], "little")
            else:
                file.seek(size, 1)
            file.seek(file.tell() % 2, 1)  # chunks start at even offsets
    return None


def check_finite(frames: np.ndarray, start: int, rate: int, path: Path) -> None:
    """Refuse NaN/Inf samples ([n, channels] from file frame `start`): one would turn every
    stem into NaN through the track normalization."""
    bad = ~np.isfinite(frames)
    if bad.any():
        frame, channel = (int(i) for i in np.argwhere(bad)[0])
        raise UserError(
            f"{path} holds a non-finite sample ({frames[frame, channel]}) at "
            f"{clock((start + frame) / rate)} (frame {start + frame}, channel {channel + 1}); "
            "every stem would be NaN. Repair or re-export the audio"
        )


@contextlib.contextmanager
def open_track(path: Path, samplerate: int, channels: int) -> Iterator[Track]:
    """Open `path` as a normalized Track, read from disk or decoded as a stream as needed."""
    try:
        sound = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise UserError(f"cannot read {path} as audio ({exc}); use WAV or FLAC") from None
    with sound:
        rate = sound.samplerate
        if sound.frames <= 0:
            raise UserError(f"{path} holds no audio frames")
        log.info(
            "%s: %d Hz, %d channel(s), %.1f s",
            path.name,
            rate,
            sound.channels,
            sound.frames / rate,
        )
        if sound.channels != channels:
            log.info("%d channel(s) -> %d, as demucs converts them", sound.channels, channels)
        source: Seeking | Decoded
        if rate == samplerate and sound.seekable():
            source = Seeking(sound, path, channels)
        else:
            if rate != samplerate:
                log.info("resampling %d Hz -> %d Hz with soxr (VHQ), streamed", rate, samplerate)
            source = Decoded(path, samplerate, channels)
        try:
            track = normalize(Track(source.read, source.length, channels))
            present = source.present
            declared = max(sound.frames, wav_declared_frames(path) or 0)
            if not present or not track.length:
                raise UserError(f"{path} holds no audio frames (its header declares {declared})")
            if present < declared:
                log.warning(
                    "%s is truncated: its header declares %d frames (%s), the file holds %d "
                    "(%s); separating the %s present",
                    path,
                    declared,
                    clock(declared / rate),
                    present,
                    clock(present / rate),
                    clock(present / rate),
                )
            yield track
        finally:
            if isinstance(source, Decoded) and source.sound is not None:
                source.sound.close()


@dataclass(frozen=True)
class Chunk:
    """One model call: output frames [start, start + kept) of shift pass `shift`.

    `start` is in track frames and negative for a shifted pass's first chunks; the model input
    begins `pad` frames earlier (demucs' centered padding of a chunk shorter than a segment).
    """

    start: int
    kept: int
    pad: int
    shift: int


def transition_weight(segment: int, power: float = 1.0) -> np.ndarray:
    """demucs' triangle: 1..segment//2 then back down to 1, normalized, to `power`."""
    up = np.arange(1, segment // 2 + 1)
    down = np.arange(segment - segment // 2, 0, -1)
    weight = np.concatenate([up, down]).astype(np.float64)
    return ((weight / weight.max()) ** power).astype(np.float32)


def plan(length: int, segment: int, overlap: float, bases: Sequence[int]) -> list[Chunk]:
    """Every model call of `apply_model(split=True)` over a track, in order of `start`.

    `bases` holds one entry per pass: 0 without shifts, `offset - max_shift` for a shift pass,
    whose view of the zero-padded track begins there. Chunks that only produce frames before
    the track (which demucs computes and then cuts off) are skipped.
    """
    stride = int((1 - overlap) * segment)
    chunks = []
    for shift, base in enumerate(bases):
        view = length - base
        for offset in range(0, view, stride):
            kept = min(view - offset, segment)
            if base + offset + kept > 0:
                chunks.append(Chunk(base + offset, kept, (segment - kept) // 2, shift))
    return sorted(chunks, key=lambda c: (c.start, c.shift))


class OverlapAdd:
    """Weighted overlap-add over a sliding window one segment long, one buffer per pass.

    Each pass divides by its own weight sum before the passes are averaged, as demucs does; a
    frame is emitted once no chunk still to come can touch it.
    """

    def __init__(self, passes: int, stems: int, channels: int, segment: int, weight: np.ndarray):
        self.out = np.zeros((passes, stems, channels, segment), np.float32)
        self.total = np.zeros((passes, segment), np.float32)
        self.weight = weight
        self.origin = 0  # track frame of buffer index 0

    def add(self, chunk: Chunk, stems: np.ndarray) -> None:
        skip = max(0, -chunk.start)  # frames before the track are cut off anyway
        lo = chunk.start + skip - self.origin
        hi = lo + chunk.kept - skip
        weight = self.weight[skip : chunk.kept]
        self.out[chunk.shift, :, :, lo:hi] += (
            weight * stems[:, :, chunk.pad + skip : chunk.pad + chunk.kept]
        )
        self.total[chunk.shift, lo:hi] += weight

    def emit(self, until: int) -> np.ndarray:
        """Final [stems, channels, n] for frames [origin, until); the window slides past them."""
        n = until - self.origin
        block = (self.out[..., :n] / self.total[:, None, None, :n]).mean(0)
        for buffer in (self.out, self.total):
            size = buffer.shape[-1]
            buffer[..., : size - n] = buffer[..., n:]  # numpy buffers overlapping copies
            buffer[..., size - n :] = 0
        self.origin = until
        return block


def shift_offsets(shifts: int, max_shift: int, seed: int | None = None) -> list[int]:
    """`shifts` random offsets in [0, max_shift], as demucs' `random.randint(0, max_shift)`."""
    return [int(o) for o in np.random.default_rng(seed).integers(0, max_shift + 1, size=shifts)]


def stream(
    track: Track,
    engine: Callable[[np.ndarray], np.ndarray],
    segment: int,
    stems: int,
    overlap: float,
    offsets: Sequence[int],
    max_shift: int,
    sums: Sequence[int] | None = None,
) -> Iterator[np.ndarray]:
    """Separated, de-normalized blocks [stems, channels, n] covering the track in order.

    `sums[i]`: how many stems output i adds up (the track's mean comes back once per stem).
    """
    bases = [o - max_shift for o in offsets] if offsets else [0]
    chunks = plan(track.length, segment, overlap, bases)
    log.info(
        "%d model call(s): %d pass(es), segment %d, overlap %g",
        len(chunks),
        len(bases),
        segment,
        overlap,
    )
    window = OverlapAdd(len(bases), stems, track.channels, segment, transition_weight(segment))
    mean = np.float32(track.mean) * np.asarray(sums or [1] * stems, np.float32)[:, None, None]
    # Closed on the way out of a failure too, so an error starts a line of its own.
    with tqdm(chunks, desc="separate", unit="segment") as bar:
        for chunk in bar:
            if chunk.start > window.origin:
                yield window.emit(chunk.start) * track.std + mean
            window.add(chunk, engine(track.window(chunk.start - chunk.pad, segment)))
    yield window.emit(track.length) * track.std + mean


def song_folder(song: Path, out_dir: Path) -> Path:
    """OUT_DIR/SONG: the song's name without its extension, or with it where that would leave
    a relative name (`...wav` would be `..`, the parent of OUT_DIR)."""
    name = song.stem if song.stem not in ("", ".", "..") else song.name
    if name.startswith(PREFIX):
        raise UserError(
            f"{song}: a stems folder named {name!r} would be taken for a run's staging folder; "
            "rename the song"
        )
    return out_dir / name


def stem_paths(song: Path, out_dir: Path, stems: list[str]) -> dict[str, Path]:
    folder = song_folder(song, out_dir)
    return {stem: folder / f"{stem}.wav" for stem in stems}


def previous_set(folder: Path, targets: list[Path]) -> tuple[list[Path], str | None]:
    """The files of the stem set already in `folder` and the song they are of, if recorded.

    The set is what its `separation.json` lists (a six-stem run's guitar.wav included) plus
    any of `targets` present (folders written before the record existed).
    """
    record = folder / MANIFEST
    files = [t for t in targets if t.exists() or t.is_symlink()]
    song = None
    try:
        entries = json.loads(record.read_text(encoding="utf-8"))
        song = str(entries["song"])
        names = [str(name) for name in entries["stems"]]
    except FileNotFoundError:
        names = []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is not a separation record (%s); ignoring it", record, exc)
        names = []
    for name in names:
        path = folder / name
        if Path(name).name == name and name.endswith(".wav") and path.is_file():
            files.append(path)
    return list(dict.fromkeys(files)), song


def manifest_text(song: Path, model: Path, names: list[str], **options) -> str:
    record = {
        "song": str(song.resolve()),
        "model": str(model.resolve()),
        "stems": [f"{name}.wav" for name in names],
        "converter": __version__,
        **options,
    }
    return json.dumps(record, indent=2) + "\n"


def write_failure(exc: Exception, folder: Path) -> str:
    """What a failed write says: the OS reason where there is one (ENOSPC, EDQUOT, EIO...).

    libsndfile reports a failed write(2) as a bare "System error", so a nearly full disk is
    recognized by its free space.
    """
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).replace("System error : ", "")
    if "System error" in text:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            if free < LOW_SPACE_BYTES:
                return f"No space left on device: {free >> 10} KiB free"
    return text


def separate(
    song: Path,
    model: Path = DEFAULT_MODEL,
    out_dir: Path = Path("separated"),
    overlap: float = 0.25,
    shifts: int = 0,
    overwrite: bool = False,
    seed: int | None = None,
    karaoke: bool = False,
) -> dict[str, Path]:
    """Separate `song` with the converted file `model` into `out_dir/SONG/STEM.wav` (with
    `karaoke`, vocals.wav and accompaniment.wav) beside a `separation.json` record.

    Stems are 32-bit float WAV: no clipping decision is needed for a stream whose peak is not
    known until the end, and the files hold exactly what the model produced. All stems appear
    together, after the last frame is written, or none does; `overwrite` replaces the whole
    previous set in the folder.
    """
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap {overlap} is outside [0, 1)")
    if shifts < 0:
        raise UserError(f"--shifts {shifts} is negative")
    if shifts > MAX_SHIFTS:
        raise UserError(
            f"--shifts {shifts} is more than {MAX_SHIFTS}: each shift is one more whole pass "
            "over the song (demucs suggests up to 10)"
        )
    if seed is not None and seed < 0:
        raise UserError(f"--seed {seed} is negative; pass 0 or more")
    check_input(song, "audio file", "pass the song's file", "pass an existing audio file")
    with note_on_interrupt("stopped before separating; nothing was written"):
        engine = Engine(model)
    info = engine.info
    if int((1 - overlap) * info.segment) < 1:
        raise UserError(
            f"--overlap {overlap} leaves no stride within a {info.segment}-sample segment"
        )
    names, engine.groups = outputs(info.stems, karaoke)
    finals = stem_paths(song, out_dir, names)
    folder = song_folder(song, out_dir)
    record = folder / MANIFEST
    targets = [*finals.values(), record]
    check_targets(targets)
    max_shift = int(MAX_SHIFT_SECONDS * info.samplerate)
    offsets = shift_offsets(shifts, max_shift, seed)
    if offsets:
        log.info("shift offsets (frames): %s", offsets)
        if info.models > 1:
            # demucs draws offsets per bag member; the file runs the whole bag on one input.
            log.info("the %d models of the bag share each pass's offset", info.models)
    if karaoke:
        log.info("karaoke: vocals and accompaniment (the sum of %s)", ", ".join(info.stems))

    staging = Staging(targets, "--out-dir", out_dir, exclusive=True)
    with staging:
        existing, source = previous_set(folder, targets)
        if existing and not overwrite:
            if source is not None and source != str(song.resolve()):
                raise UserError(
                    f"{folder} holds the stems of {source}, not of {song}; pass another "
                    "--out-dir (or --overwrite to replace them)"
                )
            shown = ", ".join(str(p) for p in existing)
            raise UserError(f"{shown} already exist(s); pass --overwrite to replace")
        staging.replace_also(existing)
        with open_track(song, info.samplerate, info.channels) as track:
            try:
                write_stems(staging, finals, track, engine, overlap, offsets, max_shift, model)
                text = manifest_text(
                    song,
                    model,
                    names,
                    interface=info.interface,
                    overlap=overlap,
                    shifts=shifts,
                    shift_offsets=offsets,
                    karaoke=karaoke,
                )
                staging.staged(record).write_text(text, encoding="utf-8")
            except (OSError, sf.LibsndfileError) as exc:
                raise UserError(
                    f"cannot write the stems into {folder} ({write_failure(exc, out_dir)}); "
                    "nothing "
                    "was written and earlier stems are untouched: free some space or pass "
                    "another --out-dir"
                ) from None
        staging.commit()
    log.info("separated %s: peak RSS %.0f MB", song.name, peak_rss_mb())
    return finals


def write_stems(
    staging: Staging,
    finals: dict[str, Path],
    track: Track,
    engine: Engine,
    overlap: float,
    offsets: list[int],
    max_shift: int,
    model: Path,
) -> None:
    """Stream the separation into the staged WAVs, one per output of `engine`."""
    info = engine.info
    names = list(finals)
    with contextlib.ExitStack() as files:
        writers = [
            files.enter_context(
                sf.SoundFile(
                    staging.staged(p),
                    "w",
                    samplerate=info.samplerate,
                    channels=info.channels,
                    subtype="FLOAT",
                    format="WAV",
                )
            )
            for p in finals.values()
        ]
        done = 0
        sums = [len(group) for group in engine.groups] if engine.groups else None
        blocks = stream(track, engine, info.segment, len(names), overlap, offsets, max_shift, sums)
        for block in files.enter_context(contextlib.closing(blocks)):  # its progress bar too
            check_output(block, done, names, info.samplerate, model)
            for writer, stem in zip(writers, block, strict=True):
                writer.write(stem.T)
            done += block.shape[-1]


def check_output(block: np.ndarray, start: int, names: list[str], rate: int, model: Path) -> None:
    """Never write a non-finite stem: stop at the first NaN/Inf the model produced."""
    bad = ~np.isfinite(block)
    if bad.any():
        stem, channel, frame = (int(i) for i in np.argwhere(bad)[0])
        raise UserError(
            f"{model} produced a non-finite value for stem {names[stem]!r} at "
            f"{clock((start + frame) / rate)} (channel {channel + 1}); no stems were "
            "written. The file is broken, or this audio overflows float32 in it"
        )
