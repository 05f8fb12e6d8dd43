"""`invoke check-upstream`: open one issue when the package index has a newer demucs than we pin.

The pin lives in one place, `requirements/constraints.txt`, which the conversion installs from,
so the comparison is always against what the shipped files were actually built with. The index is
the one pip is configured with (mirrors, air-gapped proxies), asked through the PEP 691 JSON API.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import requests
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from converter.errors import UserError
from converter.facts import REPO_ROOT
from converter.shapes import shape_problem
from converter.ship import github
from converter.ship.github import redact, redact_text

log = logging.getLogger(__name__)

PACKAGE = "demucs"
CONSTRAINTS = REPO_ROOT / "requirements" / "constraints.txt"
LABEL = "upstream-update"
LABEL_COLOR = "fbca04"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
INDEX_TIMEOUT_S = (10.0, 60.0)
PIP_CONFIG_TIMEOUT_S = 60
# What `released_versions` reads of a PEP 691 project page.
INDEX_SHAPE = {"files": [{"filename": str}]}


def marker(version: Version) -> str:
    """The hidden line that ties an issue to one upstream version, whatever its title became."""
    return f"<!-- openkara-upstream: {PACKAGE}=={version} -->"


def pinned_version(constraints: Path = CONSTRAINTS) -> Version:
    pattern = re.compile(rf"^{PACKAGE}==(\S+)\s*$", re.IGNORECASE)
    for line in constraints.read_text(encoding="utf-8").splitlines():
        if match := pattern.match(line.strip()):
            return Version(match[1])
    raise UserError(
        f"{constraints} has no `{PACKAGE}==X.Y.Z` line; add the pin the conversion uses"
    )


def index_url(environ: dict[str, str] | None = None) -> str:
    """The index pip would use: PIP_INDEX_URL, else `pip config`, else pip's built-in default."""
    env = os.environ if environ is None else environ
    if env.get("PIP_INDEX_URL"):
        return env["PIP_INDEX_URL"]
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=False,
            timeout=PIP_CONFIG_TIMEOUT_S,
            env={**env, "PIP_NO_INPUT": "1"},
        ).stdout
    except subprocess.TimeoutExpired:
        raise UserError(
            f"`pip config list` gave no answer in {PIP_CONFIG_TIMEOUT_S} s; set PIP_INDEX_URL to "
            "the package index and run again"
        ) from None
    config = dict(re.findall(r"^([\w:.-]+)='(.*)'$", listing, re.MULTILINE))
    # `pip install` reads its own section before [global].
    for key in ("install.index-url", "global.index-url"):
        if config.get(key):
            return config[key]
    # here: pip's private API, read only when pip's configuration names no index
    from pip._internal.models.index import PyPI

    return PyPI.simple_url


def released_versions(
    index: str, session: requests.Session | None = None, deadline_s: float | None = None
) -> list[Version]:
    """Final releases of `demucs` on `index` that have at least one file not yanked.

    The answer must be the PEP 691 JSON API within `deadline_s` in all (default: the one
    GitHub calls get); anything else, a proxy's login page included, is one UserError.
    """
    url = f"{index.rstrip('/')}/{PACKAGE}/"
    fix = (
        "it must serve the PEP 691 JSON API; check PIP_INDEX_URL / `pip config list` and try again"
    )
    try:
        response = github.send(
            session or requests.Session(),
            "GET",
            url,
            headers={"Accept": SIMPLE_JSON},
            timeout=INDEX_TIMEOUT_S,
            left=github.deadline_s() if deadline_s is None else deadline_s,
        )
        response.raise_for_status()
    except (requests.RequestException, ValueError) as exc:
        raise UserError(
            f"cannot read {PACKAGE} from the package index {redact(url)} "
            f"({type(exc).__name__}: {redact_text(' '.join(str(exc).split()))[:300]}); {fix}"
        ) from None
    try:
        project = response.json()
    except ValueError:
        kind = response.headers.get("Content-Type", "no Content-Type").split(";")[0]
        raise UserError(
            f"cannot read {PACKAGE} from the package index {redact(url)}: it answered {kind}, "
            f"not JSON (a proxy's login page?); {fix}"
        ) from None
    problem = shape_problem(project, INDEX_SHAPE)
    if problem:
        raise UserError(
            f"cannot read {PACKAGE} from the package index {redact(url)}: it answered JSON of "
            f"another shape ({problem}); {fix}"
        )
    installable: set[Version] = set()
    for file in project["files"]:
        if file.get("yanked"):
            continue
        version = _file_version(file["filename"])
        if version is not None and not (version.is_prerelease or version.is_devrelease):
            installable.add(version)
    return sorted(installable)


