"""`invoke release` end to end against a local server that behaves like the GitHub API.

The build step is injected (a tiny stamped ONNX file) so each run takes milliseconds; everything
after it — draft, uploads, verification, publishing, recovery — is the real code.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converter.errors import UserError
from converter.facts import ACCELERATORS_TARGET, CPU_TARGET, SPECTRAL_CORE, WAVEFORM
from converter.gate import contract_selftest, evidence, oplist
from converter.metadata import (
    CACHE_KEY,
    MODEL_NAME,
    PROVENANCE,
    TARGET,
    TENSOR_INTERFACE,
    WEIGHT_STORAGE,
    read_metadata,
    sha256_file,
    sidecar_path,
    stamp,
)
from converter.ship import github, release, tags
from tests.fake_github import REPOSITORY, TOKEN, FakeGitHub, Fault, run_cli
from tests.spectral_files import app_like_check, write_release_file

TAG = "model-v1.2.3"
TOOLCHAIN = {name: importlib.metadata.version(name) for name in ("onnx", "requests")}


def write_model(
    out_dir: Path,
    model: str,
    toolchain: dict[str, str] = TOOLCHAIN,
    seed: int = 0,
    weight_storage: str = "float16",
) -> Path:
    """A small file that passes the static contract gate, stamped like a converted `model`,
    with its sidecar; `seed` varies its bytes (1.2 MB of them)."""
    proto = contract_selftest.tiny_model()
    weight = np.random.default_rng(seed).standard_normal(300_000).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(weight, "unused"))
    entries = read_metadata(proto)
    entries[MODEL_NAME] = model
    entries[WEIGHT_STORAGE] = weight_storage
    entries[PROVENANCE] = json.dumps(
        {"model": model, "signatures": ["955717e8"], "toolchain": toolchain}
    )
    del entries[CACHE_KEY]
    stamp(proto, entries)
    path = out_dir / f"{model}.onnx"
    contract_selftest.write_model(proto, path)
    return path


class Builder:
    """Stands in for convert → validate → contract gate; counts calls."""

    def __init__(self, seed: int = 0, error: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.seed, self.error = seed, error

    def __call__(self, tag: release.Tag, repo: Path | None, out_dir: Path) -> Path:
        self.calls.append(tag.model)
        if self.error is not None:
            raise self.error
        if tag.interface == SPECTRAL_CORE:
            return write_release_file(out_dir, tag.model, seed=self.seed, toolchain=TOOLCHAIN)
        return write_model(out_dir, tag.model, seed=self.seed)


def write_evidence(
    results: Path,
    model: Path,
    *,
    skip: tuple[str, ...] = (),
    fail: tuple[str, str] | None = None,
    sha256: str | None = None,
) -> None:
    """ortcheck records as the load-test matrix leaves them: one folder per runner, one
    `contract-results/<ort>.json` per version, rows carrying the file's SHA-256 and platform."""
    for platform, versions in evidence.required().items():
        if platform in skip:
            continue
        for ort in versions:
            row = {
                "ort": ort,
                "platform": platform,
                "model": model.name,
                "path": f"/runner/{model.name}",
                "sha256": sha256 or sha256_file(model),
                "status": "[disabled] Fail: boom" if fail == (platform, ort) else "ok",
                "load_s": 0.5,
                "run_s": 1.5,
            }
            record = {"ort": ort, "platform": platform, "missing_kernels": [], "rows": [row]}
            folder = results / f"contract-results-{evidence.PLATFORMS[platform]}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{ort}.json").write_text(json.dumps(record), encoding="utf-8")


def passing_load_test(model: Path, results: Path) -> None:
    write_evidence(results, model)


@pytest.fixture
def client(fake):
    return github.Client(
        api_url=fake.api_url,
        repository=REPOSITORY,
        token=TOKEN,
        sleep=lambda s: None,
        timeout=(5.0, 5.0),
    )


@pytest.fixture
def run(client, tmp_path):
    def run(tag: str = TAG, builder: Builder | None = None, **kwargs) -> str:
        return release.release(
            tag,
            out_dir=tmp_path / "models",
            client=client,
            prepare=builder or Builder(),
            load_test=passing_load_test,
            server_url="https://gh.example",
            **kwargs,
        )

    return run


