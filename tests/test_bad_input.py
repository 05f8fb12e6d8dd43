"""Bad input and stop signals, run as a user runs them: `python -m invoke ...` from the repo root.

Each case checks the exit status, that stderr holds exactly one `error:` (or `interrupted`)
line and no traceback, and what is left on disk: never a partial or mixed set of outputs, never
a staging folder or temp file.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
from onnx import TensorProto, helper

from converter import staging
from converter.errors import UserError

# Not the fast tier: it runs the tasks as subprocesses (seconds each).
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
RATE = 44100
STEMS = ("drums", "bass", "other", "vocals")


def invoke(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_line(done, start: str = "error:", status: int = 1) -> str:
    """The one line starting with `start` in stderr (no traceback), after checking the status."""
    lines = [line for line in done.stderr.splitlines() if line.startswith(start)]
    assert done.returncode == status and len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def song(path: Path, seconds: float = 1.0, subtype: str = "FLOAT") -> Path:
    audio = 0.1 * np.random.default_rng(0).standard_normal((int(seconds * RATE), 2))
    sf.write(path, audio.astype(np.float32), RATE, subtype=subtype)
    return path


def leftovers(folder: Path) -> list[str]:
    """Staging folders and temp files anywhere under `folder`."""
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def separate(song_path: Path, model: Path, out: Path, *more):
    return invoke("separate", song_path, "--model", model, "--out-dir", out, *more)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_sample_is_refused_with_its_time(bad, small_models, tmp_path):
    path = song(tmp_path / "song.wav", 2.0)
    audio, _ = sf.read(path, dtype="float32")
    audio[30000, 1] = bad
    sf.write(path, audio, RATE, subtype="FLOAT")
    line = one_line(separate(path, small_models["htdemucs"], tmp_path / "out"))
    assert f"non-finite sample ({bad})" in line
    assert "at 0:00.680 (frame 30000, channel 2)" in line
    assert not (tmp_path / "out").exists()  # the folder this run created is gone again


def test_a_model_that_produces_non_finite_stems_writes_none(tmp_path):
    # sqrt(-1 - |x|) is NaN everywhere: a broken file, or one that overflows on this audio.
    nodes = [
        helper.make_node("Abs", ["audio"], ["abs"]),
        helper.make_node("Sub", ["minus_one", "abs"], ["neg"]),
        helper.make_node("Sqrt", ["neg"], ["nan"]),
        helper.make_node("Unsqueeze", ["nan", "axis"], ["stems"]),
    ]
    model = tiny_model(
        tmp_path / "nan.onnx",
        nodes,
        stems="voice",
        initializers=[
            helper.make_tensor("minus_one", TensorProto.FLOAT, [], [-1.0]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
        ],
    )
    line = one_line(separate(song(tmp_path / "song.wav", 0.01), model, tmp_path / "out"))
    assert "produced a non-finite value for stem 'voice' at 0:00.000" in line
    assert "no stems were written" in line
    assert not (tmp_path / "out").exists()


def test_a_truncated_wav_is_separated_with_a_warning_giving_both_lengths(small_models, tmp_path):
    path = song(tmp_path / "song.wav", 2.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    present = sf.info(str(path)).frames
    done = separate(path, small_models["htdemucs"], tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    (warning,) = [line for line in done.stderr.splitlines() if "WARNING" in line]
    declared = "its header declares 88200 frames (0:02.000)"
    assert f"is truncated: {declared}, the file holds {present}" in warning
    for stem in STEMS:
        assert sf.info(str(tmp_path / "out" / "song" / f"{stem}.wav")).frames == present


def test_a_damaged_flac_is_one_error(small_models, tmp_path):
    path = song(tmp_path / "song.flac", 3.0, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = one_line(separate(path, small_models["htdemucs"], tmp_path / "out"))
    assert "cannot decode" in line and "damaged there" in line
    assert "at 0:00.000" not in line  # where it breaks, not where the read began
    assert not (tmp_path / "out").exists()


def test_overwrite_with_one_stem_path_blocked_replaces_nothing(small_models, tmp_path):
    path, out = song(tmp_path / "song.wav"), tmp_path / "out"
    assert separate(path, small_models["htdemucs"], out).returncode == 0
    (out / "song" / "drums.wav").unlink()
    (out / "song" / "drums.wav").mkdir()
    before = snapshot(out / "song")
    song(path, 1.5)  # a different song under the same name
    line = one_line(separate(path, small_models["htdemucs"], out, "--overwrite"))
    assert f"{out / 'song' / 'drums.wav'} is a directory" in line
    assert snapshot(out / "song") == before and not leftovers(out)


def test_a_failed_rename_puts_the_previous_set_back(tmp_path, monkeypatch):
    """The commit itself failing midway (a disk error, a path blocked after the check)."""
    targets = [tmp_path / f"{stem}.wav" for stem in STEMS]
    for target in targets:
        target.write_text(f"old {target.name}")
    real, calls = os.replace, []

    def failing(source, target):
        calls.append(target)
        if len(calls) == 6:  # 4 old files set aside, 1 new file in, then the second fails
            raise OSError(28, "No space left on device")
        real(source, target)

    with staging.Staging(targets, "--out-dir") as stage:
        for target in targets:
            stage.staged(target).write_text(f"new {target.name}")
        monkeypatch.setattr(staging.os, "replace", failing)
        with pytest.raises(UserError, match="No space left on device.*files were put back"):
            stage.commit()
    assert {t.name: t.read_text() for t in targets} == {t.name: f"old {t.name}" for t in targets}
    assert not leftovers(tmp_path)


def test_out_dir_under_a_regular_file(small_models, tmp_path):
    path = song(tmp_path / "song.wav")
    line = one_line(separate(path, small_models["htdemucs"], path))
    assert f"cannot write to --out-dir {path} ({path / 'song'}): Not a directory" in line


def test_unwritable_out_dir(small_models, tmp_path):
    if os.geteuid() == 0:
        out = Path("/proc/openkara-not-writable")  # root ignores permission bits
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
    line = one_line(separate(song(tmp_path / "song.wav"), small_models["htdemucs"], out))
    assert f"cannot write to --out-dir {out}" in line and "pass a writable folder" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shifts", "abc"], "--shifts 'abc' is not an integer"),
        (["--overlap", "abc"], "--overlap 'abc' is not a number"),
        (["--seed", "x1"], "--seed 'x1' is not an integer"),
        (["--seed=-1"], "--seed -1 is negative"),
        (["--shifts", "1.5"], "--shifts '1.5' is not an integer"),
    ],
)
def test_bad_numbers_name_their_option(args, message, tmp_path):
    # Parsed before the model or song is opened: the paths need not exist.
    line = one_line(separate(tmp_path / "song.wav", tmp_path / "m.onnx", tmp_path, *args))
    assert message in line


def test_bench_numbers_name_their_option():
    assert "--runs 'five' is not an integer" in one_line(invoke("bench", "--runs", "five"))


def tiny_model(path: Path, nodes, stems: str = "a,b", initializers=(), **metadata) -> Path:
    """A file with the interface and metadata `invoke separate` reads: [1,2,8] -> [1,S,2,8]."""
    count = len(stems.split(","))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 2, 8])],
        [helper.make_tensor_value_info("stems", TensorProto.FLOAT, [1, count, 2, 8])],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entries = {
        "openkara.stems": stems,
        "openkara.sample_rate": "44100",
        "openkara.segment_samples": "8",
        "openkara.audio_channels": "2",
    }
    entries.update(metadata)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"openkara.sample_rate": "0"}, "openkara.sample_rate=0"),
        ({"openkara.segment_samples": "-8"}, "openkara.segment_samples=-8"),
        ({"openkara.stems": "a,../../evil"}, "openkara.stems='a,../../evil'"),
        ({"openkara.stems": "a,a"}, "openkara.stems='a,a'"),
    ],
)
def test_impossible_model_metadata(metadata, message, tmp_path):
    nodes = [
        helper.make_node("Unsqueeze", ["audio", "axis"], ["one"]),
        helper.make_node("Concat", ["one", "one"], ["stems"], axis=1),
    ]
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [1])
    model = tiny_model(tmp_path / "m.onnx", nodes, initializers=[axis], **metadata)
    line = one_line(separate(song(tmp_path / "song.wav", 0.01), model, tmp_path / "out"))
    assert "has impossible openkara.* metadata" in line and message in line
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil").exists()


def test_directories_where_files_belong(small_models, tmp_path):
    path = song(tmp_path / "song.wav")
    line = one_line(separate(path, tmp_path, tmp_path / "out"))
    assert f"model file {tmp_path} is a directory; pass the .onnx file with --model" in line
    line = one_line(separate(tmp_path, small_models["htdemucs"], tmp_path / "out"))
    assert f"audio file {tmp_path} is a directory" in line


def test_convert_refuses_a_directory_in_place_of_its_output_before_any_work(small_repo, tmp_path):
    (tmp_path / "htdemucs.onnx.sha256").mkdir(parents=True)
    done = invoke("convert", "--model", "htdemucs", "--repo", small_repo, "--out-dir", tmp_path)
    assert f"{tmp_path / 'htdemucs.onnx.sha256'} is a directory" in one_line(done)
    assert "loading htdemucs" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["htdemucs.onnx.sha256"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "models: [f7e0c4bc, d12395a8\nweights: [\n",
            "is not valid YAML (expected ',' or ']', but got ':' at line 2, column 8)",
        ),
        ("- f7e0c4bc\n", "must map `models` to a list of checkpoint signatures"),
        ("models: [12345678]\n", "quote signatures YAML reads as numbers"),
        ("models: [f7e0c4bc, d12395a8]\nweights: [[1, 0, 0, 0]]\n", "`weights` must hold one list"),
        ("models: [f7e0c4bc]\nweights: [[1, 0, 0, 0]]\n", "stem(s) [1, 2, 3] have zero total"),
    ],
)
def test_broken_bag_yaml(text, message, small_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    (repo / "htdemucs_ft.yaml").write_text(text)
    out = tmp_path / "out"
    done = invoke("convert", "--model", "htdemucs_ft", "--repo", repo, "--out-dir", out)
    line = one_line(done)
    assert f"bag file {repo / 'htdemucs_ft.yaml'}" in line and message in line
    assert not out.exists()


def start(args: list) -> subprocess.Popen:
    """`python -m invoke ARGS` in the background, with Ctrl-C at its default even where the
    test runner was started with SIGINT ignored (a background job)."""
    return subprocess.Popen(
        [sys.executable, "-m", "invoke", *map(str, args)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.02)


def staged_audio(folder: Path) -> bool:
    """True once a staging folder in `folder` holds stem audio past the WAV header."""
    return any(p.stat().st_size > 4096 for p in folder.glob(".staging-*/*.wav"))


@pytest.mark.parametrize(
    "signum, status, name",
    [
        (signal.SIGTERM, 143, "SIGTERM"),
        (signal.SIGINT, 130, "Ctrl-C"),
    ],
)
def test_stopping_separate_keeps_the_previous_stems(signum, status, name, small_models, tmp_path):
    out = tmp_path / "out"
    first = song(tmp_path / "first.wav", 0.5)
    assert separate(first, small_models["htdemucs"], out).returncode == 0
    (out / "first").rename(out / "song")
    before = snapshot(out / "song")
    path = song(tmp_path / "song.wav", 30.0)
    args = ["separate", path, "--model", small_models["htdemucs"], "--out-dir", out, "--overwrite"]
    run = start(args)
    wait_for(lambda: staged_audio(out / "song") or run.poll() is not None)
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=120)
    done = subprocess.CompletedProcess(run.args, run.returncode, "", stderr)
    line = one_line(done, "interrupted", status)
    assert line == (
        f"interrupted ({name}): nothing new was written; kept drums.wav, bass.wav, other.wav, "
        f"vocals.wav, separation.json in {out / 'song'} as they were"
    )
    assert snapshot(out / "song") == before and not leftovers(out)


def test_sigterm_during_convert_cleans_up_and_stale_staging_is_removed(
    small_repo, small_models, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    for path in small_models["htdemucs"].parent.glob("htdemucs.*"):
        shutil.copy(path, out)
    before = snapshot(out)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = out / f".staging-{gone}-left"  # what a SIGKILLed run leaves
    stale.mkdir()
    (stale / "htdemucs.onnx").write_bytes(b"unvalidated")
    run = start(["convert", "--model", "htdemucs", "--repo", small_repo, "--out-dir", out])
    wait_for(lambda: list(out.glob(f".staging-{run.pid}-*")) or run.poll() is not None)
    assert not stale.exists()  # removed by the new run before it started its own
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=300)
    done = subprocess.CompletedProcess(run.args, run.returncode, "", stderr)
    line = one_line(done, "interrupted", 143)
    assert line == (
        "interrupted (SIGTERM): nothing new was written; kept htdemucs.onnx, "
        f"htdemucs.onnx.sha256, htdemucs.reference.npz, htdemucs.required_operators.config in "
        f"{out} as they were"
    )
    assert snapshot(out) == before and not leftovers(out)


# --- fake-repo: checkpoints whole or absent, settings honest ---


def fake_repo(out: Path, *more):
    size = [] if "--size" in more else ["--size", "small"]
    return invoke("fake-repo", "--out", out, *size, "--models", "htdemucs", *more)


def test_fake_repo_on_a_full_disk_leaves_no_partial_checkpoint_and_a_rerun_completes(
    tmp_path, monkeypatch
):
    import errno

    from converter.build import fakerepo

    def half_then_full(self, data):
        with open(self, "wb") as file:
            file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "repo"
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", half_then_full)
        with pytest.raises(UserError, match="No space left on device") as caught:
            fakerepo.write_repo(out, size="small", names=["htdemucs"])
    assert "\n" not in str(caught.value)
    assert not list(out.glob("*.th")) and not leftovers(out)
    fakerepo.write_repo(out, size="small", names=["htdemucs"])
    (checkpoint,) = out.glob("955717e8-*.th")
    assert fakerepo.intact(checkpoint)


def test_fake_repo_rewrites_a_truncated_checkpoint_it_finds(tmp_path):
    out = tmp_path / "repo"
    assert fake_repo(out).returncode == 0
    (checkpoint,) = out.glob("955717e8-*.th")
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[:1000])  # what a full disk left before writes were atomic
    done = fake_repo(out)
    assert done.returncode == 0 and "do not match the checksum" in done.stderr, done.stderr
    assert checkpoint.read_bytes() == whole


def test_fake_repo_over_a_repo_of_other_settings_refuses_and_keeps_it(tmp_path):
    out = tmp_path / "repo"
    assert fake_repo(out).returncode == 0
    before = snapshot(out)
    for more, said in [
        (("--size", "full"), "not full size"),
        (("--statistics", "trained"), "trained statistics"),
        (("--seed", "7"), "seed 7"),
    ]:
        line = one_line(fake_repo(out, *more))
        assert "already holds 955717e8-" in line and said in line, line
    assert snapshot(out) == before
    kept = fake_repo(out)
    assert kept.returncode == 0 and "kept 955717e8-" in kept.stderr and snapshot(out) == before


@pytest.mark.parametrize(
    "where, more, message",
    [
        ("file", (), "is a file, not a folder"),
        ("under a file", (), "cannot create --out"),
        ("fresh", ("--statistics", "bogus"), "unknown statistics 'bogus'"),
        ("fresh", ("--seed", "1.5"), "--seed '1.5' is not an integer"),
    ],
)
def test_fake_repo_bad_out_or_options_are_one_line(where, more, message, tmp_path):
    (tmp_path / "file").write_text("x")
    out = {"file": "file", "under a file": "file/repo", "fresh": "repo"}[where]
    assert message in one_line(fake_repo(tmp_path / out, *more))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_stopping_fake_repo_says_what_it_kept(tmp_path):
    out = tmp_path / "repo"
    run = start(["fake-repo", "--out", out, "--size", "full", "--models", "htdemucs_ft"])
    wait_for(lambda: list(out.glob("*.th")) or run.poll() is not None)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    line = one_line(
        subprocess.CompletedProcess(run.args, run.returncode, "", stderr), "interr", 143
    )
    kept = sorted(out.glob("*.th"))
    assert 1 <= len(kept) < 4 and not leftovers(out)
    assert line == (
        f"interrupted (SIGTERM): kept {len(kept)} complete checkpoint(s) written so far in {out}; "
        "rerun the same command to write the rest (no partial file is left)"
    )


# Issue 28, `invoke separate`: in-process on a tiny spectral-core stand-in (milliseconds a run).
def tiny_song(path: Path, seconds: float = 0.6, rate: int = RATE, **kw) -> Path:
    from tests.test_separate import music

    sf.write(path, music(seconds, rate=rate).T, rate, **{"subtype": "FLOAT", **kw})
    return path


def tiny(tmp_path: Path, **metadata: str) -> Path:
    from tests.test_separate import tiny_spectral_model

    return tiny_spectral_model(tmp_path / "tiny.spectral.onnx", **metadata)


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path):
    from converter.measure import separate as sep

    model, out = tiny(tmp_path), tmp_path / "out"
    (out / "song").mkdir(parents=True)
    other = staging.FolderLock(out / "song")  # another run holding the folder
    assert other.acquire() is None
    try:
        with pytest.raises(UserError, match=f"process {os.getpid()}.*another --out-dir"):
            sep.separate(tiny_song(tmp_path / "song.flac", subtype="PCM_16"), model, out)
    finally:
        other.release()
    assert sorted(p.name for p in (out / "song").iterdir()) == []


def test_another_song_of_the_same_name_does_not_take_its_stems(tmp_path):
    from converter.measure import separate as sep

    model, out = tiny(tmp_path), tmp_path / "out"
    sep.separate(tiny_song(tmp_path / "song.wav"), model, out)
    before = snapshot(out / "song")
    with pytest.raises(UserError, match="holds the stems of .*song.wav, not of .*song.flac"):
        sep.separate(tiny_song(tmp_path / "song.flac", subtype="PCM_16"), model, out)
    assert snapshot(out / "song") == before and not leftovers(out)


def test_overwrite_replaces_the_whole_stem_set(tmp_path):
    from converter.measure import separate as sep

    model, out, path = tiny(tmp_path), tmp_path / "out", tiny_song(tmp_path / "song.wav")
    sep.separate(path, model, out, karaoke=True)
    assert (out / "song" / "accompaniment.wav").is_file()
    sep.separate(path, model, out, overwrite=True)
    names = sorted(p.name for p in (out / "song").iterdir())
    assert names == sorted([*(f"{s}.wav" for s in STEMS), "separation.json"])


def test_a_song_named_dots_stays_inside_out_dir(tmp_path):
    from converter.measure import separate as sep

    out = tmp_path / "a" / "out"
    paths = sep.separate(tiny_song(tmp_path / "...wav", format="WAV"), tiny(tmp_path), out)
    assert all(p.parent == out / "...wav" for p in paths.values())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            {"stems": ["bass", "drums", "other", "vocals"]},
            "openkara.stems='drums,bass,other,vocals'",
        ),
        ({"sample_rate": 48000}, "openkara.sample_rate='44100' (converted as '48000')"),
    ],
)
def test_metadata_edited_against_its_provenance_is_refused(edit, message, tmp_path):
    import json

    from converter.measure import separate as sep

    recorded = {"stems": list(STEMS), "sample_rate": RATE, "audio_channels": 2, **edit}
    model = tiny(tmp_path, **{"openkara.provenance": json.dumps(recorded)})
    with pytest.raises(UserError, match="disagrees with the provenance") as caught:
        sep.separate(tiny_song(tmp_path / "song.wav"), model, tmp_path / "out")
    assert message in str(caught.value) and not (tmp_path / "out").exists()


def test_stem_count_against_the_graph_is_refused(tmp_path):
    from converter.measure import separate as sep

    model = tiny(tmp_path, **{"openkara.stems": "drums,bass,vocals"})
    with pytest.raises(UserError, match="does not match its metadata"):
        sep.separate(tiny_song(tmp_path / "song.wav"), model, tmp_path / "out")


def test_an_ogg_that_loses_audio_in_the_middle_is_refused_where_it_does(tmp_path):
    from converter.measure import separate as sep

    path = tiny_song(tmp_path / "song.ogg", 6.0, format="OGG", subtype="VORBIS")
    data = path.read_bytes()
    pages = [i for i in range(len(data)) if data[i : i + 4] == b"OggS"]
    middle = len(pages) // 2
    path.write_bytes(data[: pages[middle]] + data[pages[middle + 1] :])
    with pytest.raises(UserError, match=r"loses 0:0\d\.\d{3} of audio near 0:0[1-5]") as caught:
        sep.separate(path, tiny(tmp_path), tmp_path / "out")
    assert "truncated" not in str(caught.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix, subtype", [(".flac", "PCM_16"), (".mp3", "MPEG_LAYER_III")])
def test_a_broken_compressed_file_is_reported_where_it_breaks(suffix, subtype, tmp_path):
    from converter.measure import separate as sep

    path = tiny_song(tmp_path / f"song{suffix}", 6.0, subtype=subtype)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = bytes(3000)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"cannot decode .* at 0:0[1-5]\.\d{3}"):
        sep.separate(path, tiny(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_error_and_nothing_half_written(tmp_path, monkeypatch):
    import errno

    import soundfile as sf

    from converter.measure import separate as sep

    model, out, path = tiny(tmp_path), tmp_path / "out", tiny_song(tmp_path / "song.wav", 2.0)
    sep.separate(path, model, out)
    before = snapshot(out / "song")
    real, calls = sf.SoundFile.write, []

    def full(self, data):
        calls.append(1)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", full)
    with pytest.raises(UserError, match="No space left on device.*earlier stems are untouched"):
        sep.separate(path, model, out, overwrite=True)
    assert snapshot(out / "song") == before and not leftovers(out)


@pytest.mark.parametrize(
    "args, metadata, message",
    [
        ({"shifts": 10**6}, {}, "--shifts 1000000 is more than 20"),
        ({}, {"openkara.sample_rate": str(10**12)}, "openkara.sample_rate=1000000000000 (at most"),
        ({}, {"openkara.stems": f"drums,bass,other,{'v' * 300}"}, "a 300-character name"),
    ],
)
def test_huge_numbers_and_names_are_one_line(args, metadata, message, tmp_path):
    from converter.measure import separate as sep

    with pytest.raises(UserError, match=re.escape(message)):
        sep.separate(tiny_song(tmp_path / "s.wav"), tiny(tmp_path, **metadata), tmp_path, **args)


def test_what_is_not_a_song_file_is_named(tmp_path):
    model = tiny(tmp_path)
    fifo, loop = tmp_path / "pipe.wav", tmp_path / "loop.wav"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    cases = {
        fifo: "is a FIFO (named pipe)",
        loop: "is a symbolic link loop",
        Path("/dev/null"): "is a character device",
    }
    for path, message in cases.items():
        line = one_line(separate(path, model, tmp_path / "out"))
        assert message in line and "does not exist" not in line


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root reads all")
def test_an_unreadable_song_names_the_permission(tmp_path):
    path = tiny_song(tmp_path / "song.wav")
    path.chmod(0o000)
    model = tiny(tmp_path)
    for folder in (tmp_path, model):
        folder.chmod(0o755)
    args = [sys.executable, "-m", "invoke", "separate", path, "--model", model]
    args += ["--out-dir", tmp_path / "out"]
    if os.geteuid() == 0:  # root reads everything: run as nobody
        args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *args]
    env = {**os.environ, "HOME": "/nonexistent"}  # nobody cannot read root's invoke config
    done = subprocess.run(list(map(str, args)), cwd=ROOT, capture_output=True, text=True, env=env)
    line = one_line(done)
    assert "ermission denied" in line and "not audio" not in line, line


def on_a_small_disk(mount: Path, size: str, command: str) -> subprocess.CompletedProcess:
    """`command` (sh) with a `size` tmpfs mounted on `mount`, in a user namespace where one may
    be mounted (else the test is skipped), its exit status kept; stdout ends with what is left
    on the mount, one path a line (the mount is gone when it returns)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    mount.mkdir()
    command = (
        f"mount -t tmpfs -o size={size} none {mount} || exit 99; {command}; status=$?; "
        f"find {mount} -mindepth 1 -printf '%P\\n'; exit $status"
    )
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", command], cwd=ROOT, capture_output=True, text=True
    )


