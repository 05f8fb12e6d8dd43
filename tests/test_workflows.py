"""The GitHub Actions workflows: triggers, least privilege, pinning, and both workflow linters."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))
PINNED = re.compile(r"^\s*(?:-\s+)?uses:\s+[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(?:\.\d+)*\s*$")


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as True.
    return workflow.get("on", workflow.get(True))


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def tool(name: str) -> str | None:
    """The executable from this venv (where pip put it), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def test_the_workflows_exist():
    assert {"release.yml", "upstream.yml"} <= {path.name for path in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_action_is_pinned_by_commit_sha_with_a_version_comment(path):
    uses = [line for line in path.read_text(encoding="utf-8").splitlines() if "uses:" in line]
    assert uses, "no actions at all?"
    assert [line for line in uses if not PINNED.match(line)] == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_read_only_by_default_and_checkout_keeps_no_credentials(path):
    workflow = load(path.name)
    assert workflow["permissions"] == {"contents": "read"}
    checkouts = [s for s in steps(workflow) if s.get("uses", "").startswith("actions/checkout@")]
    assert checkouts and all(s["with"]["persist-credentials"] is False for s in checkouts)


def test_only_the_release_job_may_write_contents_and_only_upstream_issues():
    writers = {
        (path.name, job_name, scope)
        for path in FILES
        for job_name, job in load(path.name)["jobs"].items()
        for scope, level in (job.get("permissions") or {}).items()
        if level == "write"
    }
    assert writers == {
        ("release.yml", "release", "contents"),
        ("upstream.yml", "check-upstream", "issues"),
    }


def test_release_runs_on_model_tags_one_run_per_tag_without_caches():
    workflow = load("release.yml")
    assert triggers(workflow) == {"push": {"tags": ["model-v*", "model-ft-v*", "model-6s-v*"]}}
    assert workflow["concurrency"]["group"] == "release-${{ github.ref_name }}"
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert not [
        s
        for s in steps(workflow)
        if "cache" in s.get("uses", "") or any("cache" in key for key in s.get("with", {}))
    ]
    (release_step,) = [s for s in steps(workflow) if "invoke release" in s.get("run", "")]
    assert release_step["run"] == 'invoke release --tag "$GITHUB_REF_NAME"'
    assert release_step["env"] == {"GITHUB_TOKEN": "${{ secrets.GITHUB_TOKEN }}"}
    # the token reaches no other step
    assert sum("secrets.GITHUB_TOKEN" in str(s) for s in steps(workflow)) == 1


def test_upstream_runs_on_mondays_and_on_demand():
    workflow = load("upstream.yml")
    assert triggers(workflow) == {"schedule": [{"cron": "0 9 * * 1"}], "workflow_dispatch": None}
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "issues": "write"}
    (check,) = [s for s in steps(workflow) if "invoke check-upstream" in s.get("run", "")]
    assert check["env"] == {"GITHUB_TOKEN": "${{ secrets.GITHUB_TOKEN }}"}


def test_the_release_workflow_derives_the_model_with_the_release_grammar():
    """Its shell step asks converter.release for the model, so the grammar has one home."""
    text = (WORKFLOWS / "release.yml").read_text(encoding="utf-8")
    assert "from converter.release import parse_tag" in text
    assert "${{ github.ref_name }}" not in text.split("jobs:", 1)[1]  # no template injection


def test_zizmor_finds_nothing():
    zizmor = tool("zizmor")
    assert zizmor, (
        "zizmor is missing: pip install -c requirements/constraints.txt -r requirements/dev.in"
    )
    done = subprocess.run(
        [zizmor, "--offline", "--no-progress", str(WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No findings" in done.stdout


def test_actionlint_finds_nothing():
    actionlint = os.environ.get("ACTIONLINT") or tool("actionlint")
    assert actionlint, (
        "actionlint is missing: pip install -c requirements/constraints.txt -r requirements/dev.in"
    )
    done = subprocess.run(
        [actionlint, "-no-color", *map(str, FILES)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
