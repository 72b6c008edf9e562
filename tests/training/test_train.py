"""training.train: the logistic head separates separable data, AUC and the FAR threshold are computed right,
the split keeps tasks whole, and the saved head belongs to its target."""

from __future__ import annotations

import math

import pytest
import torch

from engine.judge import JudgeError, load_judge
from engine.verify import judge_accept
from training import TrainingError
from training.data import BAD, GOOD, LabelledSet, LabelledToken
from training.train import fit_logistic, roc_auc, task_folds, threshold_at_far, train_judge


def _toy_set(hidden: int, n_tasks: int = 40, per_task: int = 10, seed: int = 0) -> LabelledSet:
    """Linearly separable: good tokens lie on the positive side of a random direction, with a margin."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(hidden, generator=gen)
    direction /= direction.norm()
    x = torch.randn(n_tasks * per_task, hidden, generator=gen) * 3.0
    side = (x @ direction) > 0
    x += direction * torch.where(side, 1.0, -1.0)[:, None]  # a margin of 1 on both sides
    examples = [
        LabelledToken(f"toy#{i // per_task}", (1, 2, 3), 1, 1, 7, 8, GOOD if bool(side[i]) else BAD)
        for i in range(len(x))
    ]
    return LabelledSet(examples, x)


def test_roc_auc_equals_the_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (60,), generator=gen).float()  # many ties
    labels = torch.randint(0, 2, (60,), generator=gen)
    pos, neg = scores[labels == GOOD], scores[labels == BAD]
    pairwise = ((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean()
    assert roc_auc(scores, labels) == pytest.approx(float(pairwise))
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([BAD, GOOD])) == 1.0


@pytest.mark.parametrize("far", [0.0, 0.05, 0.2, 0.5])
def test_threshold_accepts_at_most_the_allowed_share_of_bad_tokens(far):
    bad = torch.randn(200, generator=torch.Generator().manual_seed(2))
    p = threshold_at_far(bad, far)
    accepted = int(judge_accept(bad, p).sum())
    assert accepted <= math.floor(far * 200) and 0.0 <= p <= 1.0
    assert accepted >= math.floor(far * 200) - 1  # and not needlessly strict (no ties in these scores)


def test_folds_keep_tasks_whole_are_balanced_and_seeded():
    groups = [f"t{i // 3}" for i in range(60)]  # 20 tasks of 3 tokens
    fold = task_folds(groups, 5, seed=3)
    assert torch.equal(fold, task_folds(groups, 5, seed=3))
    assert not torch.equal(fold, task_folds(groups, 5, seed=4))
    assert all(len({int(f) for g2, f in zip(groups, fold) if g2 == g}) == 1 for g in set(groups))
    assert torch.bincount(fold).tolist() == [12] * 5  # 4 tasks per fold
    with pytest.raises(TrainingError, match="folds <= tasks"):
        task_folds(["one"] * 5 + ["two"] * 5, 3, seed=0)


def test_logistic_regression_separates_a_separable_set():
    data = _toy_set(32)
    labels = torch.tensor([e.label for e in data.examples])
    weight, bias = fit_logistic(data.features, labels, l2=1e-4)
    scores = data.features @ weight + bias
    assert roc_auc(scores, labels) > 0.999
    assert ((scores > 0).long() == labels).float().mean() > 0.98


def test_train_judge_reports_auc_and_recall_and_saves_a_head_for_its_target(engine1, tmp_path):
    target, draft = engine1.target, engine1.draft
    report = train_judge(_toy_set(target.args.hidden_size), target, far=0.05, sources="toy")
    assert report.auc > 0.99 and report.recall > 0.9 and report.far <= 0.05
    assert 0.0 < report.head.threshold < 1.0
    assert "AUC" in report.head.notes["trained"] and report.head.notes["far_target"] == "0.05"
    assert report.folds == 5 and sum(report.counts) == 400
    path = tmp_path / "judge.safetensors"
    report.head.save(path)
    head = load_judge(
        path, target_name=target.name, target_fingerprint=target.fingerprint, hidden_size=target.args.hidden_size
    )
    assert head.threshold == report.head.threshold and torch.equal(head.weight, report.head.weight)
    with pytest.raises(JudgeError, match="trained for target"):
        load_judge(
            path, target_name=draft.name, target_fingerprint=draft.fingerprint, hidden_size=draft.args.hidden_size
        )


def test_train_judge_refuses_data_without_both_labels(engine1):
    data = _toy_set(engine1.target.args.hidden_size)
    only_good = LabelledSet(
        [e for e in data.examples if e.label == GOOD], data.features[[e.label == GOOD for e in data.examples]]
    )
    with pytest.raises(TrainingError, match="bad 0"):
        train_judge(only_good, engine1.target)
