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

Every rank loads the full weights and then keeps its slice (simple; loading only the shard is the later
memory optimisation that 405B needs). The parameters stay at the same attribute paths, so `state_dict()`
keys stay Hugging Face's (`model.layers.0.self_attn.o_proj.weight`), with per-rank shapes.

Numerics: TP=N output is close to TP=1 output, not bitwise equal (the all-reduce adds partial sums in
another order). The bfloat16 batch-invariance trick of engine.model survives TP=2: each output element is
the sum of exactly two partials whatever the pass length, and a + b == b + a. With more ranks the reduction
order may depend on the message size (NCCL picks ring or tree per size), so a one-token decode and a K+1
verification pass may round one row differently; gathering the partials and adding them in rank order would
restore it if that matters.

Not for: creating process groups, placing shards, or loading checkpoints (actors/ and engine.weights do);
training (the in-place all-reduce has no backward).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.model import Attention, MLP, Transformer


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


def _slice(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous 1/world of `t` along `dim`, as a fresh compact tensor (a view would keep the full
    tensor alive, which is the memory the shard is meant to free)."""
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size).clone(memory_format=torch.contiguous_format)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


def _column_parallel(linear: nn.Linear, rank: int, world: int) -> None:
    # weight: [out, in] -> [out / world, in]; bias: [out] -> [out / world]
    linear.weight = _param(_slice(linear.weight.data, 0, rank, world), linear.weight)
    if linear.bias is not None:
        linear.bias = _param(_slice(linear.bias.data, 0, rank, world), linear.bias)
    linear.out_features //= world


def _row_parallel(linear: nn.Linear, rank: int, world: int, group: dist.ProcessGroup | None) -> RowParallelLinear:
    # weight: [out, in] -> [out, in / world]; the bias (none in the supported families) stays whole
    row = RowParallelLinear(linear.in_features // world, linear.out_features, linear.bias is not None, group)
    row.weight = _param(_slice(linear.weight.data, 1, rank, world), linear.weight)
    if linear.bias is not None:
        row.bias = linear.bias
    return row


def _check(model: Transformer, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tensor parallelism needs 0 <= rank < world, got rank={rank}, world={world}")
    if any(isinstance(layer.self_attn.o_proj, RowParallelLinear) for layer in model.model.layers):
        raise ValueError("apply_tp was already applied to this model")
    a = model.args
    uneven = [
        f"{name}={value}"
        for name, value in (
            ("num_heads", a.num_heads),
            ("num_kv_heads", a.num_kv_heads),
            ("intermediate_size", a.intermediate_size),
        )
        if value % world
    ]
    if uneven:
        # vLLM replicates kv heads when world > num_kv_heads; not implemented here, so refuse.
        raise ValueError(
            f"cannot shard this {a.family} model over world={world} ranks: {', '.join(uneven)} not divisible by "
            f"{world}; choose a tensor-parallel size that divides num_heads={a.num_heads}, "
            f"num_kv_heads={a.num_kv_heads} and intermediate_size={a.intermediate_size}"
        )
    if dist.is_available() and dist.is_initialized():
        size, me = dist.get_world_size(group), dist.get_rank(group)
        if (size, me) != (world, rank):
            raise ValueError(f"apply_tp(rank={rank}, world={world}) does not match the process group (rank {me} of {size})")


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
    _check(model, rank, world, group)
    if world == 1:
        return model
    a = model.args
    for layer in model.model.layers:
        attn: Attention = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            _column_parallel(proj, rank, world)
        attn.o_proj = _row_parallel(attn.o_proj, rank, world, group)
        attn.n_heads //= world
        attn.n_kv //= world
        mlp: MLP = layer.mlp
        _column_parallel(mlp.gate_proj, rank, world)
        _column_parallel(mlp.up_proj, rank, world)
        mlp.down_proj = _row_parallel(mlp.down_proj, rank, world, group)
    model.args = dataclasses.replace(
        a,
        num_heads=a.num_heads // world,
        num_kv_heads=a.num_kv_heads // world,
        intermediate_size=a.intermediate_size // world,
    )
    return model
