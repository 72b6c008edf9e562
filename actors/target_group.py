"""The one way to drive the target shards: run a method on every rank, in rank order, and take rank 0's result.

Tensor parallelism needs every rank to run the same passes in the same order (each pass all-reduces).
Ray runs the calls one caller makes on a synchronous actor in submission order, so submitting every
collective call from one process (the scheduler, or the backend during set-up) with no await between the
ranks keeps the ranks in step, whatever other requests' calls interleave (vLLM's collective_rpc, nano-vllm's
call(method, *args)).

Not for: placement (cluster.ray_backend) or what the methods compute (actors.target_shard).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Sequence

from ray.actor import ActorHandle


@dataclass(frozen=True)
class Collective:
    """The ObjectRefs of one call on every rank: per rank one ref, or a list of them for a method with
    several return values (TargetShard.verify)."""

    refs: list[Any]

    @property
    def leader(self) -> Any:
        """Rank 0's ref(s): the only rank whose results carry data."""
        return self.refs[0]

    async def result(self) -> Any:
        """Rank 0's (first) return value, once every rank has finished, so a failure on any rank surfaces
        here instead of leaving rank 0 waiting in a collective."""
        firsts = [r[0] if isinstance(r, list) else r for r in self.refs]
        done = await asyncio.gather(*firsts)
        return done[0]


def submit_all(shards: Sequence[ActorHandle], method: str, *args: Any, leader_args: tuple = ()) -> Collective:
    """Submits `method(*args)` on every rank; `leader_args` go to rank 0 only (None on the others), for
    data only rank 0 reads (the draft's q: vocab-sized, so not shipped to every rank)."""
    refs = []
    for rank, shard in enumerate(shards):
        extra = leader_args if rank == 0 else (None,) * len(leader_args)
        refs.append(getattr(shard, method).remote(*args, *extra))
    return Collective(refs)


async def call_all(shards: Sequence[ActorHandle], method: str, *args: Any, leader_args: tuple = ()) -> Any:
    """`method(*args)` on every rank -> rank 0's result."""
    return await submit_all(shards, method, *args, leader_args=leader_args).result()


async def form_group(shards: Sequence[ActorHandle]) -> None:
    """Joins the shards into one torch.distributed group through a file on rank 0's node (the placement
    group is STRICT_PACK, so every rank is there; no port is opened). One rank needs no group."""
    if len(shards) == 1:
        return
    init_method = await shards[0].rendezvous.remote()
    try:
        ranks = await asyncio.gather(*(shard.join.remote(init_method) for shard in shards))
    finally:
        # every rank has its communicator (NCCL's made at join, device_id given) and the shards run only
        # collectives of that group, so the store is never read again: one temporary folder per group, gone
        await shards[0].rendezvous_done.remote()
    if list(ranks) != list(range(len(shards))):
        raise RuntimeError(f"the target shards joined as ranks {ranks}")
