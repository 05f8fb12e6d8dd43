"""`invoke pin-openkara` against the loopback GitHub API and a fixture OpenKara checkout.

The fixture is written here in the syntax docs/openkara-pins.md records (OpenKara's sources of
the model-v2.0.1 era); every refusal must leave every file of it byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
from pathlib import Path

import pytest

from converter import interrupts
from converter.errors import UserError
from converter.ship import github, pins
from tests.fake_github import REPOSITORY, TOKEN, FakeGitHub, run_cli

SERVER = "https://github.com"
OLD = "https://github.com/openkara/models/releases/download"
OLD_SHA, OLD_FT_SHA = "1" * 64, "2" * 64
MODEL_BYTES = b"onnx bytes of a published htdemucs" * 1000

FIXTURE = {
    "src-tauri/src/separator/bootstrap.rs": f"""use super::ModelDescriptor;

pub const HTDEMUCS: ModelDescriptor = ModelDescriptor {{
    filename: "htdemucs.onnx",
    download_url: "{OLD}/model-v2.0.1/htdemucs.onnx",
    sha256: "{OLD_SHA}",
}};

pub const HTDEMUCS_FT: ModelDescriptor = ModelDescriptor {{
    filename: "htdemucs_ft.onnx",
    download_url: "{OLD}/model-ft-v2.0.1/htdemucs_ft.onnx",
    sha256: "{OLD_FT_SHA}",
}};

pub const MODEL_DOWNLOAD_URL: &str = HTDEMUCS.download_url;
pub const MODEL_SHA256: &str = HTDEMUCS.sha256;
""",
    "src-tauri/src/separator/model.rs": (
        'pub const EMBEDDED_MODEL_FILENAME: &str = "htdemucs.onnx";\n'
    ),
    "src-tauri/tests/phase6_model_bootstrap.rs": f"""use app::separator::bootstrap::*;

#[test]
fn htdemucs_descriptor_points_at_v2_release_asset() {{
    assert_eq!(
        HTDEMUCS.download_url,
        "{OLD}/model-v2.0.1/htdemucs.onnx"
    );
    assert_eq!(HTDEMUCS.sha256, "{OLD_SHA}");
}}

#[test]
fn htdemucs_ft_descriptor_points_at_v2_release_asset() {{
    assert_eq!(HTDEMUCS_FT.download_url, "{OLD}/model-ft-v2.0.1/htdemucs_ft.onnx");
    assert_eq!(HTDEMUCS_FT.sha256, "{OLD_FT_SHA}");
}}
""",
    "scripts/setup.sh": f"""#!/usr/bin/env bash
set -euo pipefail
MODEL_URL="{OLD}/model-v2.0.1/htdemucs.onnx"
MODEL_SHA256="{OLD_SHA}"
curl -L "$MODEL_URL" -o "$CACHE/htdemucs.onnx"
""",
    ".github/workflows/ci.yml": f"""name: ci
on: [push]
env:
  MODEL_URL: {OLD}/model-v2.0.1/htdemucs.onnx
  MODEL_SHA256: {OLD_SHA}
jobs:
  test:
    runs-on: ubuntu-latest
    env:
      MODEL_URL: not-the-top-level-one
    steps:
      - run: echo "model-${{{{ env.MODEL_SHA256 }}}}"
""",
    "docs/references/contracts/phase-6-model-bootstrap-contract.md": """# Model bootstrap

The pinned release paths:

   - `htdemucs`: `model-v2.0.1/htdemucs.onnx`
   - `htdemucs_ft`: `model-ft-v2.0.1/htdemucs_ft.onnx`
""",
}


def write_checkout(root: Path) -> Path:
    for name, text in FIXTURE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode())
    os.chmod(root / "scripts/setup.sh", 0o755)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def publish(fake: FakeGitHub, tag: str, model: str = "htdemucs", **kwargs) -> str:
    """A release as `invoke release` leaves it; returns the model's SHA-256."""
    digest = hashlib.sha256(MODEL_BYTES).hexdigest()
    sidecar = kwargs.pop("sidecar", digest)
    fake.add_release(
        tag,
        files={
            f"{model}.onnx": MODEL_BYTES,
            f"{model}.onnx.sha256": f"{sidecar}  {model}.onnx\n".encode(),
        },
        **{"draft": False, **kwargs},
    )
    return digest


