"""`invoke separate`: a whole song through a converted file, exactly as an app would run it.

Only numpy, onnxruntime, soundfile (and soxr for other sample rates) are used, never torch, so
what this produces is what OpenKara gets from the file. The semantics are demucs 4.1.0's
`Separator.separate_tensor` + `apply_model(split=True)`: track-level normalization, segments of
the file's fixed length with the given overlap and demucs' triangular transition weights, the
"shift trick", centered padding of short chunks. The output is streamed: a chunk only touches
one segment of the output, and once every chunk that starts before a frame is done that frame
is final, so it is written to the stem files at once and memory stays bounded by a few segments
whatever the song length.

Bad input never becomes bad stems: a NaN or Inf sample is refused with its time, a truncated
file is separated as far as it goes with a warning that gives both lengths, and stems that are
not finite are never written. Stems are staged and replace a previous set together or not at
all (`converter.staging`), also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metadata as meta
from .errors import UserError
from .staging import Staging, check_targets, note_on_interrupt

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/htdemucs.onnx")
# demucs adds this to the track's std so that digital silence does not divide by zero.
STD_EPSILON = 1e-8
# demucs' shift trick pads by half a second and shifts by a random amount up to that.
MAX_SHIFT_SECONDS = 0.5
STAT_BLOCK_FRAMES = 1 << 20
METADATA_KEYS = (meta.STEMS, meta.SAMPLE_RATE, meta.SEGMENT_SAMPLES, meta.AUDIO_CHANNELS)
# Stem names become file names: no separators, no hidden or relative names.
STEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")


@dataclass(frozen=True)
class ModelInfo:
    """What the separation needs to know about a converted file, all read from its metadata."""

    stems: list[str]
    samplerate: int
    segment: int
    channels: int
    models: int  # members of the bag fused into the file


def model_info(metadata: dict[str, str], path: Path) -> ModelInfo:
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise UserError(
            f"{path} lacks the metadata {', '.join(missing)}: it is not a file written by "
            "`invoke convert`; pass one with --model"
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
        )
    except ValueError as exc:
        raise UserError(f"{path} has malformed openkara.* metadata ({exc})") from None
    sizes = {
        meta.SAMPLE_RATE: info.samplerate,
        meta.SEGMENT_SAMPLES: info.segment,
        meta.AUDIO_CHANNELS: info.channels,
    }
    wrong = [f"{key}={value}" for key, value in sizes.items() if value <= 0]
    if len(set(info.stems)) != len(info.stems) or not all(map(STEM_NAME.fullmatch, info.stems)):
        names = metadata[meta.STEMS]
        wrong.append(f"{meta.STEMS}={names!r} (distinct names of letters, digits, _+-)")
    if wrong:
        raise UserError(
            f"{path} has impossible openkara.* metadata: {', '.join(wrong)}; it was not written by "
            "`invoke convert` or was edited since: convert the model again"
        )
    return info


class Engine:
    """An onnxruntime session on a converted file: one segment in, every stem out."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        if path.is_dir():
            raise UserError(f"model file {path} is a directory; pass the .onnx file with --model")
        if not path.is_file():
            raise UserError(f"model file {path} does not exist; convert one with `invoke convert`")
        options = ort.SessionOptions()
        # OpenKara skips ORT's optimizer for files optimized offline (all converted files are);
        # the metadata can only be read from a session, so that is the first one tried.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise UserError(f"{path} is not an ONNX model onnxruntime can load: {exc}") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.info = model_info(metadata, path)
        if metadata.get(meta.OPTIMIZED_BY) == meta.OPTIMIZED_BY_VALUE:
            log.info("%s is pre-optimized: graph optimization disabled, as in OpenKara", path.name)
        else:
            log.info("%s is not marked pre-optimized: ORT's default optimization", path.name)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            del self.session
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        info = self.info
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        want_in = [1, info.channels, info.segment]
        want_out = [1, len(info.stems), info.channels, info.segment]
        if (inp.name, list(inp.shape), out.name, list(out.shape)) != (
            "audio",
            want_in,
            "stems",
            want_out,
        ):
            raise UserError(
                f"{path}: interface {inp.name}{inp.shape} -> {out.name}{out.shape} does not match "
                f"its metadata (audio{want_in} -> stems{want_out})"
            )
        log.info(
            "model %s: stems %s, %d Hz, segment %d samples",
            path.name,
            ",".join(info.stems),
            info.samplerate,
            info.segment,
        )

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """[channels, segment] -> [stems, channels, segment]."""
        return self.session.run(["stems"], {"audio": audio[None]})[0][0]


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


