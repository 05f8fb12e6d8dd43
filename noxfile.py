"""Nox sessions: lint, the test suite, the static contract gate and the per-ORT-version load tests.

Thin by design: the logic lives in `converter/` (the gate) and `converter/gate/ortcheck.py` (the
load test, a standalone script); this file only builds the venvs from pinned versions.

    nox -s lint                                        # ruff check + format --check, lint-imports
    nox -s tests [-- PYTEST ARGS]
    nox -s gate [-- FILE.onnx ...]                     # self-test, then the static gate
    nox -s contract [-- FILE.onnx ...]                 # every ORT version, default models/*.onnx
    nox -s "contract(ort='1.23.2')" [-- FILE.onnx ...] # one version

Spectral-core files (`NAME.spectral.onnx`) are load-tested on their stems composed as the app
composes them (`ortcheck.run_stems`). Model paths are relative to the repository root (nox runs
from here). `contract` also accepts
`--results-dir DIR` before the files (default: models/, where contract-summary.json goes).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = "requirements/constraints.txt"
sys.path.insert(0, str(ROOT))  # the version list and wheel rule live in converter.gate.evidence
from converter.gate.evidence import LAST_MACOS_X86_64, contract_pins, has_wheel  # noqa: E402 - needs the path

nox.options.sessions = ["lint", "tests", "gate"]
# uv builds the venvs (pinned in constraints.txt; measured in docs/performance.md); nox falls back
# to virtualenv where uv is not installed.
nox.options.default_venv_backend = "uv|virtualenv"

CONTRACT_PINS = contract_pins()


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and lint-imports (the import contracts) over the
    repository (rules in pyproject.toml)."""
    session.install("-c", CONSTRAINTS, "ruff", "import-linter")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session
def tests(session: nox.Session) -> None:
    """The pytest suite with the pinned toolchain (`-- -m unit`: the fast tier)."""
    session.install("-c", CONSTRAINTS, "-r", "requirements/dev.in")
    session.run("pytest", *session.posargs)


@nox.session
def gate(session: nox.Session) -> None:
    """Prove every static rule refuses its violation, then gate FILEs (default models/*.onnx)."""
    session.install("-c", CONSTRAINTS, "onnx", "numpy", "invoke")
    session.run("invoke", "contract", "--self-test")
    session.run("invoke", "contract", *(f"--file={name}" for name in session.posargs))


@nox.session
@nox.parametrize("ort", list(CONTRACT_PINS))
def contract(session: nox.Session, ort: str) -> None:
    """Load-test models on the official onnxruntime==ORT wheel, CPU EP, nothing else installed."""
    # Queued first so the merged table ends the run even when this session fails or skips.
    session.notify("contract_summary", posargs=session.posargs)
    if not has_wheel(f"{platform.system()} {platform.machine()}", ort):
        last = ".".join(map(str, LAST_MACOS_X86_64))
        session.skip(f"onnxruntime {ort} has no macOS x86_64 wheel (the last is {last})")
    # --no-deps: ORT's declared extras (protobuf, sympy, ...) are not needed to load and run a
    # model, and leaving them out proves the loader and the file need nothing but ORT + numpy.
    session.install(
        "--no-deps", "--only-binary=:all:", f"onnxruntime=={ort}", f"numpy=={CONTRACT_PINS[ort]}"
    )
    session.run("python", "converter/gate/ortcheck.py", "--expect-ort", ort, *session.posargs)


@nox.session(venv_backend="none")
def contract_summary(session: nox.Session) -> None:
    """Merge every contract(...) result into contract-summary.json and print the table.

    Queued by the contract sessions to run after them; needs only the standard library and numpy,
    so it runs on nox's own interpreter.
    """
    session.run(sys.executable, "converter/gate/ortcheck.py", "--summary", *session.posargs)