@pytest.fixture
def checkout(tmp_path) -> Path:
    return write_checkout(tmp_path / "openkara")


@pytest.fixture
def pin(fake, checkout):
    client = github.Client(
        api_url=fake.api_url, repository=REPOSITORY, token=TOKEN, sleep=lambda s: None
    )

    def pin(tag: str, **kwargs) -> str:
        return pins.pin_openkara(tag, checkout, client=client, server_url=SERVER, **kwargs)

    return pin


def test_rewrites_all_six_places_of_htdemucs(pin, fake, checkout):
    tag = "model-v2.0.2"
    digest = publish(fake, tag)
    outcome = pin(tag)
    assert "5 of 6 places changed" in outcome  # model.rs names the same asset
    url = f"{SERVER}/{REPOSITORY}/releases/download/{tag}/htdemucs.onnx"
    expected = {name: text for name, text in FIXTURE.items()}
    old_url = f"{OLD}/model-v2.0.1/htdemucs.onnx"
    for name in expected:
        if name != "src-tauri/src/separator/model.rs":
            expected[name] = expected[name].replace(old_url, url).replace(OLD_SHA, digest)
    expected["docs/references/contracts/phase-6-model-bootstrap-contract.md"] = expected[
        "docs/references/contracts/phase-6-model-bootstrap-contract.md"
    ].replace("`model-v2.0.1/htdemucs.onnx`", f"`{tag}/htdemucs.onnx`")
    assert {n: b.decode() for n, b in snapshot(checkout).items()} == expected
    assert "not-the-top-level-one" in (checkout / ".github/workflows/ci.yml").read_text()
    assert stat.S_IMODE((checkout / "scripts/setup.sh").stat().st_mode) == 0o755
    assert fake.writes() == []  # pinning only reads GitHub
    assert "already pins" in pin(tag)  # idempotent


def test_htdemucs_ft_has_three_places_and_leaves_htdemucs_alone(pin, fake, checkout):
    tag = "model-ft-v2.1.0"
    digest = publish(fake, tag, model="htdemucs_ft")
    before = snapshot(checkout)
    assert "3 of 3 places changed" in pin(tag)
    after = snapshot(checkout)
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {
        "src-tauri/src/separator/bootstrap.rs",
        "src-tauri/tests/phase6_model_bootstrap.rs",
        "docs/references/contracts/phase-6-model-bootstrap-contract.md",
    }
    bootstrap = after["src-tauri/src/separator/bootstrap.rs"].decode()
    assert f'sha256: "{digest}"' in bootstrap and f'sha256: "{OLD_SHA}"' in bootstrap
    assert (
        f"`{tag}/htdemucs_ft.onnx`"
        in after["docs/references/contracts/phase-6-model-bootstrap-contract.md"].decode()
    )


def test_dry_run_prints_the_diff_and_changes_nothing(pin, fake, checkout):
    tag = "model-v2.0.2"
    digest = publish(fake, tag)
    before = snapshot(checkout)
    out = pin(tag, dry_run=True)
    assert snapshot(checkout) == before
    assert "--- a/scripts/setup.sh\n+++ b/scripts/setup.sh\n" in out
    assert f'\n-MODEL_SHA256="{OLD_SHA}"\n' in out and f'\n+MODEL_SHA256="{digest}"\n' in out
    assert "dry run: 5 of 6 places would change" in out and "nothing written" in out


def test_a_prerelease_needs_allow_prerelease(pin, fake, checkout):
    tag = "model-v2.0.2-rc.1"
    publish(fake, tag, prerelease=True)
    before = snapshot(checkout)
    with pytest.raises(UserError, match="is a prerelease.*--allow-prerelease"):
        pin(tag)
    assert snapshot(checkout) == before
    assert "5 of 6 places changed" in pin(tag, allow_prerelease=True)


def _missing_pattern(checkout: Path) -> None:
    setup = checkout / "scripts/setup.sh"
    setup.write_text(setup.read_text().replace("MODEL_SHA256=", "SHA="))


