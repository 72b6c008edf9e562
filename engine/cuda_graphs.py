"""CUDA graphs of a model's passes after the prefill: a one-token decode, a draft's first pass, a verification.

At batch 1 a pass of an 8B model is a few hundred kernels of a few microseconds each; launched one by one
from Python, the launches take longer than the kernels (docs/performance.md). A captured graph replays
them all with one launch. `CudaGraphs.run` is what `Transformer.forward` calls when the loader attached
one (on a GPU, runtime.cuda_graphs): the first pass of each (cache, batch, T) captures a graph of
`Transformer.forward_slots`, which attends over the whole cache through a mask, so that one graph serves
every position; later passes of that shape copy their tokens and start position into the graph's inputs
and replay it. The output equals the eager pass's up to the order of floating-point sums.

A graph holds the addresses of its cache: caches must outlive it and be reused, not reallocated (the
engine keeps one per model; actors.caches pools them).

Not for: the prefill (its length varies, it runs eagerly once per request), CPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import RuntimeConfig
from engine.model import KVCache, Transformer

WARMUP_PASSES = 2  # before capture, on a side stream: lets cuBLAS and the allocator settle (torch's advice)


@dataclass
class _Graph:
    replay: Callable[[], None]  # a captured graph's replay (or, without capture, the pass itself)
    cache: KVCache  # held: the graph writes to its tensors
    tokens: torch.Tensor  # [batch, T] input, copied in before each replay
    start: torch.Tensor  # 0-d, the position of tokens[:, 0]
    logits: torch.Tensor  # [batch, T, vocab] float32 output
    hidden: torch.Tensor  # [batch, T, hidden] output


class CudaGraphs:
    """Captured passes of one model, keyed by (cache, batch, T); passes of more than `max_rows` tokens run
    eagerly (run returns None). With `capture` False the same inputs, outputs and bookkeeping run the pass
    without a graph: how the CPU tests check this path."""

    def __init__(self, max_rows: int = 129, *, capture: bool = True, compile: bool = False):
        self.max_rows, self.capture, self.compile = max_rows, capture, compile
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool = None  # one memory pool for all: replays never overlap
        self._compiled: Callable | None = None  # torch.compile(model.forward_slots), made at the first capture

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self, model: Transformer, tokens: torch.Tensor, cache: KVCache, last_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Transformer.forward's result for a pass at cache.length > 0, or None when it must run eagerly."""
        batch, t = tokens.shape
        if t > self.max_rows:
            return None
        key = (id(cache), batch, t)
        g = self._graphs.get(key)
        if g is None:  # the graph holds its cache, so no other cache can have this id meanwhile
            g = self._graphs[key] = self._capture(model, cache, batch, t)
        g.tokens.copy_(tokens, non_blocking=True)
        g.start.fill_(cache.length)
        g.replay()
        cache.length += t
        # copies: the next replay overwrites the outputs, and callers may keep these
        if last_only:
            return g.logits[:, -1:].clone(), g.hidden[:, -1:].clone()
        return g.logits.clone(), g.hidden.clone()

    def _capture(self, model: Transformer, cache: KVCache, batch: int, t: int) -> _Graph:
        device = cache.k.device
        tokens = torch.zeros(batch, t, dtype=torch.long, device=device)
        # Warm-up and capture write their keys at the cache's last t positions: at or past cache.length
        # (forward checked that the pass fits), where nothing is valid.
        start = torch.full((), cache.max_len - t, dtype=torch.long, device=device)
        if not self.capture:
            logits, hidden = model.forward_slots(tokens, cache, start)

            def replay() -> None:
                out = model.forward_slots(tokens, cache, start)
                logits.copy_(out[0])
                hidden.copy_(out[1])

            return _Graph(replay, cache, tokens, start, logits, hidden)
        forward = model.forward_slots
        if self.compile:  # one compiled function per model; each new shape compiles during the warm-up
            if self._compiled is None:
                # every (cache size, batch, T) is its own specialisation, compiled once: more than dynamo's
                # default limit of 8 in a serving process (decode, draft passes, each K+1)
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
                self._compiled = torch.compile(model.forward_slots, fullgraph=True, dynamic=False)
            forward = self._compiled
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                forward(tokens, cache, start)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, hidden = forward(tokens, cache, start)
        self._pool = graph.pool()
        return _Graph(graph.replay, cache, tokens, start, logits, hidden)


def graphs_for(runtime: RuntimeConfig) -> CudaGraphs | None:
    """A model's CudaGraphs as the runtime section asks (one per model), or None: eager passes."""
    return CudaGraphs(compile=runtime.compile) if runtime.graphed else None
