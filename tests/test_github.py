"""The GitHub REST client against a real local HTTP server that behaves like the API."""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import time

import pytest

from converter.errors import UserError
from converter.ship import github
from tests import loopback
from tests.fake_github import REPOSITORY, TOKEN, Fault


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(fake, sleeps):
    return github.Client(
        api_url=fake.api_url,
        repository=REPOSITORY,
        token=TOKEN,
        sleep=sleeps.append,
        timeout=(5.0, 5.0),
    )


def releases_path() -> str:
    return f"/repos/{REPOSITORY}/releases"


def test_sends_the_documented_headers(client, fake):
    client.request("GET", releases_path())
    headers = fake.seen[-1].headers
    assert headers["Accept"] == "application/vnd.github+json"
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert headers["User-Agent"].startswith("openkara-demucs-onnx/")


def test_get_retries_5xx_with_growing_backoff(client, fake, sleeps):
    fake.faults.append(Fault("GET", "/releases$", status=502, times=2))
    assert client.request("GET", releases_path()).json() == []
    assert sleeps == [2.0, 4.0]
    assert len(fake.seen) == 3


def test_get_retries_a_dropped_connection(client, fake, sleeps):
    fake.faults.append(Fault("GET", "/releases$", kind="drop"))
    assert client.request("GET", releases_path()).status_code == 200
    assert len(sleeps) == 1


def test_persistent_5xx_gives_up_with_a_clear_error(client, fake, sleeps):
    fake.faults.append(Fault("GET", "/releases$", status=503, times=99))
    with pytest.raises(github.GitHubError, match="503") as failure:
        client.request("GET", releases_path())
    assert failure.value.transient
    assert len(fake.seen) == client.retries + 1


def test_post_is_not_retried_on_5xx_because_it_may_have_taken_effect(client, fake, sleeps):
    fake.faults.append(Fault("POST", "/releases$", status=500))
    with pytest.raises(github.GitHubError, match="500"):
        client.request("POST", releases_path(), json={"tag_name": "t", "draft": True})
    assert sleeps == [] and fake.releases == {}


def test_secondary_rate_limit_honours_retry_after_even_for_post(client, fake, sleeps):
    fake.faults.append(
        Fault(
            "POST",
            "/releases$",
            status=403,
            headers={"Retry-After": "7"},
            message="You have exceeded a secondary rate limit",
        )
    )
    client.request("POST", releases_path(), json={"tag_name": "t", "draft": True})
    assert sleeps == [7.0]
    assert len(fake.releases) == 1


def test_secondary_rate_limit_without_retry_after_waits_a_minute(client, fake, sleeps):
    fake.faults.append(
        Fault("GET", "/releases$", status=403, message="You have exceeded a secondary rate limit")
    )
    client.request("GET", releases_path())
    assert sleeps == [60.0]


def test_primary_rate_limit_waits_until_reset(client, fake, sleeps):
    reset = int(time.time()) + 30
    fake.faults.append(
        Fault(
            "GET",
            "/releases$",
            status=403,
            message="API rate limit exceeded",
            headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
        )
    )
    client.request("GET", releases_path())
    assert 25 <= sleeps[0] <= 32


def test_429_is_retried(client, fake, sleeps):
    fake.faults.append(Fault("GET", "/releases$", status=429, headers={"Retry-After": "2"}))
    client.request("GET", releases_path())
    assert sleeps == [2.0]


def test_rate_limit_wait_is_bounded(client, fake, sleeps):
    client.deadline_s = 100
    fake.faults.append(Fault("GET", "/releases$", status=429, headers={"Retry-After": "3600"}))
    with pytest.raises(github.GitHubError, match="waiting 3600 s more would pass the 100 s"):
        client.request("GET", releases_path())
    assert sleeps == []


@pytest.mark.parametrize(
    "value, wait",
    [("nan", 60.0), ("inf", 60.0), ("-5", 60.0), ("soon", 60.0), ("0", 1.0), ("2.5", 2.5)],
)
def test_a_retry_after_that_is_no_number_waits_a_minute(value, wait, client, fake, sleeps):
    fake.faults.append(Fault("GET", "/releases$", status=429, headers={"Retry-After": value}))
    client.request("GET", releases_path())
    assert sleeps == [wait]


def test_retry_after_as_an_http_date(client, fake, sleeps):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    fake.faults.append(Fault("GET", "/releases$", status=429, headers={"Retry-After": when}))
    client.request("GET", releases_path())
    assert 25 <= sleeps[0] <= 31


