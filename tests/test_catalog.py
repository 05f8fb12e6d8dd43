"""`invoke catalog` against the local GitHub double: the manifest it writes, and every refusal.

The schema served here is this repository's own fixture (tests/catalog_schema.json) holding
the constraints the code relies on; docs/releasing.md records the check against the real one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import onnx
import pytest

from converter.errors import UserError
from converter.facts import ACCELERATORS_TARGET, WAVEFORM
from converter.gate import oplist
from converter.metadata import (
    CACHE_KEY,
    TARGET,
    TENSOR_INTERFACE,
    read_metadata,
    sha256_file,
    sidecar_path,
)
from converter.ship import catalog, github
from tests.fake_github import REPOSITORY, TOKEN, FakeGitHub, run_cli
from tests.spectral_files import INPUT_SEMANTICS, OUTPUT_SEMANTICS, write_release_file

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(__file__).with_name("catalog_schema.json")).read_text())
SERVER = "https://github.com"
COMMIT = "c" * 40
CREATED = "2026-12-03T10:00:00Z"
RUNTIME = "ort-test-x86_64-unknown-linux-gnu"
WAVEFORM_ONLY_RUNTIME = "ort-test-waveform-only"
HT, FT = "model-spectral-v1.0.0", "model-ft-spectral-v1.0.0"
ACC = "model-spectral-accelerators-v1.0.0"
LINUX = "x86_64-unknown-linux-gnu"


def _model(artifact_id: str, variant: str, interface: str) -> dict:
    return {
        "artifact_id": artifact_id,
        "kind": "model",
        "variant": variant,
        "filename": f"{variant}.onnx",
        "download_url": f"https://example.org/releases/download/v1/{variant}.onnx",
        "byte_size": 10,
        "archive_digest": "a" * 64,
        "extracted_file_digests": {f"{variant}.onnx": {"size": 10, "sha256": "a" * 64}},
        "upstream": {"project": "example/models", "tag": "v1"},
        "deprecation": {"deprecated": False, "replacement_artifact_id": None},
        "profile": "balanced",
        "target_triple": None,
        "arch": None,
        "os": None,
        "model": {
            "format": "onnx",
            "opset": 17,
            "ir_version": 8,
            "tensor_interface": interface,
            "input_semantics": "in",
            "output_semantics": "out",
            "precision": "fp32",
            "segment_frames": 343980,
            "sample_rate": 44100,
            "stem_profile": "four-stem",
            "compatible_runtime_ids": [RUNTIME],
        },
    }


def _runtime(
    artifact_id: str,
    supported: list[str],
    providers: tuple[str, ...] = ("cpu", "xnnpack"),
    triple: str = LINUX,
) -> dict:
    return {
        "artifact_id": artifact_id,
        "kind": "runtime",
        "target_triple": triple,
        "runtime": {
            "execution_providers": list(providers),
            "supported_model_artifact_ids": supported,
        },
    }


def _edge(model: str, runtime: str, provider: str, triple: str = LINUX) -> dict:
    return {
        "model_artifact_id": model,
        "runtime_artifact_id": runtime,
        "target_triple": triple,
        "execution_provider": provider,
        "status": "supported",
    }


def base_manifest() -> dict:
    """A previous catalog release: one spectral-core and one waveform model, a runtime that
    loads the spectral one and one that loads only the waveform one."""
    ref = {"url": "https://example.org/r/x", "size": 1, "sha256": "b" * 64, "kind": "spdx-json"}
    return {
        "schema_version": "openkara.catalog/release-v1",
        "release_id": "2026-11-01-001",
        "generation": 7,
        "created_at": "2026-11-01T00:00:00Z",
        "producer": {
            "repo": "example/models",
            "commit_sha": "d" * 40,
            "workflow": "w",
            "run_id": "1",
        },
        "artifacts": {
            "models": [
                _model("old.spectral", "htdemucs", "spectral-core"),
                _model("old.waveform", "htdemucs", "waveform"),
            ],
            "runtimes": [
                _runtime(RUNTIME, ["old.spectral"]),
                _runtime(WAVEFORM_ONLY_RUNTIME, ["old.waveform"]),
            ],
            "bundles": [],
        },
        "compatibility": [
            _edge("old.spectral", RUNTIME, "cpu"),
            _edge("old.spectral", RUNTIME, "xnnpack"),
        ],
        "supply_chain": {"sbom": ref, "license": ref, "notice": ref, "provenance": ref},
        "gates": {"quality_report": ref},
        "minimum_consumer_schema": "openkara.catalog/release-v1",
    }


@pytest.fixture
def fake():
    server = FakeGitHub()
    server.contents[(catalog.SCHEMA_REPO, catalog.SCHEMA_PATH, "main")] = json.dumps(
        SCHEMA
    ).encode()
    yield server
    server.close()


@pytest.fixture
def client(fake):
    return github.Client(
        api_url=fake.api_url, repository=REPOSITORY, token=TOKEN, sleep=lambda s: None
    )


@pytest.fixture
def base(tmp_path) -> Path:
    path = tmp_path / "2026-11-01-001.json"
    path.write_text(json.dumps(base_manifest()))
    return path


def publish(fake: FakeGitHub, tmp_path: Path, tag: str, model: str, **kwargs) -> Path:
    """Build a release file of `model` and publish it with its sidecar and operator list;
    `draft`, `prerelease`, `skip` (asset names left out) and file overrides via kwargs."""
    draft, prerelease = kwargs.pop("draft", False), kwargs.pop("prerelease", False)
    skip = kwargs.pop("skip", ())
    path = write_release_file(tmp_path / "built" / tag, model, **kwargs)
    files = [path, sidecar_path(path), oplist.config_path(path)]
    fake.add_release(
        tag,
        draft=draft,
        prerelease=prerelease,
        files={f.name: f.read_bytes() for f in files if f.name not in skip},
    )
    return path


def run(client, base, out, tags=(HT,), **kwargs):
    return catalog.catalog(
        tags,
        base,
        kwargs.pop("release_id", "2026-12-03-001"),
        out,
        client=client,
        server_url=kwargs.pop("server_url", SERVER),
        commit=COMMIT,
        created_at=CREATED,
        **kwargs,
    )


def entry(manifest: dict, artifact_id: str) -> dict:
    (found,) = [m for m in manifest["artifacts"]["models"] if m["artifact_id"] == artifact_id]
    return found


def test_manifest_validates_and_holds_our_exact_bytes(client, fake, base, tmp_path):
    files = {
        HT: publish(fake, tmp_path, HT, "htdemucs"),
        FT: publish(fake, tmp_path, FT, "htdemucs_ft", seed=1),
    }
    fake.tags[FT] = (None, "e" * 40)  # a lightweight tag points at the commit itself
    before = len(fake.writes())
    path = run(client, base, tmp_path / "out", tags=(HT, FT))

    assert path == tmp_path / "out" / "2026-12-03-001.json"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no leftovers
    manifest = json.loads(path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    assert fake.writes()[before:] == []  # reading only
    # the schema came through the contents API at the default ref
    (read,) = [s for s in fake.seen if "/contents/" in s.path]
    assert read.path.endswith(f"/repos/{catalog.SCHEMA_REPO}/contents/{catalog.SCHEMA_PATH}")
    assert read.query["ref"] == ["main"]

    for tag, model in ((HT, "htdemucs"), (FT, "htdemucs_ft")):
        file = files[tag]
        ops = oplist.config_path(file)
        ours = entry(manifest, f"{model}.spectral.fp32.{tag}")
        url = f"{SERVER}/{REPOSITORY}/releases/download/{tag}/{file.name}"
        digest = sha256_file(file)
        assert ours["download_url"] == url and ours["filename"] == file.name
        assert ours["byte_size"] == file.stat().st_size
        assert ours["archive_digest"] == digest
        assert ours["extracted_file_digests"] == {
            file.name: {"sha256": digest, "size": file.stat().st_size}
        }
        assert ours["profile"] == {"htdemucs": "balanced", "htdemucs_ft": "quality"}[model]
        annotated, commit = fake.tags[tag]
        assert ours["upstream"] == {"commit_sha": commit, "project": REPOSITORY, "tag": tag}
        assert ours["deprecation"]["deprecated"] is False
        assert (ours["target_triple"], ours["arch"], ours["os"]) == (None, None, None)
        assert ours["model"] == {
            "cache_key": read_metadata(onnx.load(str(file)))[CACHE_KEY],
            "compatible_runtime_ids": [RUNTIME],  # the runtime that loads spectral-core today
            "format": "onnx",
            "input_semantics": INPUT_SEMANTICS,
            "ir_version": 8,
            "opset": 17,
            "output_semantics": OUTPUT_SEMANTICS,
            "precision": "fp32",
            "required_operator_config": {
                "sha256": sha256_file(ops),
                "size": ops.stat().st_size,
                "url": f"{SERVER}/{REPOSITORY}/releases/download/{tag}/{ops.name}",
            },
            "sample_rate": 44100,
            "segment_frames": 343980,
            "stem_profile": "four-stem",
            "tensor_interface": "spectral-core",
        }
    ids = [f"htdemucs.spectral.fp32.{HT}", f"htdemucs_ft.spectral.fp32.{FT}"]
    # carried over: the base's models, runtimes (ours declared reciprocally), edges, supply chain
    previous = base_manifest()
    assert manifest["artifacts"]["models"][:2] == previous["artifacts"]["models"]
    runtimes = {r["artifact_id"]: r for r in manifest["artifacts"]["runtimes"]}
    assert runtimes[RUNTIME]["runtime"]["supported_model_artifact_ids"] == ["old.spectral", *ids]
    assert runtimes[WAVEFORM_ONLY_RUNTIME] == previous["artifacts"]["runtimes"][1]
    assert manifest["compatibility"] == previous["compatibility"] + [
        {
            "execution_provider": "cpu",
            "model_artifact_id": aid,
            "runtime_artifact_id": RUNTIME,
            "status": "supported",
            "target_triple": "x86_64-unknown-linux-gnu",
        }
        for aid in ids
    ]
    assert manifest["supply_chain"] == previous["supply_chain"]
    assert manifest["minimum_consumer_schema"] == previous["minimum_consumer_schema"]
    assert "gates" not in manifest  # the base's reports are about the base's release
    assert manifest["generation"] == 8 and manifest["release_id"] == "2026-12-03-001"
    assert manifest["created_at"] == CREATED
    assert manifest["producer"] == {
        "commit_sha": COMMIT,
        "repo": REPOSITORY,
        "run_id": "manual",
        "workflow": "invoke catalog",
    }
    # the same inputs give the same bytes
    again = run(client, base, tmp_path / "again", tags=(HT, FT))
    assert again.read_bytes() == path.read_bytes()


def test_runtime_choice_supersede_and_schema_options(client, fake, base, tmp_path):
    publish(fake, tmp_path, HT, "htdemucs")
    fake.contents[("someone/fork", catalog.SCHEMA_PATH, "v9")] = json.dumps(SCHEMA).encode()
    path = run(
        client,
        base,
        tmp_path / "out",
        runtimes=[WAVEFORM_ONLY_RUNTIME],
        supersede=True,
        schema_repo="someone/fork",
        schema_ref="v9",
    )
    manifest = json.loads(path.read_text())
    ours = f"htdemucs.spectral.fp32.{HT}"
    assert entry(manifest, ours)["model"]["compatible_runtime_ids"] == [WAVEFORM_ONLY_RUNTIME]
    assert entry(manifest, "old.spectral")["deprecation"] == {
        "deprecated": True,
        "reason": f"superseded by {ours}",
        "replacement_artifact_id": ours,
        "sunset_generation": None,
    }
    assert entry(manifest, "old.waveform")["deprecation"]["deprecated"] is False
    # a local schema file instead of the API
    local = tmp_path / "schema.json"
    local.write_text(json.dumps(SCHEMA))
    seen = len(fake.seen)
    run(client, base, tmp_path / "local", schema=local)
    assert not [s for s in fake.seen[seen:] if "/contents/" in s.path]


MAC, WIN = "ort-test-aarch64-apple-darwin", "ort-test-x86_64-pc-windows-msvc"
WIN_CPU = "ort-test-x86_64-pc-windows-msvc-cpu"
# Runtimes as openkara-models' catalog lists them: each target's accelerator beside the CPU EP,
# and one CPU-only build.
PROVIDER_RUNTIMES = [
    (MAC, ("cpu", "coreml"), "aarch64-apple-darwin"),
    (WIN, ("cpu", "directml"), "x86_64-pc-windows-msvc"),
    (WIN_CPU, ("cpu",), "x86_64-pc-windows-msvc"),
]


def provider_base() -> dict:
    """`base_manifest` with the runtimes of `PROVIDER_RUNTIMES` loading its spectral model."""
    manifest = base_manifest()
    old = entry(manifest, "old.spectral")
    for rid, providers, triple in PROVIDER_RUNTIMES:
        manifest["artifacts"]["runtimes"].append(_runtime(rid, ["old.spectral"], providers, triple))
        old["model"]["compatible_runtime_ids"].append(rid)
        manifest["compatibility"] += [_edge("old.spectral", rid, p, triple) for p in providers]
    return manifest


def assert_invariants(manifest: dict, ids: list[str]) -> None:
    """openkara-models' cross-field rules for edges (docs/catalog-contract.md, "Invariants
    enforced" 4 and 7; docs/releasing.md names the script): every edge's provider is one its
    runtime runs and its target the runtime's; a model of `ids` and a runtime declare each other
    exactly when a supported edge joins them."""
    runtimes = {r["artifact_id"]: r for r in manifest["artifacts"]["runtimes"]}
    pairs = set()
    for edge in manifest["compatibility"]:
        runtime = runtimes[edge["runtime_artifact_id"]]
        assert edge["execution_provider"] in runtime["runtime"]["execution_providers"], edge
        assert edge["target_triple"] == runtime["target_triple"], edge
        pairs.add((edge["model_artifact_id"], edge["runtime_artifact_id"]))
    for aid in ids:
        model = entry(manifest, aid)
        declared = set(model["model"]["compatible_runtime_ids"])
        listing = {
            rid
            for rid, runtime in runtimes.items()
            if aid in runtime["runtime"]["supported_model_artifact_ids"]
        }
        assert declared == listing, aid
        assert declared == {rid for mid, rid in pairs if mid == aid}, aid


def edges_of(manifest: dict, artifact_id: str) -> list[tuple[str, str]]:
    return sorted(
        (edge["runtime_artifact_id"], edge["execution_provider"])
        for edge in manifest["compatibility"]
        if edge["model_artifact_id"] == artifact_id
    )


def publish_accelerators(fake: FakeGitHub, tmp_path: Path, tag: str = ACC, **kwargs) -> Path:
    """The accelerators' file as convert stamps it: float32 weights, `openkara.target`."""
    kwargs = {"seed": 1, "weight_storage": "float32", TARGET: ACCELERATORS_TARGET, **kwargs}
    return publish(fake, tmp_path, tag, "htdemucs", **kwargs)


