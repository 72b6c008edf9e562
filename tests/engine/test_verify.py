"""engine.verify and engine.sampling: the accept rules as pure functions, and the exactness of speculative
sampling (Leviathan et al. 2023, Theorem 1) checked statistically."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampling import SamplingParams, next_token, probabilities, sample
from engine.verify import (
    DraftBlock,
    Provenance,
    accept,
    accepted_length,
    final_token,
    judge_accept,
    standard_accept,
)

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 10


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _target_logits(argmaxes: list[int]) -> torch.Tensor:  # [K+1, VOCAB], row i's argmax is argmaxes[i]
    logits = torch.randn(len(argmaxes), VOCAB, generator=_gen(len(argmaxes)))
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 10.0
    return logits


def _greedy_step(draft: list[int], argmaxes: list[int]):
    block = DraftBlock(torch.tensor(draft), None)
    logits = _target_logits(argmaxes)
    matched, probs = standard_accept(block, logits, GREEDY, _gen())
    assert probs is None
    n = accepted_length(matched, None)
    return n, final_token(n, block, logits, probs, GREEDY, _gen()), matched


# ---- greedy standard verification ------------------------------------------------------------------------


def test_perfect_match_emits_all_drafts_and_the_bonus():
    n, last, matched = _greedy_step([3, 1, 4, 1], [3, 1, 4, 1, 5])
    assert matched.tolist() == [True] * 4
    assert n == 4 and last == 5  # the bonus: argmax of row K


def test_early_mismatch_emits_the_correction():
    n, last, matched = _greedy_step([3, 1, 4, 1], [7, 1, 4, 1, 5])
    assert matched.tolist() == [False, True, True, True]
    assert n == 0 and last == 7  # later matches do not count after a rejection


def test_late_mismatch_emits_the_correction():
    n, last, _ = _greedy_step([3, 1, 4, 1], [3, 1, 4, 9, 5])
    assert n == 3 and last == 9


def test_single_draft_token():
    assert _greedy_step([2], [2, 6])[:2] == (1, 6)
    assert _greedy_step([2], [8, 6])[:2] == (0, 8)


# ---- the judge ---------------------------------------------------------------------------------------------


def test_judge_threshold_zero_accepts_everything():
    scores = torch.tensor([-1e30, -5.0, 0.0, 3.0, float("-inf")])
    assert judge_accept(scores, 0.0).all()


def test_judge_threshold_one_accepts_nothing():
    scores = torch.tensor([1e30, 5.0, 0.0, -3.0, float("inf")])
    assert not judge_accept(scores, 1.0).any()


def test_judge_threshold_half_is_positive_score():
    scores = torch.tensor([-2.0, -1e-6, 0.0, 1e-6, 2.0])
    assert judge_accept(scores, 0.5).tolist() == [False, False, False, True, True]


def test_judge_threshold_is_sigmoid_of_score():
    scores = torch.linspace(-6, 6, 101)
    for threshold in (0.1, 0.3, 0.9):
        expected = torch.sigmoid(scores) > threshold
        got = judge_accept(scores, threshold)
        # Only a score within float rounding of the logit of the threshold may disagree.
        disagree = scores[got != expected]
        logit = torch.logit(torch.tensor(threshold))
        assert ((disagree - logit).abs() < 1e-5).all()


# ---- accept(): provenance --------------------------------------------------------------------------------


def test_accept_provenance_all_matched_then_bonus():
    block = DraftBlock(torch.tensor([5, 6, 7]), None)
    step = accept(block, torch.tensor([True, True, True]), None, last=9)
    assert step.tokens == [5, 6, 7, 9]
    assert step.provenance == [Provenance.MATCHED] * 3 + [Provenance.BONUS]
    assert step.draft_accepted == 3


def test_accept_provenance_mismatch_then_correction():
    block = DraftBlock(torch.tensor([5, 6, 7]), None)
    step = accept(block, torch.tensor([True, False, True]), None, last=9)
    assert step.tokens == [5, 9]
    assert step.provenance == [Provenance.MATCHED, Provenance.CORRECTION]


def test_judge_fills_a_standard_reject_in_the_middle():
    block = DraftBlock(torch.tensor([5, 6, 7, 8]), None)
    matched = torch.tensor([True, False, True, False])
    judged = torch.tensor([False, True, False, False])
    step = accept(block, matched, judged, last=9)
    assert step.tokens == [5, 6, 7, 9]
    assert step.provenance == [Provenance.MATCHED, Provenance.JUDGE, Provenance.MATCHED, Provenance.CORRECTION]


def test_judge_accepting_everything_gives_the_bonus():
    block = DraftBlock(torch.tensor([5, 6]), None)
    step = accept(block, torch.tensor([False, True]), torch.tensor([True, True]), last=1)
    assert step.provenance == [Provenance.JUDGE, Provenance.MATCHED, Provenance.BONUS]


def test_judge_rejecting_first_token_gives_correction_only():
    block = DraftBlock(torch.tensor([5, 6]), None)
    step = accept(block, torch.tensor([False, True]), torch.tensor([False, True]), last=1)
    assert step.tokens == [1] and step.provenance == [Provenance.CORRECTION]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=12), st.booleans())
def test_verdicts_as_lists_accept_as_the_tensors_do(flags, with_judge):
    """The scheduler passes a record's lists (engine.verify.Verdicts), the engine tensors: same n, tokens and
    provenance. The reference is the rule itself: the first position where neither verdict holds."""
    matched, judged = [m for m, _ in flags], [j for _, j in flags] if with_judge else None
    ok = [m or (judged is not None and judged[i]) for i, m in enumerate(matched)]
    n = ok.index(False) if False in ok else len(ok)
    block = DraftBlock(torch.arange(len(flags)), None)
    as_tensors = (torch.tensor(matched), torch.tensor(judged) if judged is not None else None)
    assert accepted_length(matched, judged) == accepted_length(*as_tensors) == n
    assert accept(block, matched, judged, last=99) == accept(block, *as_tensors, last=99)
    assert accept(block, matched, judged, last=99).tokens == list(range(n)) + [99]


# ---- speculative sampling follows the target distribution ------------------------------------------------

# chi2.ppf(1 - 0.001, df) for df = vocab - 1 (scipy.stats.chi2.ppf; hard-coded so scipy is not needed).
CHI2_CRITICAL_P001 = {5: 20.515}
SMALL_VOCAB = 6


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _emitted_counts(k: int, trials: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs `trials` speculative steps with fixed target logits p and draft logits q (temperature 1) and
    counts the first and (when at least one draft token was accepted) second emitted tokens."""
    g = _gen(seed)
    params = SamplingParams(temperature=1.0)
    target_logits = torch.randn(k + 1, SMALL_VOCAB, generator=g) * 1.5  # [K+1, vocab]
    draft_logits = torch.randn(k, SMALL_VOCAB, generator=g) * 1.5  # [K, vocab]
    q = probabilities(draft_logits, params)
    p = probabilities(target_logits, params)
    first = torch.zeros(SMALL_VOCAB)
    second = torch.zeros(SMALL_VOCAB)
    drafts = sample(q.expand(trials, k, SMALL_VOCAB), g)  # [trials, K]: d_i ~ q_i
    for t in range(trials):
        block = DraftBlock(drafts[t], q)
        matched, target_probs = standard_accept(block, target_logits, params, g)
        n = accepted_length(matched, None)
        step = accept(block, matched, None, final_token(n, block, target_logits, target_probs, params, g))
        first[step.tokens[0]] += 1
        if len(step.tokens) >= 2:
            second[step.tokens[1]] += 1
    return first, second, p, q


