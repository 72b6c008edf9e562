"""`judgeserve judge mine | train | eval` end to end on the tiny pair: mining a GSM8K-format file, training on
hand labels and mined data, and the evaluation's table, plot and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.cli import main
from engine.judge import JudgeHead
from tests.training.fakes import id_engine
from tests.training.test_mine import SOURCE, _tasks, mine

EVAL_KEYS = {"accuracy", "mean_accepted_per_step", "correct", "tasks", "judge_accepted_tokens", "completion_tokens"}


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_mine_command_makes_a_resumable_folder(tiny_yaml, gsm8k_file, tmp_path, capsys):
    argv = [
        "judge",
        "mine",
        "--config",
        str(tiny_yaml),
        "--tasks",
        str(gsm8k_file),
        "--out",
        str(tmp_path / "m"),
        "--max-new-tokens",
        "16",
        "--keep-unfinished",
        "--limit",
        "2",
    ]
    assert main(argv) == 0
    assert _json_out(capsys)["tasks_done"] == 2
    assert main(argv[:-2] + ["--offset", "1"]) == 0  # tasks 1 and 2: only 2 is new
    progress = json.loads((tmp_path / "m" / "progress.json").read_text())
    assert progress["tasks_done"] == 3  # the random model's answers hold no number: skipped, but done
    assert progress["settings"]["max_new_tokens"] == 16 and progress["settings"]["keep_unfinished"]


def test_user_errors_print_one_line(tiny_yaml, tmp_path, capsys):
    assert (
        main(
            [
                "judge",
                "mine",
                "--config",
                str(tiny_yaml),
                "--tasks",
                str(tmp_path / "none.jsonl"),
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("judgeserve: task file") and err.count("\n") == 1
    assert main(["judge", "train", "--config", str(tiny_yaml), "--data", str(tmp_path / "x.txt"), "--out", "j"]) == 1
    assert "neither a mined folder" in capsys.readouterr().err


@pytest.fixture
def hand_labels(tmp_path):
    path = tmp_path / "hand.jsonl"
    rows = [
        {
            "prompt": f"Question {i}: add {i} and {i + 1}.",
            "response": f"{i} + {i + 1} = {2 * i + 2}. Done.",
            "first_wrong_token_index": 6 + i % 4,
        }
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def judge_file(tiny_yaml, hand_labels, engine1, tmp_path, capsys):
    mined = tmp_path / "mined"
    mine(id_engine(engine1), _tasks(3), mined, source=SOURCE, max_new_tokens=20, progress=False)
    out = tmp_path / "judge.safetensors"
    argv = [
        "judge",
        "train",
        "--config",
        str(tiny_yaml),
        "--data",
        str(hand_labels),
        "--data",
        str(mined),
        "--out",
        str(out),
        "--far",
        "0.1",
    ]
    assert main(argv) == 0
    report = _json_out(capsys)
    assert {"threshold", "auc", "recall", "far", "folds", "good", "bad"} <= report.keys()
    assert report["far"] <= 0.1 and out.is_file()
    return out


def _eval_argv(config, judge, tasks) -> list[str]:
    return ["judge", "eval", "--config", str(config), "--judge", str(judge), "--tasks", str(tasks)]


def test_eval_writes_table_plot_and_json(tiny_yaml, gsm8k_file, judge_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = _eval_argv(tiny_yaml, judge_file, gsm8k_file) + [
        "--limit",
        "2",
        "--max-new-tokens",
        "22",
        "--thresholds",
        "0.0,1.0",
        "--draft-tokens",
        "6",
        "--json",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = _json_out(capsys)
    assert {"ar", "standard", "judge", "sweep"} <= report.keys()
    for key in ("ar", "standard", "judge"):
        assert EVAL_KEYS <= report[key].keys() and report[key]["tasks"] == 2
    thresholds = [r["threshold"] for r in report["sweep"]]
    assert report["judge"]["threshold"] in thresholds and {0.0, 1.0} <= set(thresholds)
    at = {r["threshold"]: r for r in report["sweep"]}
    # Greedy: ar and standard answer alike; the judge at 1.0 is standard decoding; at 0.0 it accepts all K
    # (22 tokens = the prefill's + 3 full steps of 6 + 1).
    assert report["ar"]["accuracy"] == report["standard"]["accuracy"] == at[1.0]["accuracy"]
    assert at[1.0]["mean_accepted_per_step"] == report["standard"]["mean_accepted_per_step"]
    assert at[0.0]["mean_accepted_per_step"] == 6.0 and at[1.0]["judge_accepted_tokens"] == 0
    assert report["ar"]["mean_accepted_per_step"] == 0.0
    assert json.loads((out / "eval.json").read_text()) == report
    table = (out / "eval.md").read_text()
    assert "| target only (ar) |" in table and "| standard |" in table and "| judge @ 1 |" in table
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_judge_of_another_target(tiny_yaml, gsm8k_file, engine1, tmp_path, capsys):
    draft = engine1.draft
    path = tmp_path / "foreign.safetensors"
    JudgeHead(torch.zeros(draft.args.hidden_size), 0.0, 0.5, draft.name, draft.fingerprint).save(path)
    argv = _eval_argv(tiny_yaml, path, gsm8k_file) + [
        "--limit",
        "1",
    ]
    assert main(argv) == 1
    assert "trained for target" in capsys.readouterr().err
