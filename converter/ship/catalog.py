"""`invoke catalog`: hand published spectral-core releases to OpenKara's catalog.

Today's OpenKara finds models only through openkara-models' catalog: a release manifest
(`catalog/releases/<release-id>.json`, schema `openkara.catalog/release-v1`) whose model entries
carry an immutable URL, the byte size and SHA-256, and the facts the app checks before it loads
a file. This module writes such a manifest for our releases: it reads each PUBLISHED release
through the API, downloads its assets (bounded, streamed), checks every byte against the
`.sha256` asset and GitHub's `digest`, reads the entry's facts from the file itself (onnx only,
no torch), carries the runtimes, compatibility edges and supply-chain records over from the
previous manifest (`--base`), marks each entry by execution provider (compatibility edges:
the CPU EP's file for `cpu`, the accelerators' file for `coreml`/`directml`/`xnnpack`, as the
file's `openkara.target` says), validates the result against the published JSON schema and
writes it atomically. Field meanings: openkara-models' docs/catalog-contract.md; ours:
docs/releasing.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import onnx

from converter.errors import UserError
from converter.facts import (
    ACCELERATORS_TARGET,
    CPU_TARGET,
    MIX_INPUT,
    REPO_ROOT,
    SPECTRAL_CONTRACT,
    SPECTRAL_CORE,
    SPECTRAL_INPUT,
    SPECTRAL_OUTPUT,
    TIME_OUTPUT,
    is_ai_onnx,
)
from converter.gate import oplist
from converter.metadata import (
    CACHE_KEY,
    INPUT_SEMANTICS,
    MODEL_NAME,
    OUTPUT_SEMANTICS,
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    STEM_PROFILE,
    TARGET,
    TENSOR_INTERFACE,
    fingerprint,
    read_metadata,
    read_sidecar,
    sidecar_path,
    stamped_target,
    write_text_atomic,
)
from converter.metadata import SPECTRAL_CONTRACT as SPECTRAL_CONTRACT_KEY
from converter.ship import github
from converter.ship.release import download_url, find_release
from converter.ship.tags import Tag, either, example, parse_tag

log = logging.getLogger(__name__)

SCHEMA_VERSION = "openkara.catalog/release-v1"
SCHEMA_REPO = "thedavidweng/openkara-models"
SCHEMA_PATH = "catalog/schema-release-v1.json"
SCHEMA_REF = "main"
RELEASE_ID = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}-[0-9]{3}")
# The catalog's product intent per model (its `profile` enum); htdemucs_6s has no place: the
# schema's stem profiles are four-stem, karaoke_2stem and dual-output.
PROFILES = {"htdemucs": "balanced", "htdemucs_ft": "quality"}
STEM_PROFILES = ("four-stem",)
# Inputs, outputs and compute are float32; float16 weight storage is exact and Cast to float32
# in the graph (docs/weight-storage.md), so the catalog's precision is fp32.
PRECISION = "fp32"
# The execution providers (the schema's `execution_provider` names) each target's file is marked
# for: the CPU EP's file (what our load tests prove) for `cpu`; the accelerators' file (no control
# flow, static shapes, standard ops, float32 weights) for the providers OpenKara registers first
# where they exist, which take almost nothing of the CPU file (docs/runtime-contract.md).
PROVIDERS = {CPU_TARGET: ("cpu",), ACCELERATORS_TARGET: ("coreml", "directml", "xnnpack")}
MAX_MODEL_BYTES = 4 << 30
MAX_TEXT_BYTES = 1 << 20


@dataclass(frozen=True)
class Download:
    name: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Verified:
    """One published release whose model, sidecar and operator list all matched."""

    tag: Tag
    model: Download
    operators: Download


@dataclass(frozen=True)
class Ours:
    """One entry we add and the providers it is marked for: runtime id -> providers."""

    entry: dict
    target: str
    marks: dict[str, list[str]]

    @property
    def artifact_id(self) -> str:
        return self.entry["artifact_id"]


# -- inputs --------------------------------------------------------------------------------


def parse_tags(tags: Iterable[str]) -> list[Tag]:
    """Every tag on the grammar, spectral-core, with a catalog profile, named once."""
    parsed: list[Tag] = []
    for name in tags:
        tag = parse_tag(name)
        if tag.interface != SPECTRAL_CORE:
            raise UserError(
                f"{name} is a {tag.interface} release: OpenKara's catalog takes spectral-core "
                "files only (tags model-spectral-v*, model-ft-spectral-v*, "
                f"{example('htdemucs', SPECTRAL_CORE, ACCELERATORS_TARGET)})"
            )
        if tag.model not in PROFILES:
            raise UserError(
                f"{name} releases {tag.model}, six stems: catalog schema v1 has no six-stem "
                f"profile; hand over {' or '.join(PROFILES)} releases"
            )
        if tag in parsed:
            raise UserError(f"--tag {name} is given twice")
        parsed.append(tag)
    if not parsed:
        raise UserError("no --tag given: name at least one published spectral-core release")
    return parsed


def load_json(path: Path, what: str) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{what} {path} is not readable JSON ({exc})") from None
    if not isinstance(document, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return document


def load_base(path: Path) -> dict:
    """The previous catalog release manifest; its shape is checked against the schema later."""
    base = load_json(path, "--base")
    if base.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"--base {path} has schema_version {base.get('schema_version')!r}, not "
            f"{SCHEMA_VERSION!r}: pass a catalog/releases/<release-id>.json of openkara-models"
        )
    return base


def fetch_schema(client: github.Client, repo: str, ref: str, path: str = SCHEMA_PATH) -> dict:
    """The published JSON schema, read through the contents API at `ref` (not vendored)."""
    log.info("reading %s at %s from %s", path, ref, repo)
    try:
        response = client.request("GET", f"/repos/{repo}/contents/{path}", params={"ref": ref})
        body = response.json()
    except ValueError:
        body = None
    except github.GitHubError as exc:
        raise UserError(
            f"cannot read the catalog schema {repo}:{path}@{ref}: {exc}; check --schema-repo "
            "and --schema-ref, or pass a local copy with --schema FILE"
        ) from None
    if not (
        isinstance(body, dict)
        and body.get("encoding") == "base64"
        and isinstance(body.get("content"), str)
        and body.get("size", 0) <= MAX_TEXT_BYTES
    ):
        raise UserError(
            f"GitHub's answer for {repo}:{path}@{ref} is not a file's base64 content; pass a "
            "local copy with --schema FILE"
        )
    try:
        schema = json.loads(base64.b64decode(body["content"]))
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"{repo}:{path}@{ref} is not a JSON schema ({exc})") from None
    if not isinstance(schema, dict):
        raise UserError(f"{repo}:{path}@{ref} is not a JSON schema object")
    return schema


def validate(document: dict, schema: dict, what: str) -> None:
    """Validate with the schema's own draft (jsonschema); one line naming the first problem."""
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UserError(f"the catalog schema is not a valid JSON schema: {exc.message}") from None
    errors = sorted(cls(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = first.json_path
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(
            f"{what} does not validate against the catalog schema: {first.message} at {where}{more}"
        )


# -- downloads -----------------------------------------------------------------------------


def _download(client: github.Client, asset: dict, target: Path, limit: int) -> Download:
    """Stream `asset` into `target`, hashing on the way; never more than its stated size (and
    `limit`); its size and GitHub's `digest` must match what arrived."""
    name, size = asset["name"], asset.get("size")
    if not isinstance(size, int) or not 0 <= size <= limit:
        raise UserError(f"asset {name} states size {size!r}; at most {limit:,} bytes are read")
    hasher, received = hashlib.sha256(), 0

    with open(target, "wb") as file:

        def chunk(block: bytes) -> None:
            nonlocal received
            received += len(block)
            if received > size:
                raise UserError(f"asset {name} sent more than its stated {size:,} bytes")
            hasher.update(block)
            file.write(block)

        client.download_asset(asset, chunk)
    digest = hasher.hexdigest()
    if received != size:
        raise UserError(f"asset {name} sent {received:,} bytes, its listing says {size:,}")
    stated = asset.get("digest") or ""
    if stated.startswith("sha256:") and stated != f"sha256:{digest}":
        raise UserError(
            f"asset {name}: GitHub's digest {stated} does not match the downloaded bytes "
            f"(sha256:{digest}); the release is corrupt: release the file under a new tag"
        )
    log.info("downloaded %s (%s bytes, sha256 %s)", name, f"{size:,}", digest)
    return Download(name, target, size, digest)


def tag_commit(client: github.Client, tag: Tag) -> str:
    """The commit the tag points at (through an annotated tag object), for `upstream`."""
    url = f"{client.repo_path}/git/ref/tags/{tag.name}"
    for _ in range(3):  # a tag of a tag of a commit is legal; a longer chain is not ours
        try:
            answer = client.request("GET", url).json()
        except ValueError:
            break
        target = answer.get("object") if isinstance(answer, dict) else None
        if not isinstance(target, dict) or not re.fullmatch(
            r"[0-9a-f]{40}", str(target.get("sha"))
        ):
            break
        if target.get("type") == "commit":
            return target["sha"]
        if target.get("type") != "tag":
            break
        url = f"{client.repo_path}/git/tags/{target['sha']}"
    raise UserError(f"tag {tag.name} does not resolve to a commit through the API")


def published_release(client: github.Client, tag: Tag, allow_prerelease: bool) -> dict:
    found = find_release(client, tag.name)
    if found is None:
        raise UserError(
            f"no release {tag.name} in {client.repository}: publish it with `invoke release`"
        )
    if found["draft"]:
        raise UserError(
            f"release {tag.name} is a draft: the catalog takes published releases only; finish "
            f"it with `invoke release --tag {tag.name}`"
        )
    if found.get("prerelease") and not allow_prerelease:
        raise UserError(
            f"release {tag.name} is a prerelease: pass --allow-prerelease for a candidate "
            "catalog, never for the stable channel"
        )
    return found


def verify_release(client: github.Client, tag: Tag, release: dict, work_dir: Path) -> Verified:
    """Download and check the three assets: model bytes == `.sha256` asset == `digest`."""
    assets = {
        a["name"]: a for a in client.paginate(f"{client.repo_path}/releases/{release['id']}/assets")
    }
    model_path = work_dir / tag.file_name
    names = [model_path.name, sidecar_path(model_path).name, oplist.config_path(model_path).name]
    missing = [name for name in names if name not in assets]
    if missing:
        raise UserError(
            f"release {tag.name} lacks {', '.join(missing)}: it cannot be catalogued; release "
            "the file again under a new tag with `invoke release`"
        )
    unfinished = [n for n in names if assets[n].get("state") != "uploaded"]
    if unfinished:
        raise UserError(f"release {tag.name}: {', '.join(unfinished)} not fully uploaded")
    _download(client, assets[names[1]], sidecar_path(model_path), MAX_TEXT_BYTES)
    try:
        expected, named = read_sidecar(model_path)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"release {tag.name}: {exc}") from None
    if named != model_path.name:
        raise UserError(f"release {tag.name}: {names[1]} names {named!r}, not {names[0]!r}")
    model = _download(client, assets[names[0]], model_path, MAX_MODEL_BYTES)
    if model.sha256 != expected:
        raise UserError(
            f"release {tag.name}: {names[0]} has SHA-256 {model.sha256} but {names[1]} says "
            f"{expected}; the release is corrupt: release the file under a new tag"
        )
    operators = _download(client, assets[names[2]], oplist.config_path(model_path), MAX_TEXT_BYTES)
    return Verified(tag, model, operators)


# -- the entry -----------------------------------------------------------------------------


def file_facts(verified: Verified) -> dict:
    """The catalog's `model` facts, read from the downloaded file; refuses anything that is
    not a spectral-core file of the tag's model with the metadata the catalog needs."""
    path, tag = verified.model.path, verified.tag
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base
        raise UserError(f"{tag.name}: {path.name} is not a readable ONNX file ({exc})") from None
    meta = read_metadata(model)
    interface = meta.get(TENSOR_INTERFACE, "waveform")
    if interface != SPECTRAL_CORE:
        raise UserError(
            f"{tag.name}: {path.name} is a {interface}-interface file ({TENSOR_INTERFACE}="
            f"{interface!r}); the catalog takes spectral-core files only"
        )
    problems = []
    if meta.get(SPECTRAL_CONTRACT_KEY) != SPECTRAL_CONTRACT:
        problems.append(f"{SPECTRAL_CONTRACT_KEY}={meta.get(SPECTRAL_CONTRACT_KEY)!r}")
    if meta.get(MODEL_NAME) != tag.model:
        problems.append(f"{MODEL_NAME}={meta.get(MODEL_NAME)!r}")
    if meta.get(STEM_PROFILE) not in STEM_PROFILES:
        problems.append(f"{STEM_PROFILE}={meta.get(STEM_PROFILE)!r}")
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    if sorted(inputs) != sorted([SPECTRAL_INPUT, MIX_INPUT]):
        problems.append(f"inputs {inputs}")
    if sorted(outputs) != sorted([SPECTRAL_OUTPUT, TIME_OUTPUT]):
        problems.append(f"outputs {outputs}")
    for key in (CACHE_KEY, SAMPLE_RATE, SEGMENT_SAMPLES, INPUT_SEMANTICS, OUTPUT_SEMANTICS):
        if not meta.get(key):
            problems.append(f"no {key}")
    for key in (SAMPLE_RATE, SEGMENT_SAMPLES):
        if meta.get(key) and not (meta[key].isdigit() and int(meta[key]) > 0):
            problems.append(f"{key}={meta[key]!r}")
    if problems:
        raise UserError(
            f"{tag.name}: {path.name} is not a spectral-core file as the catalog needs it: "
            f"{'; '.join(problems)}"
        )
    if stamped_target(meta) != tag.target:
        raise UserError(
            f"{tag.name}: {path.name} was built for --target {stamped_target(meta)} "
            f"({TARGET}={meta.get(TARGET)!r}) but the tag releases {tag.target} files; the "
            "catalog would mark it for the wrong execution providers"
        )
    if fingerprint(model) != meta[CACHE_KEY]:
        raise UserError(f"{tag.name}: {path.name}'s {CACHE_KEY} does not match its graph")
    listed = verified.operators.path.read_text(encoding="utf-8", errors="replace")
    try:
        same = oplist.parse_config(listed) == oplist.required_operators(model)
    except ValueError:
        same = False
    if not same:
        raise UserError(
            f"{tag.name}: {verified.operators.name} does not list exactly the operators of "
            f"{path.name}"
        )
    opset = next((i.version for i in model.opset_import if is_ai_onnx(i.domain)), 0)
    return {
        "cache_key": meta[CACHE_KEY],
        "format": "onnx",
        "input_semantics": meta[INPUT_SEMANTICS],
        "ir_version": model.ir_version,
        "opset": opset,
        "output_semantics": meta[OUTPUT_SEMANTICS],
        "precision": PRECISION,
        "sample_rate": int(meta[SAMPLE_RATE]),
        "segment_frames": int(meta[SEGMENT_SAMPLES]),
        "stem_profile": meta[STEM_PROFILE],
        "tensor_interface": SPECTRAL_CORE,
    }


def artifact_id(tag: Tag) -> str:
    """Never reused for other bytes: a tag names one immutable release."""
    return f"{tag.model}.spectral.{PRECISION}.{tag.name}"


def model_entry(
    verified: Verified,
    facts: dict,
    runtime_ids: list[str],
    repository: str,
    server_url: str,
    commit: str,
) -> dict:
    tag, model, operators = verified.tag, verified.model, verified.operators
    return {
        "arch": None,
        "archive_digest": model.sha256,
        "artifact_id": artifact_id(tag),
        "byte_size": model.size,
        "deprecation": {
            "deprecated": False,
            "replacement_artifact_id": None,
            "sunset_generation": None,
        },
        "download_url": download_url(server_url, repository, tag.name, model.name),
        "extracted_file_digests": {model.name: {"sha256": model.sha256, "size": model.size}},
        "filename": model.name,
        "kind": "model",
        "model": {
            **facts,
            "compatible_runtime_ids": runtime_ids,
            "required_operator_config": {
                "sha256": operators.sha256,
                "size": operators.size,
                "url": download_url(server_url, repository, tag.name, operators.name),
            },
        },
        "os": None,
        "profile": PROFILES[tag.model],
        "target_triple": None,
        "upstream": {"commit_sha": commit, "project": repository, "tag": tag.name},
        "variant": tag.model,
    }


# -- the manifest --------------------------------------------------------------------------


def spectral_runtimes(base: dict, wanted: list[str]) -> list[dict]:
    """The runtimes our entries may declare: `wanted`, else every runtime of `base` that loads
    a spectral-core model today."""
    runtimes = {r["artifact_id"]: r for r in base["artifacts"]["runtimes"]}
    if wanted:
        unknown = [rid for rid in wanted if rid not in runtimes]
        if unknown:
            raise UserError(
                f"--runtime {', '.join(unknown)} is not a runtime of --base; it has "
                f"{', '.join(runtimes) or 'none'}"
            )
        return [runtimes[rid] for rid in dict.fromkeys(wanted)]
    spectral = {
        m["artifact_id"]
        for m in base["artifacts"]["models"]
        if m["model"]["tensor_interface"] == SPECTRAL_CORE
    }
    chosen = [
        rid
        for rid, runtime in runtimes.items()
        if spectral & set(runtime["runtime"]["supported_model_artifact_ids"])
    ]
    if not chosen:
        raise UserError(
            "--base has no runtime that loads a spectral-core model: name the runtimes "
            "with --runtime ID"
        )
    log.info("runtimes that load spectral-core models in --base: %s", ", ".join(chosen))
    return [runtimes[rid] for rid in chosen]


def provider_marks(runtimes: list[dict], target: str) -> dict[str, list[str]]:
    """Runtime id -> the providers of it that `target`'s file is marked for (`PROVIDERS`),
    for every chosen runtime that has one; refused when none has."""
    wanted = PROVIDERS[target]
    marks = {
        r["artifact_id"]: [p for p in r["runtime"]["execution_providers"] if p in wanted]
        for r in runtimes
    }
    for rid in [rid for rid, providers in marks.items() if not providers]:
        log.info("runtime %s runs none of %s: no %s entry on it", rid, ", ".join(wanted), target)
        del marks[rid]
    if not marks:
        have = "; ".join(
            f"{r['artifact_id']}: {', '.join(r['runtime']['execution_providers'])}"
            for r in runtimes
        )
        raise UserError(
            f"no chosen runtime runs {either(list(wanted))}, the providers of a --target "
            f"{target} file ({have}); name runtimes that do with --runtime ID, or use a --base "
            "that has them"
        )
    log.info(
        "%s files marked for: %s",
        target,
        "; ".join(f"{rid} ({', '.join(ps)})" for rid, ps in marks.items()),
    )
    return marks


def base_target(manifest: dict, artifact_id: str) -> str:
    """Which of our targets an entry of `--base` stands for, by its edges: accelerator
    providers only means the accelerators' file; anything else (cpu among them) the CPU's."""
    providers = {
        edge["execution_provider"]
        for edge in manifest["compatibility"]
        if edge["model_artifact_id"] == artifact_id
    }
    return ACCELERATORS_TARGET if providers and "cpu" not in providers else CPU_TARGET


def build_manifest(
    base: dict,
    ours: list[Ours],
    *,
    release_id: str,
    created_at: str,
    producer: dict,
    supersede: bool = False,
) -> dict:
    """`base` carried over (runtimes, compatibility, supply chain, consumer range), our entries
    added with their runtime declarations and one edge per marked provider, as the next
    generation."""
    manifest = copy.deepcopy(base)
    by_id = {one.artifact_id: one for one in ours}
    kept = []
    for model in manifest["artifacts"]["models"]:
        aid = model["artifact_id"]
        if aid in by_id:
            if model["archive_digest"] != by_id[aid].entry["archive_digest"]:
                raise UserError(
                    f"--base already has artifact {aid} with other bytes "
                    f"({model['archive_digest']}); an artifact id never names two files"
                )
            log.info("--base already lists %s with these bytes; writing it afresh", aid)
            continue
        if supersede and model["model"]["tensor_interface"] == SPECTRAL_CORE:
            target = base_target(base, aid)
            replacement = next(
                (
                    one.artifact_id
                    for one in ours
                    if one.entry["variant"] == model["variant"] and one.target == target
                ),
                None,
            )
            if replacement and not model["deprecation"]["deprecated"]:
                log.info("deprecating %s (%s) in favour of %s", aid, target, replacement)
                model["deprecation"] = {
                    "deprecated": True,
                    "reason": f"superseded by {replacement}",
                    "replacement_artifact_id": replacement,
                    "sunset_generation": None,
                }
        kept.append(model)
    manifest["artifacts"]["models"] = kept + [one.entry for one in ours]
    triples = {}
    for runtime in manifest["artifacts"]["runtimes"]:
        rid = runtime["artifact_id"]
        triples[rid] = runtime["target_triple"]
        supported = runtime["runtime"]["supported_model_artifact_ids"]
        supported += [
            one.artifact_id for one in ours if rid in one.marks and one.artifact_id not in supported
        ]
    manifest["compatibility"] = [
        edge for edge in manifest["compatibility"] if edge["model_artifact_id"] not in by_id
    ] + [
        {
            "execution_provider": provider,
            "model_artifact_id": one.artifact_id,
            "runtime_artifact_id": rid,
            "status": "supported",
            "target_triple": triples[rid],
        }
        for one in ours
        for rid, providers in one.marks.items()
        for provider in providers
    ]
    if manifest.pop("gates", None) is not None:
        log.info("not carrying --base's gates over: they report on its own release")
    manifest.update(
        release_id=release_id,
        generation=base["generation"] + 1,
        created_at=created_at,
        producer=producer,
        notes=(
            f"Adds {', '.join(by_id)} from {producer['repo']} (invoke catalog); runtimes, "
            f"compatibility and supply-chain records carried over from {base['release_id']}."
        ),
    )
    return manifest


def producer_fields(repository: str, commit: str | None, environ=os.environ) -> dict:
    """Who wrote the manifest: this repository at `commit` (GITHUB_SHA, else the checkout's
    HEAD), the workflow and run when in GitHub Actions."""
    commit = commit or environ.get("GITHUB_SHA")
    if not commit:
        root = REPO_ROOT
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
        )
        commit = done.stdout.strip() if done.returncode == 0 else ""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise UserError(
            f"commit {commit!r} is not a 40-hex Git SHA: pass --commit SHA (the commit this "
            "repository released from)"
        )
    return {
        "commit_sha": commit,
        "repo": repository,
        "run_id": environ.get("GITHUB_RUN_ID") or "manual",
        "workflow": environ.get("GITHUB_WORKFLOW") or "invoke catalog",
    }


