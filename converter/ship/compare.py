"""`invoke compare`: a candidate file against the one before it, side by side in one run.

Timings from different machines cannot be compared, so the baseline is the previous file's own
bytes run beside the candidate on this machine, alternated (`converter.measure.pair_bench`, as
`invoke bench --baseline`): for a release, the newest published, non-prerelease release of the same
model and interface before the tag, downloaded through the API and checked against its
`.sha256` asset and GitHub's `digest`; for a pull request, main's conversion (`--baseline`).
Each metric is judged by `converter.ship.budgets`; the JSON report validates against
schemas/compare-report-v1.json and the release's evidence gate (`release_gate`) refuses to
publish on a breach that was not accepted with a reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import jsonschema
import onnx

from converter.errors import UserError
from converter.facts import REPO_ROOT, WAVEFORM, file_stem, sha256_file
from converter.gate.ortcheck import reference_path
from converter.measure import bench, pair_bench
from converter.measure.ep_report import app_coreml_share
from converter.measure.segment import APP_CONFIG, DEFAULT_CONFIG
from converter.metadata import (
    MODEL_NAME,
    PROVENANCE,
    TENSOR_INTERFACE,
    read_metadata,
    read_sidecar,
    sidecar_path,
    write_text_atomic,
)
from converter.ship import budgets, github
from converter.ship.tags import parse_tag

log = logging.getLogger(__name__)

REPORT_VERSION = 1
SCHEMA = REPO_ROOT / "schemas" / "compare-report-v1.json"
LABELS = ("candidate", "previous")
DEFAULT_RUNS = 5
# A margin is capped both ways: an exact output would be infinite, and JSON has no infinity.
MARGIN_CAP_DB = 100.0
_SERIES = re.compile(r"(?P<series>.+-v)(?P<version>\d+\.\d+\.\d+)(?P<rc>-rc\.\d+)?")


def _series(tag: str) -> tuple[str, tuple[int, ...], bool] | None:
    """(series, version, prerelease) of a release tag: `model-ft-v1.2.3-rc.1` is series
    `model-ft-v`, so one series is one model and interface."""
    match = _SERIES.fullmatch(tag)
    if not match:
        return None
    version = tuple(int(part) for part in match["version"].split("."))
    return match["series"], version, bool(match["rc"])


def find_previous(client, tag: str) -> dict | None:
    """The newest published, non-prerelease release of `tag`'s series older than `tag`."""
    parse_tag(tag)
    series, version, _ = _series(tag)
    older = []
    for found in client.paginate(f"{client.repo_path}/releases"):
        parsed = _series(found.get("tag_name", ""))
        if found.get("draft") or found.get("prerelease") or parsed is None:
            continue
        if parsed[0] == series and not parsed[2] and parsed[1] < version:
            older.append((parsed[1], found))
    if not older:
        log.info("compare: no published release of the %s* series before %s", series, tag)
        return None
    _, previous = max(older, key=lambda pair: pair[0])
    log.info("compare: the release before %s is %s", tag, previous["tag_name"])
    return previous


def download(client, found: dict, name: str, folder: Path) -> tuple[Path, str]:
    """`name` of the published release `found` into `folder`, checked against its `.sha256`
    asset and GitHub's `digest`; (path, sha256). Anything missing or differing is one error."""
    tag = found["tag_name"]
    assets = {a["name"]: a for a in github.list_assets(client, found)}
    missing = [n for n in (name, f"{name}.sha256") if n not in assets]
    if missing:
        raise UserError(
            f"previous release {tag} lacks {' and '.join(missing)}: it cannot be measured; "
            "compare against a local file with --baseline FILE instead"
        )
    path = folder / name
    with open(sidecar_path(path), "wb") as file:
        client.download_asset(assets[f"{name}.sha256"], file.write)
    try:
        digest, listed = read_sidecar(path)
    except ValueError as exc:
        raise UserError(f"{name}.sha256 of {tag} is unusable: {exc}") from None
    given = assets[name].get("digest") or ""
    problem = None
    if listed != name:
        problem = f"its .sha256 asset names {listed!r}"
    elif given.startswith("sha256:") and given != f"sha256:{digest}":
        problem = f"GitHub's digest {given} differs from its .sha256 asset ({digest})"
    else:
        hasher = hashlib.sha256()
        with open(path, "wb") as file:

            def keep(block: bytes) -> None:
                hasher.update(block)
                file.write(block)

            client.download_asset(assets[name], keep)
        if hasher.hexdigest() != digest:
            problem = f"its bytes hash to {hasher.hexdigest()}, its .sha256 says {digest}"
    if problem:
        raise UserError(
            f"{name} of previous release {tag} is not what it claims: {problem}; do not trust "
            "that release (re-publish it under a new tag) or compare with --baseline FILE"
        )
    log.info("compare: downloaded %s of %s, sha256 %s verified", name, tag, digest)
    return path, digest


