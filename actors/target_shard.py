"""A target shard: one Ray actor per tensor-parallel rank, holding its slice of the target model.

Every rank loads only its shard of the weights (engine.weights.load_model with rank and world: a real
checkpoint is read slice by slice, a dummy model drawn whole and cut by engine.tp.apply_tp), joins one
torch.distributed group (gloo on CPU, NCCL on CUDA; actors.target_group forms it) and runs the same forward
passes in the same order: every rank is a node of the step graph (actors.step_graph), and set-up calls go
through `actors.target_group.call_all`. The LM head and final norm are replicated, so every rank ends a
pass with the full logits and hidden states; rank 0 alone turns them into the compact result
(the other ranks return None), so nothing vocab-sized leaves the shard. Where a step is autoregressive
decoding alone, a call decodes up to TargetInput.tokens tokens, rank 0 broadcasting each further pass's
tokens to the other ranks (serve.ar_tokens_per_call: one Ray round trip per call, not per token).

The pure parts, engine.decode.target_passes + `verdicts`, make the same forward calls as the in-process
engine (engine.decode.Engine._target_step and ._verify), so TP=1 results are bitwise the engine's (a batch's too, where the model's batch invariance holds: bfloat16 on the CPU), and
verification uses engine.verify unchanged.

With serve.draft_placement in_rank0 (TP=1), the shard also holds the draft worker (the same class, not an
actor of its own) and drafts and verifies in one step-graph node, `draft_and_verify`: one process and CUDA
context, and a block goes from the drafting to the verification without a hop.

Not for: choosing K, accepting tokens, or the judge (actors.scheduler, actors.judge_scorer).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from actors.caches import RequestCaches, actor_device, cache_limit, set_threads
from actors.draft_worker import DraftWorker
from actors.handoff import BlockHandoff
from actors.messages import (
    DraftOutput,
    Edge,
    Item,
    Role,
    StepPlan,
    TargetInput,
    TargetOutput,
    VerifyInput,
    VerifyOutput,
    from_edge,
    read_step_input,
    step_generator,
    to_edge,
)
from engine.config import Config, DraftPlacement
from engine.cuda_graphs import graphs_for
from engine.decode import target_passes
from engine.sampling import SamplingParams, next_token
from engine.verify import DraftBlock, final_token, greedy_matched, standard_accept
from engine.weights import load_model

Row = tuple[int, TargetInput | VerifyInput, torch.Tensor | None]  # (plan index, its pass, rank 0's q)


@dataclasses.dataclass
class Begun:
    """A step between TargetShard.begin and .finish (it stays in the actor: the compiled graph hands it
    from one node to the next in process)."""

    plans: list[StepPlan]
    results: list[Item]  # per plan, rank 0's (TargetOutput or VerifyOutput, hidden), filled as its pass runs
    rows: list[Row]  # the passes left for `finish`: those of a batch where a verification needs the draft's block

# A rank whose peer died waits this long in a collective before failing (torch's default is 30 minutes).
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def verdicts(
    draft: list[int],
    q: torch.Tensor | None,
    logits: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator | None,
) -> tuple[list[bool], list[int]]:
    """draft: d_1..d_K; q: [K, vocab] or None (greedy); logits: [K+1, vocab].

    Returns (matched [K], final_candidates [K+1]): the standard rule's verdict per draft token, and for each
    n = 0..K the token emitted after d_1..d_n (the correction at n + 1, the bonus at n = K), so the
    scheduler can accept with whatever the judge says without another call. Sampling draws the K uniforms
    first, then the K+1 candidates, each from the generator's fresh numbers, so the candidate used for the
    n the verdicts pick is independent of them.
    """
    block = DraftBlock(torch.tensor(draft), q)
    matched, probs = standard_accept(block, logits, params, gen)
    candidates = [final_token(n, block, logits, probs, params, gen) for n in range(len(draft) + 1)]
    return matched.tolist(), candidates


@ray.remote
class TargetShard:
    """Rank `rank` of `world` of the target. Call every method on every rank through target_group."""

    def __init__(self, config: Config, rank: int, world: int):
        set_threads(config)
        self.config, self.rank, self.world = config, rank, world
        self.device = actor_device(config)
        # Refuses an uneven split here, before any weight is read or any collective could hang on it. The
        # group is formed later (join); the shard's collectives use the default group.
        loaded = load_model(
            config.target,
            device=self.device,
            max_seq_len=config.decoding.max_seq_len,
            rank=rank,
            world=world,
            # With TP the captured passes hold the NCCL all-reduces (tests/gpu/test_tp_graphs.py): every rank
            # captures and replays the same passes in the same order, as it runs them eagerly.
            graphs=graphs_for(config.runtime),
            stack=config.runtime.stack_projections,
        )
        # loaded.args is the whole model's (ModelInfo describes the whole model), and the fingerprint is the
        # unsharded model's, which the judge checks.
        self._info = {"name": loaded.name, "fingerprint": loaded.fingerprint, "args": loaded.args}
        self.model = loaded.model
        self.caches = RequestCaches(self.model, config.decoding.max_seq_len, cache_limit(config))
        self.max_bytes = config.serve.max_record_bytes
        self.handoff: BlockHandoff | None = None  # rank 0, where the draft worker hands blocks off (open_handoff)
        self.drafter = None  # rank 0 with draft_placement in_rank0: the draft worker, in this process
        if rank == 0 and config.serve.draft_placement is DraftPlacement.IN_RANK0:
            self.drafter = DraftWorker.__ray_actor_class__(config)  # the actor's class itself, not an actor

    # ---- the draft worker, where rank 0 holds it (in_rank0) ---------------------------------------------

    def draft_and_verify(self, inp: Edge) -> tuple[Edge, Edge]:
        """Step-graph node with draft_placement in_rank0 (TP=1): the draft worker's `step`, then `begin` and
        `finish` with its blocks (the batch read once), in this process -> (drafted, verified), the two
        nodes' outputs. Nothing is drafted ahead or handed off here (the config refuses both), so the draft
        worker's `speculate` has nothing to do and is not run."""
        plans, qs = read_step_input(inp, self.max_bytes)  # once, for both models
        drafted = self._drafter().draft(plans)
        return drafted, self.finish(self._begin(plans, qs), drafted)

    def draft_info(self) -> dict:
        return self._drafter().info()

    def draft_active(self) -> list[str]:
        return self._drafter().active()

    def _drafter(self) -> DraftWorker:
        if self.drafter is None:
            raise RuntimeError(f"rank {self.rank} holds no draft model (serve.draft_placement is not in_rank0 here)")
        return self.drafter

    def open_handoff(self, handles: dict) -> None:
        """Rank 0: opens the draft worker's hand-off buffer (DraftWorker.handoff_handles; actors.handoff)."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: the draft worker hands its blocks to rank 0 alone")
        self.handoff = BlockHandoff.open(handles)

    # ---- the process group (actors.target_group.form_group) --------------------------------------------

    def rendezvous(self) -> str:
        """Rank 0: where the group meets, a fresh file on this node (STRICT_PACK: every rank is here). A file
        store, not TCP: torch's TCPStore listens on every interface whatever host it is given."""
        self._rendezvous = tempfile.mkdtemp(prefix="judgeserve-tp-")
        return f"file://{self._rendezvous}/store"

    def rendezvous_done(self) -> None:
        """Rank 0, once every rank has joined (or failed to): removes the rendezvous folder."""
        shutil.rmtree(self._rendezvous, ignore_errors=True)

    def join(self, init_method: str) -> int:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        kwargs = {"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=self.rank,
            world_size=self.world,
            timeout=COLLECTIVE_TIMEOUT,
            **kwargs,
        )
        return dist.get_rank()

    def info(self) -> dict:
        return dict(self._info, rank=self.rank, world=self.world)

    # ---- passes ------------------------------------------------------------------------------------------

    def step(self, inp: Edge, drafted: Edge) -> Edge:
        """The step's input -> per plan (TargetOutput or VerifyOutput, hidden) on rank 0, (None, None) on the
        others and for releases, as one edge value (actors.messages.to_edge): `begin` and `finish` in one
        call (the step graph's plain calls; its compiled graph runs them as two nodes)."""
        return self.finish(self.begin(inp), drafted)

    def begin(self, inp: Edge) -> Begun:
        """Step-graph node, before the draft worker's block arrives: reads the batch, frees the released
        caches, and runs the passes of every plan that needs no block from the draft worker this step: the
        prefills (in one batched pass) and, where no verification waits on such a block, every other pass
        too. So an autoregressive step does not wait on the draft worker's idle node, and a speculative
        one has its batch read while the draft drafts."""
        return self._begin(*read_step_input(inp, self.max_bytes))

    def _begin(self, plans: list[StepPlan], qs: list[torch.Tensor | None]) -> Begun:
        begun = Begun(plans, [(None, None)] * len(plans), [])
        for plan in plans:
            if plan.release:
                self.caches.release(plan.request_id)
        prefills: list[Row] = []
        for i, plan in enumerate(plans):
            if plan.target is not None and plan.target.keep == 0:
                prefills.append((i, plan.target, None))
            elif plan.target is not None:
                begun.rows.append((i, plan.target, None))
            elif plan.verify is not None:  # a block drafted ahead has its q in qs (rank 0 alone uses them)
                begun.rows.append((i, plan.verify, qs[i] if self.rank == 0 else None))
        # prompts apart: a prompt's length would pad every one-token row; and only their last logits are needed.
        self._run(begun, prefills, last_only=True)
        if not any(plans[i].draft is not None for i, _, _ in begun.rows):
            # autoregressive rows decode more than one token only in a batch of nothing else (the others would wait)
            decoding_only = not prefills and all(isinstance(inp, TargetInput) for _, inp, _ in begun.rows)
            self._run(begun, begun.rows, last_only=False, decoding_only=decoding_only)
            begun.rows = []
        return begun

    def finish(self, begun: Begun, drafted: Edge) -> Edge:
        """Step-graph node, after `begin` and the draft worker's node: the passes `begin` left, their
        verifications taking the block from `drafted` (the draft worker's outputs in this step; rank 0 also
        its q) or from the plan (a block drafted ahead, its q from `begin`). Returns per plan (TargetOutput
        or VerifyOutput, hidden) on rank 0, (None, None) on the others and for releases. The hidden states
        of d_1..d_K are the judge's input (StepPlan.judge): not vocab-sized, they go as a CPU tensor."""
        rows: list[Row] = []
        on_device: dict[int, int] = {}  # plan index -> K of its block in the hand-off buffer
        if begun.rows:
            blocks = from_edge(drafted, self.max_bytes * len(begun.plans))
            for i, inp, q in begun.rows:
                if begun.plans[i].draft is not None:
                    out = DraftOutput.from_bytes(blocks[i][0], self.max_bytes)
                    if out.on_device:
                        if self.handoff is None:
                            raise RuntimeError(f"rank {self.rank}: a block was handed off, but no hand-off buffer is open here")
                        on_device[i] = begun.plans[i].draft.k
                    else:
                        inp, q = dataclasses.replace(inp, draft=out.tokens), blocks[i][1]
                rows.append((i, inp, q))
        self._run(begun, rows, last_only=False, on_device=on_device)
        return to_edge(begun.results)

    def _run(
        self, begun: Begun, rows: list[Row], last_only: bool, decoding_only: bool = False, on_device: dict | None = None
    ) -> None:
        """One batched pass over `rows` (none: nothing), its results into begun.results; on_device: plan index
        -> K of a verification whose block was handed off (its VerifyInput's draft is empty)."""
        if not rows:
            return
        stops = [frozenset(begun.plans[i].stop_ids) for i, _, _ in rows]
        for (i, *_), out in zip(rows, self._pass(rows, last_only, stops, decoding_only, on_device or {})):
            begun.results[i] = out

    def _pass(
        self,
        rows: list[Row],
        last_only: bool,
        stops: list[frozenset[int]],
        decoding_only: bool,
        on_device: dict[int, int],
    ) -> list[Item]:
        """One batched target pass over every row: a prefill, an autoregressive token or a verification each;
        with `decoding_only`, then the autoregressive rows' further tokens (`_decode_more`). A verification
        whose block was handed off (on_device: plan index -> K; greedy, actors.handoff) is fed it from the
        hand-off buffer and reads it back with the argmaxes."""
        t0 = time.perf_counter()
        rows = list(rows)  # a handed-off row gets its block's tokens once they are read back
        caches = [self.caches.at(inp.request_id, inp.keep) for _, inp, _ in rows]
        feeds = [torch.tensor(inp.feed + (inp.draft if isinstance(inp, VerifyInput) else []), device=self.device)
                 for _, inp, _ in rows]
        # after every copy from the host: such a copy waits for the stream, which then waits for the drafting
        handed = [self.handoff.take(i, on_device[i]) if i in on_device else None for i, _, _ in rows]
        t_taken = time.perf_counter()
        clock = self.handoff.since_taken() if on_device else None
        feeds = [feed if block is None else torch.cat([feed, block]) for feed, block in zip(feeds, handed)]
        passes = target_passes(self.model, caches, feeds, last_only=last_only)
        wanted = [inp.tokens if decoding_only and isinstance(inp, TargetInput) else 1 for _, inp, _ in rows]
        if self.rank != 0:
            if max(wanted) > 1:
                self._decode_more(rows, caches, wanted, stops)
            return [(None, None)] * len(rows)
        # The positions each row decides on: its last (a token) or its last K+1 (a verification).
        ks = [block.shape[0] if block is not None else len(inp.draft) if isinstance(inp, VerifyInput) else 0
              for (_, inp, _), block in zip(rows, handed)]
        decided = [logits[-(k + 1) :] if isinstance(inp, VerifyInput) else logits[-1:]
                   for (_, inp, _), k, (logits, _) in zip(rows, ks, passes)]
        params = [inp.sampling.params() for _, inp, _ in rows]
        # Greedy rows need only the argmax of each position: taken on the device for the whole batch and
        # read back in one copy (with the blocks handed off), instead of copying every row's logits to the CPU.
        greedy = [i for i, p in enumerate(params) if p.greedy]
        blocks = [block for block in handed if block is not None]
        read = torch.cat([torch.cat([decided[i] for i in greedy]).argmax(-1), *blocks]).tolist() if greedy else []
        tops, at = {}, 0
        for i in greedy:
            tops[i], at = read[at : at + decided[i].shape[0]], at + decided[i].shape[0]
        for j, block in enumerate(handed):
            if block is not None:  # only greedy plans hand off (DraftWorker.step)
                i, inp, q = rows[j]
                rows[j], at = (i, dataclasses.replace(inp, draft=read[at : at + ks[j]]), q), at + ks[j]
        tokens = {i: [self._token(inp, params[i], 0, tops[i][0] if params[i].greedy else decided[i][-1])]
                  for i, (_, inp, _) in enumerate(rows) if isinstance(inp, TargetInput)}
        if max(wanted) > 1:
            self._decode_more(rows, caches, wanted, stops, params, tokens)
        # the batch's passes: every request in it waited for all of them; a handed-off block's, from when the
        # GPU had it (the wait for the drafting is the draft worker's time)
        compute_s = time.perf_counter() - t0 if clock is None else t_taken - t0 + clock()
        results: list[Item] = []
        for i, ((_, inp, q), cache, (_, hidden)) in enumerate(zip(rows, caches, passes)):
            if isinstance(inp, TargetInput):
                results.append((TargetOutput(tokens[i], cache.length, compute_s).to_bytes(), None))
                continue
            gen = None if params[i].greedy else step_generator(inp.sampling.seed, Role.TARGET, inp.step)
            k = len(inp.draft)
            if params[i].greedy:  # the K+1 argmaxes: the verdicts, and top n the token after d_1..d_n
                matched, candidates = greedy_matched(inp.draft, tops[i]), tops[i]
            else:
                matched, candidates = verdicts(inp.draft, q, decided[i].cpu(), params[i], gen)
            out = VerifyOutput(matched, candidates, cache.length, compute_s)
            results.append((out.to_bytes(), hidden[-k:].cpu() if inp.want_hidden else None))
        return results

    @staticmethod
    def _token(inp: TargetInput, params: SamplingParams, j: int, decided: int | torch.Tensor) -> int:
        """Token j of an autoregressive row: the argmax already taken (greedy) or drawn from the logits [vocab]
        at RNG counter step + j, as the call of a single token at that step would draw it."""
        if params.greedy:
            return int(decided)
        return next_token(decided, params, step_generator(inp.sampling.seed, Role.TARGET, inp.step + j))

    def _decode_more(
        self,
        rows: list[Row],
        caches: list,
        wanted: list[int],
        stops: list[frozenset[int]],
        params: list[SamplingParams] | None = None,
        tokens: dict[int, list[int]] | None = None,
    ) -> None:
        """The autoregressive rows' tokens after their first, appended to `tokens` (rank 0: each row's tokens
        so far, and `params` its sampling, already parsed; None on the others): pass j feeds each row still decoding its
        token j - 1, until it has `wanted` tokens or (on rank 0's word) emitted a stop id. Rank 0 decides
        every token and broadcasts each pass's feed (-1: the row is done), so all ranks run the same passes
        on the same tokens. A batch of greedy rows alone takes `_decode_greedy`, which needs no host turn."""
        if params is None:  # the other ranks: the same parse as rank 0's, for the same choice of path
            params = [inp.sampling.params() for _, inp, _ in rows]
        if all(p.greedy for p in params):
            return self._decode_greedy(caches, wanted, stops, tokens)
        for j in range(1, max(wanted)):
            feed = torch.full((len(rows),), -1, dtype=torch.long)
            if tokens is not None:
                for i, got in tokens.items():
                    if len(got) < wanted[i] and got[-1] not in stops[i]:
                        feed[i] = got[-1]
            if self.world > 1:
                on_device = feed.to(self.device)
                dist.broadcast(on_device, src=0)
                if self.rank != 0:  # rank 0 sent its own
                    feed = on_device.cpu()
            going = [i for i in range(len(rows)) if feed[i] >= 0]
            if not going:
                break
            outs = target_passes(self.model, [caches[i] for i in going], [[int(feed[i])] for i in going], last_only=True)
            if tokens is None:
                continue
            logits = dict(zip(going, (out[0][-1] for out in outs)))  # [vocab] each
            greedy = [i for i in going if params[i].greedy]
            if greedy:  # the argmaxes in one read-back, as for the first token
                logits.update(zip(greedy, torch.stack([logits[i] for i in greedy]).argmax(-1).tolist()))
            for i in going:
                tokens[i].append(self._token(rows[i][1], params[i], j, logits[i]))

    @torch.inference_mode()
    def _decode_greedy(
        self, caches: list, wanted: list[int], stops: list[frozenset[int]], tokens: dict[int, list[int]] | None
    ) -> None:
        """_decode_more for greedy rows, with no host sync between passes: each pass feeds every row the argmax
        of its last pass on the device (rank 0's, broadcast, so that all ranks run the same passes on the same
        tokens), every row runs to its `wanted` tokens, and rank 0 reads them back once at the end and cuts
        each row after its first stop id. The passes past a stop wrote keys nothing reads: rank 0 rolls its
        cache back (it reports the length), the other ranks' are cut by the next call's `keep`, as after a
        rejected draft. A request that stops wastes at most ar_tokens_per_call - 1 passes; the others save a
        read-back and the host's turn-around between every two passes."""
        n = len(caches)
        first = torch.tensor([tokens[i][-1] if tokens is not None else 0 for i in range(n)], device=self.device)
        if self.world > 1:
            dist.broadcast(first, src=0)
        feeds = list(first.split(1))  # one token per row, on the device
        drawn: list[tuple[list[int], torch.Tensor]] = []  # per pass: its rows and their argmax
        for j in range(1, max(wanted)):
            going = [i for i in range(n) if j < wanted[i]]
            outs = self.model.forward_batch([feeds[i] for i in going], [caches[i] for i in going], last_only=True)
            top = torch.stack([logits[-1] for logits, _ in outs]).argmax(-1)
            if self.world > 1:
                dist.broadcast(top, src=0)
            drawn.append((going, top))
            for i, token in zip(going, top.split(1)):
                feeds[i] = token
        if tokens is None or not drawn:
            return
        ids = iter(torch.cat([top for _, top in drawn]).tolist())
        more: dict[int, list[int]] = {i: [] for i in range(n)}
        for going, _ in drawn:
            for i in going:
                more[i].append(next(ids))
        for i, got in tokens.items():
            for token in more[i]:
                if got[-1] in stops[i]:
                    break
                got.append(token)
            caches[i].truncate(caches[i].length - (wanted[i] - len(got)))  # the feeds past the row's last token

    def active(self) -> list[str]:
        """Request ids that hold a cache on this rank (empty when nothing is running)."""
        return self.caches.active()

    def released(self) -> dict[str, int]:
        """Passes each recently released request ran on this rank."""
        return dict(self.caches.released)
