"""`invoke check-upstream` against local servers: a PEP 691 index and the GitHub issues API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from converter.errors import UserError
from converter.ship import github, upstream
from tests import loopback
from tests.fake_github import REPOSITORY, TOKEN, Fault


def index_file(filename: str, yanked: bool | str = False) -> dict:
    """One file entry of a PEP 691 project page."""
    return {"filename": filename, "yanked": yanked, "hashes": {"sha256": "0" * 64}, "url": filename}


def wheel(version: str, yanked: bool | str = False) -> dict:
    return index_file(f"demucs-{version}-py3-none-any.whl", yanked)


def sdist(version: str, yanked: bool | str = False) -> dict:
    return index_file(f"demucs-{version}.tar.gz", yanked)


@pytest.fixture
def fake(fake):
    fake.index_files = [sdist("4.0.0"), sdist("4.0.1"), sdist("4.1.0"), wheel("4.1.0")]
    return fake


@pytest.fixture
def check(fake):
    client = github.Client(
        api_url=fake.api_url,
        repository=REPOSITORY,
        token=TOKEN,
        sleep=lambda s: None,
        timeout=(5.0, 5.0),
    )

    def check() -> str:
        return upstream.check(client=client, index=fake.index_url)

    return check


def test_pin_comes_from_the_constraints_file_the_conversion_installs_from():
    text = upstream.CONSTRAINTS.read_text()
    assert f"demucs=={upstream.pinned_version()}" in text.splitlines()


def test_missing_pin_is_a_user_error(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    with pytest.raises(UserError, match="demucs==X.Y.Z"):
        upstream.pinned_version(constraints)


def test_index_url_order_env_then_pip_config_then_pip_default(tmp_path):
    from pip._internal.models.index import PyPI

    assert upstream.index_url({"PIP_INDEX_URL": "http://mirror/simple"}) == "http://mirror/simple"
    config = tmp_path / "pip.conf"
    config.write_text(
        "[global]\nindex-url = http://global/simple\n[install]\nindex-url = http://install/simple\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "PIP_CONFIG_FILE": str(config)}
    assert upstream.index_url(env) == "http://install/simple"
    config.write_text("[global]\nindex-url = http://global/simple\n")
    assert upstream.index_url(env) == "http://global/simple"
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    assert upstream.index_url(env) == PyPI.simple_url


def test_a_pip_that_never_answers_is_one_line(monkeypatch):
    def hang(args, **kwargs):
        raise subprocess.TimeoutExpired(args, kwargs["timeout"])

    monkeypatch.setattr(upstream.subprocess, "run", hang)
    with pytest.raises(UserError, match=r"`pip config list` gave no answer in 60 s; set PIP_INDEX"):
        upstream.index_url({})


def test_prereleases_dev_releases_and_fully_yanked_versions_are_ignored(fake):
    fake.index_files += [
        sdist("5.0.0rc1"),
        sdist("5.0.0.dev3"),
        sdist("4.9.0b1"),
        sdist("4.3.0", yanked="broken"),
        wheel("4.3.0", yanked=True),  # fully yanked
        sdist("4.2.0", yanked=True),
        wheel("4.2.0"),  # one file still installable
        {"filename": "demucs-latest.zip", "yanked": False},  # not a distribution name
    ]
    versions = upstream.released_versions(fake.index_url)
    assert versions == [Version(v) for v in ("4.0.0", "4.0.1", "4.1.0", "4.2.0")]
    assert fake.seen[-1].headers["Accept"] == "application/vnd.pypi.simple.v1+json"


def test_nothing_newer_means_no_issue_and_no_label(check, fake):
    outcome = check()
    assert outcome.startswith("demucs 4.1.0 is current")
    assert fake.writes() == [] and fake.issues == []


def test_running_twice_opens_exactly_one_issue(check, fake):
    fake.index_files += [sdist("4.1.1"), sdist("4.2.0"), sdist("4.3.0rc1")]
    first = check()
    second = check()
    assert "opened issue #1" in first
    assert "already tracked by issue #1" in second
    (issue,) = fake.issues
    assert issue["labels"] == ["upstream-update"] and fake.labels == {"upstream-update"}
    assert issue["title"] == "Upstream demucs 4.2.0 released (pinned: 4.1.0)"
    body = issue["body"]
    assert upstream.marker(Version("4.2.0")) in body.splitlines()[0]
    assert "4.1.1, 4.2.0" in body and "4.3.0rc1" not in body
    assert "`demucs==4.2.0`" in body and "release" in body and "invoke convert" in body
    assert sum(1 for s in fake.seen if s.method == "POST" and s.path.endswith("/labels")) == 1


def test_a_closed_issue_still_counts_and_pull_requests_do_not(check, fake):
    fake.labels.add("upstream-update")
    fake.index_files.append(sdist("4.2.0"))
    fake.add_issue(upstream.marker(Version("4.2.0")), pull_request=True)
    for n in range(3):  # unrelated issues spread the listing over pages
        fake.add_issue(f"unrelated {n}")
    assert "opened issue #5" in check()
    fake.issues[-1]["state"] = "closed"
    fake.issues[-1]["labels"] = []  # even with its label removed by hand
    assert "already tracked by issue #5 (closed)" in check()
    assert len(fake.issues) == 5


def test_a_newer_version_later_gets_its_own_issue(check, fake):
    fake.index_files.append(sdist("4.2.0"))
    check()
    fake.index_files.append(sdist("4.3.0"))
    assert "opened issue #2" in check()
    markers = [upstream.marker(Version(v)) for v in ("4.2.0", "4.3.0")]
    assert len(fake.issues) == len(markers)
    assert all(m in issue["body"] for m, issue in zip(markers, fake.issues, strict=True))


def test_label_created_concurrently_is_fine(check, fake):
    fake.index_files.append(sdist("4.2.0"))
    fake.faults.append(Fault("POST", "/labels$", status=422, message="already_exists"))
    fake.labels.add("upstream-update")
    fake.faults.append(Fault("GET", "/labels/", status=404, message="Not Found"))
    assert "opened issue #1" in check()


@pytest.mark.parametrize("down", ["503", "connection refused", "html only"])
def test_index_down_is_a_clear_error_and_opens_no_issue(check, fake, down, monkeypatch):
    if down == "503":
        fake.index_files = None
        index = fake.index_url
    elif down == "connection refused":
        index = "http://user:s3cret@127.0.0.1:9/simple"  # discard port: nothing listens
    else:
        index = fake.index_url
        monkeypatch.setattr(upstream, "SIMPLE_JSON", "text/html")
    client = github.Client(
        api_url=fake.api_url, repository=REPOSITORY, token=TOKEN, sleep=lambda s: None
    )
    with pytest.raises(UserError, match="cannot read demucs from the package index") as failure:
        upstream.check(client=client, index=index)
    assert "s3cret" not in str(failure.value)
    assert fake.writes() == [] and fake.issues == []


@pytest.mark.parametrize(
    "server, message",
    [
        (
            lambda: loopback.Same(200, loopback.LOGIN_PAGE, {"Content-Type": "text/html"}),
            "it answered text/html, not JSON (a proxy's login page?)",
        ),
        (lambda: loopback.Same(200, [1, 2]), "JSON of another shape (an array instead of an"),
        (lambda: loopback.Same(200, {"files": [{"yanked": True}]}), "item 0: 'filename' missing"),
        (lambda: loopback.Same(200, {"files": "all"}), "'files': a string instead of an array"),
        (lambda: loopback.Same(redirect=True), "TooManyRedirects"),
        (loopback.Silent, "ReadTimeout"),
    ],
)
def test_an_index_answer_that_is_no_pep_691_page_is_one_error(server, message, check, fake):
    running = server()
    try:
        with pytest.raises(UserError) as failure:
            upstream.released_versions(running.url + "/simple", deadline_s=1.0)
    finally:
        running.close()
    text = str(failure.value)
    assert text.startswith("cannot read demucs from the package index") and message in text
    assert "PEP 691 JSON API" in text and fake.seen == []


def test_github_failure_is_an_error_without_the_token(check, fake):
    fake.index_files.append(sdist("4.2.0"))
    fake.faults.append(
        Fault("POST", "/issues$", status=403, message="Resource not accessible by integration")
    )
    with pytest.raises(github.GitHubError, match="issues: write") as failure:
        check()
    assert TOKEN not in str(failure.value) and fake.issues == []


def test_cli_prints_one_line_and_exits_zero(fake, tmp_path):
    """The invoke task end to end in a subprocess: env-configured client and index."""
    import subprocess

    fake.index_files.append(sdist("4.2.0"))
    env = {
        **os.environ,
        "GITHUB_API_URL": fake.api_url,
        "GITHUB_REPOSITORY": REPOSITORY,
        "GITHUB_TOKEN": TOKEN,
        "PIP_INDEX_URL": fake.index_url,
    }
    root = Path(__file__).resolve().parent.parent

    def check_upstream() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "invoke", "check-upstream"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    for expected in ("opened issue #1", "already tracked by issue #1"):
        done = check_upstream()
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout and len(done.stdout.strip().splitlines()) == 1
        assert TOKEN not in done.stdout + done.stderr
    env.pop("GITHUB_TOKEN")
    done = check_upstream()
    assert done.returncode == 1 and "GITHUB_TOKEN not set" in done.stderr
    assert len(fake.issues) == 1