def _file_facts(path: Path) -> dict:
    """Model name, interface and checkpoint signatures from the file's metadata."""
    try:
        entries = read_metadata(onnx.load(str(path), load_external_data=False))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base
        raise UserError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    try:
        signatures = json.loads(entries.get(PROVENANCE, "{}")).get("signatures")
    except (ValueError, AttributeError):
        signatures = None
    return {
        "model": entries.get(MODEL_NAME),
        "interface": entries.get(TENSOR_INTERFACE, WAVEFORM),
        "signatures": signatures,
    }


def measure(
    candidate: Path,
    previous: Path,
    reference: Path,
    runs: int,
    run_child: Callable[..., dict],
    threads: int | None = None,
) -> dict:
    """The pair's latency, peak RSS, session load and sizes (alternated), and each file's gate
    margin on the inputs recorded at the candidate's conversion; `threads` per session
    (default: every core, as apps run)."""
    threads = threads or os.cpu_count() or 1
    files = dict(zip(LABELS, (candidate, previous), strict=True))
    pair = pair_bench.compare(files, runs, threads, run_child)
    margins = run_child(
        "pair_margin",
        files={name: str(p) for name, p in files.items()},
        reference=str(reference),
        threads=threads,
        cap_db=MARGIN_CAP_DB,
    )
    share = {name: app_coreml_share(p) for name, p in files.items()}
    log.info("compare: CoreML share %s", share)
    return {**pair, "margin_db": margins["margin_db"], "accelerator_share": share}


def metric_values(measured: dict) -> dict[str, dict[str, float]]:
    """metric -> {label: value} for every budgeted metric that was measured."""
    app, default = measured["configs"][APP_CONFIG], measured["configs"][DEFAULT_CONFIG]
    values = {
        "gate_margin_db": measured["margin_db"],
        "latency_app_s": {n: app[n]["median_s"] for n in LABELS},
        "latency_default_s": {n: default[n]["median_s"] for n in LABELS},
        "session_load_s": {n: app[n]["session_s"] for n in LABELS},
        "peak_rss_mb": {n: app[n]["peak_rss_mb"] for n in LABELS},
        "file_bytes": {n: float(measured["files"][n]["bytes"]) for n in LABELS},
    }
    share = measured["accelerator_share"]
    if None not in share.values():
        values["accelerator_share"] = share
    return values


def judge(
    values: dict[str, dict[str, float]], kind: str, not_comparable: dict[str, str]
) -> list[dict]:
    """One row per budget: both values, the change, the limit and the status."""
    rows = []
    for budget in budgets.BUDGETS:
        row = {
            "metric": budget.metric,
            "label": budget.label,
            "unit": budget.unit,
            "better": budget.better,
            "budget": budget.describe(kind),
            "candidate": None,
            "previous": None,
            "change": None,
            "limit": None,
            "status": "not measured",
            "reason": None,
        }
        if budget.metric in values:
            cand, prev = (values[budget.metric][n] for n in LABELS)
            change = cand / prev if budget.kind == budgets.FACTOR and prev else cand - prev
            row.update(candidate=cand, previous=prev, change=change)
            row["limit"] = budget.limit(kind, prev)
            if budget.metric in not_comparable:
                row.update(status="not comparable", reason=not_comparable[budget.metric])
            elif row["limit"] is None:
                row["status"] = "not gated"
            else:
                row["status"] = "breach" if budget.breached(kind, cand, prev) else "ok"
        rows.append(row)
    return rows


def _verdict(report: dict) -> str:
    if report["previous"] is None:
        return "no baseline"
    return "fail" if any(r["status"] == "breach" for r in report["metrics"]) else "pass"


