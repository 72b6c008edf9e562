"""actors.handoff without Ray (on CPU its buffer is a shared-memory file): a greedy block the draft worker
hands off reaches target rank 0 and gives the verdict the channel gives, the draft worker's speculate node
reads it back for the scheduler, and the step graph's decoding takes the block from there."""

from __future__ import annotations

import os

import pytest
import torch

from actors import messages as m
from actors.draft_worker import DraftWorker
from actors.handoff import MAX_BLOCK, BlockHandoff
from actors.step_graph import StepGraph
from actors.target_shard import TargetShard
from engine.config import ConfigError, load_config
from tests.conftest import TINY_YAML

PROMPT = list(b"The quick brown")
K = 5
GREEDY = m.Sampling(0.0, 0, 1.0, 7)


def _plan(**kw) -> m.StepPlan:
    fields = dict(request_id="a", draft=None, target=None, verify=None, judge=False, threshold=0.5, speculate=None,
                  stop_ids=[], release=False)
    return m.StepPlan(**(fields | kw))


def _edge(*plans: m.StepPlan) -> m.Edge:
    return m.step_input(m.StepBatch(list(plans)).to_bytes(), [None] * len(plans))


def test_it_is_off_unless_asked_for_and_refused_where_rank_0_cannot_map_the_buffer():
    on_gpu = {"runtime.device": "cuda", "serve.draft_placement": "share_gpu"}
    assert not load_config(TINY_YAML, on_gpu).serve.block_handoff
    assert load_config(TINY_YAML, {"serve.block_handoff": True}).serve.block_handoff
    assert load_config(TINY_YAML, {"serve.block_handoff": True} | on_gpu).serve.block_handoff
    for bad in ({"serve.tensor_parallel": 2}, {"serve.draft_placement": "own_node"},
                {"runtime.device": "cuda", "serve.draft_placement": "own_gpu"},
                {"serve.draft_placement": "in_rank0", "serve.pipeline": False}):
        with pytest.raises(ConfigError, match="block_handoff needs tensor_parallel 1"):
            load_config(TINY_YAML, {"serve.block_handoff": True} | bad)


def test_the_buffer_is_shared_and_its_file_goes_once_rank_0_has_it():
    draft = BlockHandoff.create(torch.device("cpu"), rows=3)
    rank0 = BlockHandoff.open(draft.handles())
    assert not os.path.exists(draft.handles()["path"])  # both have it mapped: nothing left on disk
    draft.put({2: torch.tensor([7, 8, 9])})
    assert rank0.take(2, 3).tolist() == [7, 8, 9] and rank0.blocks.shape == (3, MAX_BLOCK)


def test_a_handed_off_block_verifies_as_the_one_sent_through_the_channel():
    config = load_config(TINY_YAML, {"serve.block_handoff": True})
    threads = torch.get_num_threads()
    draft = DraftWorker.__ray_actor_class__(config)  # the actors' classes themselves: no Ray
    shard = TargetShard.__ray_actor_class__(config, 0, 1)
    torch.set_num_threads(threads)  # the actors set serve.cpus_per_actor for their process, here the tests'
    shard.open_handoff(draft.handoff_handles())
    limit = config.serve.max_record_bytes
    graph = StepGraph(draft=None, shards=[None], judge=None, max_bytes=limit, compiled=False)

    # request "a" through the channel, "b" handed off: the same prompt, so the same block and verdict
    prefills = _edge(*(_plan(request_id=rid, target=m.TargetInput(rid, 0, PROMPT, 0, GREEDY)) for rid in "ab"))
    (out, _), _ = m.from_edge(shard.finish(shard.begin(prefills), m.to_edge([(None, None)] * 2)), 2 * limit)
    first = m.TargetOutput.from_bytes(out, limit).tokens[0]
    plans = [
        _plan(
            request_id=rid,
            draft=m.DraftInput(rid, 0, [*PROMPT, first], K, False, 1, GREEDY, handoff),
            verify=m.VerifyInput(rid, len(PROMPT), [first], [], False, 1, GREEDY),
        )
        for rid, handoff in (("a", False), ("b", True))
    ]
    inp = _edge(*plans)
    drafted = draft.step(inp)
    sent, handed = (m.DraftOutput.from_bytes(out, limit) for out, _ in m.from_edge(drafted, 2 * limit))
    assert len(sent.tokens) == K and not sent.on_device
    assert handed.on_device and handed.tokens == [] and handed.cache_len == sent.cache_len

    verified = m.from_edge(shard.finish(shard.begin(inp), drafted), 2 * limit)
    (a, _), (b, _) = verified
    assert m.VerifyOutput.from_bytes(b, limit) == m.VerifyOutput.from_bytes(a, limit)

    reported = draft.speculate(inp, drafted)  # nothing to draft ahead: it reads back what `step` handed off
    results = [graph._decode(i, plan, *(m.from_edge(e, 2 * limit) for e in (drafted, reported, m.to_edge(verified))), None)
               for i, plan in enumerate(plans)]
    assert results[1].drafted.tokens == sent.tokens and not results[1].drafted.on_device
    assert results[1].drafted.cache_len == sent.cache_len and results[1].drafted.compute_s > 0
    assert results[1].speculated is None and results[0].drafted == sent
    assert m.from_edge(draft.speculate(inp, drafted), 2 * limit) == [(None, None)] * 2  # read back once


def test_a_shard_without_the_buffer_refuses_a_handed_off_block():
    config = load_config(TINY_YAML, {"serve.block_handoff": True})
    threads = torch.get_num_threads()
    shard = TargetShard.__ray_actor_class__(config, 0, 1)
    torch.set_num_threads(threads)
    shard.finish(shard.begin(_edge(_plan(target=m.TargetInput("a", 0, PROMPT, 0, GREEDY)))), m.to_edge([(None, None)]))
    plan = _plan(draft=m.DraftInput("a", 0, PROMPT, K, False, 1, GREEDY, True),
                 verify=m.VerifyInput("a", len(PROMPT), [1], [], False, 1, GREEDY))
    drafted = m.to_edge([(m.DraftOutput([], None, len(PROMPT) + K, 0.0, on_device=True).to_bytes(), None)])
    with pytest.raises(RuntimeError, match="no hand-off buffer is open here"):
        shard.finish(shard.begin(_edge(plan)), drafted)
