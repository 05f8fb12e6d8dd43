"""Invoke tasks: thin wrappers over the `converter` package (run `invoke --list`).

Every CI step is one of these tasks or a nox session, so anything CI does runs the same locally.
User errors (`converter.errors.UserError`) become one clear message and exit status 1, without
a traceback; Ctrl-C and SIGTERM clean up, say what was kept and exit with 130 / 143. Numeric
options are declared as text and parsed here: invoke casts by the default's type, and a bad
value would otherwise end in its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from invoke import Collection, Exit, task

from converter import interrupts
from converter.errors import UserError
from converter.facts import ACCELERATORS_TARGET, INTERFACES, PRODUCTS, SPECTRAL_CORE, WAVEFORM
from converter.ship.tags import GRAMMAR, either, example

MODELS = f"{', '.join(PRODUCTS[:-1])} or {PRODUCTS[-1]}"
ALL_MODELS = ",".join(PRODUCTS)
INTERFACE_HELP = (
    f"Tensor interface: {' or '.join(INTERFACES)} (default {WAVEFORM}; spectral-core writes "
    "NAME.spectral.onnx, the STFT/ISTFT left to the app, docs/spectral-core.md)."
)


def _cli(func):
    """Log to stderr; UserError -> `Exit("error: ...", 1)`, Ctrl-C/SIGTERM -> one line, 130/143."""

    @functools.wraps(func)
    def wrapper(c, *args, **kwargs):
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
        )
        with interrupts.stop_on_signals():
            try:
                _refuse_help_as_value(func.__name__, [*args, *kwargs.values()])
                return func(c, *args, **kwargs)
            except UserError as exc:
                raise Exit(f"error: {exc}", code=1) from None
            except KeyboardInterrupt as exc:
                raise Exit(*interrupts.summary(exc)) from None

    return wrapper


def _refuse_help_as_value(name: str, values: list) -> None:
    """invoke reads `invoke TASK --help` as the value of TASK's first argument (a folder named
    `--help`); refuse it before any work."""
    if any(value in ("-h", "--help") for value in values):
        task = name.replace("_", "-")
        raise UserError(f"--help was read as an argument's value: run `invoke --help {task}`")


def _number(option: str, value, kind: type[int] | type[float]):
    """`value` of `--option` as `kind`, or a UserError naming the option."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise UserError(f"--{option} {value!r} is not {what}") from None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _accepted(metrics: list[str] | None, reason: str | None) -> dict[str, str]:
    """--accept-regression METRIC (repeatable) with its one --reason, as metric -> reason."""
    if not metrics:
        if reason:
            raise UserError("--reason without --accept-regression METRIC: name the metric")
        return {}
    if not (reason or "").strip():
        raise UserError("--accept-regression needs --reason TEXT: say why the regression ships")
    return dict.fromkeys(metrics, reason.strip())


ACCEPT_HELP = {
    "accept_regression": "Ship despite this metric's budget breach (repeatable; metrics in "
    "converter/ship/budgets.py); recorded with --reason in the report and the model card.",
    "reason": "Why the accepted regression ships (required with --accept-regression).",
}


@task(
    help={
        "model": f"Pretrained model to convert: {MODELS}.",
        "repo": "Local demucs model repo (SIG-CHECKSUM.th files + NAME.yaml); default: the hub.",
        "out_dir": "Where to write NAME.onnx and NAME.onnx.sha256 (default: models/).",
        "weight_storage": "float16 (weights exact in float16 stored as float16, Cast in the "
        "graph; half the size, same outputs) or float32 (every initializer float32). Default: "
        "the target's, float16 for cpu, float32 for accelerators (CoreML and XNNPACK take only "
        "constant float32 weights).",
        "interface": INTERFACE_HELP,
        "target": "cpu (default: the CPU EP's graph, shapes hidden from ORT's folding, split "
        "into If bodies) or accelerators (static shapes, no control flow, standard ops only: "
        "what CoreML, DirectML and XNNPACK take; docs/runtime-contract.md).",
    }
)
@_cli
def convert(
    c,
    model="htdemucs",
    repo=None,
    out_dir="models",
    weight_storage=None,
    interface=WAVEFORM,
    target="cpu",
):
    """Convert a pretrained Demucs model to one optimized, validated ONNX file."""
    from converter.pipeline import convert as run

    run(
        model,
        repo=_path(repo),
        out_dir=Path(out_dir),
        weight_storage=weight_storage,
        interface=interface,
        target=target,
    )