def assert_published_once(
    fake: FakeGitHub, tmp_path: Path, tag: str = TAG, model: str = "htdemucs"
) -> dict:
    """The converged state: one published release holding exactly the three right assets."""
    (only,) = fake.releases_for(tag)
    assert not only["draft"]
    path = tmp_path / "models" / release.parse_tag(tag).file_name
    assets = {a["name"]: a for a in fake.assets_of(only)}
    ops = oplist.config_path(path)
    assert set(assets) == {path.name, sidecar_path(path).name, ops.name}
    assert fake.blobs[assets[ops.name]["id"]] == ops.read_bytes()
    assert all(a["state"] == "uploaded" for a in assets.values())
    assert assets[path.name]["digest"] == f"sha256:{sha256_file(path)}"
    assert fake.blobs[assets[path.name]["id"]] == path.read_bytes()
    assert fake.blobs[assets[sidecar_path(path).name]["id"]] == sidecar_path(path).read_bytes()
    return only


@pytest.mark.parametrize(
    ("tag", "model", "prerelease", "interface", "file"),
    [
        ("model-v1.0.0", "htdemucs", False, WAVEFORM, "htdemucs.onnx"),
        ("model-ft-v2.10.3", "htdemucs_ft", False, WAVEFORM, "htdemucs_ft.onnx"),
        ("model-6s-v0.1.0-rc.2", "htdemucs_6s", True, WAVEFORM, "htdemucs_6s.onnx"),
        ("model-v1.0.0-rc.0", "htdemucs", True, WAVEFORM, "htdemucs.onnx"),
        ("model-spectral-v1.0.0", "htdemucs", False, SPECTRAL_CORE, "htdemucs.spectral.onnx"),
        (
            "model-ft-spectral-v1.2.3-rc.4",
            "htdemucs_ft",
            True,
            SPECTRAL_CORE,
            "htdemucs_ft.spectral.onnx",
        ),
        (
            "model-6s-spectral-v0.0.1",
            "htdemucs_6s",
            False,
            SPECTRAL_CORE,
            "htdemucs_6s.spectral.onnx",
        ),
        (
            "model-spectral-accelerators-v1.0.0",
            "htdemucs",
            False,
            SPECTRAL_CORE,
            "htdemucs.spectral.onnx",
        ),
        ("model-ft-accelerators-v1.0.0-rc.1", "htdemucs_ft", True, WAVEFORM, "htdemucs_ft.onnx"),
    ],
)
def test_tag_grammar(tag, model, prerelease, interface, file):
    parsed = release.parse_tag(tag)
    target = ACCELERATORS_TARGET if "-accelerators-" in tag else CPU_TARGET
    assert parsed == release.Tag(tag, model, prerelease, interface, target)
    assert parsed.file_name == file
    # the workflow's view of the same tag, from the one grammar
    assert tags.outputs(tag).splitlines() == [
        f"model={model}",
        f"interface={interface}",
        f"target={target}",
        f"file={file}",
        f"prerelease={str(prerelease).lower()}",
    ]


@pytest.mark.parametrize(
    "tag",
    [
        "v1.0.0",
        "model-v1.0",
        "model-xx-v1.0.0",
        "model-v01.0.0",
        "model-v1.0.0-beta",
        "model-v1.0.0-rc.1 ",
        "refs/tags/model-v1.0.0",
        "model-ft-6s-v1.0.0",
        "model-spectral-ft-v1.0.0",
        "model-spectral-spectral-v1.0.0",
        "model-spectral-1.0.0",
        "model-waveform-v1.0.0",
        "model-accelerators-spectral-v1.0.0",
        "model-spectral-cpu-v1.0.0",
        "model-spectral-accel-v1.0.0",
    ],
)
def test_bad_tags_are_refused_before_any_work(run, fake, tag):
    builder = Builder()
    with pytest.raises(UserError, match=r"model-vX\.Y\.Z .*model-ft-vX\.Y\.Z.*model-spectral-vX"):
        run(tag, builder)
    assert fake.seen == [] and builder.calls == []


def test_missing_token_is_one_error_before_any_work(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPOSITORY)
    builder = Builder()
    with pytest.raises(UserError, match="GITHUB_TOKEN not set"):
        release.release(TAG, out_dir=tmp_path, prepare=builder)
    assert builder.calls == []


