"""CUDA graphs of a model's passes: a prefill, a one-token decode, a draft's first pass, a verification.

At batch 1 a pass of an 8B model is a few hundred kernels of a few microseconds each; launched one by one
from Python, the launches take longer than the kernels (docs/performance.md). A captured graph replays
them all with one launch. `CudaGraphs.run` is what `Transformer.forward` calls when the loader attached
one (on a GPU, runtime.cuda_graphs): the first pass of each (cache, batch, T, key bucket) captures a graph
of `Transformer.forward_slots`, which attends through a mask over the cache's first L positions, L the
pass's end rounded up to a power of two (at least KEY_FLOOR), so that one graph serves every position of
its bucket; later passes of that shape copy their tokens and start position into the graph's inputs and
replay it. Attention thus reads about the sequence's keys, not max_seq_len's (over a whole 1024-position
cache it was a fifth of a 70B TP rank's 17-token pass, docs/performance.md, and it grows with
max_seq_len). A prefill's length varies with the prompt, so it runs padded to a bucket of rows (a power of
two of at least PREFILL_FLOOR, at most max_rows): its padding rows write past the prompt, where nothing is
valid and the prompt's rows never look (the causal mask), and only the prompt's rows are returned (84-token
prompts on H100s: the 8B bf16 target's prefill 32 -> 12 ms, the 70B int8 TP=2 target's 225 -> 135 ms,
docs/performance.md). The output equals the eager pass's up to the order of floating-point sums. With
runtime.compile, the pass's three pieces (embedding, one decoder layer, norm and LM head: engine.model's
SLOT_STEPS) are compiled apart before the capture, the layer step once for every layer (and bucket).

A graph holds the addresses of its cache: caches must outlive it and be reused, not reallocated (the
engine keeps one per model; actors.caches pools them).

Not for: prompts of more than max_rows tokens (they prefill eagerly, where the launches matter less than
the products), CPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import RuntimeConfig
from engine.model import SLOT_STEPS, CacheBlock, KVCache, SlotSteps, Transformer

WARMUP_PASSES = 2  # before capture, on a side stream: lets cuBLAS and the allocator settle (torch's advice)
KEY_FLOOR = 64  # the smallest key bucket: shorter sequences share one graph per pass shape
PREFILL_FLOOR = 16  # the smallest prefill: shorter prompts share its graph (a few padding rows cost little)
# The longest key bucket whose one-token passes attend through engine.attention_kernel: its first kernel
# takes a program per 32 keys and its second holds all their partial sums at once (64 x head_dim here).
# Longer buckets attend through SDPA, as passes did before the kernel. Measured up to 1,024 on GPUs.
ATTENTION_KERNEL_MAX_KEYS = 2048


@dataclass
class _Graph:
    replay: Callable[[], None]  # a captured graph's replay (or, without capture, the pass itself)
    cache: KVCache  # held: the graph writes to its tensors
    tokens: torch.Tensor  # [batch, T] input, copied in before each replay
    start: torch.Tensor  # 0-d, the position of tokens[:, 0]
    logits: torch.Tensor  # [batch, T, vocab] float32 output
    hidden: torch.Tensor  # [batch, T, hidden] output


@dataclass
class _RowsGraph:
    """A captured batched pass over one CacheBlock (Transformer.forward_gathered): inputs copied in before
    each replay, rows past the batch's pointing at the block's scratch slot."""

    replay: Callable[[], None]
    block: CacheBlock
    tokens: torch.Tensor  # [rows, T]
    rows: torch.Tensor  # [3, rows]: each row's slot, start and end
    logits: torch.Tensor  # [rows, T, vocab] float32
    hidden: torch.Tensor  # [rows, T, hidden]


def _bucket(n: int, floor: int = 1) -> int:
    """The power of two >= max(n, floor): batch sizes and key lengths share a few captured graphs."""
    return 1 << (max(n, floor) - 1).bit_length()


class CudaGraphs:
    """Captured passes of one model, keyed by (cache, batch, T, key bucket); passes of more than `max_rows`
    tokens run eagerly (run returns None). With `capture` False the same inputs, outputs and bookkeeping run the pass
    without a graph: how the CPU tests check this path."""

    def __init__(self, max_rows: int = 129, *, capture: bool = True, compile: bool = False, attention_kernel: bool = False):
        self.max_rows, self.capture, self.compile = max_rows, capture, compile
        self.attention_kernel = attention_kernel  # one-token passes attend through engine.attention_kernel
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool = None  # one memory pool for all: replays never overlap
        self._compiled: SlotSteps | None = None  # torch.compile of each of SLOT_STEPS, made at the first capture

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self, model: Transformer, tokens: torch.Tensor, cache: KVCache, last_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Transformer.forward's result for a pass, or None when it must run eagerly."""
        batch, t = tokens.shape
        if t > self.max_rows:
            return None
        rows = t
        if cache.length == 0:  # a prefill: padded with its last token to a bucket of rows
            rows = min(_bucket(t, PREFILL_FLOOR), self.max_rows, cache.max_len)
            tokens = torch.cat((tokens, tokens[:, -1:].expand(batch, rows - t)), dim=1)
        keys = min(_bucket(cache.length + rows, KEY_FLOOR), cache.max_len)
        key = (id(cache), batch, rows, keys)
        g = self._graphs.get(key)
        if g is None:  # the graph holds its cache, so no other cache can have this id meanwhile
            g = self._graphs[key] = self._capture(model, cache, batch, rows, keys)
        g.tokens.copy_(tokens, non_blocking=True)
        g.start.fill_(cache.length)
        g.replay()
        cache.length += t
        # copies: the next replay overwrites the outputs, and callers may keep these
        if last_only:
            return g.logits[:, t - 1 : t].clone(), g.hidden[:, t - 1 : t].clone()
        return g.logits[:, :t].clone(), g.hidden[:, :t].clone()

    def run_rows(
        self, model: Transformer, feeds: list[torch.Tensor], caches: list[KVCache], lengths: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Transformer.forward_batch's results for requests whose caches are slots of one CacheBlock, all
        past their prefill, from a graph captured per (block, rows, T, keys) with rows and keys rounded up
        to powers of two; None when it must run eagerly. Advances the caches' lengths."""
        block = caches[0].block
        t = max(lengths)
        if t > self.max_rows or any(c.block is not block or c.length == 0 for c in caches):
            return None
        rows = _bucket(len(caches))
        keys = min(_bucket(max(c.length + n for c, n in zip(caches, lengths)), KEY_FLOOR), block.max_len)
        key = ("rows", id(block), rows, t, keys)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture_rows(model, block, rows, t, keys)
        b = len(caches)
        g.tokens[:b].copy_(torch.stack([torch.cat((f, f[-1:].expand(t - n))) for f, n in zip(feeds, lengths)]))
        # slots, starts and ends are rows of one tensor: one copy to the device per replay
        g.rows[:, :b].copy_(torch.tensor([[c.slot for c in caches], [c.length for c in caches],
                                          [c.length + n for c, n in zip(caches, lengths)]]))
        g.replay()
        out = []
        for i, (cache, n) in enumerate(zip(caches, lengths)):
            cache.length += n
            out.append((g.logits[i, :n].clone(), g.hidden[i, :n].clone()))
        return out

    def _capture_rows(self, model: Transformer, block: CacheBlock, rows: int, t: int, keys: int) -> _RowsGraph:
        device = block.k.device
        # Until a replay copies a batch in, every row is padding: the scratch slot, position 0.
        tokens = torch.zeros(rows, t, dtype=torch.long, device=device)
        padding = torch.tensor([[block.scratch], [0], [1]], device=device)  # slot, start, end of a padding row
        meta = padding.expand(3, rows).clone()
        slots, starts, ends = meta

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            return model.forward_gathered(tokens, block, slots, starts, ends, keys)

        replay, logits, hidden = self._record(forward, device)

        def replay_rows() -> None:
            replay()
            meta.copy_(padding.expand(3, rows))  # a smaller batch next: its unused rows are padding again

        return _RowsGraph(replay_rows, block, tokens, meta, logits, hidden)

    def _record(self, forward: Callable[[], tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        """(replay, logits, hidden) of `forward` captured as a CUDA graph (or, without capture, run as is)."""
        if not self.capture:
            logits, hidden = forward()

            def again() -> None:
                out = forward()
                logits.copy_(out[0])
                hidden.copy_(out[1])

            return again, logits, hidden
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, hidden = forward()
        self._pool = graph.pool()
        return graph.replay, logits, hidden

    def _capture(self, model: Transformer, cache: KVCache, batch: int, t: int, keys: int) -> _Graph:
        device = cache.k.device
        tokens = torch.zeros(batch, t, dtype=torch.long, device=device)
        # Warm-up and capture write their keys at the cache's last t positions: at or past cache.length
        # (forward checked that the pass fits), where nothing is valid (past the bucket, if it is shorter:
        # every key is then visible to the warm-up's rows, whose results are not kept).
        start = torch.full((), cache.max_len - t, dtype=torch.long, device=device)
        steps = None  # the pass's pieces run eagerly
        if self.compile and self.capture:  # each new shape compiles in the warm-up
            if self._compiled is None:
                # every (cache size, batch, T) is its own specialisation, compiled once: more than dynamo's
                # default limit of 8 in a serving process (decode, draft passes, each K+1)
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
                # The pass's pieces compiled apart: one layer step serves every layer (engine.model), so a
                # shape compiles in the time of one layer, not of the model's whole depth.
                self._compiled = tuple(torch.compile(f, fullgraph=True, dynamic=False) for f in SLOT_STEPS)
            steps = self._compiled
        # Coordinate-descent tuning for one-row passes (decode, drafting) only: with it inductor turns a
        # product with one row into a tuned reduction kernel instead of a cuBLAS GEMV, which reaches more of
        # the copy bandwidth (8B decode on an H100: 155 tokens/s, gpt-fast sets it too) and fuses an int8
        # weight's conversion into the product (engine.quant). Passes of more rows keep cuBLAS, and skip the
        # tuning, which tripled an 8B shape's compile time (docs/performance.md).
        kernel = self.attention_kernel and keys <= ATTENTION_KERNEL_MAX_KEYS
        with torch._inductor.config.patch(coordinate_descent_tuning=self.compile and batch * t == 1):
            replay, logits, hidden = self._record(
                lambda: model.forward_slots(tokens, cache, start, steps, keys, kernel), device
            )
        return _Graph(replay, cache, tokens, start, logits, hidden)


def graphs_for(runtime: RuntimeConfig) -> CudaGraphs | None:
    """A model's CudaGraphs as the runtime section asks (one per model), or None: eager passes."""
    return CudaGraphs(compile=runtime.compile, attention_kernel=runtime.attention_kernel) if runtime.graphed else None