@task(
    help={
        "model": f"Model whose file to validate: {MODELS}.",
        "repo": "Local demucs model repo to build the PyTorch reference from (default: the hub).",
        "out_dir": "Folder holding NAME.onnx (default: models/).",
        "interface": INTERFACE_HELP,
    }
)
@_cli
def validate(c, model="htdemucs", repo=None, out_dir="models", interface=WAVEFORM):
    """Check models/NAME.onnx against demucs in float64 (within 6 dB of PyTorch float32's error)."""
    from converter.pipeline import validate as run

    run(model, repo=_path(repo), out_dir=Path(out_dir), interface=interface)


@task(help={"file": "ONNX file whose openkara.model_cache_key to recompute."})
@_cli
def fingerprint(c, file):
    """Print the cache key of FILE and whether it matches the stamped one (exit 1 if not).

    Needs only onnx: run it on a downloaded release asset without the conversion toolchain.
    """
    from converter.gate.fingerprint import fingerprint_report

    line, matches = fingerprint_report(Path(file))
    print(line)
    if not matches:
        raise Exit(code=1)


@task(
    help={
        "out": "Folder to write the repo into (created).",
        "size": "'full' (pretrained hyper-parameters) or 'small' (fast tests).",
        "models": "Comma-separated bag names to write (default: all three).",
        "statistics": "'init' (demucs' initialization) or 'trained' (trained-like: large biases, "
        "norm scales far from 1, growing activations).",
        "seed": "Integer for other random weights (default: the seed every earlier repo used).",
    }
)
@_cli
def fake_repo(c, out, size="full", models=ALL_MODELS, statistics="init", seed=None):
    """Write random-weight checkpoints in demucs' own repo format (offline testing)."""
    from converter.build.fakerepo import write_repo

    write_repo(
        Path(out),
        size=size,
        names=[m for m in models.split(",") if m],
        statistics=statistics,
        seed=None if seed is None else _number("seed", seed, int),
    )


@task(
    help={
        "out": "Folder for the sweep's repos, files and tables (built files are reused).",
        "seeds": "How many seeds of the small models (htdemucs, htdemucs_6s, a 2-model bag).",
        "full": "How many seeds of full-size htdemucs (several minutes each).",
        "python": "Interpreter that runs the files (a venv with another onnxruntime; "
        "default: this one).",
    }
)
@_cli
def sweep(c, out, seeds="20", full="3", python=None):
    """Convert trained-like models of many seeds; worst file-vs-PyTorch gap per model and input."""
    from converter.measure.sweep import sweep as run

    run(Path(out), _number("seeds", seeds, int), _number("full", full, int), python)


@task(
    help={
        "tag": f"Release tag: {GRAMMAR}.",
        "repo": "Local demucs model repo, as for convert (air-gapped runs, tests); default: hub.",
        "dry_run": "Print the plan (release, assets, sizes, digests) and write nothing.",
        "contract_results": "Folder of the load-test matrix's contract-results/*.json: publish "
        "the file already in --out-dir with that evidence (default: build and load-test here).",
        "out_dir": "Folder holding the tag's file, its sidecar and operator list (default: "
        "models/).",
        "compare_report": "NAME.compare.json from `invoke compare --tag TAG` on these bytes: "
        "refuse on a budget breach, publish it and its table in the model card.",
        **ACCEPT_HELP,
    },
    iterable=["accept_regression"],
)
@_cli
def release(
    c,
    tag,
    repo=None,
    dry_run=False,
    contract_results=None,
    out_dir="models",
    compare_report=None,
    accept_regression=None,
    reason=None,
):
    """Publish one model as a GitHub release once every platform load-tested it (safe to re-run).

    Needs GITHUB_TOKEN and GITHUB_REPOSITORY (GITHUB_API_URL optional), as GitHub Actions sets.
    """
    from converter.ship.release import release as run

    print(
        run(
            tag,
            repo=_path(repo),
            dry_run=dry_run,
            contract_results=_path(contract_results),
            out_dir=Path(out_dir),
            compare_report=_path(compare_report),
            accepted=_accepted(accept_regression, reason),
        )
    )


