"""Tensor parallelism as a transform of the plain `engine.model.Transformer` (as gpt-fast's tp.py does).

`apply_tp(model, rank, world)` shards every decoder layer in place, Megatron style:

- column-parallel (each rank keeps a contiguous slice of the output features, biases included):
  q_proj, k_proj, v_proj (whole attention heads / kv heads) and gate_proj, up_proj (intermediate features);
- row-parallel (each rank keeps the matching slice of the input features): o_proj and down_proj, whose
  partial products are summed over the group by an all-reduce, so each layer's output is replicated again.

Two all-reduces per layer, nothing else crosses ranks: attention runs on the rank's own heads against its
own KV cache, and the SiLU-gated MLP is elementwise on the rank's own intermediate features. The embedding,
the final norm and the LM head stay replicated (the simplest layout; a vocabulary-parallel LM head is a
later optimisation), so every rank ends a forward pass with the same full logits and hidden states.

`shard_dim` is the one definition of that split, per state-dict key; three things apply it. `apply_tp`
slices a full model that is already in memory (the tests' reference); engine.weights.load_checkpoint reads
only the rank's slices from the safetensors files and engine.weights.dummy_model keeps only the rank's
slices of each tensor it draws, so a rank of 70B or 405B never holds the full model. All go through
`shard_modules` and `check_tp`, so all give the same model and refuse the same splits. The parameters stay
at the same attribute paths, so `state_dict()` keys stay Hugging Face's
(`model.layers.0.self_attn.o_proj.weight`), with per-rank shapes.

Numerics: TP=N output is close to TP=1 output, not bitwise equal (the all-reduce adds partial sums in
another order). The bfloat16 batch-invariance trick of engine.model survives TP=2: each output element is
the sum of exactly two partials whatever the pass length, and a + b == b + a. With more ranks the reduction
order may depend on the message size (NCCL picks ring or tree per size), so a one-token decode and a K+1
verification pass may round one row differently; gathering the partials and adding them in rank order would
restore it if that matters.

Not for: creating process groups, placing shards, or reading checkpoint files (actors/ and engine.weights
do); training (the in-place all-reduce has no backward).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.model import ModelArgs, Transformer


class RowParallelLinear(nn.Linear):
    """A Linear holding a slice of the input features; its output is the all-reduced (SUM) full product.

    A subclass of nn.Linear rather than a wrapper module, so the weight stays at `<path>.weight` and the
    state dict keys do not change. The bias, if any, is added once after the reduction, not once per rank.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup | None):
        with torch.device("meta"):  # the caller assigns the real sharded parameters
            super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features / world] -> [..., out_features]
        out = F.linear(x, self.weight)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out if self.bias is None else out + self.bias


# Megatron's split of a decoder layer: the dim of each parallel linear's weight [out, in] that is divided
# over the ranks. 0 (column-parallel): a rank computes its own output features, i.e. its own attention
# heads and kv heads (q, k, v) or its own intermediate features (gate, up). 1 (row-parallel): a rank
# multiplies its slice of the input features and the partial products are all-reduced (o, down).
PARALLEL_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def shard_dim(name: str) -> int | None:
    """The dim along which the parameter `name` (a state-dict key, e.g. `model.layers.3.mlp.down_proj.weight`)
    is divided over the ranks; None if every rank holds it whole (embedding, norms, LM head)."""
    parts = name.rsplit(".", 2)
    if len(parts) < 2:
        return None
    module, leaf = parts[-2], parts[-1]
    dim = PARALLEL_DIM.get(module)
    if dim is None or leaf not in ("weight", "bias"):
        return None
    if leaf == "bias":
        # A column-parallel bias [out] goes with its output features; a row-parallel one is added once,
        # after the all-reduce, so it stays whole (RowParallelLinear).
        return 0 if dim == 0 else None
    return dim


def shard_span(size: int, rank: int, world: int) -> slice:
    """Rank's contiguous 1/world of `size` elements along a sharded dim (check_tp ensures it divides)."""
    local = size // world
    return slice(rank * local, (rank + 1) * local)


def local_args(args: ModelArgs, world: int) -> ModelArgs:
    """The shape a rank's shard has: head counts and intermediate size divided by `world`, the rest whole."""
    return dataclasses.replace(
        args,
        num_heads=args.num_heads // world,
        num_kv_heads=args.num_kv_heads // world,
        intermediate_size=args.intermediate_size // world,
    )