@pytest.fixture(scope="module")
def sampled():
    return _emitted_counts(k=2, trials=20_000, seed=2024)


def test_rejection_sampling_first_token_follows_target(sampled):
    first, _, p, _ = sampled
    assert first.sum() == 20_000
    assert _chi_square(first, p[0]) < CHI2_CRITICAL_P001[SMALL_VOCAB - 1]


def test_rejection_sampling_second_token_follows_target(sampled):
    # Given d_1 was accepted, the next emitted token (d_2 or the correction at 2) must follow p_2, which here
    # does not depend on d_1.
    _, second, p, _ = sampled
    assert second.sum() > 2_000
    assert _chi_square(second, p[1]) < CHI2_CRITICAL_P001[SMALL_VOCAB - 1]


def test_rejection_sampling_test_detects_the_draft_distribution(sampled):
    """Negative control: the same statistic against the draft's q is far above the critical value, so the
    test above can fail."""
    first, _, p, q = sampled
    assert _chi_square(first, q[0]) > 10 * CHI2_CRITICAL_P001[SMALL_VOCAB - 1]
    assert (p[0] - q[0]).abs().sum() > 0.3  # the two distributions really differ


def test_chi_square_critical_value():
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.chi2.ppf(0.999, SMALL_VOCAB - 1) == pytest.approx(CHI2_CRITICAL_P001[SMALL_VOCAB - 1], abs=1e-3)