def test_happy_path_publishes_a_verified_release_with_a_model_card(
    run, fake, tmp_path, monkeypatch
):
    summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    outcome = run()

    published = assert_published_once(fake, tmp_path)
    path = tmp_path / "models" / "htdemucs.onnx"
    digest = sha256_file(path)
    assert outcome.startswith(f"published {TAG}: htdemucs.onnx") and digest in outcome
    body = published["body"]
    assert digest in body and f"{path.stat().st_size:,} bytes" in body
    assert "| weight storage (`openkara.weight_storage`) | float16 |" in body
    key = read_metadata(onnx.load(str(path)))[CACHE_KEY]
    assert f"`{CACHE_KEY}` | `{key}`" in body
    url = f"https://gh.example/{REPOSITORY}/releases/download/{TAG}/htdemucs.onnx"
    # the pin in OpenKara's own syntax, on the card and in the job summary
    for text in (body, summary.read_text()):
        assert f'    download_url: "{url}",\n    sha256: "{digest}",' in text
        assert f'assert_eq!(HTDEMUCS.sha256, "{digest}");' in text
        assert f"  MODEL_URL: {url}\n  MODEL_SHA256: {digest}" in text
        assert f"   - `htdemucs`: `{TAG}/htdemucs.onnx`" in text
        assert f"`{CACHE_KEY}`: `{key}`" in text and f"invoke pin-openkara --tag {TAG}" in text
    assert "```toml" not in body
    # one passing row per platform and ORT version, for exactly these bytes
    for platform, versions in evidence.required().items():
        for ort in versions:
            assert f"| {platform} | {ort} | ok | 0.5 | 1.5 |" in body
    assert f"onnx {TOOLCHAIN['onnx']}" in body and "955717e8" in body
    assert published["prerelease"] is False
    # uploads followed upload_url, every API call carried the headers
    uploads = [s for s in fake.seen if s.method == "POST" and "/uploads/" in s.path]
    assert len(uploads) == 3 and all(s.path.startswith("/api/uploads/") for s in uploads)
    # the publish came last, after every upload
    assert fake.writes()[-1].method == "PATCH"


REFUSED = {
    "empty": ({"skip": tuple(evidence.PLATFORMS)}, "no load-test results"),
    "missing platform": ({"skip": ("Darwin arm64",)}, r"no passing row from Darwin arm64"),
    "failing row": (
        {"fail": ("Windows AMD64", "1.17.3")},
        r"failed on Windows AMD64 ORT 1\.17\.3: \[disabled\] Fail: boom",
    ),
    "other bytes": ({"sha256": "e" * 64}, "rows for other bytes .*" + "e" * 64),
}


