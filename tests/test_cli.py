"""The tasks as users run them: `invoke ...` in a subprocess, judged by exit status, output, files.

One small htdemucs goes through fake-repo -> convert -> validate -> fingerprint; the release
plan runs against the loopback GitHub API. The verify tools (`fingerprint`, `contract`) are
also run where torch, onnxruntime and POSIX-only modules cannot be imported, and in a fresh
venv holding only onnx, numpy and invoke (from the package index).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import onnx
import pytest

from converter import metadata
from converter.gate import contract_selftest
from tests.fake_github import REPOSITORY, TOKEN

# Not the fast tier: it runs every task as a subprocess (seconds each).
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def invoke(
    *args: str, python: str = sys.executable, cwd: Path = ROOT, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "invoke", "--search-root", str(ROOT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=env,
    )


def assert_one_clear_error(run: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit 1, an `error:` line naming the problem, no traceback."""
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """`invoke fake-repo` then `invoke convert` for a small htdemucs, as a user would run them."""
    root = tmp_path_factory.mktemp("cli")
    repo, out = root / "repo", root / "models"
    made = invoke("fake-repo", "--out", str(repo), "--size", "small", "--models", "htdemucs")
    assert made.returncode == 0, made.stderr
    run = invoke("convert", "--model", "htdemucs", "--repo", str(repo), "--out-dir", str(out))
    assert run.returncode == 0, run.stderr
    return {"repo": repo, "out": out, "log": run.stderr}


def test_fake_repo_writes_demucs_checkpoints_and_refuses_an_unknown_size(converted, tmp_path):
    repo = converted["repo"]
    assert (repo / "htdemucs.yaml").is_file()
    (checkpoint,) = repo.glob("955717e8-*.th")
    assert checkpoint.stat().st_size > 0
    assert_one_clear_error(
        invoke("fake-repo", "--out", str(tmp_path / "r"), "--size", "medium"), "unknown size"
    )


def test_help_after_a_task_is_not_taken_as_its_folder(tmp_path):
    """invoke hands `--help` after a task to its first argument: one line naming the command
    that prints the help, and no folder `--help` written."""
    run = invoke("fake-repo", "--help", cwd=tmp_path)
    assert_one_clear_error(run, "invoke --help fake-repo")
    assert not any(tmp_path.iterdir())
    assert invoke("--help", "fake-repo").returncode == 0


def test_convert_writes_the_file_its_sidecar_and_reference_and_nothing_else(converted):
    out = converted["out"]
    names = sorted(path.name for path in out.iterdir())
    assert names == [
        "htdemucs.onnx",
        "htdemucs.onnx.sha256",
        "htdemucs.reference.npz",
        "htdemucs.required_operators.config",
    ]
    model = out / "htdemucs.onnx"
    assert metadata.read_sidecar(model) == (metadata.sha256_file(model), model.name)
    # A log line for every step and decision, on stderr.
    for step in ("load", "export", "optimize", "validate", "contract gate"):
        assert f"{step}: done in" in converted["log"]


def test_validate_passes_the_written_file_and_names_the_fix_for_a_missing_one(converted):
    repo, out = str(converted["repo"]), str(converted["out"])
    run = invoke("validate", "--model", "htdemucs", "--repo", repo, "--out-dir", out)
    assert run.returncode == 0, run.stderr
    missing = invoke("validate", "--model", "htdemucs_6s", "--repo", repo, "--out-dir", out)
    assert_one_clear_error(missing, "run `invoke convert --model htdemucs_6s` first")


def test_fingerprint_matches_the_stamp_and_exits_1_when_the_file_was_edited(converted, tmp_path):
    model = converted["out"] / "htdemucs.onnx"
    run = invoke("fingerprint", str(model))
    key = metadata.read_metadata(onnx.load(model))[metadata.CACHE_KEY]
    assert run.returncode == 0 and run.stdout == f"{key}  htdemucs.onnx: matches\n"

    edited = onnx.load(model)
    edited.graph.name = "edited after stamping"
    onnx.save(edited, tmp_path / "edited.onnx")
    run = invoke("fingerprint", str(tmp_path / "edited.onnx"))
    assert run.returncode == 1 and f"differs from stamped {key}" in run.stdout


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: (tmp / "empty.onnx", (tmp / "empty.onnx").write_bytes(b""))[0], "0 bytes"),
        (lambda tmp: (tmp / "x.onnx", (tmp / "x.onnx").write_bytes(b"\xff\x00"))[0], "not an ONNX"),
        (lambda tmp: tmp / "absent.onnx", "no such file"),
    ],
    ids=["directory", "empty", "junk", "absent"],
)
def test_fingerprint_refuses_what_is_not_an_onnx_file(tmp_path, make, phrase):
    path = make(tmp_path)
    assert_one_clear_error(invoke("fingerprint", str(path)), str(path), phrase)


