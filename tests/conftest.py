"""Shared fixtures: the tiny random pair of config/tiny.yaml, loaded once per test session."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def judge_config(tmp_path_factory) -> Config:
    """tiny.yaml with a lenient judge (a large bias: it accepts draft tokens the standard rule rejects, so
    judge mode's output differs from the target's and the lossy path is exercised), saved for the actors."""
    from engine.decode import Engine
    from engine.judge import JudgeHead

    plain = Engine.from_config(load_config(TINY_YAML))
    w = torch.randn(plain.target.args.hidden_size, generator=torch.Generator().manual_seed(7))
    path = tmp_path_factory.mktemp("judge") / "tiny-judge.safetensors"
    JudgeHead(w, 20.0, 0.5, plain.target.name, plain.target.fingerprint).save(path)
    return load_config(TINY_YAML, {"judge.path": str(path), "decoding.mode": "judge"})


class EventLoopThread:
    """An asyncio loop on a daemon thread: the backends' (and the gRPC servers') loop in Ray tests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