def test_cpu_and_accelerators_files_are_marked_by_provider(client, fake, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(provider_base()))
    cpu = publish(fake, tmp_path, HT, "htdemucs")
    accelerators = publish_accelerators(fake, tmp_path)
    path = run(client, base, tmp_path / "out", tags=(HT, ACC), supersede=True)

    manifest = json.loads(path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    cpu_id, acc_id = f"htdemucs.spectral.fp32.{HT}", f"htdemucs.spectral.fp32.{ACC}"
    assert_invariants(manifest, ["old.spectral", cpu_id, acc_id])
    # the CPU EP's file: the cpu provider of every runtime that loads spectral-core models
    assert entry(manifest, cpu_id)["model"]["compatible_runtime_ids"] == [
        RUNTIME,
        MAC,
        WIN,
        WIN_CPU,
    ]
    assert edges_of(manifest, cpu_id) == sorted(
        [(RUNTIME, "cpu"), (MAC, "cpu"), (WIN, "cpu"), (WIN_CPU, "cpu")]
    )
    # the accelerators' file: each runtime's accelerator, none on the CPU-only build
    assert entry(manifest, acc_id)["model"]["compatible_runtime_ids"] == [RUNTIME, MAC, WIN]
    assert edges_of(manifest, acc_id) == sorted(
        [(RUNTIME, "xnnpack"), (MAC, "coreml"), (WIN, "directml")]
    )
    runtimes = {r["artifact_id"]: r["runtime"] for r in manifest["artifacts"]["runtimes"]}
    assert runtimes[WIN_CPU]["supported_model_artifact_ids"] == ["old.spectral", cpu_id]
    assert runtimes[MAC]["supported_model_artifact_ids"] == ["old.spectral", cpu_id, acc_id]
    # two files, each its own release's bytes
    ours = entry(manifest, acc_id)
    assert ours["archive_digest"] == sha256_file(accelerators) != sha256_file(cpu)
    assert ours["download_url"] == (
        f"{SERVER}/{REPOSITORY}/releases/download/{ACC}/{accelerators.name}"
    )
    assert ours["model"]["cache_key"] == read_metadata(onnx.load(str(accelerators)))[CACHE_KEY]
    assert (ours["variant"], ours["profile"], ours["model"]["precision"]) == (
        "htdemucs",
        "balanced",
        "fp32",
    )
    # --supersede: the base's entry (cpu and accelerator edges) gives way to the CPU file
    assert entry(manifest, "old.spectral")["deprecation"]["replacement_artifact_id"] == cpu_id
    lines = catalog.summary(path).splitlines()
    assert lines[1].startswith(f"- {cpu_id} (cpu): {SERVER}/")
    assert lines[2].startswith(f"- {acc_id} (coreml, directml, xnnpack): {SERVER}/")

    # the next release supersedes each of ours by the new file of its own target only
    publish(fake, tmp_path, "model-spectral-v1.1.0", "htdemucs", seed=2)
    publish_accelerators(fake, tmp_path, "model-spectral-accelerators-v1.1.0", seed=3)
    steps = [
        ("model-spectral-v1.1.0", cpu_id, acc_id),
        ("model-spectral-accelerators-v1.1.0", acc_id, cpu_id),
    ]
    for number, (tag, replaced, kept) in enumerate(steps, start=2):
        nxt = json.loads(
            run(
                client,
                path,
                tmp_path / "out",
                tags=(tag,),
                supersede=True,
                release_id=f"2026-12-03-00{number}",
            ).read_text()
        )
        new_id = f"htdemucs.spectral.fp32.{tag}"
        assert entry(nxt, replaced)["deprecation"]["replacement_artifact_id"] == new_id
        assert entry(nxt, kept)["deprecation"]["deprecated"] is False
        assert_invariants(nxt, [cpu_id, acc_id, new_id])


def cpu_only_base() -> dict:
    """A catalog whose runtimes run the CPU EP only."""
    manifest = base_manifest()
    for runtime in manifest["artifacts"]["runtimes"]:
        runtime["runtime"]["execution_providers"] = ["cpu"]
    manifest["compatibility"] = [_edge("old.spectral", RUNTIME, "cpu")]
    return manifest


def test_an_accelerators_file_without_an_accelerator_runtime_is_one_line(fake, tmp_path):
    publish_accelerators(fake, tmp_path)
    base = tmp_path / "base.json"
    base.write_text(json.dumps(cpu_only_base()))
    out = tmp_path / "out"
    seen = len(fake.seen)
    done = run_cli(
        fake,
        *("catalog", "--tag", ACC, "--base", str(base), "--release-id", "2026-12-03-001"),
        *("--out", str(out), "--commit", COMMIT),
        cwd=ROOT,
    )
    assert done.returncode == 1 and done.stdout == ""
    errors = [text for text in done.stderr.splitlines() if text.startswith("error:")]
    assert errors == [
        "error: no chosen runtime runs coreml, directml or xnnpack, the providers of a --target "
        f"accelerators file ({RUNTIME}: cpu); name runtimes that do with --runtime ID, or use a "
        "--base that has them"
    ], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or list(out.iterdir()) == []
    # refused before any download
    assert not [s for s in fake.seen[seen:] if "/assets" in s.path or "/download/" in s.path]


def _corrupt_digest(fake, tmp_path):
    publish(fake, tmp_path, HT, "htdemucs")
    (asset,) = [a for a in fake.assets.values() if a["name"] == "htdemucs.spectral.onnx"]
    asset["digest"] = "sha256:" + "0" * 64


def _wrong_sidecar(fake, tmp_path):
    path = publish(fake, tmp_path, HT, "htdemucs")
    (asset,) = [a for a in fake.assets.values() if a["name"].endswith(".sha256")]
    fake.blobs[asset["id"]] = f"{'1' * 64}  {path.name}\n".encode()
    asset["size"] = len(fake.blobs[asset["id"]])
    asset["digest"] = "sha256:" + hashlib.sha256(fake.blobs[asset["id"]]).hexdigest()


REFUSALS = {
    "draft release": (
        lambda fake, tmp: publish(fake, tmp, HT, "htdemucs", draft=True),
        {},
        f"release {HT} is a draft: the catalog takes published releases only",
    ),
    "prerelease": (
        lambda fake, tmp: publish(
            fake, tmp, "model-spectral-v1.0.0-rc.1", "htdemucs", prerelease=True
        ),
        {"tags": ("model-spectral-v1.0.0-rc.1",)},
        "release model-spectral-v1.0.0-rc.1 is a prerelease: pass --allow-prerelease",
    ),
    "unpublished tag": (lambda fake, tmp: None, {}, f"no release {HT} in {REPOSITORY}"),
    "missing asset": (
        lambda fake, tmp: publish(
            fake, tmp, HT, "htdemucs", skip=("htdemucs.spectral.required_operators.config",)
        ),
        {},
        f"release {HT} lacks htdemucs.spectral.required_operators.config: it cannot be",
    ),
    "digest mismatch": (
        _corrupt_digest,
        {},
        "asset htdemucs.spectral.onnx: GitHub's digest sha256:0000",
    ),
    "sidecar mismatch": (
        _wrong_sidecar,
        {},
        f"release {HT}: htdemucs.spectral.onnx has SHA-256 ",
    ),
    "waveform file under a spectral tag": (
        lambda fake, tmp: publish(fake, tmp, HT, "htdemucs", **{TENSOR_INTERFACE: WAVEFORM}),
        {},
        f"{HT}: htdemucs.spectral.onnx is a waveform-interface file",
    ),
    "wrong spectral contract": (
        lambda fake, tmp: publish(
            fake, tmp, HT, "htdemucs", **{"openkara.spectral_contract": "v0"}
        ),
        {},
        f"{HT}: htdemucs.spectral.onnx is not a spectral-core file as the catalog needs it: "
        "openkara.spectral_contract='v0'",
    ),
    "tag that names no commit": (
        lambda fake, tmp: (
            publish(fake, tmp, HT, "htdemucs"),
            fake.tags.__setitem__(HT, (None, "not-a-sha")),
        ),
        {},
        f"tag {HT} does not resolve to a commit through the API",
    ),
    "CPU file under an accelerators tag": (
        lambda fake, tmp: publish(fake, tmp, ACC, "htdemucs"),
        {"tags": (ACC,)},
        f"{ACC}: htdemucs.spectral.onnx was built for --target cpu (openkara.target=None) but "
        "the tag releases accelerators files",
    ),
    "accelerators file under a CPU tag": (
        lambda fake, tmp: publish_accelerators(fake, tmp, HT),
        {},
        f"{HT}: htdemucs.spectral.onnx was built for --target accelerators "
        "(openkara.target='accelerators') but the tag releases cpu files",
    ),
    "accelerators file, no runtime with an accelerator": (
        lambda fake, tmp: publish_accelerators(fake, tmp),
        {"tags": (HT, ACC), "runtimes": [WAVEFORM_ONLY_RUNTIME], "base_manifest": cpu_only_base},
        "no chosen runtime runs coreml, directml or xnnpack, the providers of a --target acc",
    ),
    "waveform tag": (
        lambda fake, tmp: None,
        {"tags": ("model-v1.0.0",)},
        "model-v1.0.0 is a waveform release: OpenKara's catalog takes spectral-core files only",
    ),
    "six stems": (
        lambda fake, tmp: None,
        {"tags": ("model-6s-spectral-v1.0.0",)},
        "model-6s-spectral-v1.0.0 releases htdemucs_6s, six stems: catalog schema v1 has no",
    ),
    "unknown runtime": (
        lambda fake, tmp: publish(fake, tmp, HT, "htdemucs"),
        {"runtimes": ["ort-nope"]},
        "--runtime ort-nope is not a runtime of --base",
    ),
    "release id not after the base's": (
        lambda fake, tmp: publish(fake, tmp, HT, "htdemucs"),
        {"release_id": "2026-11-01-001"},
        "--release-id 2026-11-01-001 does not come after --base's 2026-11-01-001",
    ),
    "schema not at that ref": (
        lambda fake, tmp: publish(fake, tmp, HT, "htdemucs"),
        {"schema_ref": "no-such-branch"},
        "cannot read the catalog schema thedavidweng/openkara-models:catalog/schema-release-v1."
        "json@no-such-branch: GitHub API GET",
    ),
    "manifest that fails the schema": (
        lambda fake, tmp: publish(fake, tmp, HT, "htdemucs"),
        {"server_url": "http://github.example"},
        "the manifest for 2026-12-03-001 does not validate against the catalog schema: "
        "'http://github.example/",
    ),
}


@pytest.mark.parametrize(("prepare", "options", "line"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_are_one_line_and_write_nothing(
    client, fake, base, tmp_path, prepare, options, line
):
    prepare(fake, tmp_path)
    out = tmp_path / "out"
    writes = len(fake.writes())
    if "base_manifest" in options:
        options = dict(options)
        base.write_text(json.dumps(options.pop("base_manifest")()))
    with pytest.raises(UserError) as refused:
        run(client, base, out, **options)
    message = str(refused.value)
    assert message.startswith(line) and "\n" not in message
    assert not out.exists() or list(out.iterdir()) == []
    assert len(fake.writes()) == writes


BAD_BASES = {
    "not JSON": ("{", "--base {path} is not readable JSON"),
    "not a manifest": (
        '{"schema_version": "openkara.catalog/channel-v1"}',
        "--base {path} has schema_version 'openkara.catalog/channel-v1', not",
    ),
    "fails the schema": (
        json.dumps({**base_manifest(), "generation": 0}),
        "--base {path} does not validate against the catalog schema: 0 is less than the "
        "minimum of 1 at $.generation",
    ),
    "missing": (None, "--base {path} does not exist"),
}


@pytest.mark.parametrize(("text", "line"), BAD_BASES.values(), ids=BAD_BASES.keys())
def test_a_bad_base_is_one_line_before_any_download(client, fake, tmp_path, text, line):
    publish(fake, tmp_path, HT, "htdemucs")
    path = tmp_path / "base.json"
    if text is not None:
        path.write_text(text)
    seen = len(fake.seen)
    with pytest.raises(UserError) as refused:
        run(client, path, tmp_path / "out")
    assert str(refused.value).startswith(line.format(path=path))
    assert not [s for s in fake.seen[seen:] if "/assets" in s.path or "/download/" in s.path]


def test_a_base_lacking_fields_under_a_lax_schema_is_one_line(client, fake, tmp_path):
    publish(fake, tmp_path, HT, "htdemucs")
    lax = tmp_path / "lax.json"
    lax.write_text(json.dumps({"$schema": SCHEMA["$schema"], "type": "object"}))
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"schema_version": "openkara.catalog/release-v1"}))
    with pytest.raises(UserError, match=r"^--base .* lacks a field of catalog schema v1 \(KeyErr"):
        run(client, base, tmp_path / "out", schema=lax)