def test_release_dry_run_prints_the_plan_and_writes_nothing(fake, tmp_path):
    env = {
        **os.environ,
        "GITHUB_API_URL": fake.api_url,
        "GITHUB_REPOSITORY": REPOSITORY,
        "GITHUB_TOKEN": TOKEN,
    }
    run = invoke("release", "--tag", "model-v1.0.0", "--dry-run", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "model-v1.0.0" in run.stdout  # the plan names the release
    assert fake.seen and fake.writes() == []
    assert list(tmp_path.iterdir()) == []
    assert TOKEN not in run.stdout + run.stderr


def test_release_without_a_token_is_one_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_TOKEN", "GITHUB_REPOSITORY")}
    run = invoke("release", "--tag", "model-v1.0.0", "--dry-run", cwd=tmp_path, env=env)
    assert_one_clear_error(run, "GITHUB_TOKEN")


# --- the verify tools without the conversion toolchain ---

# Runs invoke with torch, demucs, onnxruntime and POSIX-only `resource` unimportable, as on a
# maintainer's Windows machine holding only onnx, numpy and invoke.
WITHOUT_TOOLCHAIN = textwrap.dedent(
    """
    import sys
    for name in ("torch", "demucs", "onnxruntime", "resource", "soundfile", "requests"):
        sys.modules[name] = None
    from invoke.main import program
    program.run(["invoke", "--search-root", sys.argv[1], *sys.argv[2:]])
    """
)


def test_fingerprint_and_contract_need_neither_torch_nor_onnxruntime_nor_posix(tmp_path):
    model = contract_selftest.write_tiny(tmp_path / "models" / "tiny.onnx")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_TOOLCHAIN, str(ROOT), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )

    fingerprinted = run("fingerprint", str(model))
    assert fingerprinted.returncode == 0, fingerprinted.stderr
    assert "tiny.onnx: matches" in fingerprinted.stdout
    gated = run("contract", "--file", str(tmp_path / "models" / "*.onnx"))  # an absolute glob
    assert gated.returncode == 0, gated.stderr
    assert f"{model}: ok" in gated.stdout
    self_test = run("contract", "--self-test")
    assert self_test.returncode == 0, self_test.stderr


@pytest.mark.index
def test_verify_tools_run_in_a_venv_holding_only_onnx_numpy_and_invoke(tmp_path):
    """The proof behind docs/releasing.md's `invoke fingerprint` on a downloaded asset."""
    model = contract_selftest.write_tiny(tmp_path / "models" / "tiny.onnx")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = str(bindir / ("python.exe" if os.name == "nt" else "python"))
    constraints = ROOT / "requirements" / "constraints.txt"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-c", str(constraints), "onnx", "numpy", "invoke"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    probe = "import importlib.util as u; print(*(u.find_spec(m) is None for m in sys.argv[1:]))"
    absent = subprocess.run(
        [python, "-c", f"import sys; {probe}", "torch", "onnxruntime"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert absent.stdout.split() == ["True", "True"]

    fingerprinted = invoke("fingerprint", str(model), python=python, cwd=tmp_path)
    assert fingerprinted.returncode == 0, fingerprinted.stderr
    assert "tiny.onnx: matches" in fingerprinted.stdout
    gated = invoke("contract", "--file", str(tmp_path / "models" / "*.onnx"), python=python)
    assert gated.returncode == 0 and f"{model}: ok" in gated.stdout, gated.stderr
    self_test = invoke("contract", "--self-test", python=python, cwd=tmp_path)
    assert self_test.returncode == 0, self_test.stderr
