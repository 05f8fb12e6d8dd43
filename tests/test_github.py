"""The GitHub REST client against a real local HTTP server that behaves like the API."""

from __future__ import annotations

import hashlib
import logging
import time

import pytest

from converter import github
from converter.errors import UserError
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
    client.max_wait_s = 100
    fake.faults.append(Fault("GET", "/releases$", status=429, headers={"Retry-After": "3600"}))
    with pytest.raises(github.GitHubError, match="budget"):
        client.request("GET", releases_path())
    assert sleeps == []


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
    ],
)
def test_from_env_refuses_missing_settings(env, message):
    with pytest.raises(UserError, match=message):
        github.from_env(env)


def test_from_env_defaults_and_trailing_slash():
    client = github.from_env({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "a/b"})
    assert client.api_url == github.DEFAULT_API_URL
    client = github.from_env(
        {"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "a/b", "GITHUB_API_URL": "http://h/api/v3/"}
    )
    assert client.api_url == "http://h/api/v3" and client.repo_path == "/repos/a/b"
