"""The draft worker: a Ray actor holding the draft model and one KV cache per active request.

Each step-graph node (`step`, and `speculate` for pipelining) drafts whole blocks (nothing per token
crosses the actor boundary) for every request of the step batch at once with `engine.decode.draft_blocks`,
the in-process engine's own draft loop, so the draft tokens equal the engine's (bit for bit where the
model's batch invariance holds: bfloat16 on the CPU); a block may start with a greedy guess of the target's next
token, which is how pipelining drafts block t+1 before block t is verified (actors.scheduler).

Not for: deciding what to accept (the scheduler and engine.verify), or the target.
"""

from __future__ import annotations

import dataclasses
import time

import ray

from actors.caches import RequestCaches, actor_device, cache_limit, set_threads
from actors.messages import (
    DraftInput,
    DraftOutput,
    Edge,
    Item,
    Role,
    from_edge,
    read_step_input,
    step_generator,
    to_edge,
)
from engine.config import Config
from engine.cuda_graphs import graphs_for
from engine.decode import DraftAsk, draft_blocks
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
            stack=config.runtime.stack_projections,
        )
        self.caches = RequestCaches(self.loaded.model, config.decoding.max_seq_len, cache_limit(config))
        self.max_bytes = config.serve.max_record_bytes

    def info(self) -> dict:
        """The loaded model, for ModelInfo (cluster.backend.describe's keys) and the vocabulary check."""
        return {"name": self.loaded.name, "fingerprint": self.loaded.fingerprint, "args": self.loaded.args}

    def step(self, inp: Edge) -> Edge:
        """Step-graph node (actors.step_graph): the step's input -> per plan (DraftOutput, q) when it drafts,
        else (None, None), as one edge value (actors.messages.to_edge); the releases first, then every block
        in one batch of passes.

        q is the draft's distribution [K, vocab] (float32, CPU) over the block's positions in sampling mode
        and None when greedy: vocab-sized, so it travels as a tensor to target rank 0, never in a record.
        """
        plans, _ = read_step_input(inp, self.max_bytes)
        for plan in plans:
            if plan.release:
                self.caches.release(plan.request_id)
        return to_edge(self._propose([plan.draft for plan in plans]))

    def speculate(self, inp: Edge, drafted: Edge) -> Edge:
        """Step-graph node, after `step`: drafts each plan's next block while the target verifies this one
        (StepPlan.speculate), fed this block's last token; (None, None) where not asked or where the block
        holds a stop token."""
        plans, _ = read_step_input(inp, self.max_bytes)
        asks: list[DraftInput | None] = []
        for plan, (out, _) in zip(plans, from_edge(drafted, self.max_bytes * len(plans))):
            ask = plan.speculate
            if ask is not None and plan.draft is not None:  # drafted in this step: continue from this cache
                block = DraftOutput.from_bytes(out, self.max_bytes)
                ask = dataclasses.replace(ask, keep=block.cache_len, feed=block.tokens[-1:])
                tokens = block.tokens
            else:
                tokens = plan.verify.draft if ask is not None else []
            asks.append(None if ask is None or any(t in plan.stop_ids for t in tokens) else ask)
        return to_edge(self._propose(asks))

    def _propose(self, inputs: list[DraftInput | None]) -> list[Item]:
        """Drafts the blocks asked for, all in one batch of passes; (None, None) where none is."""
        t0 = time.perf_counter()
        asks = {}
        for i, inp in enumerate(inputs):
            if inp is not None:
                params = inp.sampling.params()
                gen = None if params.greedy else step_generator(inp.sampling.seed, Role.DRAFT, inp.step)
                cache = self.caches.at(inp.request_id, inp.keep)
                asks[i] = DraftAsk(cache, inp.feed, inp.k, params, gen, inp.guess)
        blocks = dict(zip(asks, draft_blocks(self.loaded.model, list(asks.values()))))
        compute_s = time.perf_counter() - t0  # the batch's: every request in it waited for all of it
        results: list[Item] = []
        for i in range(len(inputs)):
            if i not in blocks:
                results.append((None, None))
                continue
            tokens, q, guess = blocks[i]
            results.append((DraftOutput(tokens, guess, asks[i].cache.length, compute_s).to_bytes(), q))
        return results

    def active(self) -> list[str]:
        """Request ids that hold a cache here (empty when nothing is running)."""
        return self.caches.active()
