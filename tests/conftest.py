"""Shared fixtures: the tiny random pair of config/tiny.yaml, loaded once per test session, and tiny
checkpoint folders written as Hugging Face lays them out."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.config import Config, load_config
from engine.model import ModelArgs, Transformer
from engine.shapes import SHAPES

if not torch.cuda.is_available():
    # engine.int8_kernel's Triton kernel runs in Triton's interpreter on CPU tensors; Triton reads this
    # once, so it is set before anything imports it (tests/gpu, on a GPU, compile the kernel for real)
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def write_checkpoint(tmp_path_factory) -> Callable[[Transformer, dict, torch.dtype], Path]:
    """write(model, config, dtype) -> a fresh folder holding config.json, `model`'s weights in `dtype` split
    over two safetensors files (a tied LM head omitted, as transformers saves it), and a two-word tokenizer
    (enough for engine.weights.load_model, which loads one from every checkpoint folder)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def write(model: Transformer, config: dict, dtype: torch.dtype) -> Path:
        folder = tmp_path_factory.mktemp("checkpoint")
        (folder / "config.json").write_text(json.dumps(config))
        state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
        if model.args.tie_word_embeddings:
            del state["lm_head.weight"]
        names = sorted(state)
        half = len(names) // 2
        for i, part in enumerate((names[:half], names[half:]), start=1):
            save_file({k: state[k] for k in part}, str(folder / f"model-0000{i}-of-00002.safetensors"))
        words = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(str(folder))
        return folder

    return write


class EventLoopThread:
    """An asyncio loop on a daemon thread: the backends' (and the gRPC servers') loop in Ray tests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_server(self, backend, **kwargs):
        """cluster.server.build_server(backend, **kwargs) started on this loop -> (server, port)."""
        from cluster.server import build_server

        async def start():
            server, port = await build_server(backend, **kwargs)
            await server.start()
            return server, port

        return self.run(start())

    def close(self) -> None:
        """Cancels what still runs on the loop (a backend's supervisor, a stream's waits) and waits for it
        to end, as asyncio.run does, so that no task is destroyed pending; then stops the loop."""

        async def cancel_the_rest() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        self.run(cancel_the_rest(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
