"""The accuracy gate over many random draws: trained-like models of many seeds, each converted
and measured against demucs at both ONNX Runtime session settings (`invoke sweep`).

One draw of weights proves little about float32 rounding: a small trained-like htdemucs of
another seed was refused by the gate (issue 27). A sweep writes, per seed, a small trained-like
htdemucs, htdemucs_6s and a 2-model bag (`PAIR`, the first two models of htdemucs_ft), plus
full-size htdemucs for a few seeds, converts each through the real pipeline (its gate
included) and records every input of the gate with demucs' float64 and float32 outputs
(`record`). `converter/measure/sweepcheck.py` then runs the files on any ORT (a bare venv's
python), and `summary` gives the worst file-vs-PyTorch gap per model and input. Built files are
reused, so a second ORT version only measures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.build.fakerepo import BAGS, write_bag, write_repo
from converter.errors import UserError
from converter.gate.accuracy import MARGIN_DB, allowed_mse
from converter.measure.sweepcheck import record_path
from converter.metadata import atomic_path
from converter.pipeline import convert

log = logging.getLogger(__name__)

PAIR = "htdemucs_ft"  # written as a bag of its first two models
SMALL_MODELS = ("htdemucs", "htdemucs_6s", PAIR)
FULL_MODELS = ("htdemucs",)


@dataclass(frozen=True)
class Case:
    """One model of the sweep: a bag at a size, its weights drawn with a seed."""

    size: str
    seed: int
    model: str

    @property
    def label(self) -> str:
        name = f"{self.model} (2-model bag)" if self.model == PAIR else self.model
        return f"{name}, {self.size}"

    def folder(self, out: Path) -> Path:
        return out / f"{self.size}-seed{self.seed}"

    def file(self, out: Path) -> Path:
        return self.folder(out) / "models" / f"{self.model}.onnx"


def cases(seeds: int, full_seeds: int) -> list[Case]:
    """Seeds 1..`seeds` of the small models, 1..`full_seeds` of the full-size ones."""
    return [Case("small", s, m) for s in range(1, seeds + 1) for m in SMALL_MODELS] + [
        Case("full", s, m) for s in range(1, full_seeds + 1) for m in FULL_MODELS
    ]


def stems(model: str) -> list[str]:
    return BAGS[model][2]


def write_case_repo(case: Case, repo: Path) -> None:
    """The trained-like repo of `case` (every model of its size and seed; PAIR cut to two)."""
    names = list(SMALL_MODELS if case.size == "small" else FULL_MODELS)
    write_repo(repo, size=case.size, names=names, statistics="trained", seed=case.seed)
    if PAIR in names:
        signatures, _, _, _ = BAGS[PAIR]
        write_bag(repo, PAIR, signatures[:2])


def record(outputs: dict, stems: list[str], path: Path) -> Path:
    """Save, beside `path`, every input of the validation gate with demucs' float64 and float32
    outputs for it (`outputs` of `pipeline.convert`): what `sweepcheck` needs, without torch."""
    out = record_path(path)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as file:
            np.savez(
                file,
                inputs=np.array(list(outputs["inputs"])),
                stems=np.array(stems),
                audio=np.stack(list(outputs["inputs"].values())),
                truth=np.stack(list(outputs["truth"].values())),
                pytorch=np.stack(list(outputs["pytorch"].values())),
            )
    return out


def build(out: Path, todo: list[Case]) -> dict[str, str]:
    """Convert and record every case not yet built; {file: why} for those that did not convert."""
    failed = {}
    for number, case in enumerate(todo, 1):
        path = case.file(out)
        if path.is_file() and record_path(path).is_file():
            log.info(
                "sweep %d/%d: %s seed %d already built", number, len(todo), case.label, case.seed
            )
            continue
        log.info("sweep %d/%d: %s seed %d", number, len(todo), case.label, case.seed)
        repo = case.folder(out) / "repo"
        write_case_repo(case, repo)
        outputs: dict = {}
        try:
            convert(case.model, repo=repo, out_dir=path.parent, outputs=outputs)
        except UserError as exc:
            log.error("sweep: %s seed %d did not convert: %s", case.label, case.seed, exc)
            failed[str(path)] = str(exc)
            continue
        record(outputs, stems(case.model), path)
    return failed


def measure(out: Path, files: list[Path], python: str | None = None) -> dict:
    """Run `sweepcheck` on `files` with `python` (default: this interpreter); its results, also
    saved as `out/sweep-ort-VERSION.json`."""
    script = Path(__file__).with_name("sweepcheck.py")
    rows = out / f".rows-{os.getpid()}.json"
    command = [python or sys.executable, str(script), "--out", str(rows), *map(str, files)]
    log.info("measuring %d file(s): %s", len(files), " ".join(command[:2]))
    try:
        done = subprocess.run(command, stdout=subprocess.DEVNULL)
        if done.returncode != 0 or not rows.is_file():
            raise UserError(f"{command[0]} could not run the files (exit {done.returncode})")
        results = json.loads(rows.read_text(encoding="utf-8"))
        os.replace(rows, out / f"sweep-ort-{results['ort']}.json")
    finally:
        rows.unlink(missing_ok=True)
    return results


def gap_db(mse: float, pytorch_mse: float) -> float:
    """How much larger the file's error is than PyTorch float32's, in dB (0 when both are 0)."""
    if mse == pytorch_mse:
        return 0.0
    if pytorch_mse == 0 or not math.isfinite(mse):
        return math.inf
    return -math.inf if mse == 0 else 10 * math.log10(mse / pytorch_mse)


def margin_db(mse: float, pytorch_mse: float) -> float:
    """How far the file's error stays inside the gate's bound, in dB (negative: refused)."""
    if mse == 0:
        return math.inf
    return 10 * math.log10(allowed_mse(pytorch_mse) / mse) if math.isfinite(mse) else -math.inf


def summary(results: dict, out: Path, built: list[Case]) -> list[dict]:
    """Per model label and input: the worst gap and gate margin over seeds and stems, per
    session setting."""
    label = {str(case.file(out)): case.label for case in built}
    worst: dict[tuple[str, str], dict] = {}
    for file, rows in results["files"].items():
        for row in rows:
            entry = worst.setdefault(
                (label.get(file, file), row["input"]), {"gap": {}, "margin": {}, "where": {}}
            )
            gap, margin = (
                gap_db(row["mse"], row["pytorch_mse"]),
                margin_db(row["mse"], row["pytorch_mse"]),
            )
            setting = row["setting"]
            if gap > entry["gap"].get(setting, -math.inf):
                entry["gap"][setting] = gap
                entry["where"][setting] = f"{Path(file).parent.parent.name} {row['stem']}"
            entry["margin"][setting] = min(margin, entry["margin"].get(setting, math.inf))
    return [{"model": m, "input": i, **v} for (m, i), v in sorted(worst.items())]


def table(rows: list[dict], ort: str) -> str:
    """Markdown: worst gap (file's MSE over PyTorch float32's, dB) and smallest gate margin."""
    settings = ("optimization off", "default options")
    lines = [
        f"ORT {ort}. Gap: the file's error over PyTorch float32's, worst over seeds and stems "
        f"(dB; the gate allows {MARGIN_DB:g} above the larger of PyTorch's and the floor). "
        "Margin: how far inside the gate.",
        "",
        "| model | input | gap off | gap default | margin off | margin default | worst at |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        gaps = [f"{row['gap'].get(s, math.nan):+.1f}" for s in settings]
        margins = [f"{row['margin'].get(s, math.nan):.1f}" for s in settings]
        where = row["where"].get(settings[0], "")
        lines.append(
            f"| {row['model']} | {row['input']} | {' | '.join(gaps + margins)} | {where} |"
        )
    return "\n".join(lines)


def sweep(out: Path, seeds: int, full_seeds: int, python: str | None = None) -> list[dict]:
    """Build what is missing of the sweep in `out`, measure it with `python`, write and print
    the table; a UserError if a model did not convert or a file left the gate."""
    if seeds < 0 or full_seeds < 0 or seeds + full_seeds == 0:
        raise UserError("--seeds and --full must be counts >= 0, not both 0")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    todo = cases(seeds, full_seeds)
    failed = build(out, todo)
    files = [case.file(out) for case in todo if str(case.file(out)) not in failed]
    results = measure(out, files, python)
    rows = summary(results, out, todo)
    text = table(rows, results["ort"])
    (out / f"sweep-ort-{results['ort']}.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    worst = min((m for row in rows for m in row["margin"].values()), default=math.inf)
    worst_gap = max((g for row in rows for g in row["gap"].values()), default=-math.inf)
    log.info(
        "sweep on ORT %s: %d of %d model(s) converted; worst gap %+.1f dB, smallest margin %.1f dB",
        results["ort"],
        len(files),
        len(todo),
        worst_gap,
        worst,
    )
    if failed:
        raise UserError(
            f"{len(failed)} model(s) of the sweep did not convert; first: "
            f"{next(iter(failed.values()))}"
        )
    if worst < 0:
        raise UserError(
            f"a file of the sweep leaves the gate on ORT {results['ort']} (margin {worst:.1f} "
            f"dB); see {out}/sweep-ort-{results['ort']}.md"
        )
    return rows
