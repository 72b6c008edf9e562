"""The draft worker: a Ray actor holding the draft model and one KV cache per active request.

Each step-graph node (`step`, and `speculate` for pipelining) drafts whole blocks (nothing per token
crosses the actor boundary) for every request of the step batch at once with `engine.decode.draft_blocks`,
the in-process engine's own draft loop, so the draft tokens equal the engine's (bit for bit where the
model's batch invariance holds: bfloat16 on the CPU); a block may start with a greedy guess of the target's next
token, which is how pipelining drafts block t+1 before block t is verified (actors.scheduler). With
serve.draft_placement in_rank0 the class is not started as an actor: target rank 0 holds an instance and
calls its `step` itself (actors.target_shard, TargetShard.draft_and_verify).

Not for: deciding what to accept (the scheduler and engine.verify), or the target.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import ray
import torch

from actors.caches import RequestCaches, actor_device, cache_limit, set_threads
from actors.handoff import BlockHandoff
from actors.messages import (
    DraftInput,
    DraftOutput,
    Edge,
    Item,
    Role,
    StepPlan,
    from_edge,
    read_step_input,
    step_generator,
    to_edge,
)
from engine.config import Config
from engine.cuda_graphs import graphs_for
from engine.decode import DraftAsk, draft_on_device, read_block
from engine.weights import load_model



@dataclass
class _Handed:
    """A step's blocks left in the hand-off buffer: when its drafting began, each plan's block (on the
    device) and draft cache length."""

    start: float
    blocks: dict[int, torch.Tensor]
    cache_lens: dict[int, int]


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
        limit = cache_limit(config)  # no batch has more plans than there are caches
        self.handoff = BlockHandoff.create(actor_device(config), limit) if config.serve.block_handoff else None
        self._handed: _Handed | None = None  # this step's blocks left on the device, until `speculate` reads them

    def handoff_handles(self) -> dict:
        """What target rank 0 opens the hand-off buffer with (TargetShard.open_handoff, at start-up)."""
        if self.handoff is None:
            raise RuntimeError("serve.block_handoff is off for this deployment: the draft worker has no buffer")
        return self.handoff.handles()

    def info(self) -> dict:
        """The loaded model, for ModelInfo (cluster.backend.describe's keys) and the vocabulary check."""
        return {"name": self.loaded.name, "fingerprint": self.loaded.fingerprint, "args": self.loaded.args}

    def step(self, inp: Edge) -> Edge:
        """Step-graph node (actors.step_graph): the step's input -> per plan (DraftOutput, q) when it drafts,
        else (None, None), as one edge value (actors.messages.to_edge); the releases first, then every block
        in one batch of passes.

        q is the draft's distribution [K, vocab] (float32, CPU) over the block's positions in sampling mode
        and None when greedy: vocab-sized, so it travels as a tensor to target rank 0, never in a record.
        A block the plan lets stay on the device (DraftInput.handoff) goes to rank 0 through the hand-off
        buffer (actors.handoff): its DraftOutput says so and holds no tokens, and `speculate` reports them.
        """
        return self.draft(read_step_input(inp, self.max_bytes)[0])

    def draft(self, plans: list[StepPlan]) -> Edge:
        """`step` on the batch's plans already read (target rank 0 holding this worker reads them once)."""
        self._handed = None
        for plan in plans:
            if plan.release:
                self.caches.release(plan.request_id)
        handoff = set()
        if self.handoff is not None:
            handoff = {i for i, p in enumerate(plans) if p.draft is not None and p.draft.handoff and p.speculate is None
                       and i < self.handoff.rows and p.draft.sampling.params().greedy}
        return to_edge(self._propose([plan.draft for plan in plans], handoff))

    def speculate(self, inp: Edge, drafted: Edge) -> Edge:
        """Step-graph node, after `step`: drafts each plan's next block while the target verifies this one
        (StepPlan.speculate), fed this block's last token; (None, None) where not asked or where the block
        holds a stop token. A block `step` handed off is read back here instead (no plan that hands off
        speculates): its DraftOutput, for the scheduler, once the GPU has drawn it."""
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
        reported = self._read_handed()
        return to_edge([reported.get(i, item) for i, item in enumerate(self._propose(asks))])

    def _propose(self, inputs: list[DraftInput | None], handoff: set[int] = frozenset()) -> list[Item]:
        """Drafts the blocks asked for, all in one batch of passes; (None, None) where none is. The blocks of
        the plans in `handoff` go into the hand-off buffer, unread."""
        t0 = time.perf_counter()
        asks = {}
        for i, inp in enumerate(inputs):
            if inp is not None:
                params = inp.sampling.params()
                gen = None if params.greedy else step_generator(inp.sampling.seed, Role.DRAFT, inp.step)
                cache = self.caches.at(inp.request_id, inp.keep)
                asks[i] = DraftAsk(cache, inp.feed, inp.k, params, gen, inp.guess)
        drawn = dict(zip(asks, draft_on_device(self.loaded.model, list(asks.values()))))
        handed = {i: drawn[i][0] for i in handoff}
        if handed:
            self.handoff.put(handed)  # queued behind the passes, with the event rank 0 waits on
            self._handed = _Handed(t0, handed, {i: asks[i].cache.length for i in handed})
        blocks = {i: read_block(asks[i], *drawn[i]) for i in asks if i not in handed}
        compute_s = time.perf_counter() - t0  # the batch's: every request in it waited for all of it
        results: list[Item] = []
        for i in range(len(inputs)):
            if i in handed:
                results.append((DraftOutput([], None, asks[i].cache.length, compute_s, on_device=True).to_bytes(), None))
            elif i in blocks:
                tokens, q, guess = blocks[i]
                results.append((DraftOutput(tokens, guess, asks[i].cache.length, compute_s).to_bytes(), q))
            else:
                results.append((None, None))
        return results

    def _read_handed(self) -> dict[int, Item]:
        """The blocks this step's `step` handed off, read back (one copy): plan index -> its DraftOutput."""
        handed, self._handed = self._handed, None
        if handed is None:
            return {}
        ids = torch.cat(list(handed.blocks.values())).tolist()
        compute_s = time.perf_counter() - handed.start  # until the GPU had drawn them: the drafting's time
        reported, at = {}, 0
        for i, block in handed.blocks.items():
            out = DraftOutput(ids[at : at + block.shape[0]], None, handed.cache_lens[i], compute_s)
            reported[i], at = (out.to_bytes(), None), at + block.shape[0]
        return reported

    def active(self) -> list[str]:
        """Request ids that hold a cache here (empty when nothing is running)."""
        return self.caches.active()