@contextlib.contextmanager
def _base_fields(base: Path) -> Iterator[None]:
    """A `--base` that passed a schema laxer than v1 (`--schema FILE`) may still lack a field
    this module reads: one line, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"--base {base} lacks a field of catalog schema v1 ({type(exc).__name__}: {exc}); "
            "validate it against openkara-models' schema-release-v1.json"
        ) from None


def catalog(
    tags: Iterable[str],
    base: Path,
    release_id: str,
    out_dir: Path,
    *,
    schema: Path | None = None,
    schema_repo: str = SCHEMA_REPO,
    schema_ref: str = SCHEMA_REF,
    runtimes: Iterable[str] = (),
    allow_prerelease: bool = False,
    supersede: bool = False,
    created_at: str | None = None,
    commit: str | None = None,
    client: github.Client | None = None,
    server_url: str | None = None,
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> Path:
    """Write `out_dir/RELEASE_ID.json` for the published releases `tags`; return its path.

    Everything that needs no download is checked first; the file appears only once the whole
    manifest validated (atomic rename).
    """
    parsed = parse_tags(tags)
    if not RELEASE_ID.fullmatch(release_id):
        raise UserError(f"--release-id {release_id!r} is not YYYY-MM-DD-NNN")
    target = out_dir / f"{release_id}.json"
    if target.exists():
        raise UserError(
            f"{target} exists: a catalog release is immutable; pick the next --release-id"
        )
    previous = load_base(base)
    client = client or github.from_env()
    producer = producer_fields(client.repository, commit)
    document = (
        load_json(schema, "--schema") if schema else fetch_schema(client, schema_repo, schema_ref)
    )
    validate(previous, document, f"--base {base}")
    with _base_fields(base):
        if release_id <= previous["release_id"]:
            raise UserError(
                f"--release-id {release_id} does not come after --base's {previous['release_id']}"
            )
        chosen = spectral_runtimes(previous, list(runtimes))
        marks = {t: provider_marks(chosen, t) for t in dict.fromkeys(t.target for t in parsed)}
    server = server_url or github.server_url()
    ours = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".catalog-", dir=out_dir) as work:
        for tag in parsed:
            found = published_release(client, tag, allow_prerelease)
            folder = Path(work) / tag.name
            folder.mkdir()
            verified = verify_release(client, tag, found, folder)
            facts = file_facts(verified)
            entry = model_entry(
                verified,
                facts,
                list(marks[tag.target]),
                client.repository,
                server,
                tag_commit(client, tag),
            )
            ours.append(Ours(entry, tag.target, marks[tag.target]))
            log.info(
                "%s: %s verified, entry %s for %s",
                tag.name,
                verified.model.name,
                artifact_id(tag),
                ", ".join(PROVIDERS[tag.target]),
            )
            verified.model.path.unlink()  # hundreds of MB; the next tag may need the room
    stamp = created_at or now().strftime("%Y-%m-%dT%H:%M:%SZ")
    with _base_fields(base):
        manifest = build_manifest(
            previous,
            ours,
            release_id=release_id,
            created_at=stamp,
            producer=producer,
            supersede=supersede,
        )
    validate(manifest, document, f"the manifest for {release_id}")
    write_text_atomic(target, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s (%d model entries added)", target, len(ours))
    return target


def summary(path: Path) -> str:
    """One line per entry this repository added: what OpenKara will download, and for which
    execution providers."""
    manifest = json.loads(path.read_text(encoding="utf-8"))
    providers: dict[str, set[str]] = {}
    for edge in manifest["compatibility"]:
        providers.setdefault(edge["model_artifact_id"], set()).add(edge["execution_provider"])
    ours = [
        m
        for m in manifest["artifacts"]["models"]
        if m["upstream"]["project"] == manifest["producer"]["repo"]
    ]
    lines = [f"wrote {path} (generation {manifest['generation']}):"]
    lines += [
        f"- {m['artifact_id']} ({', '.join(sorted(providers.get(m['artifact_id'], ())))}): "
        f"{m['download_url']} ({m['byte_size']:,} bytes, sha256 {m['archive_digest']})"
        for m in ours
    ]
    return "\n".join(lines)