REFUSALS = {
    "unknown tag": (lambda fake, co: None, r"no release model-v2\.0\.2 in"),
    "draft": (lambda fake, co: publish(fake, "model-v2.0.2", draft=True), "is a draft"),
    "prerelease": (
        lambda fake, co: publish(fake, "model-v2.0.2", prerelease=True),
        "is a prerelease",
    ),
    "digest mismatch": (
        lambda fake, co: publish(fake, "model-v2.0.2", sidecar="f" * 64),
        "has SHA-256 .* on GitHub but its .sha256 asset says f{64}",
    ),
    "pattern not found": (
        lambda fake, co: (publish(fake, "model-v2.0.2"), _missing_pattern(co)),
        r"scripts/setup.sh: `MODEL_SHA256=\"...\"` not found.*No file was changed",
    ),
    "file missing": (
        lambda fake, co: (publish(fake, "model-v2.0.2"), (co / "scripts/setup.sh").unlink()),
        r"scripts/setup.sh: cannot read",
    ),
}


@pytest.mark.parametrize(("prepare", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_change_no_file(pin, fake, checkout, prepare, message):
    prepare(fake, checkout)
    before = snapshot(checkout)
    with pytest.raises(UserError, match=message):
        pin("model-v2.0.2")
    assert snapshot(checkout) == before
    assert fake.writes() == []


def test_htdemucs_6s_has_no_place(pin, fake, checkout):
    publish(fake, "model-6s-v1.0.0", model="htdemucs_6s")
    before = snapshot(checkout)
    with pytest.raises(UserError, match="OpenKara has no place for htdemucs_6s"):
        pin("model-6s-v1.0.0")
    assert snapshot(checkout) == before and fake.seen == []


def test_spectral_releases_go_to_the_catalog_not_to_pins(pin, fake, checkout):
    before = snapshot(checkout)
    with pytest.raises(UserError, match="spectral-core release: OpenKara takes those from its ca"):
        pin("model-spectral-v1.0.0")
    assert snapshot(checkout) == before and fake.seen == []


def test_a_failed_write_rolls_back_the_files_already_renamed(pin, fake, checkout, monkeypatch):
    publish(fake, "model-v2.0.2")
    before = snapshot(checkout)
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise PermissionError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(pins.os, "replace", failing_replace)
    with pytest.raises(UserError, match="no file was changed"):
        pin("model-v2.0.2")
    assert snapshot(checkout) == before  # no temp files left either


@pytest.mark.parametrize("call", [1, 3, 5])
def test_a_signal_between_the_renames_rolls_back_every_file(call, pin, fake, checkout, monkeypatch):
    """SIGTERM (raised as interrupts.Interrupted) right after rename `call` of the 5 files that
    change (model.rs already names htdemucs.onnx): the first, one midway, the last."""
    publish(fake, "model-v2.0.2")
    before = snapshot(checkout)
    real_replace, calls = os.replace, []

    def stopped_replace(src, dst):
        calls.append(dst)
        if len(calls) == call:
            real_replace(src, dst)  # the rename happened; the signal lands just after it
            raise interrupts.Interrupted(signal.SIGTERM)
        real_replace(src, dst)

    monkeypatch.setattr(pins.os, "replace", stopped_replace)
    with pytest.raises(interrupts.Interrupted) as stopped:
        pin("model-v2.0.2")
    assert interrupts.summary(stopped.value) == (
        "interrupted (SIGTERM): no file was changed",
        128 + signal.SIGTERM,
    )
    assert snapshot(checkout) == before  # every file back, no temp file left


def test_cli_dry_run_needs_no_model_code_and_changes_nothing(fake, checkout):
    digest = publish(fake, "model-v2.0.2")
    before = snapshot(checkout)
    done = run_cli(
        fake,
        "pin-openkara",
        "--tag",
        "model-v2.0.2",
        "--checkout",
        str(checkout),
        "--dry-run",
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'+    sha256: "{digest}",' in done.stdout
    assert f"+  MODEL_URL: {SERVER}/{REPOSITORY}/releases/download/model-v2.0.2/" in done.stdout
    assert snapshot(checkout) == before


def test_cli_refusal_is_one_line(fake, checkout):
    publish(fake, "model-v2.0.2", draft=True)
    done = run_cli(
        fake,
        "pin-openkara",
        "--tag",
        "model-v2.0.2",
        "--checkout",
        str(checkout),
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: release model-v2.0.2 is a draft")
