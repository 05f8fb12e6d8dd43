"""`invoke separate`: parity with demucs' own chunked separation, I/O rules, atomic output.

The reference is `demucs.apply.apply_model(split=True, overlap=0.25)` on the random-weight
small models, normalized the way `demucs.api.Separator.separate_tensor` does it. Small models
have a 0.5 s segment, so a 30 s song is 81 overlapping chunks and the tail, padding and
transition weights are all exercised.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import soxr
from onnx import TensorProto, helper

from converter.build.loading import load
from converter.errors import UserError
from converter.measure import separate as sep

ROOT = Path(__file__).resolve().parent.parent
RATE = 44100
MIN_SNR_DB = 60.0


def music(seconds: float, rate: int = RATE, channels: int = 2) -> np.ndarray:
    """[channels, n] float32: a stepping bass line, two tones, decaying noise bursts."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    bass = 0.3 * np.sin(2 * np.pi * 55 * t * (1 + 0.5 * (np.floor(t * 2) % 4)))
    tones = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 660 * t + 1)
    bursts = 0.4 * np.exp(-30 * ((t * 4) % 1.0)) * np.random.default_rng(1).standard_normal(n)
    left, right = bass + tones + bursts, bass + 0.8 * tones + 0.9 * bursts
    return np.stack([left, right][:channels]).astype(np.float32)


def write_song(path: Path, audio: np.ndarray, rate: int = RATE, subtype: str = "FLOAT") -> Path:
    sf.write(path, audio.T, rate, subtype=subtype)
    return path


def read_stems(paths: dict[str, Path]) -> np.ndarray:
    stems = []
    for path in paths.values():
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        assert rate == RATE and sf.info(str(path)).subtype == "FLOAT"
        stems.append(data.T)
    return np.stack(stems)


def demucs_separation(bag, audio: np.ndarray, shifts: int = 0) -> np.ndarray:
    """demucs' own result: `Separator.separate_tensor`'s normalization around `apply_model`."""
    import torch
    from demucs.apply import apply_model

    wav = torch.from_numpy(audio)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    with torch.no_grad():
        out = apply_model(bag, ((wav - mean) / std)[None], shifts=shifts, split=True, overlap=0.25)
    return (out * std + mean)[0].numpy()


def snr_db(want: np.ndarray, got: np.ndarray) -> list[float]:
    want = want.astype(np.float64)
    return [
        float(10 * np.log10((w**2).sum() / ((w - g) ** 2).sum()))
        for w, g in zip(want, got, strict=True)
    ]


def seeded_demucs_shifts(monkeypatch, shifts: int, seed: int) -> None:
    """Make demucs draw exactly the offsets `separate(seed=seed)` draws."""
    import demucs.apply

    offsets = iter(sep.shift_offsets(shifts, int(sep.MAX_SHIFT_SECONDS * RATE), seed))
    monkeypatch.setattr(demucs.apply.random, "randint", lambda lo, hi: next(offsets))


def parity(name, seconds, small_models, small_repo, tmp_path, monkeypatch, shifts=0):
    audio = music(seconds)
    song = write_song(tmp_path / "song.wav", audio)
    paths = sep.separate(song, small_models[name], tmp_path / "out", shifts=shifts, seed=7)
    got = read_stems(paths)
    seeded_demucs_shifts(monkeypatch, shifts, seed=7)
    want = demucs_separation(load(name, small_repo).bag, audio, shifts=shifts)
    assert got.shape == want.shape == (len(paths), 2, audio.shape[1])
    snrs = snr_db(want, got)
    print(
        f"{name} {seconds} s shifts={shifts}: SNR dB per stem", dict(zip(paths, snrs, strict=True))
    )
    assert min(snrs) >= MIN_SNR_DB, dict(zip(paths, snrs, strict=True))
    return paths


def test_30_second_song_matches_demucs_apply_model(small_models, small_repo, tmp_path, monkeypatch):
    paths = parity("htdemucs", 30.0, small_models, small_repo, tmp_path, monkeypatch)
    assert list(paths) == ["drums", "bass", "other", "vocals"]
    assert all(p == tmp_path / "out" / "song" / f"{s}.wav" for s, p in paths.items())