@pytest.mark.parametrize(("spoil", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_evidence_is_refused_before_anything_is_created(client, fake, tmp_path, spoil, message):
    """Both ways in: the matrix's results (--contract-results) and a local load test."""
    out = tmp_path / "models"
    path = write_model(out, "htdemucs")
    write_evidence(tmp_path / "matrix", path, **spoil)
    (tmp_path / "matrix").mkdir(exist_ok=True)
    with pytest.raises(UserError, match=f"not publishing htdemucs.onnx: {message}"):
        release.release(TAG, out_dir=out, client=client, contract_results=tmp_path / "matrix")
    with pytest.raises(UserError, match=f"not publishing htdemucs.onnx: {message}"):
        release.release(
            TAG,
            out_dir=out,
            client=client,
            prepare=Builder(),
            load_test=lambda model, results: write_evidence(results, model, **spoil),
        )
    assert fake.writes() == [] and fake.releases == {}


def test_a_version_missing_on_one_platform_is_named(client, fake, tmp_path):
    out = tmp_path / "models"
    path = write_model(out, "htdemucs")
    write_evidence(tmp_path / "matrix", path)
    (tmp_path / "matrix" / "contract-results-windows-latest" / "1.23.2.json").unlink()
    with pytest.raises(UserError, match=r"no passing row from Windows AMD64 for ORT 1\.23\.2;"):
        release.release(TAG, out_dir=out, client=client, contract_results=tmp_path / "matrix")
    assert fake.writes() == []


def test_macos_x64_needs_only_the_versions_that_have_wheels():
    versions = evidence.required()
    assert versions["Darwin x86_64"][-1] == "1.23.2"
    assert versions["Darwin arm64"] == list(evidence.contract_pins())


def test_contract_results_publish_the_prebuilt_file_without_building(client, fake, tmp_path):
    out = tmp_path / "models"
    path = write_model(out, "htdemucs")
    write_evidence(tmp_path / "matrix", path)
    builder = Builder()
    plan = release.release(
        TAG,
        dry_run=True,
        out_dir=out,
        client=client,
        contract_results=tmp_path / "matrix",
        prepare=builder,
    )
    assert "load-test evidence" in plan and "passing rows" in plan and fake.writes() == []
    release.release(
        TAG, out_dir=out, client=client, contract_results=tmp_path / "matrix", prepare=builder
    )
    assert builder.calls == []
    assert_published_once(fake, tmp_path)


def test_corrupt_model_file_is_one_clear_error(client, fake, tmp_path):
    out = tmp_path / "models"
    path = write_model(out, "htdemucs")
    write_evidence(tmp_path / "matrix", path)
    path.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    with pytest.raises(UserError, match=r"htdemucs.onnx is not a readable ONNX file .*rebuild"):
        release.release(TAG, out_dir=out, client=client, contract_results=tmp_path / "matrix")
    assert fake.writes() == []
    # building instead: the corrupt file is not reused but rebuilt
    assert release.reuse_check(path, "htdemucs") == (False, f"{path} is not a readable ONNX file")


def test_prerelease_tag_makes_a_prerelease(run, fake, tmp_path):
    run("model-6s-v1.0.0-rc.1")
    (only,) = fake.releases_for("model-6s-v1.0.0-rc.1")
    assert only["prerelease"] and not only["draft"]
    assert {a["name"] for a in fake.assets_of(only)} == {
        "htdemucs_6s.onnx",
        "htdemucs_6s.onnx.sha256",
        "htdemucs_6s.required_operators.config",
    }


FAULTS = {
    "500 on create": Fault("POST", r"/releases$", status=500),
    "create done, response lost": Fault("POST", r"/releases$", kind="lost"),
    "502 mid-upload leaves a starter asset, every attempt": Fault(
        "POST", r"/uploads/", kind="partial", status=502, times=release.UPLOAD_ATTEMPTS
    ),
    "dropped connection on every upload attempt": Fault(
        "POST", r"/uploads/", kind="drop", times=release.UPLOAD_ATTEMPTS
    ),
    "422 on upload": Fault("POST", r"/uploads/", status=422, message="Validation Failed"),
    "401 on listing": Fault("GET", r"/releases$", status=401, message="Bad credentials"),
    "500 on publish, past retries": Fault("PATCH", r"/releases/\d+$", status=500, times=99),
    "dropped connection on listing assets, past retries": Fault(
        "GET", r"/assets$", kind="drop", times=99
    ),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_a_failed_run_is_finished_by_running_again(run, fake, tmp_path, fault, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    fake.faults.append(fault)
    with pytest.raises(github.GitHubError) as failure:
        run()
    assert not any(not r["draft"] for r in fake.releases_for(TAG)), "published too early"
    fake.faults.clear()
    run()
    assert_published_once(fake, tmp_path)
    captured = capsys.readouterr()
    assert TOKEN not in str(failure.value) + captured.out + captured.err + caplog.text


TRANSIENT = {
    "one 502 mid-upload leaving a starter": Fault("POST", r"/uploads/", kind="partial", status=502),
    "one dropped upload": Fault("POST", r"/uploads/", kind="drop"),
    "one lost upload response": Fault("POST", r"/uploads/", kind="lost"),
    "403 secondary limit with Retry-After on create": Fault(
        "POST",
        r"/releases$",
        status=403,
        headers={"Retry-After": "3"},
        message="You have exceeded a secondary rate limit",
    ),
    "dropped connection on publish": Fault("PATCH", r"/releases/\d+$", kind="drop"),
    "502 listing releases": Fault("GET", r"/releases$", status=502, times=2),
}


@pytest.mark.parametrize("fault", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_faults_are_absorbed_within_one_run(run, fake, tmp_path, fault):
    fake.faults.append(fault)
    run()
    assert fault.times == 0  # the fault did fire
    assert_published_once(fake, tmp_path)


def test_starter_asset_left_behind_is_cleaned_up_on_rerun(run, fake, tmp_path):
    fake.add_release(TAG, draft=True, files={})
    (draft,) = fake.releases_for(TAG)
    fake._new_asset(draft, "htdemucs.onnx", b"half", "starter", "application/octet-stream")
    run()
    assert_published_once(fake, tmp_path)


def test_rerun_on_a_draft_keeps_matching_assets_and_replaces_wrong_ones(run, fake, tmp_path):
    path = write_model(tmp_path / "models", "htdemucs")
    fake.add_release(
        TAG,
        draft=True,
        files={
            "htdemucs.onnx": path.read_bytes(),
            "htdemucs.onnx.sha256": b"0" * 64 + b"  htdemucs.onnx\n",
            "stale.bin": b"left over",
        },
    )
    run()
    assert_published_once(fake, tmp_path)
    uploaded = [s.query["name"][0] for s in fake.seen if "/uploads/" in s.path]
    assert uploaded == ["htdemucs.onnx.sha256", "htdemucs.required_operators.config"]


def test_assets_without_digest_are_verified_by_download(client, tmp_path):
    fake = FakeGitHub(digests=False)
    try:
        client.api_url = fake.api_url
        release.release(
            TAG,
            out_dir=tmp_path / "models",
            client=client,
            prepare=Builder(),
            load_test=passing_load_test,
        )
        (only,) = fake.releases_for(TAG)
        assert not only["draft"]
        assert sum(1 for s in fake.seen if s.path.startswith("/download/")) >= 2
    finally:
        fake.close()


def test_a_corrupted_upload_is_never_published(run, fake, tmp_path, monkeypatch):
    original = fake._new_asset

    def corrupt(rel, name, data, state, content_type):
        return original(
            rel, name, data[:-1] + b"!" if name.endswith(".onnx") else data, state, content_type
        )

    monkeypatch.setattr(fake, "_new_asset", corrupt)
    with pytest.raises(UserError, match="not publishing .*htdemucs.onnx has SHA-256"):
        run()
    assert all(r["draft"] for r in fake.releases_for(TAG))


def test_rerun_of_a_published_release_only_verifies(run, fake, tmp_path):
    run()
    before = len(fake.writes())
    builder = Builder()
    outcome = run(builder=builder)
    assert "already published and verified" in outcome
    assert len(fake.writes()) == before and builder.calls == []
    assert_published_once(fake, tmp_path)


def test_published_release_with_a_wrong_asset_is_reported_not_touched(run, fake):
    fake.add_release(
        TAG,
        draft=False,
        files={
            "htdemucs.onnx": b"something else",
            "htdemucs.onnx.sha256": b"a" * 64 + b"  htdemucs.onnx\n",
        },
    )
    with pytest.raises(
        UserError, match="published release .* is wrong: htdemucs.onnx has SHA-256 .*new tag"
    ):
        run()
    assert fake.writes() == []


def test_published_release_without_its_sidecar_is_reported(run, fake):
    fake.add_release(TAG, draft=False, files={"htdemucs.onnx": b"model bytes"})
    with pytest.raises(UserError, match=r"htdemucs.onnx.sha256 is missing\. Published"):
        run()
    assert fake.writes() == []


def test_build_or_contract_failure_writes_nothing_on_github(run, fake):
    with pytest.raises(UserError, match="contract"):
        run(builder=Builder(error=UserError("contract: IR 11 > 10")))
    assert fake.writes() == []


def test_dry_run_prints_the_plan_and_writes_nothing(run, fake, tmp_path):
    builder = Builder()
    plan = run(dry_run=True, builder=builder)
    assert "create draft release model-v1.2.3" in plan and "convert htdemucs" in plan
    path = write_model(tmp_path / "models", "htdemucs")
    fake.add_release(TAG, draft=True, files={"htdemucs.onnx": path.read_bytes()})
    plan = run(dry_run=True, builder=builder)
    assert "reuse draft release" in plan
    assert f"htdemucs.onnx: {release.KEEP}" in plan
    assert f"htdemucs.onnx.sha256: {release.UPLOAD}" in plan
    assert f"{path.stat().st_size:,} bytes, sha256 {sha256_file(path)}" in plan
    assert fake.writes() == [] and builder.calls == []


def test_reuse_check(tmp_path):
    path = write_model(tmp_path, "htdemucs")
    assert release.reuse_check(path, "htdemucs")[0]
    assert "not 'htdemucs_ft'" in release.reuse_check(path, "htdemucs_ft")[1]
    old = write_model(tmp_path / "old", "htdemucs", toolchain={**TOOLCHAIN, "onnx": "0.0.1"})
    reuse, why = release.reuse_check(old, "htdemucs")
    assert not reuse and f"onnx 0.0.1 (installed: {TOOLCHAIN['onnx']})" in why
    full = write_model(tmp_path / "full", "htdemucs", weight_storage="float32")
    assert release.reuse_check(full, "htdemucs")[1].endswith("as float32; releases ship float16")
    # the accelerators' file: stamped for its target, float32 weights
    accel = write_release_file(
        tmp_path / "accel",
        "htdemucs",
        toolchain=TOOLCHAIN,
        weight_storage="float32",
        **{TARGET: ACCELERATORS_TARGET},
    )
    assert release.reuse_check(accel, "htdemucs", SPECTRAL_CORE, ACCELERATORS_TARGET)[0]
    assert release.reuse_check(accel, "htdemucs", SPECTRAL_CORE)[1].endswith(
        "was built for --target accelerators, not cpu"
    )
    cpu = write_release_file(tmp_path / "cpu", "htdemucs", toolchain=TOOLCHAIN)
    assert release.reuse_check(cpu, "htdemucs", SPECTRAL_CORE, ACCELERATORS_TARGET)[1].endswith(
        "was built for --target cpu, not accelerators"
    )
    sidecar_path(path).write_text("f" * 64 + "  htdemucs.onnx\n")
    assert not release.reuse_check(path, "htdemucs")[0]
    assert not release.reuse_check(tmp_path / "missing.onnx", "htdemucs")[0]


def test_local_assets_refuse_a_stale_sidecar(tmp_path):
    path = write_model(tmp_path, "htdemucs")
    sidecar_path(path).write_text("0" * 64 + "  htdemucs.onnx\n")
    with pytest.raises(UserError, match="does not match"):
        release.local_assets(path)


def test_real_build_converts_once_then_reuses_the_file(small_repo, client, fake, tmp_path, caplog):
    """The default build step with the real pipeline (small random-weight repo): the second
    release of the same model reuses the file built by the same toolchain, after validating it."""
    caplog.set_level(logging.INFO, logger="converter.ship.release")
    out = tmp_path / "models"
    release.release(
        "model-v1.0.0", repo=small_repo, out_dir=out, client=client, load_test=passing_load_test
    )
    assert "converting htdemucs" in caplog.text
    built = (out / "htdemucs.onnx").stat().st_mtime_ns
    caplog.clear()
    release.release(
        "model-v1.0.1", repo=small_repo, out_dir=out, client=client, load_test=passing_load_test
    )
    assert "reusing" in caplog.text and "validating it again" in caplog.text
    assert (out / "htdemucs.onnx").stat().st_mtime_ns == built
    for tag in ("model-v1.0.0", "model-v1.0.1"):
        (only,) = fake.releases_for(tag)
        assert not only["draft"] and len(fake.assets_of(only)) == 3


ROOT = Path(__file__).resolve().parent.parent


def test_publishing_with_the_matrix_results_imports_no_model_code(fake, tmp_path):
    """The publish job's command, as the workflow runs it, in an interpreter where torch,
    demucs and the other model code cannot be imported."""
    out = tmp_path / "models"
    path = write_model(out, "htdemucs")
    write_evidence(tmp_path / "matrix", path)
    summary = tmp_path / "step-summary.md"
    done = run_cli(
        fake,
        "release",
        "--tag",
        TAG,
        "--contract-results",
        str(tmp_path / "matrix"),
        "--out-dir",
        str(out),
        cwd=ROOT,
        GITHUB_STEP_SUMMARY=str(summary),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"published {TAG}: htdemucs.onnx")
    assert_published_once(fake, tmp_path)
    assert f'MODEL_SHA256="{sha256_file(path)}"' in summary.read_text()


CLI_REFUSALS = {
    "a platform missing": (
        lambda path, results: write_evidence(results, path, skip=("Windows AMD64",)),
        "error: not publishing htdemucs.onnx: no passing row from Windows AMD64 "
        "(windows-latest); run `nox -s contract",
    ),
    "corrupt model file": (
        lambda path, results: (write_evidence(results, path), path.write_bytes(b"\x0a\xff")),
        "error: {path} is not a readable ONNX file (DecodeError); delete it and run",
    ),
}


@pytest.mark.parametrize(("spoil", "line"), CLI_REFUSALS.values(), ids=CLI_REFUSALS.keys())
def test_cli_refusals_are_one_line_and_create_nothing(fake, tmp_path, spoil, line):
    out = tmp_path / "models"
    path = write_model(out, "htdemucs")
    spoil(path, tmp_path / "matrix")
    done = run_cli(
        fake,
        "release",
        "--tag",
        TAG,
        "--contract-results",
        str(tmp_path / "matrix"),
        "--out-dir",
        str(out),
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [text for text in done.stderr.splitlines() if text.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line.format(path=path)), done.stderr
    assert "Traceback" not in done.stderr
    assert fake.writes() == [] and fake.releases == {}


@pytest.mark.parametrize(
    "args",
    [("release", "--tag", TAG, "--dry-run"), ("check-upstream",)],
    ids=["release", "check-upstream"],
)
def test_credentials_in_github_api_url_are_never_printed(fake, tmp_path, args):
    secret = "ghp_SECRET-in-the-url-0123456789"
    url = fake.api_url.replace("http://", f"http://user:{secret}@")
    done = run_cli(fake, *args, cwd=ROOT, GITHUB_API_URL=url)
    assert done.returncode == 1
    assert secret not in done.stdout + done.stderr
    assert "error: GITHUB_API_URL carries credentials (http://***@127.0.0.1:" in done.stderr
    assert fake.seen == []


def test_a_missing_allow_listed_kernel_fails_its_rows(tmp_path):
    path = write_model(tmp_path / "models", "htdemucs")
    write_evidence(tmp_path / "matrix", path)
    record_path = tmp_path / "matrix" / "contract-results-macos-14" / "1.17.3.json"
    record = json.loads(record_path.read_text())
    record["missing_kernels"] = ["FusedConv"]
    record_path.write_text(json.dumps(record))
    with pytest.raises(UserError, match="failed on Darwin arm64 ORT 1.17.3: no CPU kernel for Fu"):
        evidence.require(tmp_path / "matrix", path.name, sha256_file(path))


# -- spectral-core releases ----------------------------------------------------------------

SPECTRAL_TAG = "model-ft-spectral-v1.0.0"


def test_spectral_release_publishes_file_sidecar_and_operator_list(client, fake, tmp_path):
    """The publish job's path (--contract-results) for a spectral-core file: exactly these
    bytes, their sidecar and the operator list convert wrote; the card hands it to the catalog."""
    out = tmp_path / "models"
    path = write_release_file(out, "htdemucs_ft", toolchain=TOOLCHAIN)
    assert path.name == "htdemucs_ft.spectral.onnx"
    listed = oplist.config_path(path).read_bytes()
    write_evidence(tmp_path / "matrix", path)
    gated = []
    outcome = release.release(
        SPECTRAL_TAG,
        out_dir=out,
        client=client,
        contract_results=tmp_path / "matrix",
        gate=lambda p: (gated.append(p), app_like_check(p)),
        server_url="https://gh.example",
    )
    assert gated == [path]
    assert outcome.startswith(f"published {SPECTRAL_TAG}: htdemucs_ft.spectral.onnx (")
    published = assert_published_once(fake, tmp_path, SPECTRAL_TAG, "htdemucs_ft")
    assets = {a["name"]: a for a in fake.assets_of(published)}
    # the operator list convert wrote is shipped as it is, not rewritten
    assert fake.blobs[assets["htdemucs_ft.spectral.required_operators.config"]["id"]] == listed
    body = published["body"]
    assert "| tensor interface (`openkara.tensor_interface`) | spectral-core |" in body
    assert "`htdemucs_ft.spectral.required_operators.config`" in body
    url = f"https://gh.example/{REPOSITORY}/releases/download/{SPECTRAL_TAG}/{path.name}"
    assert f"## OpenKara catalog ({SPECTRAL_TAG})" in body and url in body
    assert f"invoke catalog --tag {SPECTRAL_TAG}" in body
    assert "OpenKara pin" not in body and "assert_eq!" not in body
    # a re-run verifies all three assets and writes nothing
    before = len(fake.writes())
    again = release.release(
        SPECTRAL_TAG, out_dir=out, client=client, contract_results=tmp_path / "matrix"
    )
    assert again.endswith("already published and verified; nothing to do")
    assert len(fake.writes()) == before


def test_spectral_release_built_here_generates_a_missing_operator_list(run, fake, tmp_path):
    out = tmp_path / "models"

    def build_without_list(tag, repo, out_dir):
        return write_release_file(out_dir, tag.model, toolchain=TOOLCHAIN, operators=False)

    run("model-spectral-v2.0.0-rc.1", build_without_list)
    published = assert_published_once(fake, tmp_path, "model-spectral-v2.0.0-rc.1")
    assert published["prerelease"]
    path = out / "htdemucs.spectral.onnx"
    text = oplist.config_path(path).read_text()
    assert text.splitlines()[-1] == "ai.onnx;17;Mul,Unsqueeze"
    assert f"sha256 {sha256_file(path)}" in text


def test_a_stale_operator_list_is_refused_before_anything_is_created(client, fake, tmp_path):
    out = tmp_path / "models"
    path = write_release_file(out, "htdemucs_ft", toolchain=TOOLCHAIN)
    oplist.config_path(path).write_text("ai.onnx;17;Mul\n")
    write_evidence(tmp_path / "matrix", path)
    with pytest.raises(UserError, match="does not list exactly the operators of htdemucs_ft"):
        release.release(
            SPECTRAL_TAG,
            out_dir=out,
            client=client,
            contract_results=tmp_path / "matrix",
            gate=app_like_check,
        )
    assert fake.writes() == [] and fake.releases == {}


@pytest.mark.parametrize(
    ("tag", "stamped", "message"),
    [
        (SPECTRAL_TAG, {TENSOR_INTERFACE: WAVEFORM}, "is a waveform file .* but tag model-ft-spe"),
        ("model-ft-v1.0.0", {TENSOR_INTERFACE: SPECTRAL_CORE}, "is a spectral-core file .* but"),
        (
            "model-ft-spectral-accelerators-v1.0.0",
            {},
            "was built for --target cpu but tag model-ft-spectral-accelerators-v1.0.0 releases "
            "accelerators files",
        ),
        (
            SPECTRAL_TAG,
            {TARGET: ACCELERATORS_TARGET},
            f"was built for --target accelerators but tag {SPECTRAL_TAG} releases cpu files",
        ),
    ],
)
def test_a_file_of_the_other_interface_is_refused(client, fake, tmp_path, tag, stamped, message):
    """The file's stamp must match the tag's interface and target, both ways in."""
    out = tmp_path / "models"
    interface = release.parse_tag(tag).interface
    # the right name for the tag, the wrong interface or target in its metadata
    path = write_release_file(out, "htdemucs_ft", interface, toolchain=TOOLCHAIN, **stamped)
    write_evidence(tmp_path / "matrix", path)
    with pytest.raises(UserError, match=message):
        release.release(
            tag, out_dir=out, client=client, contract_results=tmp_path / "matrix", gate=print
        )
    with pytest.raises(UserError, match=message):
        release.release(
            tag,
            out_dir=out,
            client=client,
            prepare=lambda *args: path,
            load_test=passing_load_test,
        )
    assert fake.writes() == [] and fake.releases == {}


def test_waveform_evidence_does_not_prove_the_spectral_file(tmp_path):
    waveform = write_release_file(tmp_path, "htdemucs", WAVEFORM)
    spectral = write_release_file(tmp_path, "htdemucs")
    write_evidence(tmp_path / "matrix", waveform)
    with pytest.raises(UserError, match="not publishing htdemucs.spectral.onnx: no load-test"):
        evidence.require(tmp_path / "matrix", spectral.name, sha256_file(spectral))


def test_a_published_spectral_release_with_a_wrong_operator_list_is_reported(run, fake, tmp_path):
    path = write_release_file(tmp_path, "htdemucs")
    ops = oplist.config_path(path)
    fake.add_release(
        "model-spectral-v1.0.0",
        draft=False,
        files={
            path.name: path.read_bytes(),
            sidecar_path(path).name: sidecar_path(path).read_bytes(),
            ops.name: ops.read_bytes(),
        },
    )
    (asset,) = [a for a in fake.assets.values() if a["name"] == ops.name]
    asset["digest"] = "sha256:" + "0" * 64
    with pytest.raises(UserError, match=f"is wrong: {ops.name} has SHA-256 0000"):
        run("model-spectral-v1.0.0")


def test_spectral_dry_run_on_the_command_line_names_three_assets(fake, tmp_path):
    out = tmp_path / "models"
    write_release_file(out, "htdemucs_6s", toolchain=TOOLCHAIN, operators=False)
    done = run_cli(
        fake,
        "release",
        "--tag",
        "model-6s-spectral-v1.0.0",
        "--dry-run",
        "--out-dir",
        str(out),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "htdemucs_6s.spectral.onnx",
        "htdemucs_6s.spectral.onnx.sha256",
        "htdemucs_6s.spectral.required_operators.config",
    ):
        assert f"- {name}: {release.UPLOAD} (" in done.stdout
    assert "- write htdemucs_6s.spectral.required_operators.config from the graph" in done.stdout
    assert fake.writes() == [] and not list(out.glob("*.config"))
