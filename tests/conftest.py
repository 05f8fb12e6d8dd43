"""Shared fixtures: random-weight demucs repos in demucs' own format, and small converted files.

Everything runs offline: the repos are written with `converter.build.fakerepo` (demucs'
`serialize_model` + `save_with_checksum` + bag YAML files) and loaded through demucs' real loader.

The fast tier: every test that needs none of the fixtures below that write or convert models, and
is neither `slow` nor `index`, is marked `unit` here, so `python -m pytest -m unit` is the edit
loop (DEVELOPERS.md) and a new test joins it by what it uses, not by a marker someone must add.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from converter.build.fakerepo import write_repo
from converter.facts import PRODUCTS, SPECTRAL_CORE
from converter.pipeline import convert
from tests.fake_github import FakeGitHub

# Fixtures that write checkpoints or convert models (seconds to minutes each): not the fast tier.
MODEL_FIXTURES = frozenset(
    {
        "small_repo",
        "small_models",
        "small_spectral_models",
        "small_trained_repo",
        "small_trained_models",
        "full_repo",
    }
)


def pytest_collection_modifyitems(config, items):
    """Mark `unit` every test that builds no model, installs nothing and is not `slow`."""
    for item in items:
        heavy = MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if not heavy and not any(
            item.get_closest_marker(m) for m in ("slow", "index", "integration")
        ):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory) -> Path:
    """All three products at a small size (same architecture features, seconds to convert)."""
    return write_repo(tmp_path_factory.mktemp("small-repo"), size="small")


@pytest.fixture(scope="session")
def small_models(small_repo, tmp_path_factory) -> dict[str, Path]:
    """{name: converted, validated NAME.onnx} for the three products, small size."""
    logging.getLogger("converter").setLevel(logging.INFO)
    out = tmp_path_factory.mktemp("small-models")
    return {name: convert(name, repo=small_repo, out_dir=out) for name in PRODUCTS}


@pytest.fixture(scope="session")
def small_spectral_models(small_repo, tmp_path_factory) -> dict[str, Path]:
    """{name: converted, validated NAME.spectral.onnx} for the three products, small size."""
    logging.getLogger("converter").setLevel(logging.INFO)
    out = tmp_path_factory.mktemp("small-spectral-models")
    return {
        name: convert(name, repo=small_repo, out_dir=out, interface=SPECTRAL_CORE)
        for name in PRODUCTS
    }


@pytest.fixture(scope="session")
def small_trained_repo(tmp_path_factory) -> Path:
    """All three products at the small size with trained-like statistics."""
    return write_repo(tmp_path_factory.mktemp("small-trained"), size="small", statistics="trained")


@pytest.fixture(scope="session")
def small_trained_models(small_trained_repo, tmp_path_factory) -> dict[str, Path]:
    """{name: converted, validated NAME.onnx} from `small_trained_repo`."""
    logging.getLogger("converter").setLevel(logging.INFO)
    out = tmp_path_factory.mktemp("small-trained-models")
    return {name: convert(name, repo=small_trained_repo, out_dir=out) for name in PRODUCTS}


@pytest.fixture(scope="session")
def full_repo(tmp_path_factory) -> Path:
    """htdemucs with the exact pretrained hyper-parameters (41,984,456 random weights) and
    trained-like statistics."""
    return write_repo(
        tmp_path_factory.mktemp("full-repo"), size="full", names=["htdemucs"], statistics="trained"
    )


@pytest.fixture
def fake() -> FakeGitHub:
    """A GitHub-like REST server (and package index) on 127.0.0.1, fresh for each test."""
    server = FakeGitHub()
    yield server
    server.close()
