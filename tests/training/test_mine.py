"""training.mine and training.data on the tiny pair: labels on a case whose right answer is known, features are
the judge's input, a resumed run equals an uninterrupted one, and mining carries on past sandbox failures."""

from __future__ import annotations

import functools

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.config import Mode
from engine.sampling import SamplingParams
from tests.training.fakes import PrefixTask, id_engine
from training import TrainingError, sandbox
from training.data import BAD, GOOD, LABELS, MinedStore, load_hand_labels, load_mined, read_mined
from training.mine import label_task, settings_for
from training.mine import mine as _mine
from training.tasks import Outcome

MAX_NEW = 30
SOURCE = "gsm8k:/nonexistent/fake.jsonl"  # only recorded: the fake tasks are passed in directly


def mine(*args, **kwargs):
    """training.mine.mine, keeping answers cut by the length limit: the random tiny model never emits EOS."""
    return _mine(*args, keep_unfinished=True, **kwargs)


@pytest.fixture(scope="module")
def ids_engine(engine1):
    return id_engine(engine1)


def _tasks(n: int, m: int = 10) -> list[PrefixTask]:
    return [PrefixTask(f"fake/{i}", f"question {i}: what comes next?", m) for i in range(n)]


@torch.no_grad()
def test_mining_labels_known_case(ids_engine):
    """The outcome is the first m answer tokens, so a draft token swapped in at i is BAD exactly when i < m."""
    task = _tasks(1)[0]
    record, features = label_task(ids_engine, task, max_new_tokens=MAX_NEW, batch_size=4, keep_unfinished=True)
    request = ids_engine.make_request(messages=task.messages(), params=SamplingParams(max_tokens=MAX_NEW), mode=Mode.AR)
    answer = ids_engine.generate(request).token_ids
    prompt = list(request.prompt_ids)
    assert record.prompt_ids == prompt and record.answer_ids == answer
    # Independent reference: one full forward pass of each model over prompt + answer.
    full = torch.tensor([prompt + answer])
    draft_logits, _ = ids_engine.draft.model(full, ids_engine.draft.model.new_cache(full.shape[1]))
    drafted = draft_logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    expected = [i for i in range(len(answer)) if drafted[i] != answer[i]]
    assert [m.position for m in record.mismatches] == expected
    labels = {m.position: m.label for m in record.mismatches}
    assert labels == {i: BAD if i < task.m else GOOD for i in expected}
    assert {GOOD, BAD} <= set(labels.values()), "the case must hold both labels to test anything"
    target = ids_engine.target.model
    for row, m in enumerate(record.mismatches):
        assert (m.draft_token, m.target_token) == (drafted[m.position], answer[m.position])
        # The feature: the target's hidden state at the swapped-in draft token's own position.
        seq = torch.tensor([prompt + answer[: m.position] + [m.draft_token]])
        _, hidden = target(seq, target.new_cache(seq.shape[1]))
        torch.testing.assert_close(features[row], hidden[0, -1], atol=1e-5, rtol=1e-5)


def _folder_contents(folder) -> tuple[bytes, dict]:
    feats = {p.name: load_file(str(p))["hidden"] for p in sorted((folder / "features").glob("*.safetensors"))}
    return (folder / LABELS).read_bytes(), feats


