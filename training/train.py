"""Trains the judge head: class-weighted logistic regression on the target's frozen last-layer hidden states
(Bachmann et al. 2025 train the same linear head with class-weighted binary cross-entropy, in minutes).

Label convention: GOOD (1) = the token may be accepted; the head scores high for good. A held-out split by
task (seeded) measures ROC AUC and picks the threshold: the lowest one whose false-accept rate on held-out
BAD tokens is at most `far`; recall is the share of held-out GOOD tokens it accepts. Both are measured with
engine.verify.judge_accept on JudgeHead.scores, the rule and arithmetic the engine uses when it serves. The
saved head is the one fitted on the training split (refitting on everything would move the scores the
threshold was chosen for).

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
    auc: float  # held-out ROC AUC of the score, GOOD as the positive class
    recall: float  # held-out GOOD tokens accepted at the threshold
    far: float  # held-out BAD tokens accepted at the threshold (<= the target FAR)
    train_counts: tuple[int, int]  # (good, bad)
    heldout_counts: tuple[int, int]

    def as_dict(self) -> dict:
        return {
            "threshold": self.head.threshold,
            "auc": round(self.auc, 4),
            "recall": round(self.recall, 4),
            "far": round(self.far, 4),
            "train": {"good": self.train_counts[0], "bad": self.train_counts[1]},
            "heldout": {"good": self.heldout_counts[0], "bad": self.heldout_counts[1]},
        }


def heldout_mask(groups: list[str], fraction: float, seed: int) -> torch.Tensor:
    """[N] bool: the examples whose group (task) falls in the held-out share; a task is never split."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise TrainingError(f"the data has {len(unique)} task(s); a held-out split needs at least 2")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    held = {unique[i] for i in order[:n_held]}
    return torch.tensor([g in held for g in groups], dtype=torch.bool)


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
    holdout: float = 0.2,
    seed: int = 0,
    l2: float = 1e-3,
    sources: str = "",
) -> TrainReport:
    if not 0.0 <= far < 1.0:
        raise TrainingError("--far must be in [0, 1)")
    if not 0.0 < holdout < 1.0:
        raise TrainingError("--holdout must be in (0, 1)")
    if data.features.shape[1:] != (target.args.hidden_size,):
        raise TrainingError(
            f"features of width {tuple(data.features.shape[1:])}, the target's hidden size is {target.args.hidden_size}"
        )
    labels = torch.tensor([e.label for e in data.examples])
    held = heldout_mask([e.group for e in data.examples], holdout, seed)
    counts = {
        name: (int((labels[m] == GOOD).sum()), int((labels[m] == BAD).sum()))
        for name, m in (("train", ~held), ("heldout", held))
    }
    if min(counts["heldout"]) == 0:
        good, bad = counts["heldout"]
        raise TrainingError(
            f"the held-out tasks have {good} good and {bad} bad examples: mine more tasks, or change --seed / --holdout"
        )
    weight, bias = fit_logistic(data.features[~held], labels[~held], l2=l2)
    probe = JudgeHead(weight, bias, 1.0, target.name, target.fingerprint)
    scores = probe.scores(data.features[held])
    good, bad = scores[labels[held] == GOOD], scores[labels[held] == BAD]
    threshold = threshold_at_far(bad, far)
    recall = float(judge_accept(good, threshold).float().mean())
    far_seen = float(judge_accept(bad, threshold).float().mean())
    auc = roc_auc(scores, labels[held])
    (train_good, train_bad), (held_good, held_bad) = counts["train"], counts["heldout"]
    notes = {
        "trained": (
            f"{time.strftime('%Y-%m-%d')}: {len(data.examples)} labelled tokens ({sources}); train good/bad "
            f"{train_good}/{train_bad}, held-out good/bad {held_good}/{held_bad}; held-out AUC {auc:.4f}, "
            f"recall {recall:.4f} at FAR {far_seen:.4f} (target FAR {far})"
        ),
        "auc": f"{auc:.6f}",
        "recall": f"{recall:.6f}",
        "far": f"{far_seen:.6f}",
        "far_target": repr(far),
        "examples": str(len(data.examples)),
    }
    head = JudgeHead(weight, bias, threshold, target.name, target.fingerprint, notes)
    return TrainReport(head, auc, recall, far_seen, counts["train"], counts["heldout"])
