"""The draft worker: a Ray actor holding the draft model and one KV cache per active request.

Each step-graph node (`step`, and `speculate` for pipelining) drafts one whole block (nothing per token
crosses the actor boundary). The pure part,
`draft_block`, is the engine's draft loop (engine.decode.Engine._draft) with the same forward calls, so the
draft tokens equal the in-process engine's bit for bit; it optionally starts with a greedy guess of the
target's next token, which is how pipelining drafts block t+1 before block t is verified (actors.scheduler).

Not for: deciding what to accept (the scheduler and engine.verify), or the target.
"""

from __future__ import annotations

import dataclasses
import time

import ray
import torch

from actors.caches import RequestCaches, actor_device, cache_limit, set_threads
from actors.messages import DraftInput, DraftOutput, Role, StepPlan, step_generator
from engine.config import Config
from engine.cuda_graphs import graphs_for
from engine.model import KVCache, Transformer
from engine.sampling import SamplingParams, probabilities, sample
from engine.weights import load_model


@torch.inference_mode()
def draft_block(
    model: Transformer,
    cache: KVCache,
    feed: list[int],
    k: int,
    params: SamplingParams,
    gen: torch.Generator | None,
    guess: bool,
) -> tuple[list[int], torch.Tensor | None, int | None]:
    """One draft pass per token, the first also feeding `feed` (what the draft has not seen).

    Returns (d_1..d_K, q [K, vocab] float32 on the CPU or None when greedy, the guess or None). With
    `guess`, the first pass yields the draft's argmax guess of the target's next token (argmax even when
    sampling: the guess only has to be likely, it is never emitted unchecked) and the block follows it.
    """
    device = cache.k.device
    fed = torch.tensor([feed], device=device)
    drawn, probs = [], []  # the guess (if any), then d_1..d_K, as 0-d tensors on the device
    for i in range(k + int(guess)):
        logits, _ = model(fed, cache, last_only=True)
        row = logits[0, -1]  # [vocab]
        if (guess and i == 0) or params.greedy:  # the argmax stays on the device: one host sync per block
            token = row.argmax()
        else:
            q = probabilities(row, params)  # [vocab]
            token = torch.tensor(int(sample(q, gen)), device=device)
            probs.append(q)
        drawn.append(token)
        fed = token.view(1, 1)
    q_block = torch.stack(probs).cpu() if probs else None  # [K, vocab]
    ids = torch.stack(drawn).tolist() if drawn else []
    first = ids.pop(0) if guess else None
    return ids, q_block, first


@ray.remote
class DraftWorker:
    """Holds the draft model; `step` and `speculate` draft blocks (or free a request's cache)."""

    def __init__(self, config: Config):
        set_threads(config)
        self.config = config
        self.loaded = load_model(
            config.draft,
            device=actor_device(config),
            max_seq_len=config.decoding.max_seq_len,
            graphs=graphs_for(config.runtime),
        )
        self.caches = RequestCaches(self.loaded.model, config.decoding.max_seq_len, cache_limit(config))
        self.max_bytes = config.serve.max_record_bytes

    def info(self) -> dict:
        """The loaded model, for ModelInfo (cluster.backend.describe's keys) and the vocabulary check."""
        return {"name": self.loaded.name, "fingerprint": self.loaded.fingerprint, "args": self.loaded.args}

    def step(self, rec: bytes) -> tuple[bytes | None, torch.Tensor | None]:
        """Step-graph node (actors.step_graph): StepPlan -> (DraftOutput, q) when it drafts, else (None, None).

        q is the draft's distribution [K, vocab] (float32, CPU) over the block's positions in sampling mode
        and None when greedy: vocab-sized, so it travels as a tensor to target rank 0, never in a record.
        """
        plan = StepPlan.from_bytes(rec, self.max_bytes)
        if plan.release:
            self.caches.release(plan.request_id)
        return self._propose(plan.draft) if plan.draft is not None else (None, None)

    def speculate(self, rec: bytes, drafted: tuple[bytes | None, torch.Tensor | None]) -> tuple[bytes | None, torch.Tensor | None]:
        """Step-graph node, after `step`: drafts the next step's block while the target verifies this one
        (StepPlan.speculate), fed this block's last token; (None, None) when not asked or when the block
        holds a stop token."""
        plan = StepPlan.from_bytes(rec, self.max_bytes)
        inp = plan.speculate
        if inp is None:
            return None, None
        if plan.draft is not None:  # the block was drafted in this step: continue from this cache
            out = DraftOutput.from_bytes(drafted[0], self.max_bytes)
            block, inp = out.tokens, dataclasses.replace(inp, keep=out.cache_len, feed=out.tokens[-1:])
        else:
            block = plan.verify.draft
        if any(t in plan.stop_ids for t in block):
            return None, None
        return self._propose(inp)

    def _propose(self, inp: DraftInput) -> tuple[bytes, torch.Tensor | None]:
        t0 = time.perf_counter()
        params = inp.sampling.params()
        gen = None if params.greedy else step_generator(inp.sampling.seed, Role.DRAFT, inp.step)
        cache = self.caches.at(inp.request_id, inp.keep)
        tokens, q, guess = draft_block(self.loaded.model, cache, inp.feed, inp.k, params, gen, inp.guess)
        out = DraftOutput(tokens, guess, cache.length, time.perf_counter() - t0)
        return out.to_bytes(), q

    def active(self) -> list[str]:
        """Request ids that hold a cache here (empty when nothing is running)."""
        return self.caches.active()
