"""A small GitHub REST client on `requests`, shared by `invoke release` and `invoke check-upstream`.

It exists so that both tasks get the same behaviour without a heavy SDK: the documented headers,
retries with backoff on connection errors and 5xx, rate limits honoured, one deadline per call
that covers every attempt and every wait (a server that accepts connections and never answers
costs at most that), every answer checked to be JSON of the shape the caller reads (a proxy's
login page or a wrong GITHUB_API_URL is one clear error, not a KeyError), uploads streamed from
disk to the release's own `upload_url`, and a token that never reaches output, logs or
exceptions (it lives only in the Authorization header; every message is redacted).
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from tqdm import tqdm

from converter import __version__
from converter.errors import UserError
from converter.shapes import shape_problem

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
DEFAULT_SERVER_URL = "https://github.com"
API_VERSION = "2022-11-28"
USER_AGENT = f"openkara-demucs-onnx/{__version__}"

# A POST that failed with a 5xx or a dropped connection may still have taken effect on the
# server (a release or issue created, a starter asset left), so only requests that are safe to
# repeat are retried blindly; callers of POST reconcile state instead.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"})

# One call, every attempt and every wait included, ends within this many seconds, so a silent
# server makes a task give up in under three minutes. The variable overrides it (slow proxies,
# tests); uploads are bounded by their progress instead (each send and read has a timeout).
DEADLINE_ENV = "OPENKARA_API_DEADLINE_S"
DEFAULT_DEADLINE_S = 150.0
CONNECT_READ_TIMEOUT_S = (10.0, 60.0)
# How the answers we read must look: field -> type; `?` marks a field that may be absent or null.
RELEASE = {"id": int, "tag_name": str, "draft": bool, "upload_url": str, "prerelease?": bool}
ASSET = {"id": int, "name": str, "url": str, "state?": str, "digest?": str, "size?": int}
ISSUE = {"number": int, "body?": str, "state?": str, "html_url?": str}
# (method, path pattern, shape): a list means a JSON array of such objects.
SHAPES = (
    ("GET", r"/releases$", [RELEASE]),
    ("POST", r"/releases$", RELEASE),
    ("PATCH", r"/releases/\d+$", RELEASE),
    ("GET", r"/releases/\d+/assets$", [ASSET]),
    ("POST", r"/releases/\d+/assets$", ASSET),
    ("GET", r"/releases/assets/\d+$", ASSET),
    ("GET", r"/issues$", [ISSUE]),
    ("POST", r"/issues$", ISSUE),
)
API_URL_HINT = (
    "GITHUB_API_URL must be the REST API: https://api.github.com, or https://HOST/api/v3 on "
    "GitHub Enterprise; a proxy that answers with a login page must let the call through"
)


class GitHubError(UserError):
    """A GitHub API call failed for good; `status` is None when no HTTP response came back."""

    def __init__(
        self, message: str, status: int | None = None, *, transient: bool | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self._transient = transient

    @property
    def transient(self) -> bool:
        """True for failures a later attempt may not see again (server error, lost connection)."""
        if self._transient is not None:
            return self._transient
        return self.status is None or self.status >= 500


@dataclass
class Client:
    """Authenticated access to one repository's REST API.

    `sleep`, `clock` and the retry and deadline bounds are fields so tests can run the real
    retry logic without real waiting.
    """

    api_url: str
    repository: str
    token: str = field(repr=False)
    timeout: tuple[float, float] = CONNECT_READ_TIMEOUT_S
    retries: int = 5
    backoff_s: float = 2.0
    deadline_s: float = DEFAULT_DEADLINE_S
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self.token = clean_token(self.token)

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
        and 5xx only when `retry` (default: the method is idempotent). Attempts and waits
        together end within `deadline_s`; an upload's body is bounded by its progress instead.
        Unless streamed, the answer must be JSON of the shape SHAPES gives for the call.
        """
        full = url if "://" in url else self.api_url + url
        retry = method in IDEMPOTENT if retry is None else retry
        sent = {**self._headers(), **(headers or {})}
        body = kwargs.get("data")
        upload = hasattr(body, "read")
        spent = 0.0  # the attempts' time plus the waits between them
        for attempt in range(self.retries + 1):
            if attempt and hasattr(body, "seek"):
                body.seek(0)
            started = self.clock()
            try:
                response = send(
                    self.session,
                    method,
                    full,
                    timeout=self.timeout,
                    left=None if upload else self.deadline_s - spent,
                    headers=sent,
                    **kwargs,
                )
            except TRANSIENT as exc:
                failure = GitHubError(
                    f"GitHub API {method} {_short(full)}: {self._redact(_no_answer(exc))}; "
                    "check the network and GITHUB_API_URL, then run again"
                )
                delay = self._backoff(attempt) if retry else None
            except Exception as exc:  # a bad URL, header or redirect loop: trying again won't help
                raise GitHubError(
                    f"GitHub API {method} {_short(full)}: {type(exc).__name__}: "
                    f"{self._redact(_one_line(exc))}; {API_URL_HINT}",
                    transient=False,
                ) from None
            else:
                if response.status_code < 400 or response.status_code in expect:
                    if not kwargs.get("stream"):  # else the caller reads the bytes
                        self._check_answer(method, full, response)
                    return response
                failure = self._error(method, full, response)
                delay = _rate_limit_delay(response)
                if delay is None and response.status_code >= 500 and retry:
                    delay = self._backoff(attempt)
            finally:
                spent += self.clock() - started
            if delay is None or attempt == self.retries:
                raise failure
            if spent + delay >= self.deadline_s:
                raise GitHubError(
                    f"{failure} (gave up after {spent:.0f} s: waiting {delay:.0f} s more would "
                    f"pass the {self.deadline_s:.0f} s one call may take; run again later, or "
                    f"raise {DEADLINE_ENV})",
                    failure.status,
                )
            log.warning("%s; retrying in %.1f s (attempt %d)", failure, delay, attempt + 2)
            self.sleep(delay)
            spent += delay
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
            try:
                for block in response.iter_content(1 << 20):
                    chunk(block)
            except requests.RequestException as exc:
                raise GitHubError(
                    f"downloading {asset['name']} from {_short(response.url)}: "
                    f"{self._redact(_no_answer(exc))}; run again"
                ) from None

    def _headers(self) -> dict[str, str]:
        return {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {self.token}",
            "User-Agent": USER_AGENT,
            "X-GitHub-Api-Version": API_VERSION,
        }

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, 60.0)

    def _redact(self, text: str) -> str:
        """`text` without the token or credentials in URLs (a proxy or test server may echo)."""
        return redact_text(text.replace(self.token, "***"))

    def _check_answer(self, method: str, url: str, response: requests.Response) -> None:
        """Refuse an answer the caller could not read: not JSON, or JSON of another shape."""
        if not response.content:
            return  # 204 No Content, an empty 404
        path = urlsplit(url).path
        try:
            value = response.json()
        except ValueError:
            raise GitHubError(
                f"GitHub API {method} {_short(url)} answered {response.status_code} with "
                f"{_what(response)}, not JSON; {API_URL_HINT}",
                response.status_code,
                transient=False,
            ) from None
        for verb, pattern, shape in SHAPES:
            if verb == method and re.search(pattern, path):
                problem = shape_problem(value, shape)
                if problem:
                    raise GitHubError(
                        f"GitHub API {method} {_short(url)} answered JSON of another shape "
                        f"({self._redact(problem)}); {API_URL_HINT}",
                        response.status_code,
                        transient=False,
                    )

    def _error(self, method: str, url: str, response: requests.Response) -> GitHubError:
        """A one-line error naming the call, GitHub's message and the likely fix."""
        try:
            answer = response.json()
        except ValueError:
            answer = None
        status = response.status_code
        if isinstance(answer, dict):
            message = " ".join(str(answer.get("message", "")).split())[:300]
        else:
            message = f"({_what(response)}, not GitHub's JSON)"
        hint = {
            401: "GITHUB_TOKEN is invalid or expired",
            403: "the token lacks permission (release needs contents: write, "
            "check-upstream needs issues: write)",
            404: "check GITHUB_REPOSITORY and that the token can see it",
        }.get(status, "")
        if answer is None and status < 500:
            hint = API_URL_HINT
        text = f"GitHub API {method} {_short(url)} failed: {status} {message}".rstrip()
        if hint:
            text += f" ({hint})"
        return GitHubError(self._redact(text), status)


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


TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def send(
    session: requests.Session,
    method: str,
    url: str,
    *,
    timeout: tuple[float, float],
    left: float | None = None,
    stream: bool = False,
    **kwargs,
) -> requests.Response:
    """One HTTP exchange: every connect, send and read waits at most `timeout`.

    With `left`, the whole exchange (connect, headers, redirects and, unless `stream`, the body)
    also ends within about `left` seconds: a server that trickles or never answers cannot hold
    it longer, which per-read timeouts alone allow.
    """
    if left is None:
        return session.request(method, url, timeout=timeout, stream=stream, **kwargs)
    if left <= 0:
        raise requests.Timeout("no time left for another attempt")
    end = time.monotonic() + left
    limit = urllib3.Timeout(connect=min(timeout[0], left), read=min(timeout[1], left), total=left)
    response = session.request(method, url, timeout=limit, stream=True, **kwargs)
    if stream:
        return response
    try:
        content = _read_body(response, end, left)
    except BaseException:
        response.close()
        raise
    # What requests' own `content` would hold had it read the body itself.
    response._content = content
    response._content_consumed = True
    return response


def _read_body(response: requests.Response, end: float, left: float) -> bytes:
    """The whole (decoded) body, checking the deadline between socket reads (read1 returns
    what has arrived); urllib3's errors as the requests exceptions callers handle."""
    blocks = []
    try:
        while block := response.raw.read1(1 << 16, decode_content=True):
            blocks.append(block)
            if time.monotonic() > end:
                raise requests.ReadTimeout(f"the answer took more than {left:.0f} s")
    except requests.RequestException:  # an OSError too
        raise
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.ReadTimeout(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise requests.ConnectionError(exc) from exc
    return b"".join(blocks)


def _no_answer(exc: Exception) -> str:
    """Why no (complete) answer came back, in a few words."""
    if isinstance(exc, requests.Timeout):
        return f"no answer in time ({type(exc).__name__}: {_one_line(exc)})"
    return f"no response ({type(exc).__name__})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _what(response: requests.Response) -> str:
    """What an answer that is not JSON looks like: its type and a hint of its text."""
    kind = response.headers.get("Content-Type", "no Content-Type").split(";")[0].strip()
    text = " ".join(response.text[:400].split())
    title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
    return f"{kind} ({title[1][:80]!r})" if title else kind


def _rate_limit_delay(response: requests.Response) -> float | None:
    """Seconds to wait before retrying a rate-limited response, or None if it is not one.

    GitHub's documented order: honour `retry-after`; else if `x-ratelimit-remaining` is 0 wait
    for `x-ratelimit-reset`; else a 403/429 that mentions a rate limit is a secondary limit:
    wait at least a minute. A plain 403 (no permission) is not retried. A header that is no
    number (`nan`, a proxy's garbage) counts as absent.
    """
    if response.status_code not in (403, 429):
        return None
    headers = response.headers
    if "retry-after" in headers:
        return max(_retry_after(headers["retry-after"]), 1.0)
    reset = _seconds(headers.get("x-ratelimit-reset", ""))
    if headers.get("x-ratelimit-remaining") == "0" and reset is not None:
        return max(reset - time.time(), 0.0) + 1.0
    if response.status_code == 429 or "rate limit" in response.text.lower():
        return 60.0
    return None


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _retry_after(text: str) -> float:
    """Retry-After as seconds: a number, or an HTTP date; 60 for anything else."""
    seconds = _seconds(text)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return 60.0
    return when.timestamp() - time.time() if when.tzinfo else 60.0


def redact(url: str) -> str:
    """The URL without credentials, for messages (mirrors and proxies embed user:token@host)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])
    return urlunsplit(parts)


def redact_text(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***."""
    return re.sub(r"(\w+://)[^/\s@]*@", r"\1***@", text)


def _short(url: str) -> str:
    """The URL without its query or credentials, for messages."""
    return redact(url.split("?", 1)[0])


def clean_token(token: str) -> str:
    """The token without surrounding whitespace (a Windows-edited secret ends in `\\r`); a
    UserError, never echoing it, if anything else in it cannot go into an HTTP header."""
    token = token.strip()
    if not token or not all("!" <= char <= "~" for char in token):
        raise UserError(
            "GITHUB_TOKEN is empty or holds a space, control or non-ASCII character inside it "
            "(not shown); set it to the token alone, e.g. copy it again from GitHub"
        )
    return token


_OWNER = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,38})"
_NAME = r"[A-Za-z0-9._-]{1,100}"


