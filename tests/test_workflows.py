"""The GitHub Actions workflows: both linters, and their parsed structure (job graph, least
privilege, what each job installs), instead of comparisons with their text."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from converter.gate import evidence
from converter.ship import tags

ROOT = Path(__file__).resolve().parent.parent
GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
ACTIONS = sorted((GITHUB / "actions").glob("*/action.yml"))
SHA_PINNED = re.compile(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}")
# What the job that holds `contents: write` must never install: model code and unpicklers.
HEAVY = {"torch", "demucs", "torchaudio", "julius", "omegaconf", "dora-search", "soundfile"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as True.
    return workflow.get("on", workflow.get(True))


def steps(document: dict) -> list[dict]:
    if "runs" in document:  # a composite action
        return document["runs"]["steps"]
    return [step for job in document["jobs"].values() for step in job.get("steps", [])]


def tool(name: str) -> str | None:
    """The executable from this venv (where pip put it), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def pip_install_args(run: str) -> list[str]:
    """The arguments after `python -m pip install` in a one-line `run:`."""
    words = shlex.split(run)
    assert words[:4] == ["python", "-m", "pip", "install"], run
    return words[4:]


def closure(names: set[str]) -> set[str]:
    """Every distribution `names` pull in, from the installed metadata (this venv has the
    pinned toolchain, so this is what pip installs under the constraints)."""
    seen: set[str] = set()
    todo = [n.lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name.lower().replace("_", "-"))
    return seen


