"""What the model-holding actors share: one KV cache per active request, and the torch set-up of an actor.

A cache is created on a request's first call and freed by `release` (a StepPlan.release step); every call names the length the
cache must have (`keep`), so the actor rolls back to the scheduler's view of the sequence instead of
tracking acceptance itself. Not for: the model or the algorithm (engine/), Ray calls (the actor modules).
"""

from __future__ import annotations

import torch

from actors.step_graph import MAX_INFLIGHT
from engine.config import Config
from engine.model import KVCache, Transformer

# Request caches are allocated this many at a time, as slots of one engine.model.CacheBlock: memory grows
# with the load, and a batch's caches are mostly in one block (on a GPU with CUDA graphs, all of them are).
BLOCK_SLOTS = 8
RECENT_RELEASED = 1024  # released request ids whose pass counts a RequestCaches remembers (the oldest go)


class CacheError(RuntimeError):
    """A call that does not fit the request's cache (a scheduler bug, or too many requests at once)."""


class RequestCaches:
    """request_id -> KVCache of one model, at most `limit` at a time (the scheduler's max_active_requests)."""

    def __init__(self, model: Transformer, max_len: int, limit: int):
        self.model, self.max_len, self.limit = model, max_len, limit
        self._caches: dict[str, KVCache] = {}
        self._free: list[KVCache] = []  # released (or not yet used) caches, for the next requests
        self._allocated = 0
        self._passes: dict[str, int] = {}  # passes run for each active request
        # request id -> passes it ran, for the last RECENT_RELEASED released: shows how much work a
        # cancelled request still cost after its stop (docs/reliability.md)
        self.released: dict[str, int] = {}

    def at(self, request_id: str, keep: int) -> KVCache:
        """The request's cache rolled back to `keep` positions (created, empty, on first use)."""
        cache = self._caches.get(request_id)
        if cache is None:
            if len(self._caches) >= self.limit:
                raise CacheError(
                    f"{len(self._caches)} request caches are held already (serve.max_active_requests is "
                    f"{self.limit}): {sorted(self._caches)}"
                )
            if not self._free:  # caches come in blocks, so a batched pass reads many with one op (engine.model)
                # with CUDA graphs one block for all: a captured batched pass covers the caches of one block
                size = self.limit if self.model.graphs is not None else BLOCK_SLOTS
                block = self.model.new_block(self.max_len, min(size, self.limit - self._allocated))
                self._allocated += len(block.caches)
                self._free.extend(reversed(block.caches))
            # a released cache is reused: a CUDA graph captured over it stays valid (engine.cuda_graphs)
            cache = self._caches[request_id] = self._free.pop()
            cache.truncate(0)
        if keep > cache.length:
            raise CacheError(f"request {request_id}: asked to keep {keep} positions, the cache holds {cache.length}")
        cache.truncate(keep)
        self._passes[request_id] = self._passes.get(request_id, 0) + 1
        return cache

    def release(self, request_id: str) -> bool:
        if request_id in self._passes:
            self.released[request_id] = self._passes.pop(request_id)
            if len(self.released) > RECENT_RELEASED:
                del self.released[next(iter(self.released))]
        cache = self._caches.pop(request_id, None)
        if cache is not None:
            self._free.append(cache)
        return cache is not None

    def active(self) -> list[str]:
        return sorted(self._caches)


def actor_device(config: Config) -> torch.device:
    """The device of a model actor: Ray's num_gpus makes the actor's GPU visible as cuda:0."""
    return torch.device("cuda" if config.runtime.device.startswith("cuda") else "cpu")


def set_threads(config: Config) -> None:
    """torch CPU threads = the CPUs Ray reserved for this actor, so that co-located actors (the draft worker
    and the shards on one node) do not run more threads than there are cores."""
    torch.set_num_threads(config.serve.cpus_per_actor)


def cache_limit(config: Config) -> int:
    """Request caches an actor may hold: the running requests, plus those whose release is still queued in
    the step graph behind a step of a newer request (actors.step_graph.MAX_INFLIGHT)."""
    return config.serve.max_active_requests + MAX_INFLIGHT
