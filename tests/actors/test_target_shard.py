"""The target shard's pure parts (no Ray, TP=1): engine.decode.target_passes and actors.target_shard.verdicts
give the engine's target token and verification verdicts; the shard's two step-graph nodes split a step's
passes by what they wait on."""

from __future__ import annotations

import torch

from actors import messages as m
from actors.target_shard import TargetShard, verdicts
from engine.decode import Timings, _Sequence, target_passes
from engine.sampling import SamplingParams, next_token
from engine.verify import DraftBlock, final_token, standard_accept

PROMPT = list(b"The quick brown")
DRAFT = list(b" fox")  # K = 4


def _prefilled(engine):
    seq = _Sequence(PROMPT, engine.target.model.new_cache(64), engine.draft.model.new_cache(64))
    first = engine._target_step(seq, SamplingParams(), None, Timings())
    return seq, first.tokens[0]


def target_token(model, cache, feed) -> int:
    ((logits, _),) = target_passes(model, [cache], [feed], last_only=True)
    return next_token(logits[-1], SamplingParams(), None)


def test_target_token_equals_the_engines_step(tiny_engine):
    _, want = _prefilled(tiny_engine)
    cache = tiny_engine.target.model.new_cache(64)
    assert target_token(tiny_engine.target.model, cache, PROMPT) == want
    assert cache.length == len(PROMPT)


def test_greedy_verdicts_equal_the_engines(tiny_engine):
    seq, first = _prefilled(tiny_engine)
    block = DraftBlock(torch.tensor(DRAFT), None)
    logits_want, hidden_want = tiny_engine._verify(seq, block)
    matched_want, _ = standard_accept(block, logits_want, SamplingParams(), None)

    cache = tiny_engine.target.model.new_cache(64)
    target_token(tiny_engine.target.model, cache, PROMPT)
    ((logits, hidden),) = target_passes(tiny_engine.target.model, [cache], [[first] + DRAFT])
    logits, hidden = logits[-(len(DRAFT) + 1) :].cpu(), hidden[-len(DRAFT) :]
    assert torch.equal(logits, logits_want) and torch.equal(hidden, hidden_want)
    matched, candidates = verdicts(DRAFT, None, logits, SamplingParams(), None)
    assert matched == matched_want.tolist()
    assert candidates == [int(logits[n].argmax()) for n in range(len(DRAFT) + 1)]


def test_sampled_verdicts_draw_the_uniforms_first(tiny_engine):
    """Same generator state -> the same matched as engine.verify, and the n = 0 candidate as final_token."""
    params = SamplingParams(temperature=0.9)
    seq, first = _prefilled(tiny_engine)
    vocab = tiny_engine.target.args.vocab_size
    q = torch.softmax(torch.randn(len(DRAFT), vocab, generator=torch.Generator().manual_seed(1)), -1)  # [K, vocab]
    block = DraftBlock(torch.tensor(DRAFT), q)
    logits, _ = tiny_engine._verify(seq, block)
    gen = torch.Generator().manual_seed(5)
    matched_want, probs = standard_accept(block, logits, params, gen)
    first_candidate = final_token(0, block, logits, probs, params, gen)
    matched, candidates = verdicts(DRAFT, q, logits, params, torch.Generator().manual_seed(5))
    assert matched == matched_want.tolist() and candidates[0] == first_candidate
    assert len(candidates) == len(DRAFT) + 1


def test_greedy_verdicts_from_the_argmax_equal_engine_verify(tiny_engine):
    """The shard's greedy shortcut (argmax of each position, read back once per batch) is engine.verify's
    greedy rule: matched iff d_j is the argmax at j, candidate n the argmax at n."""
    seq, first = _prefilled(tiny_engine)
    block = DraftBlock(torch.tensor(DRAFT), None)
    logits, _ = tiny_engine._verify(seq, block)
    matched, candidates = verdicts(DRAFT, None, logits, SamplingParams(), None)
    top = logits.argmax(-1).tolist()
    assert [d == t for d, t in zip(DRAFT, top)] == matched and top == candidates


def test_begin_runs_the_passes_that_need_no_drafted_block_and_finish_the_rest(tiny_config, tiny_engine):
    """The compiled step graph runs `begin` as soon as the batch arrives and `finish` once the draft worker's
    node has answered: a prefill or autoregressive step is done in `begin`, a verification of this step's
    drafted block waits for `finish`, and the results are the engine's."""
    threads = torch.get_num_threads()
    shard = TargetShard.__ray_actor_class__(tiny_config, 0, 1)  # the actor's class itself: no Ray
    torch.set_num_threads(threads)  # the actor sets serve.cpus_per_actor for its process, here the tests'
    limit, greedy = tiny_config.serve.max_record_bytes, m.Sampling(0.0, 0, 1.0, 7)

    def plan(**kw) -> m.Edge:
        fields = dict(request_id="a", draft=None, target=None, verify=None, judge=False, threshold=0.5,
                      speculate=None, stop_ids=[], release=False)
        return m.step_input(m.StepBatch([m.StepPlan(**(fields | kw))]).to_bytes(), [None])

    seq, first = _prefilled(tiny_engine)
    begun = shard.begin(plan(target=m.TargetInput("a", 0, PROMPT, 0, greedy)))
    assert begun.rows == []
    (out, _), = begun.results
    assert m.TargetOutput.from_bytes(out, limit).tokens == [first]
    assert m.from_edge(shard.finish(begun, m.to_edge([(None, None)])), limit) == begun.results

    draft = m.DraftInput("a", 0, PROMPT, len(DRAFT), False, 1, greedy)
    begun = shard.begin(plan(draft=draft, verify=m.VerifyInput("a", len(PROMPT), [first], [], False, 1, greedy)))
    assert begun.results == [(None, None)] and len(begun.rows) == 1  # waits for the block
    drafted = m.to_edge([(m.DraftOutput(DRAFT, None, len(PROMPT) + len(DRAFT), 0.0).to_bytes(), None)])
    (out, _), = m.from_edge(shard.finish(begun, drafted), limit)
    logits, _ = tiny_engine._verify(seq, DraftBlock(torch.tensor(DRAFT), None))
    want_matched, want_candidates = verdicts(DRAFT, None, logits, SamplingParams(), None)
    verdict = m.VerifyOutput.from_bytes(out, limit)
    assert (verdict.matched, verdict.final_candidates) == (want_matched, want_candidates)
    assert verdict.cache_len == len(PROMPT) + 1 + len(DRAFT)
