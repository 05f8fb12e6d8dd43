"""A small GitHub REST client on `requests`, shared by `invoke release` and `invoke check-upstream`.

It exists so that both tasks get the same behaviour without a heavy SDK: the documented headers,
timeouts, retries with backoff on connection errors and 5xx, rate limits honoured with a bounded
total wait, uploads streamed from disk to the release's own `upload_url`, and a token that never
reaches output, logs or exceptions (it lives only in the Authorization header).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import requests
from tqdm import tqdm

from converter import __version__
from converter.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
USER_AGENT = f"openkara-demucs-onnx/{__version__}"

# A POST that failed with a 5xx or a dropped connection may still have taken effect on the
# server (a release or issue created, a starter asset left), so only requests that are safe to
# repeat are retried blindly; callers of POST reconcile state instead.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"})


class GitHubError(UserError):
    """A GitHub API call failed for good; `status` is None when no HTTP response came back."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """True for failures a later attempt may not see again (server error, lost connection)."""
        return self.status is None or self.status >= 500


@dataclass
class Client:
    """Authenticated access to one repository's REST API.

    `sleep` and the retry/wait bounds are fields so tests can run the real retry logic without
    real waiting.
    """

    api_url: str
    repository: str
    token: str = field(repr=False)
    timeout: tuple[float, float] = (10.0, 120.0)
    retries: int = 5
    backoff_s: float = 2.0
    max_wait_s: float = 900.0
    sleep: Callable[[float], None] = time.sleep
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    @property
    def repo_path(self) -> str:
        return f"/repos/{self.repository}"

    def request(
        self,
        method: str,
        url: str,
        *,
        expect: Collection[int] = (),
        retry: bool | None = None,
        headers: dict[str, str] | None = None,
        **kwargs,
    ) -> requests.Response:
        """Send one API call; return its response if 2xx/3xx or in `expect`, else GitHubError.

        `url` is a path under the API base or an absolute URL (upload_url, pagination links).
        Rate-limited responses are always retried (GitHub did not act on them); connection errors
        and 5xx only when `retry` (default: the method is idempotent). All waits together stay
        under `max_wait_s`.
        """
        full = url if "://" in url else self.api_url + url
        retry = method in IDEMPOTENT if retry is None else retry
        sent = {**self._headers(), **(headers or {})}
        body = kwargs.get("data")
        waited = 0.0
        for attempt in range(self.retries + 1):
            if attempt and hasattr(body, "seek"):
                body.seek(0)
            try:
                response = self.session.request(
                    method, full, headers=sent, timeout=self.timeout, **kwargs
                )
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                failure = GitHubError(
                    f"GitHub API {method} {_short(full)}: no response ({type(exc).__name__}); "
                    "check the network and GITHUB_API_URL, then run again"
                )
                delay = self._backoff(attempt) if retry else None
            else:
                if response.status_code < 400 or response.status_code in expect:
                    return response
                failure = self._error(method, full, response)
                delay = _rate_limit_delay(response)
                if delay is None and response.status_code >= 500 and retry:
                    delay = self._backoff(attempt)
            if delay is None or attempt == self.retries:
                raise failure
            if waited + delay > self.max_wait_s:
                raise GitHubError(
                    f"{failure} (gave up: waiting {delay:.0f} s more would exceed the "
                    f"{self.max_wait_s:.0f} s budget for one call)",
                    failure.status,
                )
            log.warning("%s; retrying in %.1f s (attempt %d)", failure, delay, attempt + 2)
            self.sleep(delay)
            waited += delay
        raise AssertionError("unreachable: the loop returns or raises")

    def paginate(self, url: str, params: dict[str, str | int] | None = None) -> Iterator[dict]:
        """Yield the items of every page, following the Link `next` URL GitHub sends."""
        page_params = {"per_page": 100, **(params or {})}
        next_url: str | None = url
        while next_url:
            response = self.request("GET", next_url, params=page_params)
            yield from response.json()
            next_url = response.links.get("next", {}).get("url")
            page_params = None  # the next link carries the query already

    def upload_asset(self, release: dict, path: Path, name: str, content_type: str) -> dict:
        """Stream `path` to the release's `upload_url` as asset `name`; return the asset JSON.

        Always the server-given upload_url: on GitHub Enterprise uploads live on another path
        than the API. Content-Length is set because GitHub answers a chunked body with 400. Not
        retried here: a failed upload can leave a `starter` asset that must be deleted first,
        which the caller does.
        """
        url = release["upload_url"].split("{", 1)[0]
        size = path.stat().st_size
        with (
            path.open("rb") as file,
            tqdm(
                total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=name, mininterval=1.0
            ) as bar,
        ):
            response = self.request(
                "POST",
                url,
                params={"name": name},
                data=_ProgressReader(file, bar, size),
                headers={"Content-Type": content_type, "Content-Length": str(size)},
                retry=False,
            )
        return response.json()

    def download_asset(self, asset: dict, chunk: Callable[[bytes], None]) -> None:
        """Stream an asset's bytes into `chunk` (GitHub redirects to storage; requests drops
        the Authorization header when the redirect leaves the API host)."""
        response = self.request(
            "GET", asset["url"], headers={"Accept": "application/octet-stream"}, stream=True
        )
        with response:
            for block in response.iter_content(1 << 20):
                chunk(block)

    def _headers(self) -> dict[str, str]:
        return {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {self.token}",
            "User-Agent": USER_AGENT,
            "X-GitHub-Api-Version": API_VERSION,
        }

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, 60.0)

    def _error(self, method: str, url: str, response: requests.Response) -> GitHubError:
        """A one-line error naming the call, GitHub's message and the likely fix."""
        try:
            message = str(response.json().get("message", ""))
        except ValueError:
            message = response.text[:200]
        status = response.status_code
        hint = {
            401: "GITHUB_TOKEN is invalid or expired",
            403: "the token lacks permission (release needs contents: write, "
            "check-upstream needs issues: write)",
            404: "check GITHUB_REPOSITORY and that the token can see it",
        }.get(status, "")
        text = f"GitHub API {method} {_short(url)} failed: {status} {message}".rstrip()
        if hint:
            text += f" ({hint})"
        # GitHub never echoes the token, but a proxy or a test server might.
        return GitHubError(text.replace(self.token, "***"), status)