def check_repository(repository: str) -> str:
    """`owner/name` as GitHub allows them; no spaces, no `..`, nothing that changes the path."""
    match = re.fullmatch(rf"({_OWNER})/({_NAME})", repository)
    if not match or match[2] in (".", ".."):
        raise UserError(
            f"GITHUB_REPOSITORY must be owner/name (letters, digits, '-', '_', '.' in the "
            f"name; no spaces, no '..'), got {repository!r}"
        )
    return repository


def check_base_url(variable: str, url: str, example: str) -> str:
    """`url` without its trailing slash, if it is an http(s) URL with a host and no
    credentials; else a UserError naming `variable` and showing `example`."""
    url = url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise UserError(
            f"{variable} {redact_text(url)!r} is not a URL ({exc}); use {example}"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(
            f"{variable} {redact_text(url)!r} is not an http(s) URL with a host (no scheme?); "
            f"use {example}"
        )
    if "@" in parts.netloc:
        raise UserError(
            f"{variable} carries credentials ({redact(url)}): they would replace the "
            "token; set it without user:password@ and the token in GITHUB_TOKEN"
        )
    return url


def deadline_s(environ: dict[str, str] | None = None) -> float:
    """Seconds one API call may take in all: `OPENKARA_API_DEADLINE_S`, else the default."""
    env = os.environ if environ is None else environ
    text = env.get(DEADLINE_ENV) or str(DEFAULT_DEADLINE_S)
    value = _seconds(text)
    if not value:
        raise UserError(f"{DEADLINE_ENV}={text!r} is not a positive number of seconds")
    return value


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
    repository = check_repository(env["GITHUB_REPOSITORY"])
    api_url = check_base_url(
        "GITHUB_API_URL",
        env.get("GITHUB_API_URL") or DEFAULT_API_URL,
        f"{DEFAULT_API_URL} (GitHub Enterprise: https://HOST/api/v3)",
    )
    return Client(
        api_url=api_url,
        repository=repository,
        token=env["GITHUB_TOKEN"],
        deadline_s=deadline_s(env),
    )


def server_url(environ: dict[str, str] | None = None) -> str:
    """GITHUB_SERVER_URL (what release download URLs start with), checked, else github.com."""
    env = os.environ if environ is None else environ
    return check_base_url(
        "GITHUB_SERVER_URL",
        env.get("GITHUB_SERVER_URL") or DEFAULT_SERVER_URL,
        f"{DEFAULT_SERVER_URL} (GitHub Enterprise: https://HOST)",
    )


# --- releases: what `invoke release`, `pin-openkara` and `compare` read and upload ---------------


@dataclass(frozen=True)
class LocalAsset:
    """A file to upload as a release asset, with what GitHub will be told and checked against."""

    name: str
    path: Path
    size: int
    sha256: str
    content_type: str


def download_url(server_url: str, repository: str, tag: str, name: str) -> str:
    return f"{server_url.rstrip('/')}/{repository}/releases/download/{tag}/{name}"


def find_release(client: Client, tag: str) -> dict | None:
    """The release for `tag`, drafts included (`releases/tags/{tag}` hides drafts)."""
    matches = [r for r in client.paginate(f"{client.repo_path}/releases") if r["tag_name"] == tag]
    if not matches:
        log.info("no release for %s yet", tag)
        return None
    # Two drafts for one tag only arise from runs outside the workflow's concurrency group;
    # a published one wins, else the oldest, so every run picks the same one.
    chosen = min(matches, key=lambda r: (r["draft"], r["id"]))
    log.info(
        "found %s release %s for %s%s",
        "draft" if chosen["draft"] else "published",
        chosen["id"],
        tag,
        f" (ignoring {len(matches) - 1} other drafts)" if len(matches) > 1 else "",
    )
    return chosen


def list_assets(client: Client, release: dict) -> list[dict]:
    return list(client.paginate(f"{client.repo_path}/releases/{release['id']}/assets"))


def remote_sha256(client: Client, asset: dict) -> str:
    """The asset's SHA-256: GitHub's `digest` when given, else by downloading and hashing."""
    digest = asset.get("digest") or ""
    if digest.startswith("sha256:"):
        return digest.removeprefix("sha256:")
    hasher = hashlib.sha256()
    client.download_asset(asset, hasher.update)
    return hasher.hexdigest()
