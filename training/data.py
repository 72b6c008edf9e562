"""Labelled judge data: the mined output folder (written by training.mine, resumable), hand labels in the
paper's form, and the flat labelled examples both turn into for training.

Mined folder (docs/judge.md has the full description):
  progress.json    the settings the data was mined with (source, target and draft fingerprints, ...) and counts
  labels.jsonl     one line per finished task, appended in task order: the prompt and answer token ids once,
                   then every labelled mismatch (position, draft token, target token, label)
  features/N.safetensors  `hidden` [mismatches, hidden]: the target's last-layer hidden state at each swapped-in
                   draft token (the judge's input), row i for mismatch i of line N

A task is finished when its line is in labels.jsonl: its features file is written first (atomically), the
line is appended and fsynced after, so an interrupted run loses at most the task in flight, and a torn last
line is cut on reopening.

Hand labels: JSONL of {"prompt", "response", "first_wrong_token_index"} (Bachmann et al. 2025): response tokens
before the index are good, the token at it bad, the rest ignored; null means no error (every token good).

Not for: running models (training.mine computes what is stored here; training.train reads it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine.weights import LoadedModel
from training import TrainingError
from training.rollout import teacher_forced

FORMAT = "judgeserve-mined/1"
LABELS, PROGRESS, FEATURES = "labels.jsonl", "progress.json", "features"
GOOD, BAD = 1, 0  # the judge outputs high for good: a good token may be accepted


@dataclass(frozen=True)
class Mismatch:
    position: int  # index in the answer where the draft's argmax differs from the target's token
    draft_token: int
    target_token: int
    label: int  # GOOD: the answer's outcome held with the draft token swapped in; BAD: it changed
    answer: str | None  # the outcome's answer after the swap (for auditing)


@dataclass(frozen=True)
class MinedTask:
    """One line of labels.jsonl."""

    task: str
    prompt_ids: list[int]
    answer_ids: list[int]  # the target's greedy answer
    answer: str | None  # its outcome's answer
    correct: bool
    skipped: str | None = None  # why the task has no labels (no answer to compare, prompt too long)
    mismatches: list[Mismatch] = field(default_factory=list)
    features: str | None = None  # the features file, relative to the folder

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> MinedTask:
        raw = json.loads(line)
        raw["mismatches"] = [Mismatch(**m) for m in raw["mismatches"]]
        return cls(**raw)


@dataclass(frozen=True)
class LabelledToken:
    """One training example, whichever format it came from."""

    group: str  # what the held-out split keeps together: "<data set>#<task id>"
    sequence: Sequence[int]  # prompt + answer (or response), shared by the task's examples rather than copied
    prompt_len: int
    position: int  # index in the answer
    token: int  # the token judged: the swapped-in draft token, or the response's own token
    target_token: int | None  # the target's greedy token at the position (mined); None for hand labels
    label: int  # GOOD or BAD

    @property
    def prefix_ids(self) -> list[int]:
        """The tokens before the judged one: prompt + answer[:position]."""
        return list(self.sequence[: self.prompt_len + self.position])


@dataclass
class LabelledSet:
    examples: list[LabelledToken]
    features: torch.Tensor  # [N, hidden] float32, row i for examples[i]

    @staticmethod
    def concat(parts: Sequence[LabelledSet], hidden_size: int) -> LabelledSet:
        examples = [e for p in parts for e in p.examples]
        feats = [p.features for p in parts if len(p.examples)]
        return LabelledSet(examples, torch.cat(feats) if feats else torch.empty(0, hidden_size))


# ---- the mined folder -------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MinedStore:
    """The output folder of one mining run, opened for appending; refuses a folder mined with other settings."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        self.folder, self.settings = folder, settings
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FEATURES).mkdir(exist_ok=True)
        progress = folder / PROGRESS
        if progress.is_file():
            old = json.loads(progress.read_text()).get("settings") or {}
            if old != settings:
                changed = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
                raise TrainingError(
                    f"{folder} holds data mined with other settings ({', '.join(changed)} differ): resume with the "
                    "same config, tasks and --max-new-tokens, or choose another --out"
                )
        self.done: set[str] = set()  # ids of finished tasks (the records themselves are not kept in memory)
        self._counts = {"tasks_done": 0, "tasks_skipped": 0, "mismatches": 0, "good": 0, "bad": 0}
        for r in self._read_finished():
            self.done.add(r.task)
            self._count(r)

    def _count(self, record: MinedTask) -> None:
        """Running counts, so that progress costs nothing per task however large the folder grows."""
        labels = [m.label for m in record.mismatches]
        c = self._counts
        c["tasks_done"] += 1
        c["tasks_skipped"] += record.skipped is not None
        c["mismatches"] += len(labels)
        c["good"] += labels.count(GOOD)
        c["bad"] += labels.count(BAD)

    def _read_finished(self) -> list[MinedTask]:
        path = self.folder / LABELS
        if not path.is_file():
            return []
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a line torn by an interrupted append: that task is redone
            data = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
        return [MinedTask.from_json(line) for line in data.decode().splitlines()]

    def append(self, record: MinedTask, features: torch.Tensor | None) -> None:
        """features: [len(record.mismatches), hidden], or None when there are no mismatches."""
        from safetensors.torch import save

        if features is not None:
            name = f"{FEATURES}/{self._counts['tasks_done']:06d}.safetensors"  # the line's index
            _write_atomic(self.folder / name, save({"hidden": features.contiguous().cpu()}))
            record = replace(record, features=name)
        with open(self.folder / LABELS, "a") as f:
            f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(record.task)
        self._count(record)
        self._write_progress()

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def _write_progress(self) -> None:
        state = {
            "format": FORMAT,
            "settings": self.settings,
            **self.counts(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_atomic(self.folder / PROGRESS, (json.dumps(state, indent=2) + "\n").encode())


def read_mined(folder: Path) -> tuple[dict[str, Any], list[MinedTask]]:
    """(settings, finished tasks) of a mined folder."""
    progress = folder / PROGRESS
    if not progress.is_file():
        raise TrainingError(f"{folder} is not a mined data folder (no {PROGRESS}); see `judgeserve judge mine`")
    state = json.loads(progress.read_text())
    if state.get("format") != FORMAT:
        raise TrainingError(f"{folder}: format {state.get('format')!r}, expected {FORMAT!r}")
    labels = folder / LABELS
    text = labels.read_text() if labels.is_file() else ""
    lines = text.split("\n")[:-1]  # a last line without its newline is a task still being written
    return state["settings"], [MinedTask.from_json(line) for line in lines if line.strip()]


def load_mined(folder: Path, target: LoadedModel) -> LabelledSet:
    """The labelled mismatches of a mined folder with their stored features; refuses another target's data."""
    from safetensors.torch import load_file

    settings, records = read_mined(folder)
    mined_for = settings["target"]
    if mined_for["fingerprint"] != target.fingerprint:
        raise TrainingError(
            f"{folder} was mined with target {mined_for['name']!r} (fingerprint {mined_for['fingerprint']}), but the "
            f"config's target is {target.name!r} (fingerprint {target.fingerprint}): its features are another "
            "model's hidden states; mine again with this config"
        )
    examples, feats = [], []
    for r in records:
        if not r.mismatches:
            continue
        hidden = load_file(str(folder / r.features))["hidden"]
        if hidden.shape != (len(r.mismatches), target.args.hidden_size):
            raise TrainingError(f"{folder / r.features}: shape {tuple(hidden.shape)} does not match its labels")
        sequence = tuple(r.prompt_ids + r.answer_ids)
        for m in r.mismatches:
            group = f"{folder.name}#{r.task}"
            examples.append(
                LabelledToken(group, sequence, len(r.prompt_ids), m.position, m.draft_token, m.target_token, m.label)
            )
        feats.append(hidden.float().cpu())
    width = target.args.hidden_size
    return LabelledSet(examples, torch.cat(feats) if feats else torch.empty(0, width))


# ---- hand labels ------------------------------------------------------------------------------------------------


def load_hand_labels(path: Path, target: LoadedModel) -> LabelledSet:
    """Hand labels (module docstring) with features computed by one teacher-forced target pass per answer.

    The prompt is the user message (the target's chat template is applied, as mining does); the response and
    first_wrong_token_index are in the target tokenizer's tokens of `response`.
    """
    if not path.is_file():
        raise TrainingError(f"hand-label file {path} does not exist")
    tok = target.tokenizer
    examples, feats = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            prompt, response, wrong = record["prompt"], record["response"], record["first_wrong_token_index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TrainingError(f"{where}: expected {{prompt, response, first_wrong_token_index}}") from None
        prompt_ids, response_ids = tok.chat([{"role": "user", "content": prompt}]), tok.encode(response)
        if wrong is not None and not (isinstance(wrong, int) and 0 <= wrong < len(response_ids)):
            raise TrainingError(
                f"{where}: first_wrong_token_index {wrong!r} is not a token index of the response "
                f"({len(response_ids)} tokens with this target's tokenizer) or null"
            )
        kept = response_ids if wrong is None else response_ids[: wrong + 1]  # later tokens are ignored
        if not kept:
            continue
        hidden = teacher_forced(target.model, prompt_ids, kept).hidden  # [len(kept), hidden]
        sequence = tuple(prompt_ids + kept)
        group = f"{path.name}#{record.get('id', number)}"
        for i, token in enumerate(kept):
            label = BAD if i == wrong else GOOD
            examples.append(LabelledToken(group, sequence, len(prompt_ids), i, token, None, label))
        feats.append(hidden.float().cpu())
    width = target.args.hidden_size
    return LabelledSet(examples, torch.cat(feats) if feats else torch.empty(0, width))


def load_data(paths: Sequence[Path], target: LoadedModel) -> LabelledSet:
    """Any mix of mined folders and hand-label .jsonl files."""
    parts = []
    for p in paths:
        if p.is_dir():
            parts.append(load_mined(p, target))
        elif p.suffix == ".jsonl":
            parts.append(load_hand_labels(p, target))
        else:
            raise TrainingError(f"--data {p}: neither a mined folder nor a hand-label .jsonl file")
    return LabelledSet.concat(parts, target.args.hidden_size)