def test_a_real_full_disk_is_one_error(tmp_path):
    """The same on a 1 MiB tmpfs, where a user namespace may mount one (else skipped)."""
    model, path, out = tiny(tmp_path), tiny_song(tmp_path / "song.wav", 5.0), tmp_path / "small"
    done = on_a_small_disk(
        out,
        "1m",
        f"{sys.executable} -m invoke separate {path} --model {model} --out-dir {out / 'out'}",
    )
    line = one_line(done)
    assert "No space left on device" in line and "nothing was written" in line
    assert not done.stdout.strip()  # the mount's view: nothing left behind


# Issue 28 #1 and #12: convert and validate keep what was there on a failed gate or a full disk.
def copy_converted(small_models, out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    for path in small_models["htdemucs"].parent.glob("htdemucs.*"):
        shutil.copy(path, out)
    return snapshot(out)


def test_a_failed_validate_keeps_the_good_reference(small_models, tmp_path):
    from converter import pipeline
    from converter.build import fakerepo
    from converter.gate.validation import ValidationError

    out, other = tmp_path / "models", tmp_path / "other"
    before = copy_converted(small_models, out)
    fakerepo.write_repo(other, size="small", names=["htdemucs"], seed=7)  # other weights
    with pytest.raises(ValidationError):
        pipeline.validate("htdemucs", other, out)
    assert snapshot(out) == before and not leftovers(out)


def test_convert_on_a_full_disk_is_one_line_naming_the_disk(small_repo, tmp_path):
    """ONNX Runtime's optimizer reports the full disk as INVALID_PROTOBUF, about the model."""
    out = tmp_path / "small"
    done = on_a_small_disk(
        out,
        "1m",
        f"{sys.executable} -m invoke convert --model htdemucs --repo {small_repo} "
        f"--out-dir {out / 'models'}",
    )
    line = one_line(done)
    assert f"no space left on the disk holding {out / 'models'} (file system {out}" in line
    assert "pass --out-dir on another disk" in line and "INVALID_PROTOBUF" not in line
    assert done.stdout.split() in ([], ["models"])  # at most the folder it was asked for


def test_validate_on_a_full_disk_keeps_the_reference(small_models, small_repo, tmp_path):
    """8 MiB: the file and its reference fit, a second reference does not."""
    out, before = tmp_path / "small", tmp_path / "before"
    copy_converted(small_models, before)
    done = on_a_small_disk(
        out,
        "8m",
        f"cp {before}/* {out} && {sys.executable} -m invoke validate --model htdemucs "
        f"--repo {small_repo} --out-dir {out}; status=$?; cmp -s {before}/htdemucs.reference.npz "
        f"{out}/htdemucs.reference.npz && echo intact; (exit $status)",
    )
    line = one_line(done)
    assert f"no space left on the disk holding {out}" in line
    listed = done.stdout.split()
    assert listed[0] == "intact"  # the reference that was there, byte for byte
    assert sorted(listed[1:]) == sorted(p.name for p in before.iterdir())  # and no temp file


# Issue 28 #6: the cache key covers the metadata the runtime acts on (a stamped, compliant
# stand-in from the contract self-test: milliseconds, where a converted file takes minutes).
def stamped_file(path: Path, **entries: str) -> str:
    """The self-test's compliant file at `path`, `entries` then edited and its sidecar
    regenerated (what a user editing the metadata would do); returns the key it still carries."""
    from converter import metadata
    from converter.gate import contract_selftest

    model = contract_selftest.tiny_model()
    for prop in model.metadata_props:
        prop.value = entries.get(prop.key, prop.value)
    metadata.write_with_sidecar(model, path)
    return metadata.read_metadata(model)[metadata.CACHE_KEY]


def test_the_cache_key_covers_every_entry_but_itself_and_the_provenance():
    from converter import metadata
    from converter.gate import contract_selftest

    model = contract_selftest.tiny_model()
    key = metadata.fingerprint(model)
    assert key == metadata.read_metadata(model)[metadata.CACHE_KEY]
    for prop in model.metadata_props:
        kept = prop.value
        prop.value = kept + " "
        assert (metadata.fingerprint(model) != key) == (prop.key not in metadata.UNKEYED), prop
        prop.value = kept
    model.metadata_props.add(key="openkara.extra", value="1")
    assert metadata.fingerprint(model) != key
    assert metadata.graph_fingerprint(model) == metadata.graph_fingerprint(
        contract_selftest.tiny_model()
    )


@pytest.mark.parametrize(
    "entries",
    [{"openkara.stems": "bass,drums,other,vocals"}, {"openkara.sample_rate": "48000"}],
    ids=["stems permuted", "sample rate"],
)
def test_edited_metadata_fails_fingerprint_and_contract(entries, tmp_path):
    path = tmp_path / "tiny.onnx"
    stamped_file(path)
    assert invoke("contract", "--file", path).returncode == 0  # as written: compliant
    stamped = stamped_file(path, **entries)
    done = invoke("fingerprint", path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.endswith(f"  tiny.onnx: differs from stamped {stamped}\n"), done.stdout
    done = invoke("contract", "--file", path)
    assert f"{path} breaks the runtime contract" in one_line(done)
    assert "  - [cache_key] openkara.model_cache_key is " + stamped in done.stderr


def test_a_key_over_the_graph_alone_says_to_convert_again(tmp_path):
    from converter import metadata
    from converter.gate import contract_selftest

    old = metadata.graph_fingerprint(contract_selftest.tiny_model())
    path = tmp_path / "tiny.onnx"
    stamped_file(path, **{metadata.CACHE_KEY: old})
    done = invoke("fingerprint", path)
    assert done.returncode == 1 and f"differs from stamped {old}, the key over" in done.stdout
    assert "convert the file again" in done.stdout


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root reads all")
@pytest.mark.parametrize("closed", ["file", "folder"])
def test_an_unreadable_model_names_the_permission_not_onnx(closed, tmp_path):
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path if closed == "folder" else None))
    try:
        path = folder / "tiny.onnx"
        stamped_file(path)
        if closed == "file":
            folder.chmod(0o755)
            path.chmod(0o000)
        else:
            folder.chmod(0o000)
        args = [sys.executable, "-m", "invoke", "fingerprint", path]
        if os.geteuid() == 0:  # root reads everything: run as nobody
            args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *args]
        env = {**os.environ, "HOME": "/nonexistent"}
        done = subprocess.run(
            list(map(str, args)), cwd=ROOT, capture_output=True, text=True, env=env
        )
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
    line = one_line(done)
    assert f"cannot read {path}: Permission denied" in line and "not an ONNX" not in line