def test_the_budget_counts_the_attempts_time_not_only_the_waits(client, fake, sleeps):
    """Each attempt seems to take 50 s (a slow 502): 50 + 2 + 50 + 4 + 50, then waiting 8 s
    more would pass the 150 s one call may take."""
    ticks = iter(range(0, 10_000, 50))  # read before and after each attempt
    client.clock = lambda: float(next(ticks))
    client.deadline_s = 150
    fake.faults.append(Fault("GET", "/releases$", status=502, times=99))
    with pytest.raises(github.GitHubError, match="gave up after 156 s: waiting 8 s more"):
        client.request("GET", releases_path())
    assert sleeps == [2.0, 4.0] and len(fake.seen) == 3


def test_a_silent_server_costs_one_deadline(sleeps):
    """It accepts the connection and never answers: the read timeout (60 s) would wait longer."""
    server = loopback.Silent()
    try:
        silent = github.Client(
            api_url=server.url, repository=REPOSITORY, token=TOKEN, sleep=sleeps.append
        )
        silent.deadline_s = 1.0
        with pytest.raises(github.GitHubError, match="no answer in time") as failure:
            silent.request("GET", releases_path())
    finally:
        server.close()
    assert "gave up after 1 s" in str(failure.value) and sleeps == []


def test_a_trickling_answer_is_bounded_too(sleeps):
    """Every read gets a byte in time; the whole answer would take 55 hours."""
    server = loopback.Trickle(pause=0.2)
    try:
        slow = github.Client(
            api_url=server.url, repository=REPOSITORY, token=TOKEN, sleep=sleeps.append
        )
        slow.deadline_s = 1.0
        with pytest.raises(github.GitHubError, match="the answer took more than 1 s"):
            slow.request("GET", releases_path())
    finally:
        server.close()


@pytest.mark.parametrize(
    "server, message",
    [
        (
            lambda: loopback.Same(200, loopback.LOGIN_PAGE, {"Content-Type": "text/html"}),
            "answered 200 with text/html ('Sign in - Corporate Proxy'), not JSON",
        ),
        (
            lambda: loopback.Same(404, b"<html><title>Page not found</title>", {}),
            "failed: 404 (application/json ('Page not found'), not GitHub's JSON)",
        ),
        (lambda: loopback.Same(200, {"releases": []}), "an object instead of an array"),
        (lambda: loopback.Same(200, [1, 2]), "item 0: a number instead of an object"),
        (
            lambda: loopback.Same(200, [{"id": 1, "tag_name": "t", "upload_url": "u"}]),
            "item 0: 'draft' missing",
        ),
        (
            lambda: loopback.Same(
                200, [{"id": True, "tag_name": "t", "draft": False, "upload_url": "u"}]
            ),
            "item 0: 'id': true/false, not an integer",
        ),
        (lambda: loopback.Same(redirect=True), "TooManyRedirects"),
    ],
)
def test_an_answer_the_caller_cannot_read_is_one_clear_error(server, message, sleeps):
    running = server()
    try:
        client = github.Client(
            api_url=running.url, repository=REPOSITORY, token=TOKEN, sleep=sleeps.append
        )
        with pytest.raises(github.GitHubError) as failure:
            list(client.paginate(releases_path()))
    finally:
        running.close()
    text = str(failure.value)
    assert message in text and "GITHUB_API_URL must be the REST API" in text
    assert not failure.value.transient and sleeps == [] and "\n" not in text


def test_a_token_ending_in_a_carriage_return_is_stripped(fake):
    windows = github.Client(api_url=fake.api_url, repository=REPOSITORY, token=f" {TOKEN}\r\n")
    assert windows.request("GET", releases_path()).status_code == 200
    assert fake.seen[-1].headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("token", [f"{TOKEN[:9]}\r{TOKEN[9:]}", f"{TOKEN} x", "tök", " \r\n"])
def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it(token):
    with pytest.raises(UserError, match="GITHUB_TOKEN is empty or holds a space") as failure:
        github.Client(api_url="http://127.0.0.1:9", repository=REPOSITORY, token=token)
    assert TOKEN not in str(failure.value) and "tök" not in str(failure.value)


def test_any_request_error_is_redacted(client, fake):
    """requests' InvalidHeader quotes the header; whatever the exception, no token."""
    with pytest.raises(github.GitHubError, match="InvalidHeader") as failure:
        client.request("GET", releases_path(), headers={"X-Echo": f"a\r\n{TOKEN}"})
    assert TOKEN not in str(failure.value) and "***" in str(failure.value)


def test_plain_403_is_a_permission_error_not_retried(client, fake, sleeps):
    fake.faults.append(
        Fault("POST", "/releases$", status=403, message="Resource not accessible by integration")
    )
    with pytest.raises(github.GitHubError, match="contents: write"):
        client.request("POST", releases_path(), json={"tag_name": "t"})
    assert sleeps == []


