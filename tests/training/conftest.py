"""Fixtures of the training tests: the tiny random pair on one CPU thread, and tiny task files.

One thread: the tiny model's matrices are far too small to gain from two, and a second thread spinning on a
loaded 2-core machine made a 40-token mining task take 30 s instead of 0.2 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import load_config
from engine.decode import Engine

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "config" / "tiny.yaml"


@pytest.fixture(scope="session")
def engine1():
    threads = torch.get_num_threads()
    yield Engine.from_config(load_config(TINY_YAML, {"runtime.threads": 1}))
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    """config/tiny.yaml on one thread, as a file for the CLI."""
    data = yaml.safe_load(TINY_YAML.read_text())
    data["runtime"]["threads"] = 1
    path = tmp_path / "tiny1.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def gsm8k_file(tmp_path) -> Path:
    path = tmp_path / "mini-gsm8k.jsonl"
    rows = [
        {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A box holds 12 eggs. How many eggs in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
        {"question": "Sam had 1,000 dollars and spent 250. How much is left?", "answer": "1000 - 250 = 750\n#### 750"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
