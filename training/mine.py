"""Automatic labelling of draft/target mismatches (AutoJudge, Garipov et al. 2025), resumable.

For each task:
  1. the target answers greedily (Engine in standard mode: greedy standard output is the target's own);
  2. one teacher-forced draft pass over prompt + answer finds the positions i where the draft's argmax
     d_i differs from the target's token a_i (what the draft would propose there as its first token);
  3. for each such i the target continues answer[:i] + [d_i] greedily to the end (batched, see
     training.rollout.continue_greedy), and the task's outcome is checked: the same answer as the target's
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

from engine.config import Mode
from engine.decode import Engine, RequestError
from engine.output import FinishReason
from engine.sampling import SamplingParams
from training import TrainingError
from training.data import BAD, GOOD, MinedStore, MinedTask, Mismatch
from training.rollout import continue_greedy, teacher_forced
from training.tasks import Task, parse_source


def label_task(
    engine: Engine,
    task: Task,
    *,
    max_new_tokens: int,
    batch_size: int,
    keep_unfinished: bool = False,
    note: Callable[[str], None] = lambda _: None,
) -> tuple[MinedTask, torch.Tensor | None]:
    """One task's labelled mismatches and their features [mismatches, hidden] (None when there are none).
    `note` hears which stage the task is in (a task of the real pair takes minutes on a CPU)."""
    note("answering")
    try:
        request = engine.make_request(
            messages=task.messages(), params=SamplingParams(max_tokens=max_new_tokens), mode=Mode.STANDARD
        )
    except RequestError as err:  # a prompt too long for the context window: skip it, keep mining
        return MinedTask(task.id, [], [], None, False, skipped=str(err)), None
    completion = engine.generate(request)
    prompt, answer, decode = list(request.prompt_ids), completion.token_ids, engine.tokenizer.decode
    if completion.finish_reason is FinishReason.LENGTH and not keep_unfinished:
        why = f"the answer did not end within max_new_tokens ({max_new_tokens})"
        return MinedTask(task.id, prompt, answer, None, False, skipped=why), None
    own = task.outcome(decode(answer))
    if own.answer is None:
        return MinedTask(task.id, prompt, answer, None, False, skipped=f"no outcome to compare ({own.detail})"), None
    note("drafting")
    drafted = teacher_forced(engine.draft.model, prompt, answer).predictions  # [n]
    positions = [i for i, (d, a) in enumerate(zip(drafted, answer)) if d != a]
    if not positions:
        return MinedTask(task.id, prompt, answer, own.answer, own.correct), None
    base = teacher_forced(engine.target.model, prompt, answer).cache  # the shared prefix of every continuation
    end, eos = len(prompt) + max_new_tokens, set(engine.tokenizer.eos_ids)
    mismatches, features = [], []
    # Consecutive positions share a batch: rows start at the batch's first position, so nearby ones waste
    # the fewest forced passes.
    for b in range(0, len(positions), batch_size):
        batch = positions[b : b + batch_size]
        note(f"continuing {b}-{b + len(batch)} of {len(positions)} mismatches")
        first = batch[0]
        forced = [answer[first:i] + [drafted[i]] for i in batch]
        rows = continue_greedy(engine.target.model, base, len(prompt) + first, forced, end=end, eos_ids=eos)
        for i, row in zip(batch, rows):
            swapped = task.outcome(decode(answer[:i] + [drafted[i]] + row.tokens))
            label = GOOD if swapped.answer == own.answer else BAD
            mismatches.append(Mismatch(i, drafted[i], answer[i], label, swapped.answer))
            features.append(row.hidden)
    return MinedTask(task.id, prompt, answer, own.answer, own.correct, mismatches=mismatches), torch.stack(features)


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
    batch_size: int = 16,
    keep_unfinished: bool = False,
    progress: bool = True,
    on_task: Callable[[MinedTask], None] | None = None,
) -> dict[str, int]:
    """Labels every task not yet in `out` (a resumed run skips finished ones) and returns the folder's counts.
    `on_task` is called after each task is stored."""
    from tqdm import tqdm

    if engine.draft is None:
        raise RequestError("mining needs a draft model")
    if max_new_tokens < 1 or batch_size < 1:
        raise TrainingError("--max-new-tokens and --batch-size must be at least 1")
    store = MinedStore(out, settings_for(engine, source, max_new_tokens, keep_unfinished))
    todo = [t for t in tasks if t.id not in store.done]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="task", desc="mining", disable=not progress)

    def show(task_id: str, stage: str) -> None:
        c = store.counts()
        bar.set_postfix_str(f"labelled {c['mismatches']} (good {c['good']}, bad {c['bad']}); {task_id}: {stage}")

    with bar:
        for task in todo:
            record, features = label_task(
                engine,
                task,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                keep_unfinished=keep_unfinished,
                note=functools.partial(show, task.id),
            )
            store.append(record, features)
            show(task.id, "stored")
            bar.update()
            if on_task is not None:
                on_task(record)
    return store.counts()