def accept(report: dict, accepted: dict[str, str]) -> dict:
    """Mark breached `accepted` metrics (metric -> reason) as accepted, reasons recorded."""
    for metric, reason in accepted.items():
        try:
            budgets.get(metric)
        except ValueError as exc:
            raise UserError(f"--accept-regression: {exc}") from None
        if not reason.strip():
            raise UserError(f"--accept-regression {metric} needs --reason TEXT saying why")
        (row,) = [r for r in report["metrics"] if r["metric"] == metric]
        if row["status"] not in ("breach", "accepted"):
            log.info("compare: %s is %s, nothing to accept", metric, row["status"])
            continue
        row.update(status="accepted", reason=reason.strip())
        log.info("compare: regression of %s accepted: %s", metric, reason.strip())
    report["accepted"] = [
        {"metric": r["metric"], "reason": r["reason"]}
        for r in report["metrics"]
        if r["status"] == "accepted"
    ]
    report["verdict"] = _verdict(report)
    return report


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit in ("dB", "%"):
        return f"{value:.1f} {unit}"
    return f"{value:.3f} {unit}".strip()


def _change(row: dict) -> str:
    if row["change"] is None:
        return "-"
    if budgets.get(row["metric"]).kind == budgets.FACTOR:
        return f"{row['change']:.3f}×"
    return f"{row['change']:+.2f} {row['unit']}".strip()


def breach_line(row: dict, kind: str) -> str:
    """One breach in words: the metric, both values and the budget."""
    return (
        f"{row['metric']} {_value(row['candidate'], row['unit'])} vs previous "
        f"{_value(row['previous'], row['unit'])} ({_change(row)}) breaks the {kind} budget "
        f"{row['budget']}"
    )


