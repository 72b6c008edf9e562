"""One step's dataflow across the actors, run as a Ray Compiled Graph (the default) or as plain actor calls.

The scheduler sends one StepBatch per execution: the StepPlans of every running request whose next step
is ready (continuous batching). The data then flows between the actors directly, one value per node
holding an entry per plan (actors.messages.to_edge), and the scheduler gets everything back at once (one
round trip per batch of steps instead of one per phase of each):

    drafted    = draft.step(batch)                      # per plan: DraftOutput and q, or nothing
    speculated = draft.speculate(batch, drafted)        # pipelining: next blocks, during verification;
                                                        # and the blocks handed off on the GPU, read back
    begun_r    = shard_r.begin(batch, qs)               # every rank: what needs no drafted block, at once
    verified_r = shard_r.finish(begun_r, drafted)       # every rank: verifications and target tokens
    judged     = judge.step(batch, verified_0)          # on rank 0's hidden states of the blocks

An autoregressive step or a prefill therefore runs on the shards as soon as the batch arrives, beside the
draft worker's idle node instead of after it (begin_r -> finish_r stays in the shard's process). With the
draft model in target rank 0's process (serve.draft_placement in_rank0, TP=1) the graph is one node with two
outputs, `drafted, verified_0 = shard_0.draft_and_verify(batch)`, and the judge's after it.

A plain Ray actor call costs about 1 ms on the GPU machine (measured there: two chained calls 2.1 ms, the
same two hops as a Compiled Graph 0.27 ms); a Compiled Graph sets up its channels once and reuses them for
every step. Ray allows one compiled graph per actor, so this one graph carries every kind of step (a plan
tells each node what to do, or to pass). The plain path runs the same methods with ObjectRefs for the
edges (a shard's begin and finish as one call, `step`), skipping the nodes a plan leaves idle: the default
on CPU, where the compiled graph's polling threads cost more than its saved round trips
(serve.compiled_graph; both measured in docs/performance.md).

The compiled graph's executions run on a thread of the scheduler's own (`_serve`), which writes a step's
input and reads its outputs itself: Ray's asyncio path hands the input to a background writer thread and
the outputs back through a background reader thread and a future per output, hand-offs that cost a served
GPU step about 0.5 ms (docs/performance.md, measurement 4); here a step crosses between the event loop and
the thread once each way.

Both keep the target's ranks in step (each runs its nodes in graph order; plain calls from one caller
run in submission order) and deliver a step's results only when every node finished, so a failure on any
rank surfaces here instead of leaving rank 0 waiting in a collective. Anything that changes an actor's
caches goes through the graph for the same reason: a release (StepPlan.release) is a step of its own, so
it runs after the request's last step on every rank (a graph's nodes run on their own thread in each
actor, so a plain call could overtake them).

Not for: what the plan says (actors.scheduler), or what the nodes compute (the actor modules).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import ray
import torch
from ray.actor import ActorHandle
from ray.dag import InputNode, MultiOutputNode

from actors.messages import (
    DraftOutput,
    Edge,
    Item,
    JudgeOutput,
    StepBatch,
    StepPlan,
    TargetOutput,
    VerifyOutput,
    from_edge,
    step_input,
    to_edge,
)

# Executions waiting for the graph at once (the scheduler runs one batch at a time; more only while a
# cancelled batch's execution drains): the graph's thread runs them one after another, and a semaphore
# keeps the queue short.
MAX_INFLIGHT = 8


class StepFailed(RuntimeError):
    """A step did not complete: an actor died, or the graph was torn down (Ray reports a dead actor's
    closed channel in several ways, some not Ray errors). The request is lost; the backend restarts the
    actors when one is dead."""


@dataclass
class StepResult:
    """The decoded outputs of one step; None where the plan did not ask for that node's work."""

    drafted: DraftOutput | None
    q: torch.Tensor | None  # [K, vocab] of the drafted block (sampling), else None
    speculated: DraftOutput | None
    speculated_q: torch.Tensor | None
    target: TargetOutput | None
    verify: VerifyOutput | None
    judged: JudgeOutput | None


