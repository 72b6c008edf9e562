"""Weight-only int8 quantization of a model's linear layers (`ModelSpec.quantize: int8`).

A one-token decode reads every weight once and does two flops per weight, so its time is the weights'
bytes over the memory bandwidth (DESIGN.md 3). Holding the matrices as int8 with one scale per output
feature (symmetric, round to nearest, as gpt-fast's int8 mode) halves those bytes; activations, the
cache, norms and the embedding stay in the model's dtype. `Int8Linear.forward` is written in the one
form inductor turns into a fused kernel: under torch.compile (runtime.compile) with coordinate-descent
tuning, a product with a single row becomes one reduction that reads the int8 weight and scales on the
fly (engine.cuda_graphs sets that up). On a GPU a pass of 2 to 128 rows (a K+1 verification, a draft's
first pass after a fully accepted block, a prefill graph's bucket) runs engine.int8_kernel's Triton kernel,
which reads the int8 weight once; a longer pass (an eager prefill), or any pass on a CPU, converts the
weight to the model's dtype in memory first and multiplies as usual.

Lossy: the quantized model is another model, close to the original but not equal (docs/performance.md
measures how close on the real pair). Every exactness guarantee of the engine (greedy speculative output
equals autoregressive output, rollback, the judge at threshold 1.0) holds relative to the quantized target.

Applied while loading (engine.weights), a decoder layer at a time as soon as it is filled, and after
tensor-parallel sharding, so each rank quantizes its own slices (a row-parallel slice gets its own
per-feature scales; its partial product is scaled before the all-reduce) and never holds its whole shard
in the model's dtype: a 70B rank at TP=2 is 72.7 GB in bf16, about 38 GB in int8.

Not for: activations or the KV cache (they stay in the model's dtype), fp8 tensor-core products.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.model import DecoderLayer, Transformer
from engine.tp import RowParallelLinear

QMAX = 127  # symmetric: -127 .. 127, so a weight and its negation round alike


KERNEL_MAX_ROWS = 128  # passes of 2..KERNEL_MAX_ROWS rows on a GPU run engine.int8_kernel (all it takes)


@torch.library.custom_op("judgeserve::int8_partials", mutates_args=())
def int8_partials(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """engine.int8_kernel.partial_products (Triton) as one op torch.compile and CUDA graphs take whole."""
    from engine import int8_kernel  # Triton: imported where a GPU pass first needs it

    return int8_kernel.partial_products(x.contiguous(), weight)


@int8_partials.register_fake
def _int8_partials_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from engine import int8_kernel

    n, k = weight.shape
    return x.new_empty((int8_kernel.splits(x.device, n, k), x.shape[0], n), dtype=torch.float32)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(x weight^T) * scales for x [rows <= KERNEL_MAX_ROWS, in] by the Triton kernel; in x's dtype."""
    return (int8_partials(x, weight).sum(dim=0) * scales.float()).to(x.dtype)


@torch.library.custom_op("judgeserve::widen", mutates_args=())
def widen(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight.to(dtype), as an op of its own: inductor leaves it apart from the product that reads it."""
    return weight.to(dtype)


@widen.register_fake
def _widen_fake(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=dtype, device=weight.device)


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights [out, in] and per-output scales [out]; y = (x W_q^T) * s (+ b).

    Replaces an nn.Linear or a RowParallelLinear in place (same path; its output is all-reduced over the
    same group, the bias added after the reduction as there)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scales = w.float().abs().amax(dim=1).clamp_min(1e-12) / QMAX  # float32 for the rounding
        self.register_buffer("weight", torch.round(w.float() / scales[:, None]).clamp(-QMAX, QMAX).to(torch.int8))
        self.register_buffer("scales", scales.to(w.dtype))
        self.bias = linear.bias
        self.reduce_group = linear.group if isinstance(linear, RowParallelLinear) else None
        self.row_parallel = isinstance(linear, RowParallelLinear)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @classmethod
    def stacked(cls, parts: list[Int8Linear] | tuple[Int8Linear, ...]) -> Int8Linear:
        """One layer whose output is the parts' side by side (engine.model.stack_outputs): int8 weights, scales
        and biases stacked along the outputs. Exact: each output feature keeps its own scale."""
        if any(p.row_parallel for p in parts):
            raise ValueError("row-parallel layers sum over the ranks and cannot be stacked along their outputs")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.register_buffer("weight", torch.cat([p.weight for p in parts]))
        layer.register_buffer("scales", torch.cat([p.scales for p in parts]))
        biases = [p.bias for p in parts]
        layer.bias = None if biases[0] is None else nn.Parameter(torch.cat(biases).detach(), requires_grad=False)
        layer.reduce_group, layer.row_parallel = None, False
        layer.in_features, layer.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale multiplies the product, not the weight. One row: the pattern inductor fuses into one
        # tuned reduction. A few rows on a GPU: the Triton kernel. Otherwise the weight converted by an op
        # inductor cannot fuse, then the usual matrix product (fused, a 33-row 8B pass took 634 ms on an
        # H100: docs/performance.md).
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        elif x.is_cuda and rows <= KERNEL_MAX_ROWS:
            out = int8_matmul(x.reshape(rows, x.shape[-1]), self.weight, self.scales).view(*x.shape[:-1], -1)
        else:
            out = F.linear(x, widen(self.weight, x.dtype)) * self.scales
        if self.row_parallel:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.reduce_group)
        return out if self.bias is None else out + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in the scales' dtype [out, in] (tests and diagnostics)."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]


def quantize_part(model: Transformer, part: nn.Module) -> None:
    """Quantizes one part of `model` in place if it is one int8 covers: a decoder layer's products, or the LM
    head unless it is tied to the embedding (which stays whole); other parts are left alone. engine.weights
    calls it on each part as soon as it is filled."""
    if isinstance(part, DecoderLayer):  # q, k, v, o, gate, up, down (or qkv, o, gate_up, down once stacked)
        for block in (part.self_attn, part.mlp):
            for name, child in list(block.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(block, name, Int8Linear(child))
    elif part is model.lm_head and not model.args.tie_word_embeddings:
        model.lm_head = Int8Linear(part)


def quantize_int8(model: Transformer) -> Transformer:
    """Replaces, in place, every linear layer of the decoder layers and the LM head (unless tied to the
    embedding) by an Int8Linear; returns the model. One layer at a time, so the peak is the model plus one
    layer's float32 copy of a weight. (engine.weights quantizes while it loads, so that the model's dtype
    copy is never whole.)"""
    for part in (*model.model.layers, model.lm_head):
        quantize_part(model, part)
    return model