def _file_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        log.info("skipping %s: not a wheel or sdist name", filename)
        return None


def issue_body(pinned: Version, newer: list[Version]) -> str:
    latest = newer[-1]
    listed = ", ".join(str(v) for v in newer)
    return "\n".join(
        [
            marker(latest),
            f"The package index has {PACKAGE} {listed}; the conversion pins {PACKAGE}=={pinned} "
            "(`requirements/constraints.txt`).",
            "",
            "What may have changed: the pretrained model list or signatures, the HTDemucs "
            "architecture or its STFT framing, `apply_model`, and the hub download paths. Read "
            f"{PACKAGE}'s changelog for {listed} before converting.",
            "",
            "To do:",
            f"1. Bump the pin to `{PACKAGE}=={latest}` in `requirements/constraints.txt` and "
            "reinstall (`pip install -c requirements/constraints.txt -r requirements/dev.in`).",
            "2. Run the tests, then `invoke convert --model NAME` for htdemucs, htdemucs_ft and "
            "htdemucs_6s.",
            "3. Compare outputs with the current release (`invoke validate`, the contract "
            "sessions; `invoke fingerprint` shows whether the file changed at all).",
            "4. If the files changed, release them with new `model-*` tags and update OpenKara's "
            "pins (docs/releasing.md); if not, just land the pin bump.",
            "",
            "Opened by `invoke check-upstream` (weekly workflow); it opens one issue per version.",
        ]
    )


def ensure_label(client: github.Client) -> None:
    response = client.request("GET", f"{client.repo_path}/labels/{LABEL}", expect=(404,))
    if response.status_code == 404:
        log.info("creating label %s", LABEL)
        client.request(
            "POST",
            f"{client.repo_path}/labels",
            json={"name": LABEL, "color": LABEL_COLOR, "description": "A newer demucs exists"},
            expect=(422,),  # created meanwhile by a concurrent run
        )


def find_issue(client: github.Client, version: Version) -> dict | None:
    """An issue (open or closed, pull requests excluded) whose body carries the version marker.

    All issues are scanned rather than those with the label, so removing the label by hand does
    not make the next run open a duplicate.
    """
    tag = marker(version)
    for item in client.paginate(f"{client.repo_path}/issues", {"state": "all"}):
        if "pull_request" not in item and tag in (item.get("body") or ""):
            return item
    return None


def check(
    *,
    client: github.Client | None = None,
    index: str | None = None,
    constraints: Path = CONSTRAINTS,
) -> str:
    """Compare the pinned demucs with the index; open an issue if needed; return one line."""
    client = client or github.from_env()
    pinned = pinned_version(constraints)
    index = index or index_url()
    newer = [v for v in released_versions(index) if v > pinned]
    if not newer:
        log.info("no %s release newer than %s on %s", PACKAGE, pinned, redact(index))
        return f"{PACKAGE} {pinned} is current on {redact(index)}; nothing to do"
    latest = newer[-1]
    ensure_label(client)
    existing = find_issue(client, latest)
    if existing is not None:
        log.info("issue #%s already tracks %s %s", existing["number"], PACKAGE, latest)
        return (
            f"{PACKAGE} {latest} is newer than the pinned {pinned}; already tracked by issue "
            f"#{existing['number']} ({existing.get('state')})"
        )
    log.info("opening an issue for %s %s", PACKAGE, latest)
    issue = client.request(
        "POST",
        f"{client.repo_path}/issues",
        json={
            "title": f"Upstream {PACKAGE} {latest} released (pinned: {pinned})",
            "body": issue_body(pinned, newer),
            "labels": [LABEL],
        },
    ).json()
    return (
        f"{PACKAGE} {latest} is newer than the pinned {pinned}; opened issue "
        f"#{issue['number']} {issue.get('html_url', '')}".rstrip()
    )
