"""Invoke tasks: thin wrappers over the `converter` package (run `invoke --list`).

Every CI step is one of these tasks or a nox session, so anything CI does runs the same locally.
User errors (`converter.errors.UserError`) become one clear message and exit status 1, without
a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from invoke import Collection, Exit, task

from converter.errors import UserError

MODELS = "htdemucs, htdemucs_ft or htdemucs_6s"


def _cli(func):
    """Log to stderr and turn UserError into `Exit(message, 1)`."""

    @functools.wraps(func)
    def wrapper(c, *args, **kwargs):
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
        )
        try:
            return func(c, *args, **kwargs)
        except UserError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


@task(
    help={
        "model": f"Pretrained model to convert: {MODELS}.",
        "repo": "Local demucs model repo (SIG-CHECKSUM.th files + NAME.yaml); default: the hub.",
        "out_dir": "Where to write NAME.onnx and NAME.onnx.sha256 (default: models/).",
    }
)
@_cli
def convert(c, model="htdemucs", repo=None, out_dir="models"):
    """Convert a pretrained Demucs model to one optimized, validated ONNX file."""
    from converter.pipeline import convert as run

    run(model, repo=_path(repo), out_dir=Path(out_dir))


@task(
    help={
        "model": f"Model whose file to validate: {MODELS}.",
        "repo": "Local demucs model repo to build the PyTorch reference from (default: the hub).",
        "out_dir": "Folder holding NAME.onnx (default: models/).",
    }
)
@_cli
def validate(c, model="htdemucs", repo=None, out_dir="models"):
    """Check models/NAME.onnx against demucs in PyTorch (per-stem MSE gate)."""
    from converter.pipeline import validate as run

    run(model, repo=_path(repo), out_dir=Path(out_dir))


@task(help={"file": "ONNX file whose openkara.model_cache_key to recompute."})
@_cli
def fingerprint(c, file):
    """Print the cache key of FILE and whether it matches the stamped one."""
    from converter.pipeline import fingerprint_report

    print(fingerprint_report(Path(file)))


@task(
    help={
        "out": "Folder to write the repo into (created).",
        "size": "'full' (pretrained hyper-parameters) or 'small' (fast tests).",
        "models": "Comma-separated bag names to write (default: all three).",
    }
)
@_cli
def fake_repo(c, out, size="full", models="htdemucs,htdemucs_ft,htdemucs_6s"):
    """Write random-weight checkpoints in demucs' own repo format (offline testing)."""
    from converter.fakerepo import write_repo

    write_repo(Path(out), size=size, names=[m for m in models.split(",") if m])


@task(
    help={
        "tag": "Release tag: model-vX.Y.Z (htdemucs), model-ft-vX.Y.Z (htdemucs_ft) or "
        "model-6s-vX.Y.Z (htdemucs_6s), optionally with -rc.N (prerelease).",
        "repo": "Local demucs model repo, as for convert (air-gapped runs, tests); default: the hub.",
        "dry_run": "Print the plan (release, assets, sizes, digests) and write nothing.",
    }
)
@_cli
def release(c, tag, repo=None, dry_run=False):
    """Convert, validate, gate and publish one model as a GitHub release (safe to re-run).

    Needs GITHUB_TOKEN and GITHUB_REPOSITORY (GITHUB_API_URL optional), as GitHub Actions sets.
    """
    from converter.release import release as run

    print(run(tag, repo=_path(repo), dry_run=dry_run))


@task
@_cli
def check_upstream(c):
    """Open one issue (label upstream-update) when the package index has a newer demucs.

    Reads the pin from requirements/constraints.txt and the index from pip's configuration;
    needs GITHUB_TOKEN and GITHUB_REPOSITORY.
    """
    from converter.upstream import check

    print(check())


@task(
    iterable=["file"],
    help={
        "file": "ONNX file to check; repeat for more, globs allowed (default: every models/*.onnx).",
        "self_test": "Instead of checking files, prove each rule refuses a model built to break it.",
    },
)
@_cli
def contract(c, file=None, self_test=False):
    """Static runtime-contract gate (docs/runtime-contract.md): domains, opsets, IR, I/O, metadata."""
    from converter import contract as gate

    if self_test:
        print("\n".join(gate.self_test()))
        print("contract self-test: every rule refuses its violation; the compliant model passes")
        return
    for path in gate.gate_files(file):
        print(f"{path}: ok")


@task(
    help={
        "song": "Audio file to separate (WAV, FLAC or anything libsndfile reads); mono is duplicated.",
        "model": "Converted ONNX file (default: models/htdemucs.onnx); stems come from its metadata.",
        "out_dir": "Stems go to OUT_DIR/SONG/STEM.wav, 32-bit float (default: separated/).",
        "overlap": "Overlap of consecutive segments, in [0, 1) (default 0.25, as demucs).",
        "shifts": "Random time shifts to average (demucs' shift trick; default 0: off).",
        "seed": "Seed of the shift offsets, for reproducible runs (default: random).",
        "overwrite": "Replace stem files that already exist.",
    }
)
@_cli
def separate(
    c, song, model="models/htdemucs.onnx", out_dir="separated", overlap=0.25, shifts=0,
    seed=None, overwrite=False,
):  # fmt: skip
    """Separate a song into stems with a converted file (numpy + onnxruntime only, no torch)."""
    from converter.separate import separate as run

    run(
        Path(song), Path(model), Path(out_dir), overlap=overlap, shifts=shifts,
        overwrite=overwrite, seed=int(seed) if seed is not None else None,
    )  # fmt: skip


@task(
    help={
        "model": f"Model to convert and measure: {MODELS}.",
        "repo": "Local demucs model repo, as for convert; default: the hub.",
        "file": "Measure this converted file of MODEL instead of converting one.",
        "runs": "Timed segments per engine and round, after 2 warm-ups (default 5); with --song: "
        "runs of each separator (default 2).",
        "rounds": "Rounds of alternating engines, each engine in a fresh process (default 2).",
        "profile": "Op types to list from onnxruntime's profiler (default 10; 0: no profile).",
        "song": "Whole-song mode: time `invoke separate` against demucs' CLI on this audio file.",
        "song_seconds": "Whole-song mode on a synthetic test song this many seconds long.",
        "out_dir": "Where to write NAME.json / NAME-song.json (default: bench-results/).",
    }
)
@_cli
def bench(
    c, model="htdemucs", repo=None, file=None, runs=None, rounds=2, profile=10, song=None,
    song_seconds=0.0, out_dir="bench-results",
):  # fmt: skip
    """PyTorch vs onnxruntime per segment (speed, RSS, load), or whole songs vs demucs' CLI."""
    from converter import bench as b

    if song or song_seconds:
        results = b.bench_song(
            model, song=_path(song), seconds=float(song_seconds), repo=_path(repo),
            runs=int(runs or 2), out_dir=Path(out_dir), file=_path(file),
        )  # fmt: skip
        print(b.song_table(results))
        return
    results = b.bench(
        model, repo=_path(repo), runs=int(runs or 5), rounds=int(rounds), profile=int(profile),
        out_dir=Path(out_dir), file=_path(file),
    )  # fmt: skip
    print(b.table(results))


ns = Collection(convert, validate, fingerprint, fake_repo, release, check_upstream, contract, separate, bench)