def test_401_names_the_token_variable_without_its_value(fake, sleeps, caplog):
    caplog.set_level(logging.DEBUG)
    bad = github.Client(
        api_url=fake.api_url, repository=REPOSITORY, token="wrong-secret", sleep=sleeps.append
    )
    with pytest.raises(github.GitHubError) as failure:
        bad.request("GET", releases_path())
    assert "401" in str(failure.value) and "GITHUB_TOKEN" in str(failure.value)
    assert "wrong-secret" not in str(failure.value) + caplog.text + repr(bad)


def test_an_echoed_token_is_redacted(client, fake, caplog):
    caplog.set_level(logging.DEBUG)
    fake.faults.append(Fault("GET", "/releases$", status=400, message=f"bad header {TOKEN}"))
    with pytest.raises(github.GitHubError) as failure:
        client.request("GET", releases_path())
    assert TOKEN not in str(failure.value) and "***" in str(failure.value)


def test_paginate_follows_link_headers(client, fake):
    for n in range(5):
        fake.add_release(f"model-v1.0.{n}", draft=True, files={})
    tags = [r["tag_name"] for r in client.paginate(releases_path())]
    assert sorted(tags) == [f"model-v1.0.{n}" for n in range(5)]
    assert sum(1 for s in fake.seen if s.path.endswith("/releases")) == 3


def test_upload_streams_to_upload_url_with_length_and_type(client, fake, tmp_path, capsys):
    release = client.request("POST", releases_path(), json={"tag_name": "t", "draft": True}).json()
    data = bytes(range(256)) * 20000  # 5 MB
    path = tmp_path / "big.onnx"
    path.write_bytes(data)
    asset = client.upload_asset(release, path, "big.onnx", "application/octet-stream")
    upload = fake.seen[-1]
    assert upload.path.startswith("/api/uploads/") and not upload.path.startswith("/api/v3")
    assert upload.query == {"name": ["big.onnx"]}
    assert upload.headers["Content-Length"] == str(len(data))
    assert upload.headers["Content-Type"] == "application/octet-stream"
    assert "chunked" not in upload.headers.get("Transfer-Encoding", "")
    assert asset["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert "big.onnx" in capsys.readouterr().err  # the progress bar


def test_download_follows_the_redirect_to_storage(client, fake):
    release = fake.add_release("t", draft=True, files={"a.txt": b"hello"})
    asset = fake.assets_of(release)[0]
    got = bytearray()
    client.download_asset(asset, got.extend)
    assert bytes(got) == b"hello"
    assert [s.path.split("/")[1] for s in fake.seen[-2:]] == ["api", "download"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "GITHUB_TOKEN and GITHUB_REPOSITORY not set"),
        ({"GITHUB_REPOSITORY": "a/b"}, "GITHUB_TOKEN not set"),
        ({"GITHUB_TOKEN": "x"}, "GITHUB_REPOSITORY not set"),
        ({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "just-a-name"}, "owner/name"),
        ({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "own er/na me"}, "owner/name"),
        ({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "../.."}, "owner/name"),
        ({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "octo/.."}, "no '..'"),
        ({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "octo/a/b"}, "owner/name"),
        ({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "octo/a?b"}, "owner/name"),
        (
            {"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "a/b", "GITHUB_API_URL": "api.github.com"},
            "GITHUB_API_URL 'api.github.com' is not an http(s) URL with a host",
        ),
        (
            {"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "a/b", "GITHUB_API_URL": "http://h:x/"},
            "GITHUB_API_URL 'http://h:x' is not a URL",
        ),
        (
            {"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "a/b", "OPENKARA_API_DEADLINE_S": "nan"},
            "OPENKARA_API_DEADLINE_S='nan' is not a positive number",
        ),
    ],
)
def test_from_env_refuses_missing_settings(env, message):
    with pytest.raises(UserError, match=re.escape(message)):
        github.from_env(env)


def test_from_env_defaults_and_trailing_slash():
    client = github.from_env({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "a/b"})
    assert client.api_url == github.DEFAULT_API_URL
    client = github.from_env(
        {"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "a/b", "GITHUB_API_URL": "http://h/api/v3/"}
    )
    assert client.api_url == "http://h/api/v3" and client.repo_path == "/repos/a/b"


def test_repository_names_github_allows_pass():
    for name in ("octo/kara-models", "Octo-Cat/repo.name_2", "a/.github", "o/..."):
        assert github.check_repository(name) == name


def test_server_url_is_checked_like_the_api_url():
    assert github.server_url({}) == "https://github.com"
    assert github.server_url({"GITHUB_SERVER_URL": "https://ghe.example/"}) == "https://ghe.example"
    with pytest.raises(UserError, match="GITHUB_SERVER_URL 'github.com' is not an http"):
        github.server_url({"GITHUB_SERVER_URL": "github.com"})