def requirements_in(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


# -- linters -------------------------------------------------------------------------------


def test_zizmor_finds_nothing():
    zizmor = tool("zizmor")
    assert zizmor, (
        "zizmor is missing: pip install -c requirements/constraints.txt -r requirements/dev.in"
    )
    done = subprocess.run(
        [zizmor, "--offline", "--no-progress", str(GITHUB)],
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
        [actionlint, "-no-color", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- every workflow ------------------------------------------------------------------------


@pytest.mark.parametrize("path", WORKFLOWS + ACTIONS, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_action_is_pinned_by_commit_sha_or_local(path):
    uses = [step["uses"] for step in steps(load(path)) if "uses" in step]
    assert [u for u in uses if not (SHA_PINNED.fullmatch(u) or u.startswith("./"))] == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_read_only_by_default_and_checkout_keeps_no_credentials(path):
    workflow = load(path)
    assert workflow["permissions"] == {"contents": "read"}
    checkouts = [s for s in steps(workflow) if s.get("uses", "").startswith("actions/checkout@")]
    assert checkouts and all(s["with"]["persist-credentials"] is False for s in checkouts)


def test_only_publish_writes_contents_and_only_upstream_writes_issues():
    writers = {
        (path.name, job_name, scope)
        for path in WORKFLOWS
        for job_name, job in load(path)["jobs"].items()
        for scope, level in (job.get("permissions") or {}).items()
        if level == "write"
    }
    assert writers == {
        ("release.yml", "publish", "contents"),
        ("upstream.yml", "check-upstream", "issues"),
    }


def test_the_token_reaches_only_the_steps_that_call_github():
    users = {
        (path.name, step.get("run", "").split()[1])
        for path in WORKFLOWS
        for step in steps(load(path))
        if "secrets.GITHUB_TOKEN" in str(step)
    }
    assert users == {
        ("release.yml", "release"),
        ("release.yml", "compare"),
        ("upstream.yml", "check-upstream"),
    }


def test_conversions_install_cpu_only_torch_through_the_one_recipe():
    """The build jobs use the composite action; it takes torch's version from the constraints
    file and only the CPU build's index from PyTorch, with --no-deps."""
    (action,) = ACTIONS
    torch_step, rest_step = [s for s in steps(load(action)) if "pip" in s.get("run", "")]
    torch_args, rest_args = pip_install_args(torch_step["run"]), pip_install_args(rest_step["run"])
    assert torch_args[-1] == "torch" and "--no-deps" in torch_args
    assert torch_args[torch_args.index("-c") + 1] == "requirements/constraints.txt"
    # The CPU index comes through pip's own configuration, from the caller's repository variable.
    assert torch_step["env"]["PIP_INDEX_URL"] == "${{ inputs.torch-cpu-index }}"
    assert "--index-url" not in torch_args and "torch" not in rest_args
    assert rest_args[:2] == ["-c", "requirements/constraints.txt"]
    for path in WORKFLOWS:
        for job in load(path)["jobs"].values():
            runs = " ".join(s.get("run", "") for s in job.get("steps", []))
            if "invoke convert" in runs:
                (toolchain,) = [
                    s for s in job["steps"] if s.get("uses") == "./.github/actions/toolchain"
                ]
                assert toolchain["with"]["torch-cpu-index"] == "${{ vars.TORCH_CPU_INDEX_URL }}"
                assert "requirements/dev.in" not in runs  # not installed a second way


# -- release.yml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_yml() -> dict:
    return load(GITHUB / "workflows" / "release.yml")


# One tag of every shape the grammar accepts (converter/ship/tags.py), and some it refuses.
GRAMMAR_TAGS = [
    f"model-{flavour}{spectral}v1.2.3{rc}"
    for flavour in ("", "ft-", "6s-")
    for spectral in ("", "spectral-")
    for rc in ("", "-rc.1")
]


def test_release_runs_on_model_tags_one_run_per_tag_without_caches(release_yml):
    assert triggers(release_yml) == {"push": {"tags": [tags.WORKFLOW_FILTER]}}
    for tag in GRAMMAR_TAGS:  # the filter lets every release tag through ...
        assert fnmatch.fnmatchcase(tag, tags.WORKFLOW_FILTER) and tags.parse_tag(tag)
    assert release_yml["concurrency"] == {
        "group": "release-${{ github.ref_name }}",
        "cancel-in-progress": False,
    }
    assert not [s for s in steps(release_yml) if "cache" in s.get("uses", "")]


def test_the_tag_is_read_by_the_package_before_any_install(release_yml, tmp_path):
    """... and the build job's first step asks converter.ship.tags (the grammar's one home), which
    refuses the rest in one line before anything is installed."""
    build = release_yml["jobs"]["build"]["steps"]
    assert build[0]["uses"].startswith("actions/checkout@")
    step = build[1]
    assert step["id"] == "tag" and "uses" not in step
    command = shlex.split(step["run"].split("|")[0])
    assert command == ["python3", "-m", "converter.ship.tags", "$GITHUB_REF_NAME"]
    assert "tee -a" in step["run"] and "$GITHUB_OUTPUT" in step["run"]
    assert step["shell"] == "bash"  # GitHub runs an explicit bash with -o pipefail
    for tag, code in [("model-ft-spectral-v1.0.0", 0), ("model-latest", 1)]:
        done = subprocess.run(
            [sys.executable, "-S", "-m", "converter.ship.tags", tag],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == code, done.stderr
    assert done.stderr.startswith("error: tag 'model-latest' is not a model release tag")
    assert "Traceback" not in done.stderr
    # no workflow restates the grammar
    for path in WORKFLOWS:
        text = "".join(s.get("run", "") for s in steps(load(path)))
        assert not re.search(r"model-(ft|6s|spectral)|parse_tag", text), path.name
    (convert,) = [s for s in build if "invoke convert" in s.get("run", "")]
    assert convert["env"] == {
        "MODEL": "${{ steps.tag.outputs.model }}",
        "INTERFACE": "${{ steps.tag.outputs.interface }}",
        "TARGET": "${{ steps.tag.outputs.target }}",
        "FILE": "${{ steps.tag.outputs.file }}",
    }
    # an -accelerators- tag builds the accelerators' file (its storage follows the target)
    assert shlex.split(convert["run"].splitlines()[0]) == [
        "invoke",
        "convert",
        "--model",
        "$MODEL",
        "--interface",
        "$INTERFACE",
        "--target",
        "$TARGET",
    ]


def test_release_job_graph_build_then_four_load_tests_then_publish(release_yml):
    jobs = release_yml["jobs"]
    assert set(jobs) == {"build", "load-test", "compare", "publish"}
    assert "needs" not in jobs["build"]
    assert jobs["load-test"]["needs"] == jobs["compare"]["needs"] == "build"
    assert jobs["compare"]["runs-on"] == "ubuntu-latest"
    assert set(jobs["publish"]["needs"]) == {"build", "load-test", "compare"}
    matrix = jobs["load-test"]["strategy"]["matrix"]["os"]
    assert sorted(matrix) == sorted(evidence.PLATFORMS.values())
    assert jobs["load-test"]["strategy"]["fail-fast"] is False
    assert jobs["load-test"]["runs-on"] == "${{ matrix.os }}"


def test_release_permissions_and_environment(release_yml):
    jobs = release_yml["jobs"]
    assert release_yml["permissions"] == {"contents": "read"}
    assert "permissions" not in jobs["build"] and "permissions" not in jobs["load-test"]
    assert jobs["publish"]["permissions"] == {"contents": "write"}
    assert jobs["publish"]["environment"] == "release"
    assert [j for j, job in jobs.items() if "environment" in job] == ["publish"]


def test_publish_installs_only_what_publishing_needs(release_yml):
    publish = release_yml["jobs"]["publish"]
    assert not [s for s in publish["steps"] if s.get("uses", "").startswith("./")]
    (install,) = [s for s in publish["steps"] if "pip install" in s.get("run", "")]
    args = pip_install_args(install["run"])
    assert args == ["-c", "requirements/constraints.txt", "-r", "requirements/publish.in"]
    installed = closure(requirements_in(ROOT / "requirements/publish.in"))
    assert not installed & HEAVY, installed & HEAVY


def test_the_bytes_flow_from_build_through_load_tests_to_publish(release_yml):
    jobs = release_yml["jobs"]
    build, load_test, publish = jobs["build"], jobs["load-test"], jobs["publish"]
    (upload,) = [s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-")]
    name = upload["with"]["name"]
    assert build["outputs"] == {
        "file": "${{ steps.tag.outputs.file }}",
        "model": "${{ steps.tag.outputs.model }}",
        "sha256": "${{ steps.build.outputs.sha256 }}",
    }
    # the operator list travels with the file to publish
    assert "models/*.required_operators.config" in upload["with"]["path"].split()
    downloads = [
        s["with"]
        for s in load_test["steps"] + publish["steps"]
        if s.get("uses", "").startswith("actions/download-artifact@")
    ]
    assert [d.get("name") for d in downloads].count(name) == 2
    (results,) = [s for s in load_test["steps"] if s.get("uses", "").startswith("actions/upload-")]
    assert results["if"] == "always()"
    assert results["with"]["name"] == "contract-results-${{ matrix.os }}"
    assert {"pattern": "contract-results-*", "path": "contract-results"} in downloads
    (nox,) = [s for s in load_test["steps"] if "nox -s contract" in s.get("run", "")]
    assert nox["env"]["FILE"] == "${{ needs.build.outputs.file }}"
    assert shlex.split(nox["run"])[-1] == "models/$FILE"
    # publish: the artifact's SHA-256 against build's output, then the release with the results
    names = [s.get("name", s.get("uses", "")) for s in publish["steps"]]
    check = next(s for s in publish["steps"] if "sha256sum --check" in s.get("run", ""))
    assert check["env"]["SHA256"] == "${{ needs.build.outputs.sha256 }}"
    (release_step,) = [s for s in publish["steps"] if "invoke release" in s.get("run", "")]
    assert names.index(check["name"]) < names.index(release_step["name"])
    assert shlex.split(release_step["run"]) == [
        "invoke",
        "release",
        "--tag",
        "$GITHUB_REF_NAME",
        "--contract-results",
        "contract-results",
        "--compare-report",
        "models/$MODEL.compare.json",
    ]
    assert release_step["env"] == {
        "GITHUB_TOKEN": "${{ secrets.GITHUB_TOKEN }}",
        "MODEL": "${{ needs.build.outputs.model }}",
    }


def test_the_accelerator_report_installs_pinned_wheels(release_yml):
    """CoreML's report runs on the toolchain's onnxruntime, DirectML's on onnxruntime-directml,
    both at the versions requirements/constraints.txt pins, beside the verify tools' pins."""
    (step,) = [s for s in steps(release_yml) if "invoke ep-report" in s.get("run", "")]
    wheels = re.findall(r"&& '([\w-]+)' \|\| '([\w-]+)'", step["env"]["WHEEL"])[0]
    assert wheels == ("onnxruntime-directml", "onnxruntime")
    (install,) = [line for line in step["run"].splitlines() if " pip install " in line]
    assert shlex.split(install)[4:] == [
        "-c",
        "requirements/constraints.txt",
        *["onnx", "numpy", "invoke", "$WHEEL"],
    ]
    constraints = (ROOT / "requirements" / "constraints.txt").read_text(encoding="utf-8")
    pinned = re.findall(r"^([\w.-]+)==", constraints, re.MULTILINE)
    assert set(wheels) | {"onnx", "numpy", "invoke"} <= set(pinned)


def test_no_expression_is_spliced_into_a_script():
    """Values reach scripts through env:, never `${{ }}` inside `run:` (template injection)."""
    for path in WORKFLOWS + ACTIONS:
        assert [s["run"] for s in steps(load(path)) if "${{" in s.get("run", "")] == [], path.name


# -- upstream.yml and Dependabot -----------------------------------------------------------


def test_upstream_runs_on_mondays_and_on_demand():
    workflow = load(GITHUB / "workflows" / "upstream.yml")
    assert triggers(workflow) == {"schedule": [{"cron": "0 9 * * 1"}], "workflow_dispatch": None}
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "issues": "write"}


def test_dependabot_keeps_every_pinned_action_current():
    config = load(GITHUB / "dependabot.yml")
    (actions,) = [u for u in config["updates"] if u["package-ecosystem"] == "github-actions"]
    folders = {"/" + a.parent.relative_to(ROOT).as_posix() for a in ACTIONS}
    assert set(actions["directories"]) == {"/"} | folders
    assert actions["schedule"]["interval"] in ("daily", "weekly")
