"""Shared fixtures: the tiny random pair of config/tiny.yaml, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Config, load_config
from engine.model import ModelArgs
from engine.shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "config" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return load_config(TINY_YAML)


@pytest.fixture(scope="session")
def tiny_args() -> ModelArgs:
    return ModelArgs.from_hf(SHAPES["tiny"])


@pytest.fixture(scope="session")
def tiny_engine(tiny_config):
    """One Engine (target + noisy draft, no judge) shared by the decode tests; requests run one at a time."""
    from engine.decode import Engine

    return Engine.from_config(tiny_config)
