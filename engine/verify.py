"""Verification of a draft block: standard speculative acceptance, the judge, and the accept rule.

Vocabulary (used across the project):
  draft token   d_i, one of the K tokens the draft model proposes in a step (i = 1..K)
  accepted      d_i emitted because it passed verification (standard OR judge) along with d_1..d_{i-1}
  matched       accepted by the standard rule: greedy d_i == argmax p_i, or the rejection test passed
  judge-accepted accepted by the judge only (the standard rule rejected it): the lossy part
  correction    the target's token emitted after the first rejected draft token
  bonus         the target's token emitted after a step that accepted all K draft tokens

One step, as DESIGN.md section 1 gives it (Bachmann et al. 2025; Leviathan et al. 2023):
  standard_i = d_i agrees with the target; judge_i = sigmoid(w . h_i + b) > threshold
  n = the number of leading draft tokens with (standard_i OR judge_i)
  emit d_1..d_n, then the correction (n < K) or the bonus (n == K)

Pure functions of tensors (and of verdict lists), no model calls: tested on their own, and used
unchanged by the actors.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.sampling import SamplingParams, probabilities, sample


class Provenance(enum.IntEnum):
    """Where an emitted token came from."""

    TARGET = 0  # sampled by the target alone: autoregressive decoding, and the first token of any mode
    MATCHED = 1  # a draft token the standard rule accepted
    JUDGE = 2  # a draft token only the judge accepted
    CORRECTION = 3  # the target's token after the first rejected draft token
    BONUS = 4  # the target's token after all K draft tokens were accepted


@dataclass(frozen=True)
class DraftBlock:
    tokens: torch.Tensor  # [K] long
    probs: torch.Tensor | None  # [K, vocab] the draft's q, None when greedy


@dataclass(frozen=True)
class Accepted:
    tokens: list[int]  # d_1..d_n, then the correction or bonus token
    provenance: list[Provenance]

    @property
    def draft_accepted(self) -> int:
        return len(self.tokens) - 1


def standard_accept(
    block: DraftBlock, target_logits: torch.Tensor, params: SamplingParams, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """target_logits: [K+1, vocab]; row i predicts the token after d_i (row 0: after the last emitted token).

    Returns (matched [K] bool, target probs [K+1, vocab] or None when greedy). Greedy: d_i == argmax, the
    argmaxes taken where the logits are (a GPU's: K ints read back, not K+1 vocab-sized rows).
    Sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), i.e. when u < p / q (on the host).
    """
    k = block.tokens.shape[0]
    if params.greedy:
        return block.tokens == target_logits[:k].argmax(-1).cpu(), None
    p = probabilities(target_logits, params)
    idx = torch.arange(k)
    p_d, q_d = p[idx, block.tokens], block.probs[idx, block.tokens]
    u = torch.rand(k, generator=gen)
    return u * q_d < p_d, p  # strict: a token the target gives probability 0 is never kept


def greedy_matched(draft: Sequence[int], tops: Sequence[int]) -> list[bool]:
    """standard_accept's greedy rule on the host: d_i is kept iff it is the target's argmax there. tops: the
    verification's K+1 argmaxes, read back at once (top n is also the token after d_1..d_n)."""
    return [d == t for d, t in zip(draft, tops)]


def judge_accept(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """scores: [K] judge logits w . h_i + b -> [K] bool, sigmoid(score) > threshold.

    Compared in logit space so that the ends are exact whatever the float rounding of sigmoid:
    threshold 0.0 accepts every draft token and threshold 1.0 none (standard verification).
    """
    if threshold <= 0.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if threshold >= 1.0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores > math.log(threshold / (1.0 - threshold))


Verdicts = torch.Tensor | Sequence[bool]  # [K] bool: a tensor (sampling, the judge) or a list (greedy, records)


def verdict_list(verdicts: Verdicts) -> list[bool]:
    """[K] verdicts as a list: a step's K flags are read on the host once, not a tensor op (or element
    read) each."""
    return verdicts.tolist() if isinstance(verdicts, torch.Tensor) else list(verdicts)


def accepted_length(matched: Verdicts, judged: Verdicts | None) -> int:
    """n: the number of leading draft tokens that pass (matched OR judged); matched, judged: [K] bool."""
    ok = verdict_list(matched)
    if judged is not None:
        ok = [m or j for m, j in zip(ok, verdict_list(judged))]
    return next((i for i, passed in enumerate(ok) if not passed), len(ok))


def final_token(
    n: int,
    block: DraftBlock,
    target_logits: torch.Tensor,
    target_probs: torch.Tensor | None,
    params: SamplingParams,
    gen: torch.Generator,
) -> int:
    """The token after d_1..d_n: the bonus from p_{K+1} when n == K, else the correction at n+1.

    Sampling a correction uses the residual norm(max(0, p - q)), which makes the emitted tokens follow the
    target's distribution exactly when only the standard rule accepts (Leviathan et al., Theorem 1).
    """
    k = block.tokens.shape[0]
    if params.greedy:
        return int(target_logits[n].argmax())
    if n == k:
        return int(sample(target_probs[k], gen))
    residual = (target_probs[n] - block.probs[n]).clamp_min(0.0)
    total = residual.sum()
    dist = residual / total if total > 0 else target_probs[n]  # p == q at this position: sample p
    return int(sample(dist, gen))


def accept(block: DraftBlock, matched: Verdicts, judged: Verdicts | None, last: int) -> Accepted:
    """Assembles a step's emitted tokens with their provenance; `last` is final_token's result."""
    n = accepted_length(matched, judged)
    k = block.tokens.shape[0]
    tokens = block.tokens[:n].tolist() + [last]
    prov = [Provenance.MATCHED if m else Provenance.JUDGE for m in verdict_list(matched)[:n]]
    prov.append(Provenance.BONUS if n == k else Provenance.CORRECTION)
    return Accepted(tokens, prov)
