"""Load-test evidence: publish only bytes that passed `nox -s contract` on every platform.

An earlier file loaded on x86 and failed on Apple Silicon, so `invoke release` demands a passing
row for exactly the file's SHA-256 from every (platform, ONNX Runtime version) pair the runtime
contract names. Standard library only: the publishing job, which installs no conversion
toolchain, runs it. The rows are the `contract-results/<ort>.json` records `ortcheck` writes.
Rows are matched by file name and SHA-256, so the rows of a waveform file (NAME.onnx) never
prove its spectral-core sibling (NAME.spectral.onnx), nor the reverse.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from converter.errors import UserError
from converter.facts import REPO_ROOT, version_key
from converter.shapes import shape_problem

log = logging.getLogger(__name__)

CONTRACT_PINS = REPO_ROOT / "requirements" / "contract.txt"
# 1.23.2 is the last ONNX Runtime release with macOS x86_64 wheels.
LAST_MACOS_X86_64 = (1, 23, 2)
# `platform.system() platform.machine()` as ortcheck records it -> the runner that proves it.
PLATFORMS = {
    "Linux x86_64": "ubuntu-latest",
    "Windows AMD64": "windows-latest",
    "Darwin x86_64": "macos-15-intel",
    "Darwin arm64": "macos-14",
}


# What `require` reads of an ortcheck record (converter/gate/ortcheck.py writes it).
ROW_SHAPE = {"model": str, "sha256": str, "platform": str, "ort": str, "status": str}
RECORD_SHAPE = {"rows": [ROW_SHAPE], "missing_kernels?": [str]}


def contract_pins(path: Path = CONTRACT_PINS) -> dict[str, str]:
    """ORT version -> numpy version, from requirements/contract.txt (their one home)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        requirements = dict(word.split("==") for word in line.split("#")[0].split())
        if requirements:
            pins[requirements["onnxruntime"]] = requirements["numpy"]
    return pins


def has_wheel(platform: str, ort: str) -> bool:
    """Whether official onnxruntime `ort` has a wheel for `platform` (macOS x86_64 stops at
    1.23.2)."""
    return platform != "Darwin x86_64" or version_key(ort) <= LAST_MACOS_X86_64


def required() -> dict[str, list[str]]:
    """Platform -> the ORT versions a release must have passed on it."""
    versions = list(contract_pins())
    return {name: [v for v in versions if has_wheel(name, v)] for name in PLATFORMS}


def read_rows(results_dir: Path) -> list[dict]:
    """Every row of every ortcheck record under `results_dir`, any nesting (one artifact folder
    per runner); a record's missing allow-listed kernels fail each of its rows."""
    if not results_dir.is_dir():
        raise UserError(
            f"--contract-results {results_dir} is not a directory: pass the folder holding the "
            "load tests' contract-results/*.json (the release workflow downloads one per runner)"
        )
    rows = []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read load-test results {path}: {exc}") from None
        if not (isinstance(record, dict) and isinstance(record.get("rows"), list)):
            log.info("skipping %s: not an ortcheck record", path)
            continue
        problem = shape_problem(record, RECORD_SHAPE)
        if problem:
            raise UserError(
                f"load-test results {path} hold a broken ortcheck record ({problem}); pass the "
                "contract-results folders `nox -s contract` wrote, unedited"
            )
        for row in record["rows"]:
            if record.get("missing_kernels") and row.get("status") == "ok":
                row = {**row, "status": f"no CPU kernel for {', '.join(record['missing_kernels'])}"}
            rows.append({**row, "source": str(path)})
    log.info("read %d load-test rows from %s", len(rows), results_dir)
    return rows


def require(results_dir: Path, model: str, sha256: str) -> list[dict]:
    """The passing rows for `model` with `sha256` on every required pair, sorted; else one
    UserError naming every missing, failing or foreign row."""
    rows = [row for row in read_rows(results_dir) if row.get("model") == model]
    fix = (
        f"run `nox -s contract -- models/{model}` on the missing runners (the release workflow's "
        "load-test matrix does) and pass every runner's results with --contract-results"
    )
    if not rows:
        raise UserError(f"not publishing {model}: no load-test results in {results_dir}; {fix}")
    problems = []
    foreign = sorted({row.get("sha256") or "none" for row in rows} - {sha256})
    if foreign:
        problems.append(
            f"rows for other bytes (sha256 {', '.join(foreign)}; this file is {sha256})"
        )
    mine = [row for row in rows if row.get("sha256") == sha256]
    problems += [
        f"failed on {row.get('platform')} ORT {row.get('ort')}: {row.get('status')}"
        for row in mine
        if row.get("status") != "ok"
    ]
    passed = defaultdict(set)
    for row in mine:
        if row.get("status") == "ok":
            passed[row.get("platform")].add(row.get("ort"))
    for name, versions in required().items():
        if not passed[name]:
            problems.append(f"no passing row from {name} ({PLATFORMS[name]})")
            continue
        lacking = [v for v in versions if v not in passed[name]]
        if lacking:
            problems.append(f"no passing row from {name} for ORT {', '.join(lacking)}")
    if problems:
        raise UserError(f"not publishing {model}: {'; '.join(problems)}; {fix}")
    needed = {(name, v) for name, versions in required().items() for v in versions}
    proof = [row for row in mine if (row.get("platform"), row.get("ort")) in needed]
    log.info("load-test evidence complete: %d passing rows for sha256 %s", len(proof), sha256)
    return sorted(proof, key=lambda row: (row["platform"], version_key(row["ort"])))