def test_resumed_run_equals_uninterrupted_run(ids_engine, tmp_path):
    tasks = _tasks(4)
    whole = mine(ids_engine, tasks, tmp_path / "whole", source=SOURCE, max_new_tokens=MAX_NEW, progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record.task == "fake/1":
            raise Interrupt

    resume = functools.partial(
        mine, ids_engine, tasks, tmp_path / "resumed", source=SOURCE, max_new_tokens=MAX_NEW, progress=False
    )
    with pytest.raises(Interrupt):
        resume(on_task=stop_after_two)
    _, partial = read_mined(tmp_path / "resumed")
    assert [r.task for r in partial] == ["fake/0", "fake/1"]
    seen = []
    resumed = resume(on_task=lambda r: seen.append(r.task))
    assert seen == ["fake/2", "fake/3"]  # finished tasks are not redone
    assert resumed == whole and whole["mismatches"] > 0
    labels_a, feats_a = _folder_contents(tmp_path / "whole")
    labels_b, feats_b = _folder_contents(tmp_path / "resumed")
    assert labels_a == labels_b
    assert feats_a.keys() == feats_b.keys() and all(torch.equal(feats_a[k], feats_b[k]) for k in feats_a)


def test_a_group_mined_together_equals_its_tasks_mined_one_by_one(ids_engine, tmp_path):
    """Grouping batches the answers and continuations of several tasks (fewer places than sequences here):
    the same labels as one task and one sequence at a time; features equal up to float32's last bits."""
    tasks = _tasks(4)
    kw = dict(source=SOURCE, max_new_tokens=MAX_NEW, progress=False)
    together = mine(ids_engine, tasks, tmp_path / "together", group=4, batch_size=3, **kw)
    alone = mine(ids_engine, tasks, tmp_path / "alone", group=1, batch_size=1, **kw)
    assert together == alone and alone["mismatches"] > 0
    labels_a, feats_a = _folder_contents(tmp_path / "together")
    labels_b, feats_b = _folder_contents(tmp_path / "alone")
    assert labels_a == labels_b
    for k in feats_a:
        torch.testing.assert_close(feats_a[k], feats_b[k], atol=1e-5, rtol=1e-5)


def test_torn_last_line_is_cut_and_its_task_redone(ids_engine, tmp_path):
    tasks = _tasks(2)
    mine(ids_engine, tasks[:1], tmp_path, source=SOURCE, max_new_tokens=MAX_NEW, progress=False)
    with open(tmp_path / LABELS, "a") as f:
        f.write('{"task":"fake/1","prompt_ids":[1,2')  # an append interrupted mid-line
    counts = mine(ids_engine, tasks, tmp_path, source=SOURCE, max_new_tokens=MAX_NEW, progress=False)
    _, records = read_mined(tmp_path)
    assert [r.task for r in records] == ["fake/0", "fake/1"] and counts["tasks_done"] == 2


def test_resuming_with_other_settings_is_refused(ids_engine, tmp_path):
    mine(ids_engine, _tasks(1), tmp_path, source=SOURCE, max_new_tokens=MAX_NEW, progress=False)
    with pytest.raises(TrainingError, match="max_new_tokens"):
        mine(ids_engine, _tasks(1), tmp_path, source=SOURCE, max_new_tokens=MAX_NEW + 1, progress=False)


class LoopingTask(PrefixTask):
    """Its checker runs a program that never ends: every outcome is a sandbox timeout."""

    def outcome(self, text: str) -> Outcome:
        result = sandbox.run("while True:\n    pass", sandbox.Limits(wall_s=0.3, cpu_s=2))
        return Outcome(result.status.value, False, result.status.value)


class NoAnswerTask(PrefixTask):
    def outcome(self, text: str) -> Outcome:
        return Outcome(None, False, "no number in the answer")


def test_mining_carries_on_after_sandbox_failures_and_skips_unanswerable_tasks(ids_engine, tmp_path):
    tasks = [LoopingTask("loop", "question: loop", 3), NoAnswerTask("none", "question: none", 3), _tasks(1)[0]]
    counts = mine(ids_engine, tasks, tmp_path, source=SOURCE, max_new_tokens=6, progress=False)
    _, records = read_mined(tmp_path)
    assert [r.task for r in records] == ["loop", "none", "fake/0"]
    assert records[0].answer == "timeout" and all(m.answer == "timeout" for m in records[0].mismatches)
    assert records[1].skipped and not records[1].mismatches
    assert counts["tasks_done"] == 3 and counts["tasks_skipped"] == 1


def test_mined_folder_loads_as_labelled_examples_and_refuses_another_target(ids_engine, engine1, tmp_path):
    mine(ids_engine, _tasks(2), tmp_path, source=SOURCE, max_new_tokens=MAX_NEW, progress=False)
    data = load_mined(tmp_path, ids_engine.target)
    _, records = read_mined(tmp_path)
    assert len(data.examples) == data.features.shape[0] == sum(len(r.mismatches) for r in records)
    first, mismatch = data.examples[0], records[0].mismatches[0]
    assert first.prefix_ids == records[0].prompt_ids + records[0].answer_ids[: mismatch.position]
    assert (first.token, first.target_token, first.label) == (
        mismatch.draft_token,
        mismatch.target_token,
        mismatch.label,
    )
    with pytest.raises(TrainingError, match="another model's hidden states"):
        load_mined(tmp_path, engine1.draft)


def test_answers_cut_by_the_length_limit_are_skipped_by_default(ids_engine, tmp_path):
    counts = _mine(ids_engine, _tasks(1), tmp_path, source=SOURCE, max_new_tokens=MAX_NEW, progress=False)
    _, records = read_mined(tmp_path)
    assert counts["tasks_skipped"] == 1 and "did not end within max_new_tokens (30)" in records[0].skipped
    assert records[0].answer_ids and not records[0].mismatches


def test_settings_record_the_pair_and_the_resolved_source(engine1, gsm8k_file):
    settings = settings_for(engine1, str(gsm8k_file), 12)
    assert settings["source"] == f"gsm8k:{gsm8k_file.resolve()}"
    assert settings["target"]["fingerprint"] == engine1.target.fingerprint and settings["max_new_tokens"] == 12
    MinedStore(gsm8k_file.parent / "out", settings)  # a fresh folder opens


def test_hand_labels_give_good_tokens_before_the_first_wrong_one(engine1, tmp_path):
    path = tmp_path / "hand.jsonl"
    rows = [
        {"prompt": "What is 2 + 2?", "response": "2 + 2 = 5. The answer is 5", "first_wrong_token_index": 8},
        {"prompt": "Say hi", "response": "hi", "first_wrong_token_index": None, "id": "greeting"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_hand_labels(path, engine1.target)
    assert [e.label for e in data.examples] == [GOOD] * 8 + [BAD] + [GOOD] * 2
    assert data.examples[-1].group == "hand.jsonl#greeting"
    response = list(rows[0]["response"].encode())
    prompt = engine1.tokenizer.chat([{"role": "user", "content": rows[0]["prompt"]}])
    assert data.examples[8].token == response[8] and data.examples[8].prefix_ids == prompt + response[:8]
    model = engine1.target.model
    _, hidden = model(torch.tensor([prompt + response[:9]]), model.new_cache(len(prompt) + 9))
    torch.testing.assert_close(data.features[:9], hidden[0, len(prompt) :], atol=1e-5, rtol=1e-5)
    path.write_text(json.dumps({"prompt": "p", "response": "ab", "first_wrong_token_index": 2}) + "\n")
    with pytest.raises(TrainingError, match="hand.jsonl:1: first_wrong_token_index 2"):
        load_hand_labels(path, engine1.target)
