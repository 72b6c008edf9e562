"""Evaluates a judge: task accuracy against mean accepted draft tokens per step, for target-only decoding
(mode ar), standard speculative decoding and judge decoding at a sweep of thresholds, on the same tasks with
one Engine (one model load). Greedy decoding throughout, so ar and standard give the same answers and the
judge's effect on accuracy is the whole difference.

Accuracy: GSM8K exact final number; HumanEval pass@1 (one greedy sample, its tests run in the sandbox).
Mean accepted per step is pooled over the tasks: accepted draft tokens / speculative steps (n in DESIGN.md).

Not for: timing (see bench/; this runs on whatever machine and reports no speed) or training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.config import Mode
from engine.decode import Engine
from engine.sampling import SamplingParams
from training.tasks import Task

DEFAULT_SWEEP = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class ModeResult:
    mode: str  # ar, standard or judge
    threshold: float | None  # judge only
    accuracy: float
    mean_accepted_per_step: float
    correct: int
    tasks: int
    judge_accepted_tokens: int
    completion_tokens: int


def run_mode(
    engine: Engine,
    tasks: Sequence[Task],
    mode: Mode,
    *,
    threshold: float | None,
    draft_tokens: int,
    max_new_tokens: int,
    bar=None,
) -> ModeResult:
    correct = accepted = steps = judged = tokens = 0
    params = SamplingParams(max_tokens=max_new_tokens)
    for task in tasks:
        request = engine.make_request(
            messages=task.messages(), params=params, mode=mode, draft_tokens=draft_tokens, threshold=threshold
        )
        out = engine.generate(request)
        correct += task.outcome(out.text).correct
        accepted, steps = accepted + out.draft_tokens_accepted, steps + out.speculative_steps
        judged, tokens = judged + out.judge_accepted_tokens, tokens + out.completion_tokens
        if bar is not None:
            bar.update()
    return ModeResult(
        mode.value,
        threshold if mode is Mode.JUDGE else None,
        correct / len(tasks) if tasks else 0.0,
        accepted / steps if steps else 0.0,
        correct,
        len(tasks),
        judged,
        tokens,
    )


def evaluate(
    engine: Engine,
    tasks: Sequence[Task],
    thresholds: Sequence[float],
    *,
    draft_tokens: int,
    max_new_tokens: int,
    progress: bool = True,
    run_ar: bool = False,
) -> dict:
    """The JSON report: {"ar", "standard", "judge" (at the judge file's own threshold), "sweep": [...]}.

    Target-only accuracy is taken from standard speculative decoding's answers unless `run_ar`: greedy
    standard output is the target's own output token for token (the engine's first correctness anchor,
    tests/engine), and decoding everything once more autoregressively is the slowest run of all."""
    from tqdm import tqdm

    own = engine.judge.threshold
    sweep = sorted(set(thresholds) | {own})
    runs = ([(Mode.AR, None)] if run_ar else []) + [(Mode.STANDARD, None)] + [(Mode.JUDGE, t) for t in sweep]
    results = []
    with tqdm(total=len(runs) * len(tasks), unit="answer", desc="evaluating", disable=not progress) as bar:
        for mode, t in runs:
            bar.set_postfix(mode=mode.value if t is None else f"judge@{_t(t)}", refresh=False)
            results.append(
                run_mode(
                    engine, tasks, mode, threshold=t, draft_tokens=draft_tokens, max_new_tokens=max_new_tokens, bar=bar
                )
            )
    if not run_ar:
        std = results[0]
        results.insert(0, ModeResult(Mode.AR.value, None, std.accuracy, 0.0, std.correct, std.tasks, 0, std.completion_tokens))
    judged = results[2:]
    return {
        "ar": asdict(results[0]),
        "standard": asdict(results[1]),
        "judge": asdict(judged[sweep.index(own)]),
        "sweep": [asdict(r) for r in judged],
        "tasks": len(tasks),
        "draft_tokens": draft_tokens,
        "max_new_tokens": max_new_tokens,
    }


def _t(threshold: float) -> str:
    """A threshold as short text, but never rounded to 0 or 1, which mean "accept every draft token" and
    "judge off": a trained threshold can be 1 - 1e-9."""
    short = f"{threshold:.4g}"
    rounded_to_an_end = float(short) in (0.0, 1.0) and threshold not in (0.0, 1.0)
    return f"{threshold:.12g}" if rounded_to_an_end else short


def markdown_table(report: dict) -> str:
    rows = [("target only (ar)", report["ar"]), ("standard", report["standard"])]
    rows += [(f"judge @ {_t(r['threshold'])}", r) for r in report["sweep"]]
    header = (
        f"{report['tasks']} tasks, K = {report['draft_tokens']}, greedy, at most {report['max_new_tokens']} new "
        f"tokens; judge file threshold {_t(report['judge']['threshold'])}"
    )
    lines = [
        header,
        "",
        "| decoding | accuracy | mean accepted / step | judge-accepted tokens | output tokens |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['accuracy']:.3f} ({r['correct']}/{r['tasks']}) | {r['mean_accepted_per_step']:.2f} | "
            f"{r['judge_accepted_tokens']} | {r['completion_tokens']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """x: mean accepted tokens per step, y: accuracy; one labelled point per threshold, standard as its own
    point, target-only accuracy as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sweep = report["sweep"]
    ax.plot([r["mean_accepted_per_step"] for r in sweep], [r["accuracy"] for r in sweep], "o-", label="judge")
    for r in sweep:
        ax.annotate(
            _t(r["threshold"]),
            (r["mean_accepted_per_step"], r["accuracy"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    std = report["standard"]
    ax.plot([std["mean_accepted_per_step"]], [std["accuracy"]], "s", color="black", label="standard")
    ax.axhline(report["ar"]["accuracy"], color="grey", linestyle="--", label="target only")
    ax.set_xlabel("mean accepted draft tokens per step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.md", out / "eval.png", out / "eval.json"]
    paths[0].write_text(markdown_table(report))
    plot(report, paths[1])
    paths[2].write_text(json.dumps(report, indent=2) + "\n")
    return paths