# Issue 28 #9, #10, #13: the GitHub tasks against a silent or foreign API, run as users run them
# (a fresh interpreter, the variables GitHub Actions sets). Each gives up with one line, shows
# no token and changes nothing: no file of the checkout, nothing sent that writes on GitHub.
PIN_TAG = "model-v2.0.2"
GITHUB_TASKS = {
    "release --dry-run": ["release", "--tag", "model-v1.0.0", "--dry-run"],
    "release": ["release", "--tag", "model-v1.0.0", "--contract-results", "{tmp}/matrix"],
    "pin-openkara": ["pin-openkara", "--tag", PIN_TAG, "--checkout", "{tmp}/openkara"],
    "check-upstream": ["check-upstream"],
}
# The publishing release stops at the same first call as the dry run, except when silent.
ONE_EACH = ("release --dry-run", "pin-openkara", "check-upstream")


@pytest.fixture
def github_task(fake, tmp_path):
    """Run a task of GITHUB_TASKS against `fake` (whose index has a newer demucs, so
    check-upstream goes on to GitHub), variables overridden by `env`."""
    from tests.fake_github import run_cli
    from tests.test_pins import publish, write_checkout

    publish(fake, PIN_TAG)
    fake.index_files.append({"filename": "demucs-99.0.0.tar.gz"})
    write_checkout(tmp_path / "openkara")

    def run(task: str, **env: str) -> subprocess.CompletedProcess:
        args = [arg.format(tmp=tmp_path) for arg in GITHUB_TASKS[task]]
        env = {"PIP_INDEX_URL": fake.index_url, "OPENKARA_API_DEADLINE_S": "2", **env}
        return run_cli(fake, *args, cwd=ROOT, **env)

    return run