class _ProgressReader:
    """A read-only file view that advances a progress bar; its length gives Content-Length."""

    def __init__(self, file: BinaryIO, bar: tqdm, size: int) -> None:
        self._file, self._bar, self._size = file, bar, size

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        block = self._file.read(size)
        self._bar.update(len(block))
        return block

    def seek(self, offset: int) -> None:
        self._file.seek(offset)
        self._bar.reset()


def _rate_limit_delay(response: requests.Response) -> float | None:
    """Seconds to wait before retrying a rate-limited response, or None if it is not one.

    GitHub's documented order: honour `retry-after`; else if `x-ratelimit-remaining` is 0 wait
    for `x-ratelimit-reset`; else a 403/429 that mentions a rate limit is a secondary limit:
    wait at least a minute. A plain 403 (no permission) is not retried.
    """
    if response.status_code not in (403, 429):
        return None
    headers = response.headers
    if "retry-after" in headers:
        try:
            return max(float(headers["retry-after"]), 1.0)
        except ValueError:
            return 60.0
    if headers.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in headers:
        return max(float(headers["x-ratelimit-reset"]) - time.time(), 0.0) + 1.0
    if response.status_code == 429 or "rate limit" in response.text.lower():
        return 60.0
    return None


def redact(url: str) -> str:
    """The URL without credentials, for messages (mirrors and proxies embed user:token@host)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"***@{parts.hostname}{port}")
    return urlunsplit(parts)


def _short(url: str) -> str:
    """The URL without its query or credentials, for messages."""
    return redact(url.split("?", 1)[0])


def from_env(environ: dict[str, str] | None = None) -> Client:
    """Build a client from the variables GitHub Actions provides; one clear error if missing.

    Checked before any work so a release does not convert for an hour and then fail on a
    missing token.
    """
    env = os.environ if environ is None else environ
    missing = [name for name in ("GITHUB_TOKEN", "GITHUB_REPOSITORY") if not env.get(name)]
    if missing:
        raise UserError(
            f"{' and '.join(missing)} not set: export GITHUB_TOKEN (a token with access to the "
            "repository) and GITHUB_REPOSITORY (owner/name); in GitHub Actions pass "
            "`GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}` through `env:`"
        )
    repository = env["GITHUB_REPOSITORY"]
    if repository.count("/") != 1 or not all(repository.split("/")):
        raise UserError(f"GITHUB_REPOSITORY must be owner/name, got {repository!r}")
    api_url = (env.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
    if redact(api_url) != api_url:
        raise UserError(
            f"GITHUB_API_URL carries credentials ({redact(api_url)}): they would replace the "
            "token; set GITHUB_API_URL without user:password@ and the token in GITHUB_TOKEN"
        )
    return Client(api_url=api_url, repository=repository, token=env["GITHUB_TOKEN"])
