"""Trains the judge head: class-weighted logistic regression on the target's frozen last-layer hidden states
(Bachmann et al. 2025 train the same linear head with class-weighted binary cross-entropy, in minutes).

Label convention: GOOD (1) = the token may be accepted; the head scores high for good. Cross-validation by
task (seeded folds; a task's tokens stay in one fold) gives every token an out-of-fold score, from a head
fitted on the other folds' tasks. On those scores: ROC AUC, and the threshold, the lowest one whose
false-accept rate on BAD tokens is at most `far`; recall is the share of GOOD tokens it accepts. Both are
measured with engine.verify.judge_accept on JudgeHead.scores, the rule and arithmetic the engine uses when
it serves. The saved head is then fitted on every token.

Why folds rather than one held-out split: mined data is small (a 2-core CPU labels a few hundred tokens an
hour) and bad tokens are rare, so a held-out fifth holds a handful of them, and the AUC and the threshold
chosen on them swing from split to split; out-of-fold scores use every bad token for both. The threshold
is chosen on heads fitted on (folds - 1) / folds of the data and applied to the head fitted on all of it,
whose scores are alike but not the same: docs/judge.md's evaluation is the check.

Not for: producing labels (training.mine, training.data) or decoding with the head (engine.decode).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from engine.judge import JudgeHead
from engine.verify import judge_accept
from engine.weights import LoadedModel
from training import TrainingError
from training.data import BAD, GOOD, LabelledSet


@dataclass(frozen=True)
class TrainReport:
    head: JudgeHead
    auc: float  # out-of-fold ROC AUC of the score, GOOD as the positive class
    recall: float  # GOOD tokens accepted at the threshold, out of fold
    far: float  # BAD tokens accepted at the threshold, out of fold (<= the target FAR)
    counts: tuple[int, int]  # (good, bad)
    folds: int

    def as_dict(self) -> dict:
        return {
            "threshold": self.head.threshold,
            "auc": round(self.auc, 4),
            "recall": round(self.recall, 4),
            "far": round(self.far, 4),
            "folds": self.folds,
            "good": self.counts[0],
            "bad": self.counts[1],
        }


def task_folds(groups: list[str], folds: int, seed: int) -> torch.Tensor:
    """[N] long: each example's fold in 0 .. folds - 1. A task's examples share one fold; the tasks are dealt
    to the folds in a seeded order, so folds differ by at most one task."""
    unique = sorted(set(groups))
    if folds < 2 or len(unique) < folds:
        raise TrainingError(f"cross-validation over {folds} folds needs 2 <= folds <= tasks ({len(unique)} tasks)")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    fold = {unique[i]: k % folds for k, i in enumerate(order)}
    return torch.tensor([fold[g] for g in groups])


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, max_iter: int = 500
) -> tuple[torch.Tensor, float]:
    """x: [N, hidden], y: [N] in {0, 1} -> (weight [hidden], bias) on the raw features.

    Class-weighted BCE (each class weighs half in total, however rare bad tokens are) plus l2 / 2 |w|^2, by
    full-batch L-BFGS on standardized features (hidden states have a few very large dimensions, which would
    make the problem ill-conditioned); the standardization is folded back into w and b.
    """
    y = y.float()
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise TrainingError(f"training needs both good and bad examples (good {int(n_pos)}, bad {int(n_neg)})")
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    sample_weight = torch.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * n_neg))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=sample_weight)
        loss = loss + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w.detach() / std).float()
    return w_raw, float(b.detach() - (w_raw * mean).sum())


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The probability that a random GOOD example scores above a random BAD one (ties count half), from the
    rank-sum (Mann-Whitney U) statistic with average ranks for ties."""
    pos = labels == GOOD
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores.double(), sorted=True, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1  # 1-based rank of each distinct value's first copy
    avg_rank = first_rank + (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][pos].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def threshold_at_far(bad_scores: torch.Tensor, far: float) -> float:
    """The probability threshold for judge_accept that accepts at most floor(far * n) of the bad scores."""
    allowed = math.floor(far * len(bad_scores) + 1e-9)
    if allowed >= len(bad_scores):
        return 0.0
    cut = float(bad_scores.double().sort(descending=True).values[allowed])  # accept strictly above this
    p = 1.0 / (1.0 + math.exp(-cut)) if cut > -700 else 0.0
    # logit(sigmoid(cut)) can land a hair below cut: step up until judge_accept agrees.
    while p < 1.0 and int(judge_accept(bad_scores, p).sum()) > allowed:
        p = math.nextafter(p, 1.0)
    return p


def train_judge(
    data: LabelledSet,
    target: LoadedModel,
    *,
    far: float = 0.05,
    folds: int = 5,
    seed: int = 0,
    l2: float = 1e-3,
    sources: str = "",
) -> TrainReport:
    if not 0.0 <= far < 1.0:
        raise TrainingError("--far must be in [0, 1)")
    if data.features.shape[1:] != (target.args.hidden_size,):
        raise TrainingError(
            f"features of width {tuple(data.features.shape[1:])}, the target's hidden size is {target.args.hidden_size}"
        )
    labels = torch.tensor([e.label for e in data.examples])
    n_good, n_bad = int((labels == GOOD).sum()), int((labels == BAD).sum())
    if min(n_good, n_bad) == 0:
        raise TrainingError(f"training needs both good and bad examples (good {n_good}, bad {n_bad})")
    fold = task_folds([e.group for e in data.examples], folds, seed)
    scores = torch.empty(len(labels))
    for k in range(folds):
        out = fold == k
        try:
            weight, bias = fit_logistic(data.features[~out], labels[~out], l2=l2)
        except TrainingError as err:
            raise TrainingError(f"fold {k + 1} of {folds}: {err}; mine more tasks, or change --seed / --folds") from None
        scores[out] = JudgeHead(weight, bias, 1.0, target.name, target.fingerprint).scores(data.features[out])
    good, bad = scores[labels == GOOD], scores[labels == BAD]
    threshold = threshold_at_far(bad, far)
    recall = float(judge_accept(good, threshold).float().mean())
    far_seen = float(judge_accept(bad, threshold).float().mean())
    auc = roc_auc(scores, labels)
    weight, bias = fit_logistic(data.features, labels, l2=l2)
    notes = {
        "trained": (
            f"{time.strftime('%Y-%m-%d')}: {len(data.examples)} labelled tokens ({sources}), good/bad "
            f"{n_good}/{n_bad}; {folds}-fold cross-validation by task: AUC {auc:.4f}, recall {recall:.4f} at "
            f"FAR {far_seen:.4f} (target FAR {far}); head fitted on all tokens"
        ),
        "auc": f"{auc:.6f}",
        "recall": f"{recall:.6f}",
        "far": f"{far_seen:.6f}",
        "far_target": repr(far),
        "examples": str(len(data.examples)),
        "folds": str(folds),
    }
    head = JudgeHead(weight, bias, threshold, target.name, target.fingerprint, notes)
    return TrainReport(head, auc, recall, far_seen, (n_good, n_bad), folds)
