"""Automatic labelling of draft/target mismatches (AutoJudge, Garipov et al. 2025), resumable.

For each task (`group` tasks at a time, their sequences batched together):
  1. the target answers greedily (the tokens greedy standard decoding would give: the target's own);
  2. one teacher-forced draft pass over prompt + answer finds the positions i where the draft's argmax
     d_i differs from the target's token a_i (what the draft would propose there as its first token);
  3. for each such i the target continues answer[:i] + [d_i] greedily to the end (batched, see
     training.rollout.greedy_rows), and the task's outcome is checked: the same answer as the target's
     own -> GOOD (the mismatch was harmless), another answer -> BAD (it mattered);
  4. the judge's input for that decision is stored with the label: the target's last-layer hidden state
     (after the final norm) at d_i's position given answer[:i], exactly what Engine._verify hands the judge
     for a draft token d_i. It falls out of the continuation's first pass for free.

Only mismatches are labelled: a matched token is accepted by the standard rule whatever the judge says, so
the judge only ever decides on mismatches, and matched tokens (most of them) would swamp the classes with
easy positives. Tasks whose own answer has no outcome to compare (no number in it) are recorded as skipped,
and so, unless `keep_unfinished`, are answers cut by max_new_tokens: the last number of a cut chain of
thought is not its answer. (A continuation that runs past the limit is compared as it stands: a swap that
makes the target ramble has changed the outcome.)

Not for: training (training.train) or the storage format (training.data).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.decode import Engine, RequestError
from engine.sampling import SamplingParams
from training import TrainingError
from training.data import BAD, GOOD, MinedStore, MinedTask, Mismatch
from training.rollout import Row, greedy_rows, teacher_forced
from training.tasks import Task, parse_source


def label_task(engine: Engine, task: Task, **kwargs) -> tuple[MinedTask, torch.Tensor | None]:
    """label_tasks for one task."""
    return label_tasks(engine, [task], **kwargs)[0]


def label_tasks(
    engine: Engine,
    tasks: Sequence[Task],
    *,
    max_new_tokens: int,
    batch_size: int,
    keep_unfinished: bool = False,
    note: Callable[[str], None] = lambda _: None,
) -> list[tuple[MinedTask, torch.Tensor | None]]:
    """Each task's labelled mismatches and their features [mismatches, hidden] (None when there are none), in
    the tasks' order. The target's answers to all the tasks run as one batch, and so do the continuations of
    all their mismatches (`batch_size` sequences per pass: on a CPU a pass of many rows costs little more
    than a pass of one). `note` hears the stage (a group of tasks of the real pair takes minutes on a CPU)."""
    target, decode, eos = engine.target.model, engine.tokenizer.decode, set(engine.tokenizer.eos_ids)
    results: list[tuple[MinedTask, torch.Tensor | None] | None] = [None] * len(tasks)
    asked: list[tuple[int, list[int], int]] = []  # (task index, prompt, max new tokens)
    for j, task in enumerate(tasks):
        try:
            request = engine.make_request(messages=task.messages(), params=SamplingParams(max_tokens=max_new_tokens))
        except RequestError as err:  # a prompt too long for the context window: skip it, keep mining
            results[j] = MinedTask(task.id, [], [], None, False, skipped=str(err)), None
            continue
        asked.append((j, list(request.prompt_ids), request.params.max_tokens))
    note(f"answering {len(asked)} tasks")
    # The target's greedy answers (greedy standard decoding gives the same tokens); a row's cache then holds
    # prompt + answer but its last token: the shared prefix of the continuations from any answer position.
    rows = [Row(None, 0, prompt, len(prompt) + n) for _, prompt, n in asked]
    answers = greedy_rows(target, rows, eos_ids=eos, width=batch_size, keep_caches=True)
    labelling: dict[int, tuple] = {}  # task index -> (prompt, answer, own outcome, drafted, positions)
    continuations: list[Row] = []
    for (j, prompt, n), done in zip(asked, answers):
        task, answer = tasks[j], done.tokens
        if len(answer) >= n and answer[-1] not in eos and not keep_unfinished:
            why = f"the answer did not end within max_new_tokens ({max_new_tokens})"
            results[j] = MinedTask(task.id, prompt, answer, None, False, skipped=why), None
            continue
        own = task.outcome(decode(answer))
        if own.answer is None:
            why = f"no outcome to compare ({own.detail})"
            results[j] = MinedTask(task.id, prompt, answer, None, False, skipped=why), None
            continue
        drafted = teacher_forced(engine.draft.model, prompt, answer).predictions  # [n]
        positions = [i for i, (d, a) in enumerate(zip(drafted, answer)) if d != a]
        if not positions:
            results[j] = MinedTask(task.id, prompt, answer, own.answer, own.correct), None
            continue
        labelling[j] = (prompt, answer, own, drafted, positions)
        end = len(prompt) + max_new_tokens
        continuations += [Row(done.cache, len(prompt) + i, [drafted[i]], end) for i in positions]
    finished = 0

    def count(_: int) -> None:
        nonlocal finished
        finished += 1
        note(f"continuing: {finished} of {len(continuations)} mismatches done")

    count_done = count if continuations else None
    rolled = iter(greedy_rows(target, continuations, eos_ids=eos, width=batch_size, done=count_done))
    for j, (prompt, answer, own, drafted, positions) in labelling.items():
        mismatches, features = [], []
        for i in positions:
            row = next(rolled)
            swapped = tasks[j].outcome(decode(answer[:i] + [drafted[i]] + row.tokens))
            label = GOOD if swapped.answer == own.answer else BAD
            mismatches.append(Mismatch(i, drafted[i], answer[i], label, swapped.answer))
            features.append(row.hidden)
        record = MinedTask(tasks[j].id, prompt, answer, own.answer, own.correct, mismatches=mismatches)
        results[j] = record, torch.stack(features)
    return results  # type: ignore[return-value]


def settings_for(engine: Engine, source: str, max_new_tokens: int, keep_unfinished: bool = False) -> dict:
    """What a mined folder must have been mined with to be resumed (or trained on) with this engine."""
    kind, path = parse_source(source)
    return {
        "source": kind.value + (f":{path.resolve()}" if path is not None else ""),
        "target": {"name": engine.target.name, "fingerprint": engine.target.fingerprint},
        "draft": {"name": engine.draft.name, "fingerprint": engine.draft.fingerprint},
        "max_new_tokens": max_new_tokens,
        "keep_unfinished": keep_unfinished,
    }


def mine(
    engine: Engine,
    tasks: Sequence[Task],
    out: Path,
    *,
    source: str,
    max_new_tokens: int,
    batch_size: int = 32,
    group: int = 8,
    keep_unfinished: bool = False,
    progress: bool = True,
    on_task: Callable[[MinedTask], None] | None = None,
) -> dict[str, int]:
    """Labels every task not yet in `out` (a resumed run skips finished ones), `group` tasks at a time, and
    returns the folder's counts. A group's tasks are stored when the group is done (an interrupted run redoes
    at most one group). `on_task` is called after each task is stored."""
    from tqdm import tqdm

    if engine.draft is None:
        raise RequestError("mining needs a draft model")
    if max_new_tokens < 1 or batch_size < 1 or group < 1:
        raise TrainingError("--max-new-tokens, --batch-size and --group must be at least 1")
    store = MinedStore(out, settings_for(engine, source, max_new_tokens, keep_unfinished))
    todo = [t for t in tasks if t.id not in store.done]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="task", desc="mining", disable=not progress)

    def show(where: str, stage: str) -> None:
        c = store.counts()
        bar.set_postfix_str(f"labelled {c['mismatches']} (good {c['good']}, bad {c['bad']}); {where}: {stage}")

    with bar:
        for g in range(0, len(todo), group):
            batch = todo[g : g + group]
            where = batch[0].id if len(batch) == 1 else f"{batch[0].id}..{batch[-1].id}"
            labelled = label_tasks(
                engine,
                batch,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                keep_unfinished=keep_unfinished,
                note=functools.partial(show, where),
            )
            for record, features in labelled:
                store.append(record, features)
                bar.update()
                if on_task is not None:
                    on_task(record)
            show(where, "stored")
    return store.counts()