def resample(frames: np.ndarray, source: int, target: int) -> np.ndarray:
    """Band-limited resampling with soxr (very high quality), [channels, n] -> [channels, m]."""
    import soxr

    return np.ascontiguousarray(
        soxr.resample(frames.T, source, target, quality="VHQ").T, np.float32
    )


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
    """Open `path` as a normalized Track; at the model's rate it is read from disk as needed."""
    import soundfile as sf

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

        def read_file(start: int, stop: int) -> np.ndarray:
            try:
                sound.seek(start)
                frames = sound.read(stop - start, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise UserError(
                    f"cannot decode {path} at {clock(start / rate)} ({exc}): the file is damaged "
                    "or truncated; repair or re-encode it"
                ) from None
            check_finite(frames, start, rate, path)
            return convert_channels(frames.T, channels)

        if sound.channels != channels:
            log.info("%d channel(s) -> %d, as demucs converts them", sound.channels, channels)
        if rate == samplerate and sound.seekable():
            track = normalize(Track(read_file, sound.frames, channels))
            present = track.length
        else:
            # Resampling needs the whole signal; the resampled copy is the only one kept.
            data = read_file(0, sound.frames)
            present = data.shape[1]
            if rate != samplerate:
                log.info("resampling %d Hz -> %d Hz with soxr (VHQ)", rate, samplerate)
                data = resample(data, rate, samplerate)
            track = normalize(Track(lambda lo, hi: data[:, lo:hi], data.shape[1], channels))
        declared = max(sound.frames, wav_declared_frames(path) or 0)
        if not present:
            raise UserError(f"{path} holds no audio frames (its header declares {declared})")
        if present < declared:
            log.warning(
                "%s is truncated: its header declares %d frames (%s), the file holds %d (%s); "
                "separating the %s present",
                path,
                declared,
                clock(declared / rate),
                present,
                clock(present / rate),
                clock(present / rate),
            )
        yield track


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
) -> Iterator[np.ndarray]:
    """Separated, de-normalized blocks [stems, channels, n] covering the track in order."""
    from tqdm import tqdm

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
    for chunk in tqdm(chunks, desc="separate", unit="segment"):
        if chunk.start > window.origin:
            yield window.emit(chunk.start) * track.std + track.mean
        window.add(chunk, engine(track.window(chunk.start - chunk.pad, segment)))
    yield window.emit(track.length) * track.std + track.mean


def stem_paths(song: Path, out_dir: Path, stems: list[str]) -> dict[str, Path]:
    folder = out_dir / song.stem
    return {stem: folder / f"{stem}.wav" for stem in stems}


def separate(
    song: Path,
    model: Path = DEFAULT_MODEL,
    out_dir: Path = Path("separated"),
    overlap: float = 0.25,
    shifts: int = 0,
    overwrite: bool = False,
    seed: int | None = None,
) -> dict[str, Path]:
    """Separate `song` with the converted file `model` into `out_dir/SONG/STEM.wav`.

    Stems are 32-bit float WAV: no clipping decision is needed for a stream whose peak is not
    known until the end, and the files hold exactly what the model produced. All stems appear
    together, after the last frame is written, or none does.
    """
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap {overlap} is outside [0, 1)")
    if shifts < 0:
        raise UserError(f"--shifts {shifts} is negative")
    if seed is not None and seed < 0:
        raise UserError(f"--seed {seed} is negative; pass 0 or more")
    if song.is_dir():
        raise UserError(f"audio file {song} is a directory; pass the song's file")
    if not song.is_file():
        raise UserError(f"audio file {song} does not exist")
    with note_on_interrupt("stopped before separating; nothing was written"):
        engine = Engine(model)
    info = engine.info
    if int((1 - overlap) * info.segment) < 1:
        raise UserError(
            f"--overlap {overlap} leaves no stride within a {info.segment}-sample segment"
        )
    finals = stem_paths(song, out_dir, info.stems)
    check_targets(list(finals.values()))
    existing = [str(p) for p in finals.values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    max_shift = int(MAX_SHIFT_SECONDS * info.samplerate)
    offsets = shift_offsets(shifts, max_shift, seed)
    if offsets:
        log.info("shift offsets (frames): %s", offsets)
        if info.models > 1:
            # demucs draws offsets per bag member; the file runs the whole bag on one input.
            log.info("the %d models of the bag share each pass's offset", info.models)
    import soundfile as sf

    staging = Staging(list(finals.values()), "--out-dir", out_dir)
    with staging, open_track(song, info.samplerate, info.channels) as track:
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
            stems = len(info.stems)
            for block in stream(track, engine, info.segment, stems, overlap, offsets, max_shift):
                check_output(block, done, info, model)
                for writer, stem in zip(writers, block, strict=True):
                    writer.write(stem.T)
                done += block.shape[-1]
        staging.commit()
    return finals


def check_output(block: np.ndarray, start: int, info: ModelInfo, model: Path) -> None:
    """Never write a non-finite stem: stop at the first NaN/Inf the model produced."""
    bad = ~np.isfinite(block)
    if bad.any():
        stem, channel, frame = (int(i) for i in np.argwhere(bad)[0])
        raise UserError(
            f"{model} produced a non-finite value for stem {info.stems[stem]!r} at "
            f"{clock((start + frame) / info.samplerate)} (channel {channel + 1}); no stems were "
            "written. The file is broken, or this audio overflows float32 in it"
        )