def table(report: dict) -> str:
    """Markdown: what was compared, then one row per metric (the card shows the same)."""
    cand, prev = report["candidate"], report["previous"]
    if prev is None:
        return (
            f"First release of {report['model']} ({report['interface']}): no previous release "
            f"to measure `{cand['file']}` against, so no budget applies."
        )
    m = report["machine"]
    lines = [
        f"`{cand['file']}` ({report['tag'] or 'candidate'}, sha256 `{cand['sha256'][:12]}…`) "
        f"against `{prev['file']}` ({prev['tag'] or 'baseline'}, sha256 "
        f"`{prev['sha256'][:12]}…`), alternated in one run on {m['cpu']}, {m['cores']} cores, "
        f"onnxruntime {m['versions']['onnxruntime']}; {report['runs']} timed segments each; "
        f"{report['budgets']} budgets.",
        "",
        "| metric | candidate | previous | change | budget | verdict |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in report["metrics"]:
        verdict = row["status"] + (f": {row['reason']}" if row["reason"] else "")
        lines.append(
            f"| {row['label']} (`{row['metric']}`) | {_value(row['candidate'], row['unit'])} | "
            f"{_value(row['previous'], row['unit'])} | {_change(row)} | {row['budget']} | "
            f"{verdict} |"
        )
    return "\n".join(lines)


def validate_report(report: dict) -> None:
    """Raise UserError unless `report` matches schemas/compare-report-v1.json."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(report)
    )
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise UserError(f"comparison report does not match its schema at {where}: {error.message}")


def check(report: dict) -> None:
    """The evidence gate: one line naming every breach not accepted, else nothing."""
    breaches = [r for r in report["metrics"] if r["status"] == "breach"]
    if breaches:
        names = " ".join(f"--accept-regression {r['metric']}" for r in breaches)
        raise UserError(
            f"not publishing {report['tag'] or report['candidate']['file']}: "
            + "; ".join(breach_line(r, report["budgets"]) for r in breaches)
            + f". Fix the regression, or ship it with {names} --reason TEXT"
        )


def _write(report: dict, out: Path) -> None:
    validate_report(report)
    write_text_atomic(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", out)


def compare(
    file: Path,
    *,
    tag: str | None = None,
    baseline: Path | None = None,
    kind: str = budgets.RELEASE,
    accepted: dict[str, str] | None = None,
    runs: int = DEFAULT_RUNS,
    out: Path | None = None,
    client=None,
    run_child: Callable[..., dict] | None = None,
    threads: int | None = None,
) -> dict:
    """Measure `file` against the release before `tag` (or against `baseline`), judge it by
    the `kind` budgets, write the report (default: NAME.compare.json beside `file`)."""
    if kind not in budgets.KINDS:
        raise UserError(f"--budgets {kind!r}: one of {', '.join(budgets.KINDS)}")
    if (tag is None) == (baseline is None):
        raise UserError("pass --tag TAG (the release before it, from GitHub) or --baseline FILE")
    if runs < 1:
        raise UserError(f"--runs {runs}: at least one timed segment is needed")
    if not file.is_file():
        raise UserError(f"--file {file} does not exist; convert one with `invoke convert`")
    facts = _file_facts(file)
    if tag is not None:
        wanted = parse_tag(tag).model
        if facts["model"] != wanted:
            raise UserError(f"--file {file} is model {facts['model']!r}, tag {tag} is {wanted!r}")
    reference = reference_path(file)
    if not reference.is_file():
        raise UserError(
            f"no {reference.name} beside {file}: the gate margin needs the float64 reference "
            "that `invoke convert` writes; keep it with the file"
        )
    out = out or file.with_name(report_name(file.name))
    name = f"{file_stem(facts['model'], facts['interface'])}.onnx"
    report: dict = {
        "report_version": REPORT_VERSION,
        "tag": tag,
        "model": facts["model"],
        "interface": facts["interface"],
        "budgets": kind,
        "runs": runs,
        "candidate": {"file": name, "sha256": sha256_file(file), "bytes": file.stat().st_size},
        "previous": None,
        "machine": bench.machine(),
        "metrics": [],
        "accepted": [],
        "measurement": None,
    }
    with tempfile.TemporaryDirectory(prefix="compare-") as work:
        if baseline is None:
            client = client or github.from_env()
            found = find_previous(client, tag)
            if found is None:
                log.info("compare: first release of %s (%s): no baseline", name, tag)
                report["verdict"] = _verdict(report)
                _write(report, out)
                return report
            previous, digest = download(client, found, name, Path(work))
            report["previous"] = {"tag": found["tag_name"], "file": name, "sha256": digest}
        else:
            if not baseline.is_file():
                raise UserError(f"--baseline {baseline} does not exist; pass a converted file")
            previous = baseline
            digest = sha256_file(previous)
            report["previous"] = {"tag": None, "file": baseline.name, "sha256": digest}
        report["previous"]["bytes"] = previous.stat().st_size
        before = _file_facts(previous)
        if (before["model"], before["interface"]) != (facts["model"], facts["interface"]):
            raise UserError(
                f"{previous.name} is {before['model']} ({before['interface']}), the candidate "
                f"{facts['model']} ({facts['interface']}): compare files of one model and interface"
            )
        not_comparable = {}
        if before["signatures"] != facts["signatures"]:
            not_comparable["gate_margin_db"] = (
                f"other checkpoints ({before['signatures']} vs {facts['signatures']}): the "
                "recorded reference is the candidate's"
            )
        measured = measure(file, previous, reference, runs, run_child or bench.run_child, threads)
    report["measurement"] = measured
    report["metrics"] = judge(metric_values(measured), kind, not_comparable)
    accept(report, accepted or {})
    _write(report, out)
    return report


def report_name(model_file: str) -> str:
    """NAME.compare.json for NAME.onnx: the report's file and release asset name."""
    return f"{model_file.removesuffix('.onnx')}.compare.json"


def release_gate(report_path: Path, tag: str, model_file, accepted: dict[str, str] | None = None):
    """For `invoke release`: the report on exactly `model_file`'s bytes (a github.LocalAsset),
    `accepted` regressions recorded in it, judged; (the model card's section, the report as a
    github.LocalAsset) or one error."""
    sha256 = model_file.sha256
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read the comparison report {report_path}: {exc}; run `invoke compare --tag "
            f"{tag}` (the release workflow's compare job writes it)"
        ) from None
    validate_report(report)
    if report["tag"] != tag or report["candidate"]["sha256"] != sha256:
        raise UserError(
            f"{report_path} measured {report['tag']} with sha256 {report['candidate']['sha256']}, "
            f"not {tag} with {sha256}: run `invoke compare` on these bytes"
        )
    if accepted:
        accept(report, accepted)
        _write(report, report_path)
    check(report)
    section = ["## Against the previous release", "", table(report)]
    for accepted_row in report["accepted"]:
        section += [
            "",
            f"Accepted regression of `{accepted_row['metric']}`: {accepted_row['reason']}",
        ]
    name = report_name(model_file.name)
    section += ["", f"The full measurement is the `{name}` asset."]
    asset = github.LocalAsset(
        name, report_path, report_path.stat().st_size, sha256_file(report_path), "application/json"
    )
    return "\n".join(section), asset