def github_error(done, fake, tmp_path) -> str:
    """The one error line of a GitHub task that changed nothing and showed no token."""
    from tests.fake_github import TOKEN
    from tests.test_pins import FIXTURE, snapshot

    line = one_line(done)
    assert TOKEN not in done.stdout + done.stderr
    assert fake.writes() == [] and fake.issues == []
    assert snapshot(tmp_path / "openkara") == {k: v.encode() for k, v in FIXTURE.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["openkara"]
    return line


@pytest.mark.parametrize("task", GITHUB_TASKS)
def test_a_silent_api_makes_each_github_task_give_up_with_one_line(
    task, github_task, fake, tmp_path
):
    """A server that accepts the connection and never answers; the deadline (2 s here, 150 s
    by default) bounds each call, attempts and waits together."""
    from tests import loopback

    silent = loopback.Silent()
    try:
        done = github_task(task, GITHUB_API_URL=silent.url)
    finally:
        silent.close()
    line = github_error(done, fake, tmp_path)
    assert "no answer in time" in line and "gave up after 2 s" in line, line
    assert "raise OPENKARA_API_DEADLINE_S" in line


@pytest.mark.parametrize(
    "server, message",
    [
        (lambda lb: lb.Silent(), "Timeout"),
        (
            lambda lb: lb.Same(200, lb.LOGIN_PAGE, {"Content-Type": "text/html"}),
            "it answered text/html, not JSON (a proxy's login page?)",
        ),
    ],
    ids=["silent", "login page"],
)
def test_a_package_index_that_is_silent_or_foreign_is_one_line(
    server, message, github_task, fake, tmp_path
):
    from tests import loopback

    index = server(loopback)
    try:
        line = github_error(github_task("check-upstream", PIP_INDEX_URL=index.url), fake, tmp_path)
    finally:
        index.close()
    assert f"cannot read demucs from the package index {index.url}/demucs/" in line
    assert message in line and "PEP 691" in line, line
    assert fake.seen == []  # GitHub not asked


def test_the_default_deadline_leaves_a_silent_api_under_three_minutes():
    from converter.ship import github

    # One call, then the task ends: each task's first call is the one a silent API stops.
    assert github.deadline_s({}) + github.CONNECT_READ_TIMEOUT_S[0] < 180


@pytest.mark.parametrize(
    "server, message",
    [
        (
            lambda lb: lb.Same(200, lb.LOGIN_PAGE, {"Content-Type": "text/html"}),
            "with text/html ('Sign in - Corporate Proxy'), not JSON",
        ),
        (lambda lb: lb.Same(200, {"releases": []}), "an object instead of an array"),
        (
            lambda lb: lb.Same(200, [{"id": 1, "tag_name": "t", "upload_url": "u"}]),
            "JSON of another shape (item 0: '",
        ),
        (lambda lb: lb.Same(redirect=True), "TooManyRedirects"),
    ],
    ids=["login page", "an object", "fields missing", "redirect loop"],
)
def test_an_answer_that_is_not_the_api_is_one_line_for_each_github_task(
    server, message, github_task, fake, tmp_path
):
    from tests import loopback

    running = server(loopback)
    try:
        for task in ONE_EACH:
            line = github_error(github_task(task, GITHUB_API_URL=running.url), fake, tmp_path)
            assert message in line and "GITHUB_API_URL must be the REST API" in line, line
    finally:
        running.close()


def test_a_retry_after_that_is_no_number_gives_up_within_the_deadline(github_task, fake, tmp_path):
    from tests import loopback

    limited = loopback.Same(429, {"message": "slow down"}, {"Retry-After": "nan"})
    try:
        for task in ONE_EACH:
            line = github_error(github_task(task, GITHUB_API_URL=limited.url), fake, tmp_path)
            assert "429 slow down" in line and "waiting 60 s more would pass the 2 s" in line
    finally:
        limited.close()


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("GITHUB_API_URL", "api.github.com", "'api.github.com' is not an http(s) URL with a host"),
        ("GITHUB_REPOSITORY", "own er/na me", "must be owner/name"),
        ("GITHUB_REPOSITORY", "../..", "must be owner/name"),
    ],
)
def test_settings_that_cannot_name_the_api_are_one_line(
    variable, value, message, github_task, fake, tmp_path
):
    for task in ONE_EACH:
        line = github_error(github_task(task, **{variable: value}), fake, tmp_path)
        assert f"error: {variable}" in line and message in line, line
        assert fake.seen == []  # refused before any call