@task(
    help={
        "tag": "Published release tag whose model to pin "
        f"({either([example(m) for m in ('htdemucs', 'htdemucs_ft')])}).",
        "checkout": "An OpenKara checkout whose pins to rewrite.",
        "dry_run": "Print the unified diff and change no file.",
        "allow_prerelease": "Also pin a -rc.N prerelease (never for a stable OpenKara build).",
    }
)
@_cli
def pin_openkara(c, tag, checkout, dry_run=False, allow_prerelease=False):
    """Rewrite every pin of a published release's model in an OpenKara checkout, or none."""
    from converter.ship.pins import pin_openkara as run

    print(run(tag, Path(checkout), dry_run=dry_run, allow_prerelease=allow_prerelease))


@task(
    iterable=["tag", "runtime"],
    help={
        "tag": "Published spectral-core release to add "
        f"({either([example(m, SPECTRAL_CORE) for m in ('htdemucs', 'htdemucs_ft')])}: the "
        "CPU file, marked for the cpu provider; "
        f"{example('htdemucs', SPECTRAL_CORE, ACCELERATORS_TARGET)}: the accelerators' file, "
        "marked for coreml, directml and xnnpack); repeat for more.",
        "base": "The catalog's previous release manifest (catalog/releases/PREV.json of "
        "openkara-models): runtimes, compatibility and supply chain are carried over from it.",
        "release_id": "The new manifest's release id, YYYY-MM-DD-NNN, after --base's.",
        "out": "Folder to write RELEASE_ID.json into (default: catalog/).",
        "schema": "Validate against this local copy of schema-release-v1.json instead of "
        "reading it from --schema-repo.",
        "schema_repo": "Repository publishing the catalog schema (default: "
        "thedavidweng/openkara-models).",
        "schema_ref": "Branch, tag or commit of --schema-repo to read the schema at (default: "
        "main).",
        "runtime": "Runtime artifact id of --base our entries may declare; repeat for more "
        "(default: every runtime of --base that loads a spectral-core model); each entry goes "
        "on those running a provider of its file's target.",
        "allow_prerelease": "Also take -rc.N prereleases (a candidate catalog, never stable).",
        "supersede": "Deprecate --base's spectral-core entries of the same models in favour "
        "of ours of the same target (cpu or accelerators).",
        "created_at": "The manifest's created_at, UTC RFC 3339 (default: now).",
        "commit": "This repository's commit the releases came from (default: GITHUB_SHA, else "
        "the checkout's HEAD).",
    },
)
@_cli
def catalog(
    c,
    tag=None,
    base=None,
    release_id=None,
    out="catalog",
    schema=None,
    schema_repo="thedavidweng/openkara-models",
    schema_ref="main",
    runtime=None,
    allow_prerelease=False,
    supersede=False,
    created_at=None,
    commit=None,
):
    """Write an OpenKara catalog release manifest holding our published spectral-core files.

    Needs GITHUB_TOKEN and GITHUB_REPOSITORY (GITHUB_API_URL optional); reads the releases and
    the schema through the API, downloads and checks every asset; onnx only, no torch.
    """
    from converter.ship import catalog as cat

    if not base or not release_id:
        raise UserError("--base and --release-id are required (see `invoke --help catalog`)")
    path = cat.catalog(
        tag or [],
        Path(base),
        release_id,
        Path(out),
        schema=_path(schema),
        schema_repo=schema_repo,
        schema_ref=schema_ref,
        runtimes=runtime or [],
        allow_prerelease=allow_prerelease,
        supersede=supersede,
        created_at=created_at,
        commit=commit,
    )
    print(cat.summary(path))