def test_an_existing_manifest_is_never_overwritten(client, fake, base, tmp_path):
    publish(fake, tmp_path, HT, "htdemucs")
    path = run(client, base, tmp_path / "out")
    text = path.read_text()
    with pytest.raises(UserError, match="exists: a catalog release is immutable"):
        run(client, base, tmp_path / "out")
    assert path.read_text() == text


def test_cli_writes_the_manifest_without_model_code(fake, base, tmp_path):
    path = publish(fake, tmp_path, HT, "htdemucs")
    args = ["catalog", "--tag", HT, "--base", str(base), "--release-id", "2026-12-03-001"]
    done = run_cli(fake, *args, "--out", str(tmp_path / "out"), "--commit", COMMIT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "out" / "2026-12-03-001.json"
    url = f"{SERVER}/{REPOSITORY}/releases/download/{HT}/{path.name}"
    assert done.stdout.splitlines() == [
        f"wrote {written} (generation 8):",
        f"- htdemucs.spectral.fp32.{HT} (cpu): {url} ({path.stat().st_size:,} bytes, sha256 "
        f"{sha256_file(path)})",
    ]
    # a refusal on the command line: one line, no traceback, nothing written
    done = run_cli(fake, *args, "--out", str(tmp_path / "out2"), "--tag", "model-v1.0.0", cwd=ROOT)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model-v1.0.0 is a waveform release: OpenKara's catalog takes spectral-core files "
        "only (tags model-spectral-v*, model-ft-spectral-v*, model-spectral-accelerators-vX.Y.Z)"
    ]
    assert "Traceback" not in done.stderr and not (tmp_path / "out2").exists()


CLI_REFUSALS = ["draft release", "missing asset", "digest mismatch"]
CLI_REFUSALS += ["waveform file under a spectral tag", "bad base"]


@pytest.mark.parametrize("case", CLI_REFUSALS)
def test_cli_refusals_are_one_line_without_traceback(fake, base, tmp_path, case):
    if case == "bad base":
        publish(fake, tmp_path, HT, "htdemucs")
        base.write_text("[1, 2")
        line = f"error: --base {base} is not readable JSON"
    else:
        prepare, _, line = REFUSALS[case]
        prepare(fake, tmp_path)
        line = f"error: {line}"
    out = tmp_path / "out"
    done = run_cli(
        fake,
        *("catalog", "--tag", HT, "--base", str(base), "--release-id", "2026-12-03-001"),
        *("--out", str(out), "--commit", COMMIT),
        cwd=ROOT,
    )
    assert done.returncode == 1 and done.stdout == ""
    errors = [text for text in done.stderr.splitlines() if text.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line), done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or list(out.iterdir()) == []