def test_an_evidence_record_of_another_shape_is_one_line(fake, tmp_path):
    from tests.fake_github import run_cli
    from tests.test_release import TAG, write_model

    out, matrix = tmp_path / "models", tmp_path / "matrix"
    write_model(out, "htdemucs")
    matrix.mkdir()
    (matrix / "1.23.2.json").write_text('{"rows": [1]}')
    args = ["release", "--tag", TAG, "--contract-results", matrix, "--out-dir", out]
    line = one_line(run_cli(fake, *map(str, args), cwd=ROOT))
    assert f"load-test results {matrix / '1.23.2.json'} hold a broken ortcheck record" in line
    assert "'rows': item 0: a number instead of an object" in line
    assert fake.writes() == [] and fake.releases == {}


def test_a_token_that_cannot_be_a_header_is_one_line_without_it(github_task, fake, tmp_path):
    from tests.fake_github import TOKEN

    for task in ONE_EACH:
        done = github_task(task, GITHUB_TOKEN=f"{TOKEN[:9]}\r{TOKEN[9:]}")
        line = github_error(done, fake, tmp_path)
        assert "GITHUB_TOKEN is empty or holds a space, control or non-ASCII" in line
        assert TOKEN[:9] not in done.stderr and TOKEN[9:] not in done.stderr


def test_a_token_ending_in_a_windows_line_end_works(github_task, fake):
    from tests.fake_github import TOKEN

    for task in ("release --dry-run", "check-upstream"):
        done = github_task(task, GITHUB_TOKEN=f"{TOKEN}\r\n")
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert TOKEN not in done.stdout + done.stderr
    assert {s.headers["Authorization"] for s in fake.seen if "/api/" in s.path} == {
        f"Bearer {TOKEN}"
    }


def test_a_server_that_echoes_the_token_is_redacted(github_task, fake, tmp_path):
    from tests.fake_github import TOKEN, Fault

    for task in ONE_EACH:
        fake.faults.append(Fault("GET", ".", status=400, message=f"bad credentials {TOKEN}"))
        line = github_error(github_task(task), fake, tmp_path)
        assert "400 bad credentials ***" in line, line