@task
@_cli
def check_upstream(c):
    """Open one issue (label upstream-update) when the package index has a newer demucs.

    Reads the pin from requirements/constraints.txt and the index from pip's configuration;
    needs GITHUB_TOKEN and GITHUB_REPOSITORY.
    """
    from converter.ship.upstream import check

    print(check())


@task(
    iterable=["file"],
    help={
        "file": "ONNX file whose operators to list; repeat for a release's files (the union).",
        "out": "Write the config here (atomically) instead of printing it.",
    },
)
@_cli
def operators(c, file=None, out=None):
    """Operators of FILEs in ONNX Runtime's reduced-build config format (the union of all).

    Needs only onnx: the list an app's reduced runtime is rebuilt from (docs/spectral-core.md).
    """
    from converter.gate.oplist import files_config
    from converter.metadata import write_text_atomic

    text = files_config([Path(name) for name in file or []])
    if out:
        write_text_atomic(Path(out), text)
        print(f"wrote {out}")
    else:
        print(text, end="")


@task(
    iterable=["file"],
    help={
        "file": "ONNX file to check; repeat for more, globs (relative or absolute) allowed "
        "(default: every models/*.onnx).",
        "self_test": "Instead of checking files, prove each rule refuses a model built to break "
        "it.",
    },
)
@_cli
def contract(c, file=None, self_test=False):
    """Static runtime-contract gate (docs/runtime-contract.md): domains, opsets, IR, I/O, metadata.

    Needs only onnx and numpy, like `invoke fingerprint`.
    """
    from converter.gate import contract as gate

    if self_test:
        from converter.gate.contract_selftest import self_test as run_self_test

        print("\n".join(run_self_test()))
        print("contract self-test: every rule refuses its violation; the compliant models pass")
        return
    for path in gate.gate_files(file):
        print(f"{path}: ok")


@task(
    help={
        "song": "Audio file to separate (WAV, FLAC, whatever libsndfile reads); mono is doubled.",
        "model": "Converted ONNX file, waveform or spectral-core (NAME.spectral.onnx) interface "
        "(default: models/htdemucs.onnx), stems named by metadata.",
        "out_dir": "Stems go to OUT_DIR/SONG/STEM.wav, 32-bit float, with separation.json "
        "(default: separated/); one run at a time per folder.",
        "overlap": "Overlap of consecutive segments, a number in [0, 1) (default 0.25, as demucs).",
        "shifts": "How many random time shifts to average (demucs' shift trick; default 0: off).",
        "seed": "Integer >= 0 seeding the shift offsets, for reproducible runs (default: random).",
        "overwrite": "Replace the stem set already in OUT_DIR/SONG (all of its files).",
        "karaoke": "Write vocals.wav and accompaniment.wav (the sum of the other stems; one "
        "ISTFT of their summed spectra for a spectral-core file, as OpenKara does).",
    }
)
@_cli
def separate(
    c,
    song,
    model="models/htdemucs.onnx",
    out_dir="separated",
    overlap="0.25",
    shifts="0",
    seed=None,
    overwrite=False,
    karaoke=False,
):
    """Separate a song into stems with a converted file (numpy + onnxruntime only, no torch)."""
    from converter.measure.separate import separate as run

    run(
        Path(song),
        Path(model),
        Path(out_dir),
        overlap=_number("overlap", overlap, float),
        shifts=_number("shifts", shifts, int),
        overwrite=overwrite,
        seed=_number("seed", seed, int) if seed is not None else None,
        karaoke=karaoke,
    )


