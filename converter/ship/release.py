"""`invoke release`: publish one load-tested model as a GitHub release, safely re-runnable.

A tag names a model and a tensor interface (converter/ship/tags.py); every release ships the file,
its `.sha256` sidecar and its operator list (converter/gate/oplist.py). Releases may be immutable
once published (no asset can be added, replaced or deleted), so the order is fixed: build (or
take the build the load-test matrix ran on) and gate locally, require passing load tests for
exactly these bytes on every platform (converter/gate/evidence.py), then a DRAFT release, upload,
verify every asset's SHA-256, and only then publish. Each step first looks at what is already
there, so a run that died anywhere is finished by running the same command again, without
duplicates.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from converter.errors import UserError
from converter.facts import (
    CPU_TARGET,
    FLOAT32_STORAGE,
    REPO_ROOT,
    SPECTRAL_CORE,
    TARGET_STORAGE,
    WAVEFORM,
)
from converter.gate import evidence, oplist
from converter.gate.contract import gate
from converter.metadata import (
    CACHE_KEY,
    MODEL_NAME,
    PROVENANCE,
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    STEMS,
    TARGET,
    TENSOR_INTERFACE,
    WEIGHT_STORAGE,
    public_version,
    read_metadata,
    read_sidecar,
    sha256_file,
    sidecar_path,
    stamped_target,
    write_text_atomic,
)
from converter.ship import compare, github, pins
from converter.ship.compare import report_name
from converter.ship.github import (
    LocalAsset,
    download_url,
    find_release,
    list_assets,
    remote_sha256,
)
from converter.ship.tags import GRAMMAR as TAG_GRAMMAR  # noqa: F401 - re-exported
from converter.ship.tags import Tag, parse_tag

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3

# What a run does with one asset name; the dry run prints exactly these.
KEEP = "keep (same SHA-256)"
UPLOAD = "upload"
REPLACE = "replace (different SHA-256)"
CLEAN_UP = "delete the unfinished upload, then upload"
CHECK = "download and compare (no digest from GitHub)"
REMOVE = "delete (not part of this release)"


@dataclass(frozen=True)
class Step:
    """What to do about one asset name: `local` is what should be there, `remote` what is."""

    name: str
    action: str
    local: LocalAsset | None
    remote: dict | None


def _file_metadata(path: Path) -> dict[str, str]:
    try:
        return read_metadata(onnx.load(str(path), load_external_data=False))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base
        raise UserError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}); delete it and run "
            "`invoke convert` (or `invoke release` without --contract-results) to rebuild it"
        ) from None


def stamped_interface(metadata: dict[str, str]) -> str:
    """The file's tensor interface; files from before the key existed are waveform files."""
    return metadata.get(TENSOR_INTERFACE, WAVEFORM)


def reuse_check(
    path: Path, model: str, interface: str = WAVEFORM, target: str = CPU_TARGET
) -> tuple[bool, str]:
    """Whether `path` was built for `model`, `interface` and `target` by the toolchain
    installed now, and why (not).

    A conversion takes long (hours for htdemucs_ft on CI); a file stamped with the same
    toolchain versions and carrying a matching sidecar is the same build and need not be redone.
    """
    if not path.is_file():
        return False, f"{path} does not exist"
    try:
        metadata = _file_metadata(path)
    except UserError:
        return False, f"{path} is not a readable ONNX file"
    if metadata.get(MODEL_NAME) != model:
        return False, f"{path} is stamped as model {metadata.get(MODEL_NAME)!r}, not {model!r}"
    if stamped_interface(metadata) != interface:
        return False, f"{path} is a {stamped_interface(metadata)} file, not {interface}"
    if stamped_target(metadata) != target:
        return False, f"{path} was built for --target {stamped_target(metadata)}, not {target}"
    stored, ships = metadata.get(WEIGHT_STORAGE, FLOAT32_STORAGE), TARGET_STORAGE[target]
    if stored != ships:
        return False, f"{path} stores its weights as {stored}; releases ship {ships}"
    toolchain = json.loads(metadata.get(PROVENANCE, "{}")).get("toolchain") or {}
    if not toolchain:
        return False, f"{path} records no toolchain versions in {PROVENANCE}"
    differing = [
        f"{name} {version} (installed: {public_version(name)})"
        for name, version in sorted(toolchain.items())
        if public_version(name) != version
    ]
    if differing:
        return False, f"{path} was built with {', '.join(differing)}"
    try:
        digest, name = read_sidecar(path)
    except (OSError, ValueError) as exc:
        return False, f"its sidecar is unusable: {exc}"
    if name != path.name or digest != sha256_file(path):
        return False, f"{sidecar_path(path)} does not match {path}"
    versions = ", ".join(f"{n} {v}" for n, v in sorted(toolchain.items()))
    return True, f"{path} was built with the installed toolchain ({versions})"


