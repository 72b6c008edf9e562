"""The draft worker: a Ray actor holding the draft model and one KV cache per active request.

Each step-graph node (`step`, and `speculate` for pipelining) drafts one whole block (nothing per token
crosses the actor boundary) with `engine.decode.draft_block`, the in-process engine's own draft loop, so the
draft tokens equal the engine's bit for bit; a block may start with a greedy guess of the target's next
token, which is how pipelining drafts block t+1 before block t is verified (actors.scheduler).

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
from engine.decode import draft_block
from engine.weights import load_model


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