@task(
    help={
        "model": f"Model to convert and measure: {MODELS}.",
        "repo": "Local demucs model repo, as for convert; default: the hub.",
        "file": "Measure this converted file of MODEL instead of converting one.",
        "baseline": "Also time another build's file of MODEL (say the last release's) against "
        "this one, alternated in one process.",
        "accuracy": "SNR per input against demucs in float64 (--no-accuracy skips it: minutes "
        "per input for htdemucs_ft).",
        "storage": "Time the float16-storage file against its float32 twin (--no-storage skips "
        "it).",
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
    c,
    model="htdemucs",
    repo=None,
    file=None,
    baseline=None,
    accuracy=True,
    storage=True,
    runs="",
    rounds="2",
    profile="10",
    song=None,
    song_seconds=None,
    out_dir="bench-results",
):
    """PyTorch vs onnxruntime per segment (speed, RSS, load, accuracy), or whole songs vs demucs."""
    from converter.measure import bench as b

    rounds_n, profile_n = _number("rounds", rounds, int), _number("profile", profile, int)
    if song or song_seconds is not None:
        results = b.bench_song(
            model,
            song=_path(song),
            seconds=_number("song-seconds", "60" if song_seconds is None else song_seconds, float),
            repo=_path(repo),
            runs=_number("runs", runs or "2", int),
            out_dir=Path(out_dir),
            file=_path(file),
        )
        print(b.song_table(results))
        return
    results = b.bench(
        model,
        repo=_path(repo),
        runs=_number("runs", runs or "5", int),
        rounds=rounds_n,
        profile=profile_n,
        out_dir=Path(out_dir),
        file=_path(file),
        baseline=_path(baseline),
        accuracy=accuracy,
        storage=storage,
    )
    print(b.table(results))


@task(
    help={
        "file": "Converted .onnx file to report on.",
        "json": "Also write the figures to this JSON file (CI keeps it beside the load tests).",
        "static": "Only the graph's checks and ORT's static checker, no provider sessions.",
    }
)
@_cli
def ep_report(c, file, json=None, static=False):
    """What CoreML, DirectML, XNNPACK and the CPU EP take of FILE, opened as OpenKara does."""
    from converter.measure import ep_report as report

    result = report.report(Path(file), providers=[] if static else None)
    if json:
        import json as json_lib

        from converter.metadata import write_text_atomic

        write_text_atomic(Path(json), json_lib.dumps(result, indent=1) + "\n")
    print("\n".join(report.lines(result)))


@task(
    iterable=["accept_regression"],
    help={
        "file": "The candidate: a converted file with its NAME.reference.npz beside it.",
        "tag": "The candidate's release tag: measure it against the newest published, "
        "non-prerelease release of the same model and interface before it (GitHub API).",
        "baseline": "Instead of --tag: measure against this local file (main's conversion in a "
        "pull request's job).",
        "budgets": "Which budgets judge it: release (default) or pull-request.",
        "runs": "Timed segments per file and setting, after 2 warm-ups (default 5).",
        "out": "Report path (default: NAME.compare.json beside --file).",
        **ACCEPT_HELP,
    },
)
@_cli
def compare(
    c,
    file,
    tag=None,
    baseline=None,
    budgets="release",
    runs="5",
    out=None,
    accept_regression=None,
    reason=None,
):
    """Measure a candidate beside the release before it (or --baseline) and judge it by the
    budgets; print one table, write a JSON report; exit 1 on a breach not accepted."""
    from converter.ship import compare as run

    report = run.compare(
        Path(file),
        tag=tag,
        baseline=_path(baseline),
        kind=budgets,
        accepted=_accepted(accept_regression, reason),
        runs=_number("runs", runs, int),
        out=_path(out),
    )
    from converter.ship.release import write_step_summary

    text = run.table(report)
    print(text)
    write_step_summary(text)
    run.check(report)


ns = Collection(
    convert,
    validate,
    fingerprint,
    fake_repo,
    sweep,
    release,
    pin_openkara,
    catalog,
    check_upstream,
    contract,
    operators,
    separate,
    bench,
    ep_report,
    compare,
)