def build_model(tag: Tag, repo: Path | None, out_dir: Path) -> Path:
    """Convert (or reuse and re-validate) the tag's file, then apply the runtime contract gate.

    A reused file is validated again against demucs from `repo`: its stamp says which toolchain
    built it, not from which weights, and a file from a random-weight test repo must not ship.
    """
    # torch here, not at the top: releasing a prebuilt file needs no torch
    from converter import pipeline

    # Waveform calls keep the seed's signature; only spectral builds name their interface.
    extra = {} if tag.interface == WAVEFORM else {"interface": tag.interface}
    path = out_dir / tag.file_name
    reuse, why = reuse_check(path, tag.model, tag.interface, tag.target)
    if reuse:
        log.info("reusing %s: %s; validating it again", path, why)
        pipeline.validate(tag.model, repo, out_dir, **extra)
    else:
        log.info("converting %s (%s, %s): %s", tag.model, tag.interface, tag.target, why)
        if tag.target != CPU_TARGET:
            extra |= {"target": tag.target}  # its weight storage: facts.TARGET_STORAGE
        path = pipeline.convert(tag.model, repo, out_dir, **extra)
    gate(path)
    return path


def operator_list(path: Path, write: bool = True) -> tuple[Path, bytes]:
    """The file's operator list (`oplist.config_path`) and its bytes: checked against the
    graph, or made from it (and written unless `write` is false: a dry run).

    convert writes it; whatever wrote it, it must hold exactly the graph's (domain, opset, op)
    triples, since the app's reduced runtime is rebuilt from it.
    """
    model = onnx.load(str(path), load_external_data=False)
    ops = oplist.required_operators(model)
    target = oplist.config_path(path)
    if target.is_file():
        try:
            listed = oplist.parse_config(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{target} is unusable ({exc}); delete it to regenerate it") from None
        if listed != ops:
            raise UserError(
                f"{target} does not list exactly the operators of {path.name}; delete it to "
                "regenerate it from the file"
            )
        log.info("%s lists exactly the operators of %s", target.name, path.name)
        return target, target.read_bytes()
    header = [
        f"Operators of {path.name} (sha256 {sha256_file(path)}), in ONNX Runtime's reduced-build",
        "format (tools/ci_build/reduce_op_kernels.py --config FILE).",
    ]
    text = oplist.config_text(ops, header)
    if write:
        write_text_atomic(target, text)
        log.info("wrote %s from the graph (%d domain/opset lines)", target.name, len(ops))
    return target, text.encode("utf-8")


def local_assets(path: Path, write: bool = True) -> list[LocalAsset]:
    """The files to publish (model, sidecar, operator list), after checking that the sidecar
    matches the model file and the operator list the graph."""
    digest = sha256_file(path)
    try:
        side_digest, side_name = read_sidecar(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot release {path}: {exc}; run `invoke convert` again") from None
    side = sidecar_path(path)
    if side_digest != digest or side_name != path.name:
        raise UserError(f"{side} does not match {path}; run `invoke convert` again")
    ops, data = operator_list(path, write)
    return [
        LocalAsset(path.name, path, path.stat().st_size, digest, "application/octet-stream"),
        LocalAsset(side.name, side, side.stat().st_size, sha256_file(side), "text/plain"),
        LocalAsset(ops.name, ops, len(data), hashlib.sha256(data).hexdigest(), "text/plain"),
    ]


def contract_gate(path: Path) -> None:
    gate(path)


def check_interface(path: Path, tag: Tag, metadata: dict[str, str]) -> None:
    """A tag releases one interface and one target: a waveform file under a spectral tag (or
    the reverse) would reach an app that refuses it, a CPU file under an accelerators tag the
    wrong providers."""
    stamped = stamped_interface(metadata)
    if stamped != tag.interface:
        raise UserError(
            f"{path} is a {stamped} file ({TENSOR_INTERFACE}={stamped!r}) but tag {tag.name} "
            f"releases {tag.interface} files; build it with `invoke convert --model {tag.model} "
            f"--interface {tag.interface}` or use the matching tag ({TAG_GRAMMAR})"
        )
    built = stamped_target(metadata)
    if built != tag.target:
        raise UserError(
            f"{path} was built for --target {built} but tag {tag.name} releases {tag.target} "
            f"files; build it with `invoke convert --model {tag.model} --target {tag.target}` "
            f"or use the matching tag ({TAG_GRAMMAR})"
        )


def prebuilt(tag: Tag, out_dir: Path, gate: Callable[[Path], None] = contract_gate) -> Path:
    """The file the load-test matrix ran on (`--contract-results`), statically gated again.

    Nothing is converted or validated here: the publishing job installs no torch or demucs and
    unpickles nothing; the build job validated these bytes and the evidence names their SHA-256.
    """
    path = out_dir / tag.file_name
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: --contract-results publishes the file the load tests ran "
            f"on; put the build's {tag.file_name} and its .sha256 in --out-dir (or run without "
            "--contract-results to build and load-test here)"
        )
    metadata = _file_metadata(path)
    if metadata.get(MODEL_NAME) != tag.model:
        raise UserError(
            f"{path} is stamped as model {metadata.get(MODEL_NAME)!r}, not {tag.model!r}"
        )
    check_interface(path, tag, metadata)
    gate(path)
    return path


def run_contract_sessions(path: Path, results_dir: Path) -> None:
    """`nox -s contract` on this platform for `path`, results into `results_dir`.

    A failing session is not an error here: the evidence check names what failed.
    """
    root = REPO_ROOT
    command = [
        sys.executable,
        "-m",
        "nox",
        "--noxfile",
        str(root / "noxfile.py"),
        "-s",
        "contract",
        "--",
        "--results-dir",
        str(results_dir.resolve()),
        str(path.resolve()),
    ]
    if importlib.util.find_spec("nox") is None:
        raise UserError(
            "nox is not installed: `pip install -c requirements/constraints.txt nox`, or pass "
            "the load-test matrix's results with --contract-results"
        )
    log.info("load-testing %s on this platform: %s", path, " ".join(command))
    subprocess.run(command, cwd=root, check=False)


def pin_section(pin: pins.Pin, cache_key: str) -> str:
    """Markdown: the values OpenKara pins, in its own syntax (model card and step summary)."""
    return "\n".join(
        [
            f"## OpenKara pin ({pin.tag})",
            "",
            f"- tag: `{pin.tag}`",
            f"- URL: {pin.url}",
            f"- SHA-256: `{pin.sha256}`",
            f"- `{CACHE_KEY}`: `{cache_key}`",
            "",
            pins.snippets(pin),
        ]
    )


def catalog_section(tag: Tag, url: str, sha256: str, cache_key: str) -> str:
    """Markdown: how a spectral-core release reaches OpenKara (its catalog, not pins)."""
    return "\n".join(
        [
            f"## OpenKara catalog ({tag.name})",
            "",
            f"- URL: {url}",
            f"- SHA-256: `{sha256}`",
            f"- `{CACHE_KEY}`: `{cache_key}`",
            "",
            "OpenKara takes spectral-core files from openkara-models' catalog. Write the catalog "
            "release manifest with `invoke catalog --tag "
            f"{tag.name} --base catalog/releases/PREV.json --release-id ID --out DIR` "
            "(docs/releasing.md).",
        ]
    )


def handoff_section(tag: Tag, assets: list[LocalAsset], url: str, cache_key: str) -> str:
    """The card's and job summary's last section: the pin (waveform) or the catalog hand-off."""
    if tag.interface == SPECTRAL_CORE:
        return catalog_section(tag, url, assets[0].sha256, cache_key)
    return pin_section(
        pins.Pin(tag.model, tag.name, assets[0].name, url, assets[0].sha256), cache_key
    )


def model_card(
    tag: Tag,
    metadata: dict[str, str],
    assets: list[LocalAsset],
    url: str,
    proof: list[dict],
) -> str:
    """The release body: what the file is, where it came from, how it was checked, how to
    pin it or hand it to the catalog."""
    model_file, operators = assets[0], assets[-1]
    provenance = json.loads(metadata.get(PROVENANCE, "{}"))
    toolchain = provenance.pop("toolchain", {}) or {}
    lines = [
        f"# {tag.model} ({tag.name})",
        "",
        f"Demucs v4 `{tag.model}` converted to one ONNX file for OpenKara "
        f"(stems: {metadata.get(STEMS, '?')}; {metadata.get(SEGMENT_SAMPLES, '?')} samples "
        f"per segment at {metadata.get(SAMPLE_RATE, '?')} Hz).",
        "",
        "| | |",
        "| --- | --- |",
        f"| file | `{model_file.name}` |",
        f"| tensor interface (`{TENSOR_INTERFACE}`) | {tag.interface} |",
        f"| target (`{TARGET}`) | {tag.target} |",
        f"| size | {model_file.size:,} bytes ({model_file.size / 1e6:.1f} MB) |",
        f"| weight storage (`{WEIGHT_STORAGE}`) | "
        f"{metadata.get(WEIGHT_STORAGE, FLOAT32_STORAGE)} |",
        f"| SHA-256 | `{model_file.sha256}` |",
        f"| `{CACHE_KEY}` | `{metadata.get(CACHE_KEY, '?')}` |",
        f"| operator list (ONNX Runtime reduced build) | `{operators.name}` |",
        "",
        "## Source",
        "",
    ]
    lines += [
        f"- {key}: `{json.dumps(value, sort_keys=True)}`"
        for key, value in sorted(provenance.items())
    ] or ["- (no provenance recorded)"]
    lines += ["", "## Toolchain", ""]
    lines += [f"- {name} {version}" for name, version in sorted(toolchain.items())] or [
        "- (not recorded)"
    ]
    lines += [
        "",
        "## Runtime contract",
        "",
        f"Loaded and run on the official ONNX Runtime wheels, CPU EP, with these exact bytes "
        f"(SHA-256 `{model_file.sha256}`):",
        "",
        "| platform | onnxruntime | result | load s | run s |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        "| "
        + " | ".join(
            "" if row.get(key) is None else str(row[key])
            for key in ("platform", "ort", "status", "load_s", "run_s")
        )
        + " |"
        for row in proof
    ]
    lines += ["", handoff_section(tag, assets, url, metadata.get(CACHE_KEY, "?"))]
    return "\n".join(lines)


def write_step_summary(text: str) -> None:
    """Append `text` to the job summary GitHub Actions shows (no-op outside Actions)."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as file:
            file.write(text + "\n")


def plan_assets(existing: list[dict], wanted: list[LocalAsset]) -> list[Step]:
    """Decide per asset name what brings the draft to exactly `wanted`."""
    remote = {asset["name"]: asset for asset in existing}
    steps = []
    for local in wanted:
        asset = remote.pop(local.name, None)
        if asset is None:
            action = UPLOAD
        elif asset.get("state") != "uploaded":
            action = CLEAN_UP
        elif not (asset.get("digest") or "").startswith("sha256:"):
            action = CHECK
        elif asset["digest"] == f"sha256:{local.sha256}" and asset.get("size") == local.size:
            action = KEEP
        else:
            action = REPLACE
        steps.append(Step(local.name, action, local, asset))
    steps += [Step(name, REMOVE, None, asset) for name, asset in sorted(remote.items())]
    return steps


def _delete_asset(client: github.Client, asset: dict) -> None:
    client.request("DELETE", f"{client.repo_path}/releases/assets/{asset['id']}", expect=(404,))


def _upload(client: github.Client, release: dict, local: LocalAsset) -> None:
    """Upload with in-run retries; after a failure, clear what it left before trying again."""
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            client.upload_asset(release, local.path, local.name, local.content_type)
            return
        except github.GitHubError as exc:
            if not exc.transient or attempt == UPLOAD_ATTEMPTS:
                raise
            left = [a for a in list_assets(client, release) if a["name"] == local.name]
            # A lost response does not mean a lost upload: keep a complete, correct one.
            done = [
                a
                for a in left
                if a.get("state") == "uploaded" and remote_sha256(client, a) == local.sha256
            ]
            if done:
                log.info("upload of %s failed (%s) but the asset arrived intact", local.name, exc)
                return
            log.warning(
                "upload of %s failed (%s); deleting %d leftover asset(s), attempt %d of %d",
                local.name,
                exc,
                len(left),
                attempt + 1,
                UPLOAD_ATTEMPTS,
            )
            for asset in left:
                _delete_asset(client, asset)


def sync_assets(client: github.Client, release: dict, wanted: list[LocalAsset]) -> None:
    for step in plan_assets(list_assets(client, release), wanted):
        if step.action == KEEP or (
            step.action == CHECK and remote_sha256(client, step.remote) == step.local.sha256
        ):
            log.info("%s: already uploaded with SHA-256 %s, kept", step.name, step.local.sha256)
            continue
        log.info("%s: %s", step.name, step.action)
        if step.remote is not None:
            _delete_asset(client, step.remote)
        if step.local is not None:
            _upload(client, release, step.local)


def verify(client: github.Client, release: dict, expected: dict[str, str]) -> list[str]:
    """Problems that forbid publishing: a missing, unfinished, extra or wrong asset."""
    remote = {asset["name"]: asset for asset in list_assets(client, release)}
    extra = sorted(set(remote) - set(expected))
    problems = [f"{name} is not part of this release" for name in extra]
    for name, digest in expected.items():
        asset = remote.get(name)
        if asset is None:
            problems.append(f"{name} is missing")
        elif asset.get("state") != "uploaded":
            problems.append(f"{name} is in state {asset.get('state')!r}, not 'uploaded'")
        elif (actual := remote_sha256(client, asset)) != digest:
            problems.append(f"{name} has SHA-256 {actual}, expected {digest}")
    return problems


def _published_report(client: github.Client, release: dict, name: str) -> dict[str, str]:
    """The comparison report published beside `name` (`invoke compare`), as verify expects it."""
    return {
        a["name"]: remote_sha256(client, a)
        for a in list_assets(client, release)
        if a["name"] == report_name(name)
    }


def _verify_published(client: github.Client, release: dict, tag: Tag) -> str:
    """Check a published release against its own `.sha256` asset (nothing is rebuilt).

    Releases from before operator lists were shipped have none; one that is there must match
    its digest like every other asset.
    """
    name = tag.file_name
    remote = {asset["name"]: asset for asset in list_assets(client, release)}
    side = remote.get(f"{name}.sha256")
    problems = [f"{name}.sha256 is missing"]
    if side is not None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            with open(sidecar_path(local), "wb") as file:
                client.download_asset(side, file.write)
            try:
                digest, _ = read_sidecar(local)
                expected = {name: digest, side["name"]: sha256_file(sidecar_path(local))}
                ops = remote.get(oplist.config_path(local).name)
                if ops is not None:
                    hasher = hashlib.sha256()
                    client.download_asset(ops, hasher.update)
                    expected[ops["name"]] = hasher.hexdigest()
                expected.update(_published_report(client, release, name))
                problems = verify(client, release, expected)
            except ValueError as exc:
                problems = [str(exc)]
    if problems:
        raise UserError(
            f"published release {tag.name} is wrong: {'; '.join(problems)}. Published releases "
            "cannot be changed: release the fix under a new tag"
        )
    return f"release {tag.name} is already published and verified; nothing to do"


def _dry_run(
    client: github.Client,
    tag: Tag,
    release: dict | None,
    out_dir: Path,
    contract_results: Path | None,
) -> str:
    path = out_dir / tag.file_name
    if contract_results is not None:
        ready, why = path.is_file(), f"{path} does not exist"
        if ready:
            why = "the build the load tests ran on; static contract gate"
    else:
        ready, why = reuse_check(path, tag.model, tag.interface)
    lines = [f"dry run for {tag.name} in {client.repository} (nothing is written):"]
    if release is None:
        lines.append(f"- create draft release {tag.name} (prerelease: {tag.prerelease})")
    else:
        lines.append(f"- reuse draft release {tag.name} (id {release['id']})")
    existing = list_assets(client, release) if release else []
    steps = []
    if ready:
        local = local_assets(path, write=False)
        lines.append(f"- publish {path}: {why}")
        if not local[-1].path.is_file():
            lines.append(f"- write {local[-1].path.name} from the graph")
        if contract_results is None:
            lines.append("- validate it again; contract gate")
        steps = plan_assets(existing, local)
    else:
        ops = oplist.config_path(path).name
        lines.append(f"- convert {tag.model} ({tag.interface}; {why}); validate; contract gate")
        lines.append(
            f"- upload {tag.file_name}, {tag.file_name}.sha256 and {ops} (sizes after build)"
        )
        lines += [
            f"- {a['name']}: on the draft now ({a.get('state')}, "
            f"{a.get('digest') or 'no digest'}); kept only if it matches the build"
            for a in existing
        ]
    if contract_results is None:
        lines.append(
            "- `nox -s contract` on this platform; then require passing load tests "
            f"from every platform: {', '.join(evidence.PLATFORMS)}"
        )
    elif ready:
        try:
            proof = evidence.require(contract_results, local[0].name, local[0].sha256)
            lines.append(
                f"- load-test evidence in {contract_results}: {len(proof)} passing rows "
                "for these bytes, every platform and ORT version"
            )
        except UserError as exc:
            lines.append(f"- load-test evidence in {contract_results}: REFUSED: {exc}")
    for step in steps:
        detail = f" ({step.local.size:,} bytes, sha256 {step.local.sha256})" if step.local else ""
        lines.append(f"- {step.name}: {step.action}{detail}")
    lines.append("- verify every asset's SHA-256, then publish")
    return "\n".join(lines)


def release(
    tag: str,
    repo: Path | None = None,
    dry_run: bool = False,
    *,
    contract_results: Path | None = None,
    out_dir: Path = Path("models"),
    client: github.Client | None = None,
    prepare: Callable[[Tag, Path | None, Path], Path] = build_model,
    load_test: Callable[[Path, Path], None] = run_contract_sessions,
    gate: Callable[[Path], None] = contract_gate,
    server_url: str | None = None,
    compare_report: Path | None = None,
    accepted: dict[str, str] | None = None,
) -> str:
    """Run the whole release for `tag`; return the one-line outcome (or the dry-run plan).

    With `contract_results` (the load-test matrix's records) the file already in `out_dir` is
    published; without, it is built here and load-tested on this platform. Either way nothing
    is created on GitHub unless every platform passed with exactly these bytes. `client`,
    `prepare`, `load_test` and `gate` (the static gate of a prebuilt file) are parameters so
    tests can point the real logic at a local API double and a tiny model.
    """
    parsed = parse_tag(tag)
    client = client or github.from_env()
    found = find_release(client, parsed.name)
    if found is not None and not found["draft"]:
        return _verify_published(client, found, parsed)
    if dry_run:
        return _dry_run(client, parsed, found, out_dir, contract_results)

    if contract_results is not None:
        path = prebuilt(parsed, out_dir, gate)
        wanted = local_assets(path)
        proof = evidence.require(contract_results, wanted[0].name, wanted[0].sha256)
    else:
        path = prepare(parsed, repo, out_dir)
        check_interface(path, parsed, _file_metadata(path))
        wanted = local_assets(path)
        with tempfile.TemporaryDirectory(prefix=".load-test-", dir=out_dir) as results:
            load_test(path, Path(results))
            proof = evidence.require(Path(results), wanted[0].name, wanted[0].sha256)
    metadata = _file_metadata(path)
    server = server_url or github.server_url()
    url = download_url(server, client.repository, parsed.name, wanted[0].name)
    body = model_card(parsed, metadata, wanted, url, proof)
    if compare_report is not None:  # the budgets against the release before it (issue 25)
        section, report = compare.release_gate(compare_report, parsed.name, wanted[0], accepted)
        body += "\n\n" + section
        wanted.append(report)
    fields = {
        "name": f"{parsed.model} {parsed.name}",
        "body": body,
        "prerelease": parsed.prerelease,
    }
    if found is None:
        log.info("creating draft release %s", parsed.name)
        draft = client.request(
            "POST",
            f"{client.repo_path}/releases",
            json={"tag_name": parsed.name, "draft": True, **fields},
        ).json()
    elif any(found.get(key) != value for key, value in fields.items()):
        log.info("updating the model card of draft release %s", parsed.name)
        draft = client.request(
            "PATCH", f"{client.repo_path}/releases/{found['id']}", json=fields
        ).json()
    else:
        log.info("draft release %s is up to date", parsed.name)
        draft = found

    sync_assets(client, draft, wanted)
    problems = verify(client, draft, {asset.name: asset.sha256 for asset in wanted})
    if problems:
        raise UserError(
            f"not publishing {parsed.name}: {'; '.join(problems)}; run the release again"
        )
    log.info("all assets verified; publishing %s", parsed.name)
    published = client.request(
        "PATCH", f"{client.repo_path}/releases/{draft['id']}", json={"draft": False}
    ).json()
    write_step_summary(handoff_section(parsed, wanted, url, metadata.get(CACHE_KEY, "?")))
    return (
        f"published {parsed.name}: {wanted[0].name} ({wanted[0].size:,} bytes, sha256 "
        f"{wanted[0].sha256}) at {published.get('html_url', '')}"
    )