def test_sampling_correction_when_target_equals_draft_is_valid():
    """p == q at the rejected position leaves no residual mass; the correction then samples p."""
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(2, SMALL_VOCAB, generator=_gen(3))
    probs = probabilities(logits, params)
    block = DraftBlock(torch.tensor([0]), probs[:1])
    token = final_token(0, block, logits, probs, params, _gen(4))
    assert 0 <= token < SMALL_VOCAB


# ---- engine.sampling ---------------------------------------------------------------------------------------


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_probabilities_temperature_one_is_softmax():
    torch.testing.assert_close(probabilities(LOGITS, SamplingParams(temperature=1.0)), torch.softmax(LOGITS, -1))


def test_probabilities_top_k_keeps_k_tokens():
    probs = probabilities(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(probs[:2], torch.tensor([0.625, 0.375]))


def test_probabilities_top_k_larger_than_vocab_is_off():
    probs = probabilities(LOGITS, SamplingParams(temperature=1.0, top_k=100))
    torch.testing.assert_close(probs, torch.softmax(LOGITS, -1))


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.45, 1), (0.7, 2), (0.81, 3), (0.96, 4)],
)
def test_probabilities_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    probs = probabilities(LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    assert (probs > 0).tolist() == [True] * kept + [False] * (4 - kept)
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])[:kept]
    torch.testing.assert_close(probs[:kept], base / base.sum())


def test_probabilities_batched_rows_are_independent():
    rows = torch.stack([LOGITS, LOGITS.flip(0)])
    probs = probabilities(rows, SamplingParams(temperature=1.0, top_p=0.7))
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    assert (probs[1] > 0).tolist() == [False, False, True, True]


def test_probabilities_temperature_sharpens():
    cold = probabilities(LOGITS, SamplingParams(temperature=0.5))
    hot = probabilities(LOGITS, SamplingParams(temperature=2.0))
    base = torch.softmax(LOGITS, -1)
    assert cold[0] > base[0] > hot[0]
    torch.testing.assert_close(cold, torch.softmax(LOGITS / 0.5, -1))


def test_next_token_greedy_is_argmax_and_sampling_is_seeded():
    assert next_token(LOGITS, GREEDY, _gen()) == 0
    params = SamplingParams(temperature=1.0)
    a = [next_token(LOGITS, params, _gen(5)) for _ in range(3)]
    assert len(set(a)) == 1
    assert SamplingParams(seed=9).generator().initial_seed() == 9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 1000.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop": ("x",) * 17}, "stop"),
        ({"stop": ("x" * 257,)}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
