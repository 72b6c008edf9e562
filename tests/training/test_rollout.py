"""training.rollout on the tiny pair: the teacher-forced pass reproduces the greedy answer, batched greedy
continuations equal sequential ones token for token, and a continuation's feature is the judge's input."""

from __future__ import annotations

import pytest
import torch

from engine.config import Mode, load_config
from engine.decode import Engine
from engine.sampling import SamplingParams
from tests.training.conftest import TINY_YAML
from training.rollout import continue_greedy, teacher_forced

MAX_NEW = 40


def _answer(engine: Engine, prompt: str) -> tuple[list[int], list[int]]:
    request = engine.make_request(
        prompt=prompt, params=SamplingParams(max_tokens=MAX_NEW, ignore_eos=True), mode=Mode.STANDARD
    )
    return list(request.prompt_ids), engine.generate(request).token_ids


def _swaps(engine: Engine, prompt: list[int], answer: list[int]) -> list[tuple[int, int]]:
    """(position, draft token) of every draft/target mismatch along the answer."""
    drafted = teacher_forced(engine.draft.model, prompt, answer).predictions
    swaps = [(i, d) for i, (d, a) in enumerate(zip(drafted, answer)) if d != a]
    assert len(swaps) >= 4, "too few mismatches to exercise batching"
    return swaps


def test_teacher_forced_pass_reproduces_the_greedy_answer(engine1):
    prompt, answer = _answer(engine1, "def fib(n):")
    forced = teacher_forced(engine1.target.model, prompt, answer)
    assert forced.predictions == answer
    assert forced.hidden.shape == (len(answer), engine1.target.args.hidden_size)
    assert forced.cache.length == len(prompt) + len(answer)


def _batched_and_sequential(engine: Engine, prompt: list[int], answer: list[int]):
    swaps = _swaps(engine, prompt, answer)
    base = teacher_forced(engine.target.model, prompt, answer).cache
    first = swaps[0][0]
    forced = [answer[first:i] + [d] for i, d in swaps]
    end, eos = len(prompt) + MAX_NEW, set(engine.tokenizer.eos_ids)
    batched = continue_greedy(engine.target.model, base, len(prompt) + first, forced, end=end, eos_ids=eos)
    sequential = [
        continue_greedy(engine.target.model, base, len(prompt) + first, [f], end=end, eos_ids=eos)[0] for f in forced
    ]
    return swaps, batched, sequential


def test_batched_continuations_equal_sequential_ones(engine1):
    prompt, answer = _answer(engine1, "The quick brown fox")
    swaps, batched, sequential = _batched_and_sequential(engine1, prompt, answer)
    for (i, d), b, s in zip(swaps, batched, sequential):
        assert b.tokens == s.tokens, f"swap at {i}"
        assert len(b.tokens) == MAX_NEW - i - 1  # ignore-EOS model output: every row runs to the limit
        torch.testing.assert_close(b.hidden, s.hidden, atol=1e-5, rtol=1e-5)  # float32: last bits may differ
        # And the engine's own greedy decoding from the same prefix agrees.
        if i + 1 < MAX_NEW:
            request = engine1.make_request(
                prompt_ids=prompt + answer[:i] + [d], params=SamplingParams(max_tokens=MAX_NEW - i - 1), mode=Mode.AR
            )
            assert engine1.generate(request).token_ids == b.tokens, f"swap at {i}"


@pytest.fixture(scope="module")
def bf16_engine():
    threads = torch.get_num_threads()
    config = load_config(TINY_YAML, {"target.dtype": "bfloat16", "draft.dtype": "bfloat16", "runtime.threads": 1})
    yield Engine.from_config(config)
    torch.set_num_threads(threads)


def test_batched_continuations_are_bitwise_sequential_in_bfloat16(bf16_engine):
    """The real pair runs in bfloat16, where a row's bits do not depend on the batch: features must match exactly."""
    prompt, answer = _answer(bf16_engine, "Hello")
    _, batched, sequential = _batched_and_sequential(bf16_engine, prompt, answer)
    for b, s in zip(batched, sequential):
        assert b.tokens == s.tokens
        assert torch.equal(b.hidden, s.hidden)


@torch.no_grad()
def test_continuation_feature_is_the_hidden_state_at_the_swapped_token(engine1):
    """The judge reads the target's last-layer hidden state (after the final norm) at the draft token's own
    position: what one forward pass over prompt + answer[:i] + [d] returns last."""
    prompt, answer = _answer(engine1, "def fib(n):")
    swaps, batched, _ = _batched_and_sequential(engine1, prompt, answer)
    model = engine1.target.model
    for (i, d), row in zip(swaps, batched):
        _, hidden = model(torch.tensor([prompt + answer[:i] + [d]]), model.new_cache(len(prompt) + i + 1))
        torch.testing.assert_close(row.hidden, hidden[0, -1], atol=1e-5, rtol=1e-5)


def test_own_tokens_forced_reproduce_the_answer_and_eos_ends_a_row(engine1):
    prompt, answer = _answer(engine1, "Hello")
    base = teacher_forced(engine1.target.model, prompt, answer).cache
    p, end = len(prompt), len(prompt) + MAX_NEW
    eos = engine1.tokenizer.eos_ids[0]
    rows = continue_greedy(
        engine1.target.model, base, p + 3, [answer[3:6], answer[3:5] + [eos], answer[3:MAX_NEW]], end=end, eos_ids={eos}
    )
    assert rows[0].tokens == answer[6:]  # forcing the target's own tokens changes nothing
    assert rows[1].tokens == []  # a forced EOS ends the sequence
    assert rows[2].tokens == []  # forced up to the length limit: no room left
