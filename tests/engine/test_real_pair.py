"""The real Qwen2.5-Coder pair (config/qwen-coder.yaml): greedy speculative decoding equals autoregressive
decoding in bfloat16 at every K, and our float32 logits match transformers'. Needs the converted checkpoints
in the cache (`judgeserve models fetch qwen-coder`); takes about 7 minutes on 2 CPU cores, so the default
run leaves it out (marked `real`: `make test-real`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import fetch
from engine.config import Mode, load_config
from engine.sampling import SamplingParams
from engine.verify import Provenance

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
_MISSING = [name for name in (TARGET, DRAFT) if fetch.cached_model_dir(name) is None]

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"{', '.join(_MISSING)} not in the cache: run `judgeserve models fetch qwen-coder`",
    ),
]

CONFIG = Path(__file__).resolve().parents[2] / "config" / "qwen-coder.yaml"
CHATS = {
    "code": [{"role": "user", "content": "Write a Python function is_prime(n). Code only."}],
    "math": [{"role": "user", "content": "A shop sells pens at 3 dollars each. How much do 17 pens cost?"}],
}
MAX_TOKENS = 48


@torch.no_grad()
def test_float32_logits_match_transformers():
    """Runs first, so its two float32 copies of the 0.5B model are freed before the pair loads."""
    from transformers import AutoModelForCausalLM

    from engine.weights import load_checkpoint

    folder = fetch.cached_model_dir(DRAFT)
    prompt = torch.tensor([[151644, 872, 198, 750, 75698, 1445, 982, 262, 421, 308, 2651, 220, 16, 25, 470, 308]])
    ours = load_checkpoint(folder, torch.float32, torch.device("cpu")).eval()
    logits, _ = ours(prompt, ours.new_cache(32))
    del ours
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    expected = hf(prompt).logits.float()
    del hf
    diff = (logits - expected).abs().max().item()
    assert diff < 1e-3, f"max abs logit difference {diff}"
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.fixture(scope="module")
def pair_engine():
    from engine.decode import Engine

    return Engine.from_config(load_config(CONFIG, {"decoding.max_seq_len": 512}))


@pytest.fixture(scope="module")
def ar_outputs(pair_engine):
    params = SamplingParams(max_tokens=MAX_TOKENS)
    return {
        name: pair_engine.generate(pair_engine.make_request(messages=chat, params=params, mode=Mode.AR))
        for name, chat in CHATS.items()
    }


def test_autoregressive_output_is_sensible(ar_outputs):
    assert "def is_prime" in ar_outputs["code"].text
    assert "51" in ar_outputs["math"].text or len(ar_outputs["math"].token_ids) == MAX_TOKENS


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_greedy_standard_equals_autoregressive(pair_engine, ar_outputs, k):
    params = SamplingParams(max_tokens=MAX_TOKENS)
    for name, chat in CHATS.items():
        out = pair_engine.generate(
            pair_engine.make_request(messages=chat, params=params, mode=Mode.STANDARD, draft_tokens=k)
        )
        expected = ar_outputs[name]
        assert out.token_ids == expected.token_ids, f"K={k}, {name} prompt"
        assert out.text == expected.text
        assert out.finish_reason is expected.finish_reason
        assert Provenance.MATCHED in out.provenance, f"K={k}, {name}: the draft never matched"
