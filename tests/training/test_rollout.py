"""training.rollout on the tiny pair: the teacher-forced pass reproduces the greedy answer, greedy rows run as
one batch (answers to several prompts, continuations of several answers, fewer places than rows) equal each
row run alone and the engine's own greedy decoding, and a continuation's feature is the judge's input."""

from __future__ import annotations

import pytest
import torch

from engine.config import Mode, load_config
from engine.decode import Engine
from engine.sampling import SamplingParams
from tests.training.conftest import TINY_YAML
from training.rollout import Row, greedy_rows, teacher_forced

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


PROMPTS = ("The quick brown fox", "def fib(n):", "Hello")


def _rows(engine: Engine) -> tuple[list[Row], list[tuple[list[int], list[int], int, int]]]:
    """Continuation rows from every mismatch of three prompts' answers, and (prompt, answer, i, d) of each."""
    rows, swaps = [], []
    for text in PROMPTS:
        prompt, answer = _answer(engine, text)
        base = teacher_forced(engine.target.model, prompt, answer).cache
        for i, d in _swaps(engine, prompt, answer):
            rows.append(Row(base, len(prompt) + i, [d], len(prompt) + MAX_NEW))
            swaps.append((prompt, answer, i, d))
    return rows, swaps


def _batched_and_alone(engine: Engine):
    rows, swaps = _rows(engine)
    eos = set(engine.tokenizer.eos_ids)
    batched = greedy_rows(engine.target.model, rows, eos_ids=eos, width=5)  # fewer places than rows: refills
    alone = [greedy_rows(engine.target.model, [row], eos_ids=eos, width=1)[0] for row in rows]
    return swaps, batched, alone


def test_batched_rows_equal_rows_alone_and_the_engines_greedy_decoding(engine1):
    swaps, batched, alone = _batched_and_alone(engine1)
    for (prompt, answer, i, d), b, a in zip(swaps, batched, alone):
        assert b.tokens == a.tokens, f"swap at {i}"
        assert len(b.tokens) == MAX_NEW - i - 1  # ignore-EOS model output: every row runs to the limit
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-5)  # float32: last bits may differ
        if i + 1 < MAX_NEW:  # and the engine's own greedy decoding from the same prefix agrees
            request = engine1.make_request(
                prompt_ids=prompt + answer[:i] + [d], params=SamplingParams(max_tokens=MAX_NEW - i - 1), mode=Mode.AR
            )
            assert engine1.generate(request).token_ids == b.tokens, f"swap at {i}"


def test_prompt_rows_give_the_engines_answers_and_keep_their_caches(engine1):
    """Answers to several prompts in one batch: each the engine's greedy answer; the kept cache holds the
    prompt and the answer but its last token, the shared prefix of that answer's continuations."""
    params = SamplingParams(max_tokens=MAX_NEW)
    prompts = [list(engine1.make_request(prompt=t, params=params).prompt_ids) for t in PROMPTS]
    rows = [Row(None, 0, p, len(p) + MAX_NEW) for p in prompts]
    eos = set(engine1.tokenizer.eos_ids)
    answers = greedy_rows(engine1.target.model, rows, eos_ids=eos, width=2, keep_caches=True)
    for text, prompt, got in zip(PROMPTS, prompts, answers):
        request = engine1.make_request(prompt=text, params=SamplingParams(max_tokens=MAX_NEW), mode=Mode.AR)
        assert got.tokens == engine1.generate(request).token_ids
        assert got.cache.length == len(prompt) + len(got.tokens) - 1


@pytest.fixture(scope="module")
def bf16_engine():
    threads = torch.get_num_threads()
    config = load_config(TINY_YAML, {"target.dtype": "bfloat16", "draft.dtype": "bfloat16", "runtime.threads": 1})
    yield Engine.from_config(config)
    torch.set_num_threads(threads)


def test_batched_rows_are_bitwise_rows_alone_in_bfloat16(bf16_engine):
    """The real pair runs in bfloat16, where a row's bits do not depend on the batch: features must match exactly."""
    _, batched, alone = _batched_and_alone(bf16_engine)
    for b, a in zip(batched, alone):
        assert b.tokens == a.tokens
        assert torch.equal(b.hidden, a.hidden)


@torch.no_grad()
def test_continuation_feature_is_the_hidden_state_at_the_swapped_token(engine1):
    """The judge reads the target's last-layer hidden state (after the final norm) at the draft token's own
    position: what one forward pass over prompt + answer[:i] + [d] returns last."""
    swaps, batched, _ = _batched_and_alone(engine1)
    model = engine1.target.model
    for (prompt, answer, i, d), row in zip(swaps, batched):
        _, hidden = model(torch.tensor([prompt + answer[:i] + [d]]), model.new_cache(len(prompt) + i + 1))
        torch.testing.assert_close(row.hidden, hidden[0, -1], atol=1e-5, rtol=1e-5)


def test_own_tokens_fed_reproduce_the_answer_and_eos_or_the_limit_ends_a_row(engine1):
    prompt, answer = _answer(engine1, "Hello")
    base = teacher_forced(engine1.target.model, prompt, answer).cache
    p, end = len(prompt), len(prompt) + MAX_NEW
    eos = engine1.tokenizer.eos_ids[0]
    rows = [Row(base, p + 3, [answer[3]], end), Row(base, p + 3, [eos], end), Row(base, end - 1, [answer[-1]], end)]
    out = greedy_rows(engine1.target.model, rows, eos_ids={eos}, width=4)
    assert out[0].tokens == answer[4:]  # feeding the target's own token changes nothing
    assert out[1].tokens == []  # a fed EOS ends the sequence
    assert out[2].tokens == []  # fed up to the length limit: no room left
    with pytest.raises(ValueError, match="row 0"):
        greedy_rows(engine1.target.model, [Row(base, end, [1], end)], eos_ids={eos}, width=1)