def check_tp(args: ModelArgs, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
    """Raises ValueError if `args` cannot be split over `world` ranks, rank is out of range, or the process
    group (when one is initialised) disagrees. Callers run it before any collective and before reading
    any weights."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tensor parallelism needs 0 <= rank < world, got rank={rank}, world={world}")
    uneven = [
        f"{name}={value}"
        for name, value in (
            ("num_heads", args.num_heads),
            ("num_kv_heads", args.num_kv_heads),
            ("intermediate_size", args.intermediate_size),
        )
        if value % world
    ]
    if uneven:
        # vLLM replicates kv heads when world > num_kv_heads; not implemented here, so refuse.
        raise ValueError(
            f"cannot shard this {args.family} model over world={world} ranks: {', '.join(uneven)} not divisible "
            f"by {world}; choose a tensor-parallel size that divides num_heads={args.num_heads}, "
            f"num_kv_heads={args.num_kv_heads} and intermediate_size={args.intermediate_size}"
        )
    if dist.is_available() and dist.is_initialized():
        size, me = dist.get_world_size(group), dist.get_rank(group)
        if (size, me) != (world, rank):
            raise ValueError(
                f"tensor-parallel rank={rank}, world={world} does not match the process group (rank {me} of {size})"
            )


def shard_modules(
    model: Transformer,
    world: int,
    group: dist.ProcessGroup | None,
    fill: Callable[[str, nn.Linear, nn.Linear], None] | None = None,
) -> None:
    """Gives every parallel linear of `model` its rank-local shape, in place, one module at a time.

    Each local linear is created with its parameters on the meta device (RowParallelLinear for row-parallel
    modules, nn.Linear otherwise); `fill(qualified name, full linear, local linear)`, if given, assigns them
    before the swap, so the full module is freed at once (apply_tp). Without it they stay on meta for the
    caller to materialise (engine.weights, which then reads them from the files). Afterwards the attention
    modules count local heads and `model.args` is `local_args`. Run `check_tp` first.
    """
    for i, layer in enumerate(model.model.layers):
        for part_name, part in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for attr, full in list(part.named_children()):
                dim = PARALLEL_DIM.get(attr)
                if dim is None:
                    continue
                bias = full.bias is not None
                if dim == 1:
                    local = RowParallelLinear(full.in_features // world, full.out_features, bias, group)
                else:
                    with torch.device("meta"):
                        local = nn.Linear(full.in_features, full.out_features // world, bias=bias)
                if fill is not None:
                    fill(f"model.layers.{i}.{part_name}.{attr}", full, local)
                setattr(part, attr, local)
        layer.self_attn.n_heads //= world
        layer.self_attn.n_kv //= world
    model.args = local_args(model.args, world)


def local_part(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous 1/world of `t` along `dim`, as a view (copy it out to free the rest of `t`)."""
    span = shard_span(t.shape[dim], rank, world)
    return t.narrow(dim, span.start, span.stop - span.start)


def apply_tp(model: Transformer, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Shards `model` in place for rank `rank` of `world` and returns it.

    Every rank must start from identical full weights. Afterwards `model.args` describes this rank's
    shard (num_heads, num_kv_heads and intermediate_size divided by `world`; everything else unchanged), so
    `model.new_cache` allocates only the local kv heads and `args.num_parameters` counts the rank's own
    parameters. The forward pass then contains collectives on `group` (None: the default group): every rank
    must run the same passes in the same order. world == 1 returns the model untouched.

    Raises ValueError, before any collective, if a head count or the intermediate size does not divide by
    `world` (kv heads are not replicated across ranks), if rank is out of range, or if the model is already
    sharded.
    """
    # First: a sharded model's args are the local ones, which check_tp would judge instead.
    if any(isinstance(layer.self_attn.o_proj, RowParallelLinear) for layer in model.model.layers):
        raise ValueError("apply_tp was already applied to this model")
    if model.stacked:
        raise ValueError("shard the model before Transformer.stack_projections, not after")
    check_tp(model.args, rank, world, group)
    if world == 1:
        return model

    def fill(name: str, full: nn.Linear, local: nn.Linear) -> None:
        for leaf, p in full.named_parameters(recurse=False):
            dim = shard_dim(f"{name}.{leaf}")
            kept = p if dim is None else nn.Parameter(
                # a fresh compact tensor: a view would keep the full tensor alive, the memory the shard frees
                local_part(p.data, dim, rank, world).clone(memory_format=torch.contiguous_format),
                requires_grad=p.requires_grad,
            )
            setattr(local, leaf, kept)

    shard_modules(model, world, group, fill)
    return model


def exit_rank() -> NoReturn:
    """Ends a spawned rank's process (torch.multiprocessing.spawn) once its work is done and its process group
    destroyed, without the interpreter's teardown: there gloo's threads can still abort the process
    ("terminate called without an active exception", SIGABRT, after the work: seen once in a CI run of
    tests/engine/test_tp.py; pytorch/pytorch#179291 describes the race), which spawn reports as a failed
    rank. Call it on the success path only, so that an error still fails the spawn."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