@pytest.mark.parametrize("name", ["htdemucs_ft", "htdemucs_6s"])
def test_bag_and_six_stems_match_demucs(name, small_models, small_repo, tmp_path, monkeypatch):
    paths = parity(name, 4.0, small_models, small_repo, tmp_path, monkeypatch)
    assert len(paths) == (6 if name == "htdemucs_6s" else 4)


def test_shift_trick_matches_demucs_with_the_same_offsets(
    small_models, small_repo, tmp_path, monkeypatch
):
    parity("htdemucs", 6.0, small_models, small_repo, tmp_path, monkeypatch, shifts=2)


@pytest.mark.parametrize("shifts", [0, 1])
def test_track_shorter_than_a_segment(shifts, small_models, small_repo, tmp_path, monkeypatch):
    parity("htdemucs", 0.2, small_models, small_repo, tmp_path, monkeypatch, shifts=shifts)


def test_same_seed_same_result_other_seed_differs(small_models, tmp_path):
    song = write_song(tmp_path / "song.wav", music(2.0))
    run = lambda seed, out: read_stems(  # noqa: E731
        sep.separate(song, small_models["htdemucs"], tmp_path / out, shifts=1, seed=seed)
    )
    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_does_not_import_torch(small_models, tmp_path):
    song = write_song(tmp_path / "song.wav", music(1.0))
    code = (
        "import sys\nfrom pathlib import Path\nfrom converter.measure.separate import separate\n"
        f"separate(Path({str(song)!r}), Path({str(small_models['htdemucs'])!r}), "
        f"Path({str(tmp_path)!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "song" / "vocals.wav").is_file()


def test_mono_flac_is_duplicated_to_stereo(small_models, tmp_path):
    mono = music(1.5, channels=1)
    flac = write_song(tmp_path / "mono.flac", mono, subtype="PCM_16")
    decoded = sf.read(flac, dtype="float32", always_2d=True)[0].T
    stereo = write_song(tmp_path / "stereo.wav", np.repeat(decoded, 2, axis=0))
    model = small_models["htdemucs"]
    got = read_stems(sep.separate(flac, model, tmp_path / "out"))
    want = read_stems(sep.separate(stereo, model, tmp_path / "out"))
    assert got.shape == (4, 2, mono.shape[1])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_other_sample_rate_is_resampled_with_soxr(small_models, tmp_path):
    audio = music(1.5, rate=22050)
    song = write_song(tmp_path / "low.wav", audio, rate=22050)
    resampled = soxr.resample(audio.T, 22050, RATE, quality="VHQ").T.astype(np.float32)
    at_rate = write_song(tmp_path / "high.wav", resampled)
    model = small_models["htdemucs"]
    got = read_stems(sep.separate(song, model, tmp_path / "out"))
    assert got.shape == (4, 2, 2 * audio.shape[1])
    np.testing.assert_allclose(
        got, read_stems(sep.separate(at_rate, model, tmp_path / "out")), atol=1e-6
    )


def test_refuses_to_overwrite_unless_asked(small_models, tmp_path):
    song = write_song(tmp_path / "song.wav", music(1.0))
    model, out = small_models["htdemucs"], tmp_path / "out"
    paths = sep.separate(song, model, out)
    before = {p: p.read_bytes() for p in paths.values()}
    write_song(song, music(1.0) * 0.5)
    with pytest.raises(UserError, match="--overwrite"):
        sep.separate(song, model, out)
    assert {p: p.read_bytes() for p in paths.values()} == before
    sep.separate(song, model, out, overwrite=True)
    assert all(p.read_bytes() != before[p] for p in paths.values())


def test_failed_run_leaves_previous_stems_and_no_partial_files(small_models, tmp_path, monkeypatch):
    song = write_song(tmp_path / "song.wav", music(3.0))
    model, out = small_models["htdemucs"], tmp_path / "out"
    paths = sep.separate(song, model, out)
    before = {p: p.read_bytes() for p in paths.values()}
    calls = []
    real = sep.Engine.__call__

    def failing(self, audio):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user pressing Ctrl-C mid-song
        return real(self, audio)

    monkeypatch.setattr(sep.Engine, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        sep.separate(song, model, out, overwrite=True, shifts=1)
    assert sorted(p.name for p in (out / "song").iterdir()) == sorted(
        [*(p.name for p in paths.values()), sep.MANIFEST]
    )
    assert {p: p.read_bytes() for p in paths.values()} == before


@pytest.mark.integration  # converts or runs the CLI without a model fixture
def test_long_song_streams_in_bounded_memory_and_tail_is_exact():
    """A 10-minute song: an identity-like engine must give the input back (every frame covered
    with weights summing to one, tail included), without ever holding the whole output."""
    segment, rate, stems = 343980, RATE, 4
    length = 600 * rate + 12345
    data = (0.5 * np.sin(np.arange(length, dtype=np.float32) * np.float32(0.01)))[None].repeat(2, 0)
    data[1] *= 0.5
    track = sep.normalize(sep.Track(lambda a, b: data[:, a:b], length, 2))
    scale = np.arange(1, stems + 1, dtype=np.float32)[:, None, None]
    engine = lambda window: scale * window[None]  # noqa: E731
    # 847 MB of float32 output in total; the stream may only ever hold a few segments of it.
    for offsets in ([], [0, 22050, 777]):
        tracemalloc.start()
        done, worst = 0, 0.0
        for block in sep.stream(track, engine, segment, stems, 0.25, offsets, 22050):
            n = block.shape[-1]
            want = scale * (data[:, done : done + n] - track.mean) + track.mean
            worst = max(worst, float(np.abs(block - want).max()))
            done += n
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert done == length
        assert worst < 1e-5
        assert peak < 100e6, f"streaming peaked at {peak / 1e6:.0f} MB"


def test_plan_reproduces_demucs_chunk_offsets():
    # apply_model(split=True): offsets range(0, length, stride), the last chunk cut short.
    chunks = sep.plan(length=1000, segment=400, overlap=0.25, bases=[0])
    assert [(c.start, c.kept, c.pad) for c in chunks] == [
        (0, 400, 0),
        (300, 400, 0),
        (600, 400, 0),
        (900, 100, 150),
    ]
    # A shifted pass starts before the track; chunks that end before frame 0 are skipped.
    shifted = sep.plan(length=1000, segment=400, overlap=0.25, bases=[-500])
    assert [c.start for c in shifted] == [-200, 100, 400, 700]


def tiny_model(path: Path, metadata: dict[str, str]) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["audio"], ["stems"])],
        "tiny",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 2, 8])],
        [helper.make_tensor_value_info("stems", TensorProto.FLOAT, [1, 2, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def test_user_errors(small_models, tmp_path):
    model = small_models["htdemucs"]
    song = write_song(tmp_path / "song.wav", music(0.5))
    empty = write_song(tmp_path / "empty.wav", np.zeros((2, 0)))
    metadata = {
        "openkara.stems": "a,b",
        "openkara.sample_rate": "44100",
        "openkara.segment_samples": "8",
        "openkara.audio_channels": "2",
    }
    cases = {
        "does not exist": lambda: sep.separate(tmp_path / "missing.wav", model, tmp_path),
        "cannot read": lambda: sep.separate(_text(tmp_path / "fake.wav"), model, tmp_path),
        "no audio frames": lambda: sep.separate(empty, model, tmp_path),
        "model file": lambda: sep.separate(song, tmp_path / "missing.onnx", tmp_path),
        "not an ONNX model": lambda: sep.separate(song, _text(tmp_path / "fake.onnx"), tmp_path),
        "lacks the metadata": lambda: sep.separate(
            song, tiny_model(tmp_path / "t.onnx", {}), tmp_path
        ),
        "does not match": lambda: sep.separate(
            song, tiny_model(tmp_path / "m.onnx", metadata), tmp_path
        ),
        "malformed": lambda: sep.separate(
            song,
            tiny_model(tmp_path / "b.onnx", {**metadata, "openkara.sample_rate": "44.1k"}),
            tmp_path,
        ),
        "outside": lambda: sep.separate(song, model, tmp_path, overlap=1.0),
        "negative": lambda: sep.separate(song, model, tmp_path, shifts=-1),
    }
    for message, call in cases.items():
        with pytest.raises(UserError, match=message):
            call()
    assert not list(tmp_path.glob("*/drums.wav"))


def _text(path: Path) -> Path:
    path.write_text("not audio, not a model\n")
    return path


def test_cli_reports_a_user_error_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "separate", str(tmp_path / "none.wav")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "error: audio file" in done.stderr and "Traceback" not in done.stderr


# A spectral-core stand-in whose stems are known exactly: stem s = SPECTRAL_SCALE[s] x the
# spectrum (through the contract's ISTFT) + TIME_SCALE[s] x the mix. Stem 0 comes only through
# the spectral branch and stem 1 only through the time branch, so dropping either shows.
SPECTRAL_SCALE = np.array([1.0, 0.0, 0.5, 0.25], np.float32)
TIME_SCALE = np.array([0.0, 1.0, 1.0, 0.5], np.float32)
TINY_NFFT, TINY_SEGMENT = 512, 22050


def tiny_spectral_model(path: Path, **metadata: str) -> Path:
    """spectral [1,2,2,F,T], mix [1,2,L] -> spectral_out [1,4,2,2,F,T], time_out [1,4,2,L]."""
    from converter import facts
    from converter.spectral_contract import frames

    spectral = [2, 2, TINY_NFFT // 2, frames(TINY_SEGMENT, TINY_NFFT)]
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", [facts.SPECTRAL_INPUT, "axis"], ["z"]),
            helper.make_node("Mul", ["z", "spectral_scale"], [facts.SPECTRAL_OUTPUT]),
            helper.make_node("Unsqueeze", [facts.MIX_INPUT, "axis"], ["x"]),
            helper.make_node("Mul", ["x", "time_scale"], [facts.TIME_OUTPUT]),
        ],
        "tiny_spectral",
        [
            helper.make_tensor_value_info(facts.SPECTRAL_INPUT, TensorProto.FLOAT, [1, *spectral]),
            helper.make_tensor_value_info(facts.MIX_INPUT, TensorProto.FLOAT, [1, 2, TINY_SEGMENT]),
        ],
        [
            helper.make_tensor_value_info(
                facts.SPECTRAL_OUTPUT, TensorProto.FLOAT, [1, 4, *spectral]
            ),
            helper.make_tensor_value_info(
                facts.TIME_OUTPUT, TensorProto.FLOAT, [1, 4, 2, TINY_SEGMENT]
            ),
        ],
        initializer=[
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor(
                "spectral_scale", TensorProto.FLOAT, [1, 4, 1, 1, 1, 1], SPECTRAL_SCALE
            ),
            helper.make_tensor("time_scale", TensorProto.FLOAT, [1, 4, 1, 1], TIME_SCALE),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entries = {
        "openkara.stems": "drums,bass,other,vocals",
        "openkara.sample_rate": str(RATE),
        "openkara.segment_samples": str(TINY_SEGMENT),
        "openkara.audio_channels": "2",
        "openkara.tensor_interface": "spectral-core",
        "openkara.spectral_contract": "openkara.spectral-contract/v1",
        **metadata,
    }
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def expected_tiny_stems(audio: np.ndarray, overlap: float = 0.25) -> np.ndarray:
    """What the stand-in must give, computed without onnxruntime: the contract's transforms
    around the stand-in's arithmetic in numpy, through the same chunking and overlap-add (the
    contract drops the Nyquist bin and the edge frames, so the round trip is not the identity)."""
    from converter.spectral_contract import ispec, spec

    def engine(window: np.ndarray) -> np.ndarray:
        spectrum = spec(window, TINY_NFFT).astype(np.float32).astype(np.float64)
        waves = ispec(SPECTRAL_SCALE[:, None, None, None, None] * spectrum, window.shape[-1], 512)
        return (waves + TIME_SCALE[:, None, None] * window).astype(np.float32)

    track = sep.normalize(sep.Track(lambda a, b: audio[:, a:b], audio.shape[1], 2))
    blocks = sep.stream(track, engine, TINY_SEGMENT, 4, overlap, [], 0)
    return np.concatenate(list(blocks), axis=-1)


def test_spectral_core_file_composes_stems_outside_the_graph(tmp_path):
    audio = music(3.0)
    song = write_song(tmp_path / "song.wav", audio)
    model = tiny_spectral_model(tmp_path / "tiny.spectral.onnx")
    paths = sep.separate(song, model, tmp_path / "out")
    assert list(paths) == ["drums", "bass", "other", "vocals"]
    got, want = read_stems(paths), expected_tiny_stems(audio)
    snrs = snr_db(want, got)
    assert min(snrs) > 130, snrs
    assert np.abs(got[1] - audio).max() < 1e-5  # the time branch alone: the mix itself
    assert 20 < snr_db(audio[None], got[:1])[0] < 60  # the spectral branch: a lossy round trip


def test_karaoke_uses_one_istft_of_the_summed_spectra(tmp_path, monkeypatch):
    audio = music(2.0)
    song = write_song(tmp_path / "song.wav", audio)
    model = tiny_spectral_model(tmp_path / "tiny.spectral.onnx")
    stems = read_stems(sep.separate(song, model, tmp_path / "stems"))
    calls = []
    real = sep.spectral_contract.ispec

    def counted(spectrum, length, n_fft):
        calls.append(spectrum.shape)
        return real(spectrum, length, n_fft)

    monkeypatch.setattr(sep.spectral_contract, "ispec", counted)
    paths = sep.separate(song, model, tmp_path / "karaoke", karaoke=True)
    assert list(paths) == ["vocals", "accompaniment"]
    assert all(p.parent == tmp_path / "karaoke" / "song" for p in paths.values())
    # One ISTFT call per segment for both outputs: vocals and the summed accompaniment.
    assert calls and all(shape[0] == 2 for shape in calls)
    vocals, accompaniment = read_stems(paths)
    np.testing.assert_allclose(vocals, stems[3], atol=1e-6)
    # Linearity: the complement of the vocals is the sum of the other stems, one ISTFT or three.
    np.testing.assert_allclose(accompaniment, stems[:3].sum(0), atol=2e-5)
    np.testing.assert_allclose(accompaniment + vocals, expected_tiny_stems(audio).sum(0), atol=2e-5)


def test_karaoke_with_a_waveform_file_sums_the_other_stems(small_models, tmp_path):
    song = write_song(tmp_path / "song.flac", music(2.0), subtype="PCM_24")
    model = small_models["htdemucs"]
    stems = read_stems(sep.separate(song, model, tmp_path / "stems"))
    vocals, accompaniment = read_stems(sep.separate(song, model, tmp_path / "k", karaoke=True))
    np.testing.assert_array_equal(vocals, stems[3])
    np.testing.assert_allclose(accompaniment, stems[:3].sum(0), atol=1e-6)


def test_karaoke_needs_a_vocals_stem(tmp_path):
    song = write_song(tmp_path / "song.wav", music(0.5))
    model = tiny_spectral_model(tmp_path / "m.onnx", **{"openkara.stems": "a,b,c,d"})
    with pytest.raises(UserError, match="--karaoke needs a 'vocals' stem; this file has a, b"):
        sep.separate(song, model, tmp_path / "out", karaoke=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"openkara.tensor_interface": "waveform"}, "does not match its metadata (waveform:"),
        ({"openkara.tensor_interface": "spectral"}, "not one of waveform, spectral-core"),
        ({"openkara.spectral_contract": "v2"}, "computes openkara.spectral-contract/v1 only"),
        ({"openkara.segment_samples": "22051"}, "does not match its metadata (spectral-core:"),
    ],
)
def test_spectral_file_whose_metadata_disagrees_with_its_graph(metadata, message, tmp_path):
    song = write_song(tmp_path / "song.wav", music(0.5))
    model = tiny_spectral_model(tmp_path / "m.onnx", **metadata)
    with pytest.raises(UserError, match=re.escape(message)):
        sep.separate(song, model, tmp_path / "out")


def can_convert_spectral_core() -> bool:
    """Whether `pipeline.convert` writes spectral-core files (that part of issue 23 is built
    beside this one); checked before any fixture converts a model."""
    import inspect

    from converter import pipeline

    return "interface" in inspect.signature(pipeline.convert).parameters


@pytest.mark.skipif(
    not can_convert_spectral_core(),
    reason="`invoke convert` cannot write spectral-core files yet (no --interface)",
)
@pytest.mark.parametrize("shifts", [0, 1])
def test_waveform_and_spectral_files_of_one_checkpoint_give_the_same_wavs(
    shifts, small_models, small_repo, tmp_path
):
    from converter.pipeline import convert

    spectral = convert("htdemucs", repo=small_repo, out_dir=tmp_path, interface="spectral-core")
    assert spectral.name == "htdemucs.spectral.onnx"
    song = write_song(tmp_path / "song.wav", music(4.0))
    run = lambda model, out, **kw: read_stems(  # noqa: E731
        sep.separate(song, model, tmp_path / out, shifts=shifts, seed=3, **kw)
    )
    waveform, composed = run(small_models["htdemucs"], "w"), run(spectral, "s")
    snrs = snr_db(waveform, composed)
    print(f"waveform vs spectral-core file, shifts={shifts}: SNR dB per stem {snrs}")
    assert min(snrs) >= 100, snrs
    karaoke = [
        run(m, f"k{i}", karaoke=True) for i, m in enumerate([small_models["htdemucs"], spectral])
    ]
    assert min(snr_db(karaoke[0], karaoke[1])) >= 100


def test_a_streamed_read_is_soxr_resample_exactly_in_any_order(tmp_path):
    """Forward, overlapping, backward (a restart) and past the end: the frames of the whole
    song resampled at once, bit for bit."""
    import soxr

    song = tmp_path / "song.wav"
    sf.write(song, 0.2 * np.random.default_rng(1).standard_normal((20 * 48000, 2)), 48000)
    audio, _ = sf.read(song, dtype="float32")
    whole = soxr.resample(audio, 48000, RATE, quality="VHQ").T
    decoded = sep.Decoded(song, RATE, 2)
    assert decoded.length >= whole.shape[1]
    reads = [(0, 1000), (500, 300000), (250000, 600000), (100, 200), (700000, decoded.length)]
    for start, stop in reads:
        assert np.array_equal(decoded.read(start, stop), whole[:, start:stop]), (start, stop)
    assert decoded.read(decoded.length - 1, decoded.length).shape == (2, 0)


def test_other_rates_are_resampled_as_a_stream_in_bounded_memory(tmp_path):
    """Five minutes at 48 kHz: the resampled song (106 MB as float32) is never held whole."""
    rate, seconds = 48000, 300
    song = tmp_path / "long.wav"
    with sf.SoundFile(song, "w", rate, 2, "PCM_16") as file:
        for start in range(0, seconds * rate, 60 * rate):
            t = (start + np.arange(60 * rate)) / rate
            file.write(0.3 * np.stack([np.sin(2 * np.pi * 220 * t)] * 2, axis=1))
    whole = seconds * RATE * 2 * 4
    tracemalloc.start()
    with sep.open_track(song, RATE, 2) as track:
        for start in range(0, track.length, 300000):
            window = track.window(start, 343980)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert track.length == seconds * RATE
    assert window.shape == (2, 343980)
    assert peak < whole / 3, f"peaked at {peak / 1e6:.0f} MB of {whole / 1e6:.0f} MB"
