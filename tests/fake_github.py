"""A real HTTP server on 127.0.0.1 that behaves like the parts of the GitHub REST API we use.

It keeps the behaviours the release logic must cope with: drafts are invisible to
`releases/tags/{tag}`, `upload_url` lives on another path than the API (as on GitHub Enterprise),
a duplicate asset name gets 422 `already_exists`, a body without Content-Length gets 400, assets
carry `digest`, published releases are immutable, issue listings include pull requests, and
listings are paginated with Link headers, files of any repository are served by the contents
API (base64, as GitHub does, wrapped at 60 characters). Faults are injected per request to test
recovery; the same server also answers as a PEP 691 package index under /simple/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

TOKEN = "ghs_TEST-token-0123456789-do-not-print"
REPOSITORY = "octo/kara-models"
PAGE_SIZE_CAP = 2  # tiny pages so every listing exercises pagination


@dataclass
class Fault:
    """Make the next `times` requests matching `method` and `path` (a regex) misbehave.

    kind: "status" answers `status` with `headers` and does nothing; "drop" closes the connection
    without an answer and does nothing; "partial" (uploads) reads the body, leaves a `starter`
    asset and answers `status`; "lost" does the work, then closes without an answer.
    """

    method: str
    path: str
    kind: str = "status"
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "Server Error"
    times: int = 1


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


class FakeGitHub:
    def __init__(self, *, digests: bool = True, immutable: bool = True) -> None:
        self.digests = digests
        self.immutable = immutable
        self.releases: dict[int, dict] = {}
        self.assets: dict[int, dict] = {}
        self.blobs: dict[int, bytes] = {}
        self.labels: set[str] = set()
        self.issues: list[dict] = []
        self.index_files: list[dict] | None = []
        # (owner/name, path, ref) -> bytes, for GET /repos/{owner}/{name}/contents/{path}?ref=
        self.contents: dict[tuple[str, str, str], bytes] = {}
        # tag -> (sha of an annotated tag object or None for a lightweight tag, commit sha)
        self.tags: dict[str, tuple[str | None, str]] = {}
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self._next_id = 100
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.fake = self
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.api_url = f"{self.base}/api/v3"
        self.index_url = f"{self.base}/simple"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- helpers for tests -------------------------------------------------------------------

    def writes(self) -> list[Seen]:
        return [s for s in self.seen if s.method in ("POST", "PATCH", "PUT", "DELETE")]

    def releases_for(self, tag: str) -> list[dict]:
        return [r for r in self.releases.values() if r["tag_name"] == tag]

    def assets_of(self, release: dict) -> list[dict]:
        return [a for a in self.assets.values() if a["release_id"] == release["id"]]

    def add_release(
        self, tag: str, *, draft: bool, files: dict[str, bytes], prerelease: bool = False
    ) -> dict:
        release = self._new_release(
            {"tag_name": tag, "draft": draft, "prerelease": prerelease, "name": tag, "body": ""}
        )
        for name, data in files.items():
            self._new_asset(release, name, data, "uploaded", "application/octet-stream")
        if not draft:  # publishing a release creates its tag (here: annotated)
            digest = hashlib.sha1(tag.encode()).hexdigest()
            self.tags.setdefault(tag, (digest[::-1], digest))
        return release

    def add_issue(self, body: str, *, state: str = "open", pull_request: bool = False) -> dict:
        number = len(self.issues) + 1
        issue = {
            "number": number,
            "title": f"#{number}",
            "body": body,
            "state": state,
            "html_url": f"{self.base}/issues/{number}",
            "labels": [],
        }
        if pull_request:
            issue["pull_request"] = {"url": f"{self.base}/pulls/{number}"}
        self.issues.append(issue)
        return issue

    # -- request handling --------------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and re.search(fault.path, path) and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    def handle(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        path, query = url.path, parse_qs(url.query)
        self.seen.append(Seen(h.command, path, query, dict(h.headers.items())))
        body = b""
        if h.command in ("POST", "PATCH", "PUT"):
            if "Content-Length" not in h.headers:
                return h.reply(400, {"message": "chunked bodies are not supported"})
            body = h.rfile.read(int(h.headers["Content-Length"]))
        if path.startswith("/simple/"):
            return self._index(h, path)
        if path.startswith("/download/"):
            return h.reply_bytes(self.blobs[int(path.rsplit("/", 1)[1])])
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return h.reply(401, {"message": "Bad credentials"})
        fault = self._take_fault(h.command, path)
        if fault is not None and fault.kind == "drop":
            return h.drop()
        if fault is not None and fault.kind == "status":
            return h.reply(fault.status, {"message": fault.message}, fault.headers)
        if fault is not None and fault.kind == "partial":
            release = self.releases[int(path.split("/")[-2])]
            self._new_asset(
                release,
                query["name"][0],
                body[: len(body) // 2],
                "starter",
                h.headers["Content-Type"],
            )
            return h.reply(fault.status, {"message": fault.message}, fault.headers)
        status, payload, headers = self._route(h.command, path, query, body, h.headers)
        if fault is not None and fault.kind == "lost":
            return h.drop()
        h.reply(status, payload, headers)

    def _route(self, method, path, query, body, headers):
        with self._lock:
            api = f"/api/v3/repos/{REPOSITORY}"
            uploads = f"/api/uploads/repos/{REPOSITORY}/releases/"
            data = json.loads(body) if body and not path.startswith(uploads) else {}
            if path.startswith(uploads) and method == "POST":
                return self._upload(int(path[len(uploads) :].split("/")[0]), query, body, headers)
            if m := re.fullmatch(r"/api/v3/repos/([^/]+/[^/]+)/contents/(.+)", path):
                return self._content(m[1], m[2], query.get("ref", ["main"])[0])
            if not path.startswith(api):
                return 404, {"message": "Not Found"}, {}
            rest = path[len(api) :]
            if m := re.fullmatch(r"/git/ref/tags/(.+)", rest):
                if m[1] not in self.tags:
                    return 404, {"message": "Not Found"}, {}
                annotated, commit = self.tags[m[1]]
                kind, sha = ("tag", annotated) if annotated else ("commit", commit)
                return 200, {"ref": f"refs/tags/{m[1]}", "object": {"type": kind, "sha": sha}}, {}
            if m := re.fullmatch(r"/git/tags/([0-9a-f]{40})", rest):
                found = [c for a, c in self.tags.values() if a == m[1]]
                if not found:
                    return 404, {"message": "Not Found"}, {}
                return 200, {"sha": m[1], "object": {"type": "commit", "sha": found[0]}}, {}
            if rest == "/releases" and method == "GET":
                return self._page(
                    query, sorted(self.releases.values(), key=lambda r: -r["id"]), path
                )
            if rest == "/releases" and method == "POST":
                if any(not r["draft"] for r in self.releases_for(data["tag_name"])):
                    return (
                        422,
                        {
                            "message": "Validation Failed",
                            "errors": [{"code": "already_exists", "field": "tag_name"}],
                        },
                        {},
                    )
                return 201, self._new_release(data), {}
            if m := re.fullmatch(r"/releases/tags/(.+)", rest):
                found = [r for r in self.releases_for(m[1]) if not r["draft"]]
                return (200, found[0], {}) if found else (404, {"message": "Not Found"}, {})
            if (m := re.fullmatch(r"/releases/(\d+)", rest)) and method == "PATCH":
                release = self.releases[int(m[1])]
                release.update(
                    {
                        k: v
                        for k, v in data.items()
                        if k in ("name", "body", "prerelease", "draft", "tag_name")
                    }
                )
                if not release["draft"]:
                    release["html_url"] = (
                        f"{self.base}/{REPOSITORY}/releases/tag/" + release["tag_name"]
                    )
                return 200, self._release_json(release), {}
            if (m := re.fullmatch(r"/releases/(\d+)/assets", rest)) and method == "GET":
                release = self.releases[int(m[1])]
                return self._page(query, self.assets_of(release), path)
            if m := re.fullmatch(r"/releases/assets/(\d+)", rest):
                asset = self.assets.get(int(m[1]))
                if asset is None:
                    return 404, {"message": "Not Found"}, {}
                if method == "DELETE":
                    if self._locked(self.releases[asset["release_id"]]):
                        return 422, {"message": "Cannot modify an immutable release"}, {}
                    del self.assets[asset["id"]]
                    return 204, None, {}
                if headers.get("Accept") == "application/octet-stream":
                    return 302, None, {"Location": f"{self.base}/download/{asset['id']}"}
                return 200, asset, {}
            if m := re.fullmatch(r"/labels/(.+)", rest):
                return (
                    (200, {"name": m[1]}, {})
                    if m[1] in self.labels
                    else (404, {"message": "Not Found"}, {})
                )
            if rest == "/labels" and method == "POST":
                if data["name"] in self.labels:
                    return (
                        422,
                        {"message": "Validation Failed", "errors": [{"code": "already_exists"}]},
                        {},
                    )
                self.labels.add(data["name"])
                return 201, {"name": data["name"]}, {}
            if rest == "/issues" and method == "GET":
                items = list(reversed(self.issues))
                if query.get("state", ["open"])[0] != "all":
                    items = [i for i in items if i["state"] == query.get("state", ["open"])[0]]
                return self._page(query, items, path)
            if rest == "/issues" and method == "POST":
                if any(label not in self.labels for label in data.get("labels", [])):
                    return 422, {"message": "Validation Failed: label does not exist"}, {}
                issue = self.add_issue(data["body"])
                issue.update(title=data["title"], labels=data.get("labels", []))
                return 201, issue, {}
            return 404, {"message": "Not Found"}, {}

    def _content(self, repo: str, path: str, ref: str):
        data = self.contents.get((repo, path, ref))
        if data is None:
            return 404, {"message": "Not Found"}, {}
        encoded = base64.b64encode(data).decode()
        wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
        return (
            200,
            {
                "type": "file",
                "encoding": "base64",
                "name": path.rsplit("/", 1)[-1],
                "path": path,
                "size": len(data),
                "content": wrapped + "\n",
            },
            {},
        )

    def _page(self, query, items, path):
        per_page = min(int(query.get("per_page", ["30"])[0]), PAGE_SIZE_CAP)
        page = int(query.get("page", ["1"])[0])
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(items):
            headers["Link"] = f'<{self.base}{path}?per_page={per_page}&page={page + 1}>; rel="next"'
        if path.endswith("/releases"):
            chunk = [self._release_json(r) for r in chunk]
        return 200, chunk, headers

    def _locked(self, release: dict) -> bool:
        return self.immutable and not release["draft"]

    def _new_release(self, data: dict) -> dict:
        self._next_id += 1
        release = {
            "id": self._next_id,
            "tag_name": data["tag_name"],
            "name": data.get("name"),
            "body": data.get("body"),
            "draft": bool(data.get("draft")),
            "prerelease": bool(data.get("prerelease")),
            "html_url": f"{self.base}/{REPOSITORY}/releases/tag/untagged-{self._next_id}",
            "upload_url": f"{self.base}/api/uploads/repos/{REPOSITORY}/releases/"
            f"{self._next_id}/assets{{?name,label}}",
        }
        self.releases[release["id"]] = release
        return self._release_json(release)

    def _release_json(self, release: dict) -> dict:
        return {**release, "assets": self.assets_of(release)}

    def _upload(self, release_id, query, body, headers):
        release = self.releases[release_id]
        name = query["name"][0]
        if self._locked(release):
            return 422, {"message": "Cannot upload assets to an immutable release"}, {}
        if "Content-Type" not in headers:
            return 400, {"message": "Content-Type required"}, {}
        if any(a["name"] == name for a in self.assets_of(release)):
            return (
                422,
                {
                    "message": "Validation Failed",
                    "errors": [
                        {"resource": "ReleaseAsset", "code": "already_exists", "field": "name"}
                    ],
                },
                {},
            )
        return 201, self._new_asset(release, name, body, "uploaded", headers["Content-Type"]), {}

    def _new_asset(self, release, name, data, state, content_type) -> dict:
        self._next_id += 1
        asset = {
            "id": self._next_id,
            "release_id": release["id"],
            "name": name,
            "state": state,
            "size": len(data),
            "content_type": content_type,
            "url": f"{self.api_url}/repos/{REPOSITORY}/releases/assets/{self._next_id}",
            "browser_download_url": f"{self.base}/download/{self._next_id}",
        }
        if self.digests:
            asset["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
        self.assets[asset["id"]] = asset
        self.blobs[asset["id"]] = data
        return asset

    def _index(self, h: _Handler, path: str) -> None:
        if self.index_files is None:
            return h.reply(503, {"message": "index down"})
        if h.headers.get("Accept") != "application/vnd.pypi.simple.v1+json":
            return h.reply_bytes(b"<html>not json</html>", "text/html")
        versions = sorted(
            {f["filename"].split("-")[1].removesuffix(".tar.gz") for f in self.index_files}
        )
        h.reply(
            200,
            {
                "meta": {"api-version": "1.1"},
                "name": path.split("/")[2],
                "versions": versions,
                "files": self.index_files,
            },
            {"Content-Type": "application/vnd.pypi.simple.v1+json"},
        )


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.fake.handle(self)

    do_POST = do_PATCH = do_DELETE = do_PUT = do_GET

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def reply(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        sent = {"Content-Type": "application/json", **(headers or {})}
        for key, value in sent.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply_bytes(self, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


# Model code and unpicklers: what publishing and pinning must never import.
HEAVY_MODULES = ("torch", "demucs", "torchaudio", "julius", "omegaconf", "soundfile", "soxr")
_BLOCKING_CLI = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"blocked import of {name}: this task must not need it")

sys.meta_path.insert(0, Blocker())
from invoke.main import program
program.run(["invoke", *sys.argv[1:]])
"""


def run_cli(fake: FakeGitHub, *args: str, cwd, **env: str) -> subprocess.CompletedProcess:
    """`invoke ARGS` as a user runs it, in a fresh interpreter that refuses to import any of
    HEAVY_MODULES, against `fake` through the variables GitHub Actions sets."""
    environ = {
        **os.environ,
        "GITHUB_API_URL": fake.api_url,
        "GITHUB_REPOSITORY": REPOSITORY,
        "GITHUB_TOKEN": TOKEN,
        "GITHUB_SERVER_URL": "https://github.com",
        **env,
    }
    code = f"HEAVY = {set(HEAVY_MODULES)!r}\n" + _BLOCKING_CLI
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
