"""`judgeserve judge mine | train | eval`: the argument parsing and the three commands (docs/judge.md).

Heavy imports (torch, the models) happen inside the commands, so that building the parser stays cheap.
Not for: the pipeline itself (training.mine, training.train, training.evaluate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CONFIG = "config/qwen-coder.yaml"


def _config(path: str, judge: str | None = None):
    from engine.config import load_config

    return load_config(path, {"judge.path": str(Path(judge).resolve())} if judge else None)


def _cmd_mine(args: argparse.Namespace) -> int:
    from engine.decode import Engine
    from training.mine import mine
    from training.tasks import load_tasks, select

    config = _config(args.config)
    tasks = select(load_tasks(args.tasks), args.offset, args.limit)
    max_new = args.max_new_tokens or config.decoding.max_new_tokens
    engine = Engine.from_config(config)
    counts = mine(
        engine,
        tasks,
        Path(args.out),
        source=args.tasks,
        max_new_tokens=max_new,
        batch_size=args.batch_size,
        group=args.group,
        keep_unfinished=args.keep_unfinished,
    )
    print(json.dumps(counts))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from engine.weights import load_model
    from training.data import load_data
    from training.train import train_judge

    config = _config(args.config)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    target = load_model(config.target, device=config.runtime.device, max_seq_len=config.decoding.max_seq_len)
    data = load_data([Path(d) for d in args.data], target)
    report = train_judge(
        data, target, far=args.far, folds=args.folds, seed=args.seed, l2=args.l2, sources=", ".join(args.data)
    )
    report.head.save(args.out)
    print(json.dumps({"out": args.out, **report.as_dict()}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from engine.decode import Engine
    from training.evaluate import DEFAULT_SWEEP, evaluate, markdown_table, write_report
    from training.tasks import load_tasks, select

    config = _config(args.config, args.judge)
    tasks = select(load_tasks(args.tasks), args.offset, args.limit)
    engine = Engine.from_config(config)  # loads the judge and refuses one trained for another target
    report = evaluate(
        engine,
        tasks,
        args.thresholds if args.thresholds is not None else DEFAULT_SWEEP,
        draft_tokens=args.draft_tokens or config.decoding.draft_tokens,
        max_new_tokens=args.max_new_tokens or config.decoding.max_new_tokens,
        run_ar=args.run_ar,
    )
    report = {"source": args.tasks, "judge_file": args.judge, **report}
    if args.out:
        for path in write_report(report, Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(report) if args.json else markdown_table(report))
    return 0


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers, e.g. 0.2,0.5,0.8") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("thresholds must be in [0, 1]")
    return values


def _task_range(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        required=True,
        metavar="SOURCE",
        help="humaneval[:PATH], PATH or gsm8k:PATH (GSM8K JSONL, prose), gsm8k-code:PATH (programs)",
    )
    p.add_argument("--limit", type=int, help="at most this many tasks")
    p.add_argument("--offset", type=int, default=0, help="skip this many tasks first")
    p.add_argument(
        "--max-new-tokens", type=int, help="answer length limit; default: the config's decoding.max_new_tokens"
    )


def add_judge_parser(subparsers) -> None:
    """Adds `judge` with its three subcommands to the `judgeserve` parser's subparsers."""
    judge = subparsers.add_parser("judge", help="mine labels, train and evaluate a judge head")
    sub = judge.add_subparsers(dest="judge_command", required=True)

    mine = sub.add_parser("mine", help="label draft/target mismatches automatically (resumable)")
    mine.add_argument("--config", default=DEFAULT_CONFIG)
    _task_range(mine)
    mine.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    mine.add_argument("--batch-size", type=int, default=32, help="target sequences per pass (answers, continuations)")
    mine.add_argument("--group", type=int, default=8, help="tasks labelled together (stored when all are done)")
    mine.add_argument(
        "--keep-unfinished",
        action="store_true",
        help="also label tasks whose answer was cut by --max-new-tokens (skipped by default)",
    )
    mine.set_defaults(func=_cmd_mine)

    train = sub.add_parser("train", help="fit the judge head on mined and/or hand-labelled data")
    train.add_argument("--config", default=DEFAULT_CONFIG)
    train.add_argument(
        "--data", action="append", required=True, help="a mined folder or a hand-label .jsonl file (repeatable)"
    )
    train.add_argument("--out", required=True, help="the judge file to write (.safetensors)")
    train.add_argument("--far", type=float, default=0.05, help="false-accept rate on out-of-fold bad tokens (threshold)")
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds (by task)")
    train.add_argument("--seed", type=int, default=0, help="seed of the tasks' fold assignment")
    train.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the standardized weights")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="accuracy vs accepted tokens per step: ar, standard, judge thresholds")
    ev.add_argument("--config", default=DEFAULT_CONFIG)
    ev.add_argument("--judge", required=True, help="the judge file")
    _task_range(ev)
    ev.add_argument("--thresholds", type=_thresholds, help="comma-separated; the file's own is always added")
    ev.add_argument("--draft-tokens", type=int, help="K; default: the config's decoding.draft_tokens")
    ev.add_argument(
        "--run-ar",
        action="store_true",
        help="decode target-only (ar) too; by default its accuracy is standard's (greedy: the same answers)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ev.add_argument("--out", help="folder for eval.md, eval.png and eval.json")
    ev.set_defaults(func=_cmd_eval)
