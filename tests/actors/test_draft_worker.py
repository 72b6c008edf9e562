"""engine.decode.draft_block(s), the draft worker's loop (no Ray): the engine's draft tokens and q, the
pipelining guess, and a batch of requests drafting as each would alone."""

from __future__ import annotations

import torch

from engine.decode import DraftAsk, _Sequence, draft_block, draft_blocks
from engine.sampling import SamplingParams
from engine.weights import dummy_model

PROMPT = list(b"The quick brown")
K = 4


def _engine_draft(engine, params, gen):
    seq = _Sequence(PROMPT, engine.target.model.new_cache(64), engine.draft.model.new_cache(64))
    return engine._draft(seq, K, params, gen)


def test_greedy_block_equals_the_engines(tiny_engine):
    want = _engine_draft(tiny_engine, SamplingParams(), None)
    cache = tiny_engine.draft.model.new_cache(64)
    tokens, q, guess = draft_block(tiny_engine.draft.model, cache, PROMPT, K, SamplingParams(), None, False)
    assert tokens == want.tokens.tolist() and q is None and guess is None
    assert cache.length == len(PROMPT) + K - 1  # d_K is fed at the next call


def test_sampled_block_and_q_equal_the_engines_for_one_generator(tiny_engine):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)
    want = _engine_draft(tiny_engine, params, torch.Generator().manual_seed(3))
    cache = tiny_engine.draft.model.new_cache(64)
    gen = torch.Generator().manual_seed(3)
    tokens, q, _ = draft_block(tiny_engine.draft.model, cache, PROMPT, K, params, gen, False)
    assert tokens == want.tokens.tolist()
    assert q.shape == (K, tiny_engine.draft.args.vocab_size) and torch.equal(q, want.probs)


def test_guessed_block_equals_a_block_drafted_after_the_bonus(tiny_engine):
    """Pipelining's premise: feeding d_K, guessing g and drafting on gives the block a fresh call fed
    [d_K, g] gives (the draft's passes are row-exact), so a used speculative block changes nothing."""
    model, greedy = tiny_engine.draft.model, SamplingParams()
    ahead = model.new_cache(64)
    block, _, _ = draft_block(model, ahead, PROMPT, K, greedy, None, False)
    spec, _, guess = draft_block(model, ahead, block[-1:], K, greedy, None, True)
    assert guess is not None and ahead.length == len(PROMPT) + 2 * K

    after = model.new_cache(64)
    draft_block(model, after, PROMPT, K, greedy, None, False)
    fresh, _, _ = draft_block(model, after, [block[-1], guess], K, greedy, None, False)
    assert spec == fresh and after.length == ahead.length
    assert torch.equal(after.k[:, :, :, : after.length], ahead.k[:, :, :, : ahead.length])


@torch.no_grad()
def test_a_batch_of_requests_drafts_as_each_alone(tiny_args):
    """Requests with different prompts, K, sampling and guesses in one draft_blocks call: each block, q,
    guess and cache equals the request's own call (bfloat16: bitwise, the CPU's batch invariance)."""
    model = dummy_model(tiny_args, seed=0, noise=0.1, dtype=torch.bfloat16, device=torch.device("cpu")).eval()
    sampled = SamplingParams(temperature=0.8, top_k=40)
    specs = [  # prompt, K, params, seed (sampling), guess
        (PROMPT, 4, SamplingParams(), None, False),
        (list(b"Hello"), 1, SamplingParams(), None, True),
        (list(b"def f(x):\n    return"), 7, sampled, 5, False),
        (list(b"1 + 1 ="), 3, sampled, 9, True),
    ]

    def asks():
        return [
            DraftAsk(model.new_cache(64), prompt, k, params, torch.Generator().manual_seed(seed) if seed else None, guess)
            for prompt, k, params, seed, guess in specs
        ]

    alone = [(ask, draft_blocks(model, [ask])[0]) for ask in asks()]
    together = asks()
    for (want_ask, (tokens, q, guess)), ask, (got_tokens, got_q, got_guess) in zip(alone, together, draft_blocks(model, together)):
        assert got_tokens == tokens and got_guess == guess and len(tokens) == ask.k
        assert (q is None and got_q is None) or torch.equal(got_q, q)
        n = want_ask.cache.length
        assert ask.cache.length == n and torch.equal(ask.cache.k[:, :, :, :n], want_ask.cache.k[:, :, :, :n])
