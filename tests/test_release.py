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
from onnx import TensorProto, helper, numpy_helper

from converter import github, release
from converter.errors import UserError
from converter.metadata import (
    CACHE_KEY,
    MODEL_NAME,
    PROVENANCE,
    WEIGHT_STORAGE,
    read_metadata,
    sha256_file,
    sidecar_path,
    sidecar_text,
    stamp,
)
from tests.fake_github import REPOSITORY, TOKEN, Fault, FakeGitHub

TAG = "model-v1.2.3"
TOOLCHAIN = {name: importlib.metadata.version(name) for name in ("onnx", "requests")}


def write_model(
    out_dir: Path, model: str, toolchain: dict[str, str] = TOOLCHAIN, seed: int = 0,
    weight_storage: str = "float16",
) -> Path:  # fmt: skip
    """A small valid ONNX file stamped like a converted one, with its sidecar."""
    weight = np.random.default_rng(seed).standard_normal(300_000).astype(np.float32)  # 1.2 MB
    graph = helper.make_graph(
        [helper.make_node("Add", ["audio", "w"], ["stems"])],
        model,
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [300_000])],
        [helper.make_tensor_value_info("stems", TensorProto.FLOAT, [300_000])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stamp(
        proto,
        {
            MODEL_NAME: model,
            WEIGHT_STORAGE: weight_storage,
            PROVENANCE: json.dumps(
                {"model": model, "signatures": ["955717e8"], "toolchain": toolchain}
            ),
        },
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model}.onnx"
    onnx.save(proto, str(path))
    sidecar_path(path).write_text(sidecar_text(path, sha256_file(path)), encoding="utf-8")
    return path


class Builder:
    """Stands in for convert → validate → contract gate; counts calls."""

    def __init__(self, seed: int = 0, error: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.seed, self.error = seed, error

    def __call__(self, model: str, repo: Path | None, out_dir: Path) -> Path:
        self.calls.append(model)
        if self.error is not None:
            raise self.error
        return write_model(out_dir, model, seed=self.seed)


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
            server_url="https://gh.example",
            **kwargs,
        )

    return run


def assert_published_once(
    fake: FakeGitHub, tmp_path: Path, tag: str = TAG, model: str = "htdemucs"
) -> dict:
    """The converged state: one published release holding exactly the two right assets."""
    (only,) = fake.releases_for(tag)
    assert not only["draft"]
    path = tmp_path / "models" / f"{model}.onnx"
    assets = {a["name"]: a for a in fake.assets_of(only)}
    assert set(assets) == {path.name, sidecar_path(path).name}
    assert all(a["state"] == "uploaded" for a in assets.values())
    assert assets[path.name]["digest"] == f"sha256:{sha256_file(path)}"
    assert fake.blobs[assets[path.name]["id"]] == path.read_bytes()
    assert fake.blobs[assets[sidecar_path(path).name]["id"]] == sidecar_path(path).read_bytes()
    return only


@pytest.mark.parametrize(
    ("tag", "model", "prerelease"),
    [
        ("model-v1.0.0", "htdemucs", False),
        ("model-ft-v2.10.3", "htdemucs_ft", False),
        ("model-6s-v0.1.0-rc.2", "htdemucs_6s", True),
        ("model-v1.0.0-rc.0", "htdemucs", True),
    ],
)
def test_tag_grammar(tag, model, prerelease):
    assert release.parse_tag(tag) == release.Tag(tag, model, prerelease)


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
    ],
)
def test_bad_tags_are_refused_before_any_work(run, fake, tag):
    builder = Builder()
    with pytest.raises(UserError, match=r"model-vX\.Y\.Z .*model-ft-vX\.Y\.Z.*model-6s-vX\.Y\.Z"):
        run(tag, builder)
    assert fake.seen == [] and builder.calls == []


def test_missing_token_is_one_error_before_any_work(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPOSITORY)
    builder = Builder()
    with pytest.raises(UserError, match="GITHUB_TOKEN not set"):
        release.release(TAG, out_dir=tmp_path, prepare=builder)
    assert builder.calls == []


def test_happy_path_publishes_a_verified_release_with_a_model_card(run, fake, tmp_path):
    digest = sha256_file(write_model(tmp_path / "models", "htdemucs"))
    summary = [
        {
            "ort": "1.23.2",
            "platform": "linux-x86_64",
            "model": "htdemucs.onnx",
            "sha256": digest,
            "status": "ok",
            "load_s": 1.5,
            "run_s": 2.5,
        },
        {
            "ort": "1.17.3",
            "platform": "linux-x86_64",
            "model": "htdemucs.onnx",
            "sha256": digest,
            "status": "IR 10 > 9",
            "load_s": None,
            "run_s": None,
        },
        {
            "ort": "1.20.1",
            "model": "htdemucs.onnx",
            "sha256": "e" * 64,
            "status": "stale row for older bytes",
        },
        {"ort": "1.23.2", "model": "htdemucs_6s.onnx", "status": "ok"},
    ]
    (tmp_path / "models" / "contract-summary.json").write_text(json.dumps(summary))
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
    assert f'url = "https://gh.example/{REPOSITORY}/releases/download/{TAG}/htdemucs.onnx"' in body
    assert f'sha256 = "{digest}"' in body
    assert "| 1.23.2 | linux-x86_64 | ok | 1.5 | 2.5 |" in body and "IR 10 > 9" in body
    assert "htdemucs_6s" not in body and "stale row" not in body  # only rows for these bytes
    assert f"onnx {TOOLCHAIN['onnx']}" in body and "955717e8" in body
    assert published["prerelease"] is False
    # uploads followed upload_url, every API call carried the headers
    uploads = [s for s in fake.seen if s.method == "POST" and "/uploads/" in s.path]
    assert len(uploads) == 2 and all(s.path.startswith("/api/uploads/") for s in uploads)
    # the publish came last, after every upload
    assert fake.writes()[-1].method == "PATCH"


def test_prerelease_tag_makes_a_prerelease(run, fake, tmp_path):
    run("model-6s-v1.0.0-rc.1")
    (only,) = fake.releases_for("model-6s-v1.0.0-rc.1")
    assert only["prerelease"] and not only["draft"]
    assert {a["name"] for a in fake.assets_of(only)} == {
        "htdemucs_6s.onnx",
        "htdemucs_6s.onnx.sha256",
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
    assert uploaded == ["htdemucs.onnx.sha256"]


def test_assets_without_digest_are_verified_by_download(client, tmp_path):
    fake = FakeGitHub(digests=False)
    try:
        client.api_url = fake.api_url
        release.release(TAG, out_dir=tmp_path / "models", client=client, prepare=Builder())
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
    caplog.set_level(logging.INFO, logger="converter.release")
    out = tmp_path / "models"
    release.release("model-v1.0.0", repo=small_repo, out_dir=out, client=client)
    assert "converting htdemucs" in caplog.text
    built = (out / "htdemucs.onnx").stat().st_mtime_ns
    caplog.clear()
    release.release("model-v1.0.1", repo=small_repo, out_dir=out, client=client)
    assert "reusing" in caplog.text and "validating it again" in caplog.text
    assert (out / "htdemucs.onnx").stat().st_mtime_ns == built
    for tag in ("model-v1.0.0", "model-v1.0.1"):
        (only,) = fake.releases_for(tag)
        assert not only["draft"] and len(fake.assets_of(only)) == 2
