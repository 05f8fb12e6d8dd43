"""demucs' own loader behind `converter.build.loading`, and its errors for bad input."""

from __future__ import annotations

import shutil

import pytest

from converter.build.loading import load
from converter.errors import UserError


def test_loads_a_local_repo_and_records_checkpoint_digests(small_repo):
    bag = load("htdemucs_6s", small_repo)
    assert bag.sources == ["drums", "bass", "other", "vocals", "guitar", "piano"]
    assert bag.signatures == ["5c90dfd2"]
    (checkpoint,) = bag.checkpoints
    assert checkpoint["source"] == "local repo"
    assert checkpoint["file"] == f"5c90dfd2-{checkpoint['checksum']}.th"
    assert bag.models[0].bottom_channels == 0
    assert bag.segment_samples == 22050


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'mdx': choose one of htdemucs, htdemucs_ft"):
        load("mdx")


def test_repo_that_is_not_a_directory(tmp_path):
    with pytest.raises(UserError, match="is not a directory: pass a local demucs model repo"):
        load("htdemucs", tmp_path / "missing")


def test_empty_repo(tmp_path):
    with pytest.raises(UserError, match="could not load htdemucs from local repo .*htdemucs.yaml"):
        load("htdemucs", tmp_path)


def copy_with_checkpoint(small_repo, tmp_path):
    """A writable copy of the small repo and its htdemucs checkpoint file."""
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    (path,) = repo.glob("955717e8-*.th")
    return repo, path


def test_checkpoint_with_wrong_checksum(small_repo, tmp_path):
    repo, path = copy_with_checkpoint(small_repo, tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="Invalid checksum"):
        load("htdemucs", repo)


def test_truncated_checkpoint_without_checksum(small_repo, tmp_path):
    repo, path = copy_with_checkpoint(small_repo, tmp_path)
    path.rename(repo / "955717e8.th")
    (repo / "955717e8.th").write_bytes(path.name.encode() * 10)
    with pytest.raises(UserError, match="checkpoint is corrupt or not a demucs package"):
        load("htdemucs", repo)