class StepGraph:
    """Runs StepPlans over the draft worker, the target shards (rank order) and the judge scorer (or None)."""

    def __init__(
        self,
        draft: ActorHandle | None,
        shards: Sequence[ActorHandle],
        judge: ActorHandle | None,
        max_bytes: int,
        compiled: bool,
    ):
        """draft None: the draft model is in target rank 0's process (serve.draft_placement in_rank0, TP=1),
        which drafts and verifies in one node (TargetShard.draft_and_verify); nothing is drafted ahead."""
        self.draft, self.shards, self.judge = draft, list(shards), judge
        self.max_bytes = max_bytes
        self.compiled = compiled
        self._dag = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (input, loop, future), None to stop
        self._turns = asyncio.Semaphore(MAX_INFLIGHT)

    def compile(self) -> None:
        """Builds the compiled graph and starts the thread that runs its executions."""
        if not self.compiled or self._dag is not None:
            return
        with InputNode() as inp:
            if self.draft is None:  # in_rank0: one node, its two outputs the draft worker's and rank 0's
                drafted, leader = self.shards[0].draft_and_verify.options(num_returns=2).bind(inp)
                nodes = [drafted, leader]
            else:
                drafted = self.draft.step.bind(inp)
                speculated = self.draft.speculate.bind(inp, drafted)
                # each rank reads the batch (and runs what needs no drafted block) while the draft drafts
                begun = [shard.begin.bind(inp) for shard in self.shards]
                verified = [shard.finish.bind(b, drafted) for shard, b in zip(self.shards, begun)]
                leader, nodes = verified[0], [drafted, speculated, *verified]
            judged = [self.judge.step.bind(inp, leader)] if self.judge is not None else []
            graph = MultiOutputNode([*nodes, *judged])
        self._dag = graph.experimental_compile()
        threading.Thread(target=self._serve, args=(self._dag, self._jobs), name="step-graph", daemon=True).start()

    async def run(self, plans: list[StepPlan], qs: list[torch.Tensor | None]) -> list[StepResult]:
        """One execution for a batch of steps (actors.messages.StepBatch); qs[i] is plan i's reused block's
        [K, vocab] draft distribution (sampling), else None. Results in the plans' order."""
        inp = step_input(StepBatch(plans).to_bytes(), qs)
        async with self._turns:
            try:
                outs = await (self._run_compiled(inp) if self.compiled else self._run_calls(plans, inp))
            except Exception as err:
                ids = ", ".join(p.request_id for p in plans)
                raise StepFailed(f"step of requests {ids} failed: {type(err).__name__}: {err}") from err
        if self.draft is None:  # in_rank0: no speculate node
            outs = [outs[0], None, *outs[1:]]
        # the nodes whose results the scheduler reads: the draft worker's two, rank 0's, the judge's
        limit = self.max_bytes * len(plans)
        judged = outs[2 + len(self.shards)] if self.judge is not None else None
        items = [from_edge(out, limit) if out is not None else None for out in (outs[0], outs[1], outs[2], judged)]
        return [self._decode(i, plan, *items) for i, plan in enumerate(plans)]

    def teardown(self) -> None:
        if self._dag is not None:
            self._jobs.put(None)
            self._dag.teardown()  # an execution still waiting fails: its channels close
            self._dag = None

    async def _run_compiled(self, inp: Edge) -> list[Any]:
        if self._dag is None:
            self.compile()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._jobs.put((inp, loop, done))
        outs = await done
        for out in outs:  # a node's failure (a dead actor's closed channel) can arrive as a value
            if isinstance(out, Exception):
                raise out
        return outs

    @staticmethod
    def _serve(dag: Any, jobs: queue.SimpleQueue) -> None:
        """The graph's thread: each job's execution, its outputs (or what it raised) set on its future."""
        while (job := jobs.get()) is not None:
            inp, loop, done = job
            try:
                result, err = [ref.get(timeout=-1) for ref in dag.execute(inp)], None  # -1: a step may be long
            except Exception as e:  # noqa: BLE001 - the awaiting step raises it (StepFailed)
                result, err = None, e
            try:
                loop.call_soon_threadsafe(_settle, done, result, err)
            except RuntimeError:  # the loop closed: the actor is going away
                return

    async def _run_calls(self, plans: list[StepPlan], inp: Edge) -> list[Any]:
        """The graph's nodes as plain calls; a node no plan gives anything to do is not called (each call
        costs a round trip: a batch of autoregressive steps is one call per shard)."""
        nothing = to_edge([(None, None)] * len(plans))
        if self.draft is None:  # in_rank0: rank 0 drafts and verifies in one call
            drafted, leader = self.shards[0].draft_and_verify.options(num_returns=2).remote(inp)
            outs = [drafted, leader]
        else:
            drafting = any(p.draft is not None or p.release for p in plans)
            drafted = self.draft.step.remote(inp) if drafting else nothing
            # speculate also reads back the blocks the draft worker handed off on the device (actors.handoff)
            reading = any(p.speculate is not None or (p.draft is not None and p.draft.handoff) for p in plans)
            speculated = self.draft.speculate.remote(inp, drafted) if reading else nothing
            verified = [shard.step.remote(inp, drafted) for shard in self.shards]
            leader, outs = verified[0], [drafted, speculated, *verified]
        judging = self.judge is not None and any(p.judge for p in plans)
        outs += [self.judge.step.remote(inp, leader) if judging else None] if self.judge is not None else []
        calls = [i for i, out in enumerate(outs) if isinstance(out, ray.ObjectRef)]
        # gather: a failure on any rank surfaces at once, not after rank 0's collective times out
        for i, value in zip(calls, await asyncio.gather(*(outs[i] for i in calls))):
            outs[i] = value
        return outs

    def _decode(
        self, i: int, plan: StepPlan, drafts: list[Item], ahead: list[Item], leaders: list[Item], judges: list[Item] | None
    ) -> StepResult:
        """Plan i's results out of the nodes' items (judges None where the judge was not called)."""
        (drafted, q), (leader, _) = drafts[i], leaders[i]
        speculated, speculated_q = ahead[i] if ahead is not None else (None, None)
        judged = judges[i][0] if judges is not None else None
        limit = self.max_bytes
        block = DraftOutput.from_bytes(drafted, limit) if drafted is not None else None
        ahead = DraftOutput.from_bytes(speculated, limit) if speculated is not None else None
        if block is not None and block.on_device:  # handed off to rank 0: speculate read the block back
            block, ahead = ahead, None
        return StepResult(
            drafted=block,
            q=q,
            speculated=ahead,
            speculated_q=speculated_q,
            target=TargetOutput.from_bytes(leader, limit) if plan.target is not None else None,
            verify=VerifyOutput.from_bytes(leader, limit) if plan.verify is not None else None,
            judged=JudgeOutput.from_bytes(judged, limit) if judged is not None else None,
        )


def _settle(done: asyncio.Future, result: Any, err: BaseException | None) -> None:
    if done.cancelled():  # its step was cancelled while the graph ran it
        return
    if err is not None:
        done.set_exception(err)
    else:
        done.set_result(result)
