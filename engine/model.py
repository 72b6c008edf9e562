"""A lean decoder-only transformer for the Llama, Qwen2 and Mistral families, with a preallocated KV cache.

The module tree mirrors Hugging Face's parameter names (`model.layers.N.self_attn.q_proj.weight`, ...), so
a checkpoint's state dict loads as it is; once loaded (and sharded, and quantized), `stack_projections` can
stack q, k and v into one matrix and gate and up into another, so a pass runs 4 products per layer, not 7.
One forward call handles every case the engine needs: prefill (T prompt tokens at position 0), one-token
decode, and the K+1-token verification pass at any position; the cache is rolled back by moving its length,
because attention only ever reads positions below it.

Not for: loading weights (engine.weights), sampling (engine.sampling) or tensor parallelism, which is a
transform applied to this plain model, never a second implementation of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # frozen dict: rope_type, factor, ...
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has a bias on q, k and v
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    # Full attention equals sliding-window attention while the sequence fits the window, so the loader
    # refuses a max_seq_len longer than this rather than implementing the window.
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Reads a transformers config.json (4.x or 5.x layout); refuses what this decoder cannot run."""
        family = cfg.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5.x keeps theta and scaling together
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        scaling = rope or dict(cfg.get("rope_scaling") or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3 are)")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else tuple(sorted({**scaling, "rope_type": rope_type}.items())),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            eos_token_ids=eos_ids,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        )

    @property
    def num_parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        attn = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:  # [head_dim // 2]
    dim = args.head_dim
    # computed on the CPU whatever device context a model is built in: on the meta device (the loader's
    # _build) arange is a Python reference whose first call imports torch._dynamo (seconds), and the loader
    # sets the real frequencies once the model is on its device
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = dict(args.rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        # Llama-3.1's frequency-dependent scaling: long wavelengths are divided by `factor`, short ones
        # kept, the band between interpolated smoothly (as in Meta's reference and transformers).
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled).float()
    return inv_freq.float()


@torch.library.custom_op("judgeserve::write_kv", mutates_args=("keys", "values"))
def write_kv(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """keys[:, :, positions] = k and values[:, :, positions] = v, in place, for the graph-safe pass (Slots).

    An op of its own so that torch.compile leaves it in place: traced as `index_copy_` into a view of the
    cache (a graph input), the write is functionalized, and inductor cloned each layer's whole cache and
    copied it back, every pass (0.46 ms of a 7.9 ms 8B decode on an H100 at max_seq_len 512, growing with
    the cache; docs/performance.md). A custom op that declares the mutation is called on the cache itself.
    """
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)


@write_kv.register_fake
def _write_kv_fake(keys, values, positions, k, v) -> None:
    return None


@torch.library.custom_op("judgeserve::decode_attention", mutates_args=("keys", "values"))
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    length: int,
) -> torch.Tensor:
    """A one-row graph-safe pass's rotary, cache write and attention in two Triton kernels
    (engine.attention_kernel.decode_attention, which says what each argument is)."""
    from engine import attention_kernel  # Triton: imported where a GPU pass first needs it

    return attention_kernel.decode_attention(q, k, v, cos, sin, keys, values, positions, length)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, cos, sin, keys, values, positions, length) -> torch.Tensor:
    return torch.empty_like(q)


class KVCache:
    """Preallocated keys and values for every layer of one model: [layers, batch, kv_heads, max_len, head_dim].

    `length` is the number of valid positions. Rolling back is `truncate(n)`: entries at or past `length`
    are never read (the attention reads cache[..., :length]) and are overwritten by the next write, so a
    rolled-back cache behaves exactly as if the rejected tokens had never run.
    """

    def __init__(self, args: ModelArgs, max_len: int, *, batch: int = 1, dtype: torch.dtype, device: torch.device):
        shape = (args.num_layers, batch, args.num_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.block: CacheBlock | None = None  # set for a slot of a CacheBlock
        self.slot = 0

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of length {self.length} to {length}")
        self.length = length


class CacheBlock:
    """`slots` one-request caches in one pair of tensors [layers, slots, kv_heads, max_len, head_dim].

    Each slot is a KVCache of batch 1 (`caches[s]`, views into the block), used like any other; a batched
    pass over caches of one block reads and writes all of them with one indexed operation per layer
    instead of one per request (Transformer.forward_batch), which is what makes batching pay on a GPU.
    """

    def __init__(self, args: ModelArgs, max_len: int, slots: int, *, dtype: torch.dtype, device: torch.device):
        # one more slot than it hands out: where a captured batched pass's padding rows write (engine.cuda_graphs)
        whole = KVCache(args, max_len, batch=slots + 1, dtype=dtype, device=device)
        self.k, self.v = whole.k, whole.v
        self.max_len = max_len
        self.scratch = slots
        self.caches: list[KVCache] = []
        for s in range(slots):
            cache = KVCache.__new__(KVCache)
            cache.k, cache.v = self.k[:, s : s + 1], self.v[:, s : s + 1]
            cache.max_len, cache.length, cache.block, cache.slot = max_len, 0, self, s
            self.caches.append(cache)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference implementations do; bf16 variance loses greedy ties.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, heads, T, head_dim]; cos, sin: [T, head_dim]. Half-rotation layout (HF / Meta).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with a mask [..., T, L] for grouped-query attention: q [b, heads, T, d], keys and values
    [b, kv_heads, L, d] -> [b, heads, T, d]. The query heads that share a key head are folded into its rows
    ([b, kv_heads, group * T, d], the mask repeated per head), so the call has as many heads as the keys.
    With enable_gqa and a mask, SDPA took its math path on an H100 (torch 2.11): the keys and values repeated
    per query head and multiplied in float32, most of what a verification pass of a few rows cost beyond a
    one-row pass; folded, it takes the memory-efficient kernel (docs/performance.md, measurement 2)."""
    b, heads, t, d = q.shape
    group = heads // keys.shape[1]
    if group == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    # query head i reads key head i // group (as enable_gqa): [b, kv, group, T, d] -> rows (head in group, T)
    q = q.reshape(b, keys.shape[1], group * t, d)
    mask = mask.repeat(*([1] * (mask.dim() - 2)), group, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).reshape(b, heads, t, d)


@dataclass(frozen=True)
class Span:
    """Where an eager pass writes and reads: `rows` real tokens at positions start .. start + rows - 1 (any
    further rows are padding), attention over exactly the keys below each row; `exact`: row by row."""

    start: int
    rows: int
    exact: bool


@dataclass(frozen=True)
class Slots:
    """Where one layer of a graph-safe pass writes and reads: that layer's keys and values [batch, kv_heads,
    max_len, head_dim], positions [T] and the mask [T, L] of the keys each row sees among the cache's first
    L positions, all on the device. The pass attends over those L keys only (L: the mask's size, a bucket of
    lengths, engine.cuda_graphs), not the whole cache, whose max_len may be many times the sequence. No
    Python number depends on the position or the layer, so a captured CUDA graph replays the pass at any
    position below L, and one compiled layer step serves every layer."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    kernel: bool = False  # a pass of one row that attends through decode_attention (runtime.attention_kernel)


@dataclass(frozen=True)
class Rows:
    """Where a batched eager pass writes and reads: row b of the batch is one request's pass, over
    `caches[b]` at `spans[b]` (each request keeps its own cache; the matrix products see the whole batch).

    `gathered`, when every cache is a slot of a CacheBlock and no span is exact: the rows in runs of one
    block each, (block, first row, slots [n]), with positions [B, T] and the mask [B, 1, T, L] over the
    first L = the longest row's end positions, so each layer attends with one call for the whole batch."""

    caches: tuple[KVCache, ...]
    spans: tuple[Span, ...]
    gathered: tuple[tuple[CacheBlock, int, torch.Tensor], ...] | None = None
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def row_positions(starts: torch.Tensor, ends: torch.Tensor, t: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of requests' pass of T tokens each: row b at positions starts[b] .. (padding repeats the last
    real position, ends[b] - 1) -> positions [B, T] and the mask [B, 1, T, length] of the keys each query
    sees (the 1 broadcasts over heads). Tensors only, so a captured graph can replay it."""
    positions = torch.minimum(starts[:, None] + torch.arange(t, device=starts.device), ends[:, None] - 1)
    mask = torch.arange(length, device=starts.device)[None, None, :] <= positions[:, :, None]
    return positions, mask[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        h, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k, v stacked (stack)

    def stack(self) -> None:
        self.qkv_proj = stack_outputs(self.q_proj, self.k_proj, self.v_proj)
        # the widths to split its output at, fixed now (after TP sharding set the rank's head counts)
        self.qkv_widths = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, where: Span | Slots | Rows
    ) -> torch.Tensor:
        """x: [batch, T, hidden]. With a Span, the first `rows` rows are real and any further rows repeat the
        last real one (they only keep the matrix products at Transformer.MIN_ROWS); with Slots, every row is;
        with Rows, each batch row is a Span over its own cache (`cache` is None)."""
        b, t, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.qkv_widths, -1)
        if isinstance(where, Slots) and where.kernel:  # one row: rotary, write and attention in one op
            q, k, v = q.view(self.n_heads, -1), k.view(self.n_kv, -1), v.view(self.n_kv, -1)
            out = decode_attention(q, k, v, cos[0], sin[0], where.keys, where.values, where.positions, where.mask.shape[-1])
            return self.o_proj(out.view(b, t, -1))
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(where, Rows) and where.gathered is not None:
            return self.o_proj(self._attend_gathered(q, k, v, where).transpose(1, 2).reshape(b, t, -1))
        if isinstance(where, Rows):
            out = torch.cat(
                [
                    self._attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], c.k[self.layer], c.v[self.layer], span)
                    for i, (c, span) in enumerate(zip(where.caches, where.spans))
                ]
            )
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if isinstance(where, Slots):  # the cache's first L positions, masked: the same shapes at every position
            write_kv(where.keys, where.values, where.positions, k, v)
            n = where.mask.shape[-1]
            out = masked_attention(q, where.keys[:, :, :n], where.values[:, :, :n], where.mask)
        else:  # [batch, kv_heads, max_len, head_dim]
            out = self._attend(q, k, v, cache.k[self.layer], cache.v[self.layer], where)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _attend_gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: Rows) -> torch.Tensor:
        """Rows of CacheBlocks: per block one indexed write of every row's new keys and values and one gather
        of the rows' first L positions; then one masked attention call for the batch."""
        length = where.mask.shape[-1]
        keys, values = [], []
        for block, first, slots in where.gathered:
            rows = slice(first, first + slots.shape[0])
            at = (slots[:, None], slice(None), where.positions[rows])  # -> [n, T, kv_heads, head_dim]
            block.k[self.layer][at] = k[rows].transpose(1, 2)
            block.v[self.layer][at] = v[rows].transpose(1, 2)
            keys.append(block.k[self.layer][:, :, :length].index_select(0, slots))
            values.append(block.v[self.layer][:, :, :length].index_select(0, slots))
        keys, values = (torch.cat(x) if len(x) > 1 else x[0] for x in (keys, values))
        return masked_attention(q, keys, values, where.mask)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, where: Span
    ) -> torch.Tensor:
        """Writes the span's keys and values into the cache and attends: q [b, heads, T, head_dim] ->
        [b, heads, T, head_dim]."""
        b, _, t, _ = q.shape
        gqa = self.n_kv != self.n_heads
        start, rows = where.start, where.rows
        end = start + rows
        keys[:, :, start:end] = k[:, :, :rows]
        values[:, :, start:end] = v[:, :, :rows]
        if where.exact:
            # One query row at a time over exactly its own keys: the row's result is then the same whichever
            # pass computes it (one-token decode or a K+1-token verification), which keeps greedy
            # speculative output equal to autoregressive output in bfloat16 (docs/engine.md).
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, i : i + 1], keys[:, :, : start + i + 1], values[:, :, : start + i + 1], enable_gqa=gqa
                    )
                    for i in range(rows)
                ],
                dim=2,
            )
            if t > rows:
                out = torch.cat((out, out[:, :, -1:].expand(b, self.n_heads, t - rows, self.head_dim)), dim=2)
        else:  # query i sits at position start + min(i, rows - 1) and sees the keys up to it
            q_pos = (start + torch.arange(t, device=q.device)).clamp_max(end - 1)
            mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]
            out = masked_attention(q, keys[:, :, :end], values[:, :, :end], mask)
        return out


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up stacked (stack)

    def stack(self) -> None:
        self.gate_up_proj = stack_outputs(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def stack_outputs(*parts: nn.Module) -> nn.Module:
    """One linear layer whose output is the parts' outputs side by side (they read the same input): their
    weights (and biases) stacked along the output features. An int8 layer (engine.quant.Int8Linear) stacks
    its own way (its `stacked`); its per-output scales make that exact, as it is for a plain one."""
    if not all(type(p) is nn.Linear for p in parts):
        return type(parts[0]).stacked(parts)
    weight = torch.cat([p.weight.detach() for p in parts])
    with torch.device("meta"):
        stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None)
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if stacked.bias is not None:
        stacked.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return stacked


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, where: Span | Slots | Rows):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, where)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """The decoder. `forward` returns the logits and the last-layer hidden states (after the final norm:
    what the LM head reads, and what the judge reads) of the positions asked for."""

    # Batch invariance on the CPU (docs/engine.md): bfloat16 matrix products give a row the same bits for
    # every M >= 3, but M = 1 and M = 2 can take other kernels, so passes of fewer than 3 rows in all
    # (batch x tokens) are padded to 3 tokens; a batch of 3 or more one-token rows needs no padding.
    MIN_ROWS = 3
    # Passes after the prefill of up to this many tokens (decodes and verifications; K <= 128) compute
    # attention row by row; prefills and longer passes use one masked call. Set `exact_rows` False where rows
    # need not match across passes (the GPU fast path makes its own guarantees).
    EXACT_MAX_ROWS = 129

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.exact_rows = True
        # engine.cuda_graphs.CudaGraphs when the passes replay captured CUDA graphs (set by the loader on a
        # GPU; prompts longer than its max_rows prefill eagerly); None: every pass runs eagerly
        self.graphs: Any = None
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.args, max_len, batch=batch, dtype=w.dtype, device=w.device)

    def new_block(self, max_len: int, slots: int) -> CacheBlock:
        w = self.model.embed_tokens.weight
        return CacheBlock(self.args, max_len, slots, dtype=w.dtype, device=w.device)

    def stack_projections(self) -> None:
        """Stacks each layer's q, k and v weights into one matrix and gate and up into another, in place,
        a layer at a time (the peak is the model plus one layer's stacked copy). Same products, fewer and
        larger ones: a GPU pass launches 3 fewer per layer. That pays for passes of several rows and not for
        one-row passes (measured on H200s, docs/performance.md), so the loader does it only when
        runtime.stack_projections asks. Run it on the finished
        model: after tensor-parallel sharding (engine.tp stacks nothing; a rank stacks its own slices) and
        after int8 quantization, or before it (per-output scales: either order gives the same weights).
        Parameter names change (`qkv_proj`, `gate_up_proj`), so load checkpoints before, not after."""
        for layer in self.model.layers:
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.stack()
                layer.mlp.stack()

    @property
    def stacked(self) -> bool:
        return any(layer.self_attn.qkv_proj is not None for layer in self.model.layers)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache, *, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [batch, T] written at positions cache.length .. cache.length + T - 1.

        Returns logits [batch, T or 1, vocab] in float32 and hidden [batch, T or 1, hidden]; with
        `last_only`, only the last position's (a prefill needs nothing else, and the LM head over a long
        prompt would cost more than the prompt's layers on a large vocabulary).
        """
        start, rows = cache.length, tokens.shape[1]
        if start + rows > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {rows} tokens > max_seq_len {cache.max_len}")
        if self.graphs is not None:
            replayed = self.graphs.run(self, tokens, cache, last_only)
            if replayed is not None:
                return replayed
        if tokens.shape[0] * rows < self.MIN_ROWS:  # pad with copies of the last token at the last position
            tokens = torch.cat((tokens, tokens[:, -1:].expand(-1, self.MIN_ROWS - rows)), dim=1)
        positions = (start + torch.arange(tokens.shape[1], device=tokens.device)).clamp_max(start + rows - 1)
        x, cos, sin = self._embed(tokens, positions)
        # A prefill (start 0) is the same call in every mode, so only later passes need the row-exact path.
        where = Span(start, rows, self.exact_rows and start > 0 and rows <= self.EXACT_MAX_ROWS)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, where)
        cache.length = start + rows
        if last_only:  # the LM head too sees MIN_ROWS rows, the real last one first
            x = x[:, rows - 1 :] if x.shape[1] - rows + 1 >= self.MIN_ROWS else x[:, -self.MIN_ROWS :].flip(1)
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden).float()
        keep = 1 if last_only else rows
        return logits[:, :keep], hidden[:, :keep]

    def forward_batch(
        self, feeds: list[torch.Tensor], caches: list[KVCache], *, last_only: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One pass for several requests at once: feeds[b] (1-D token ids on the device, any length >= 1) is
        written into caches[b] at its own length, as `forward` would; the matrix products run over the whole
        batch. Returns per request (logits [T_b or 1, vocab] float32, hidden [T_b or 1, hidden]).

        A single request takes `forward` itself (and its CUDA graphs). Otherwise rows are padded to the
        longest feed with copies of their last token at their last position (idempotent writes), and each
        row's attention is `forward`'s over its own cache, so a request's results are bitwise those of a
        pass of its own wherever `forward`'s batch invariance holds (docs/engine.md).
        """
        if len(feeds) != len(caches):
            raise ValueError(f"{len(feeds)} feeds for {len(caches)} caches")
        if len(feeds) == 1:
            logits, hidden = self.forward(feeds[0][None], caches[0], last_only=last_only)
            return [(logits[0], hidden[0])]
        lengths = [int(f.shape[0]) for f in feeds]
        for cache, n in zip(caches, lengths):
            if n < 1 or cache.length + n > cache.max_len:
                raise ValueError(f"KV cache overflow or empty feed: {cache.length} + {n} tokens, max_seq_len {cache.max_len}")
        b = len(feeds)
        spans = tuple(
            Span(c.length, n, self.exact_rows and c.length > 0 and n <= self.EXACT_MAX_ROWS) for c, n in zip(caches, lengths)
        )
        gather = all(c.block is not None for c in caches) and not any(s.exact for s in spans)
        if gather and self.graphs is not None:  # one CacheBlock, no prefill: a captured pass may serve
            replayed = self.graphs.run_rows(self, feeds, caches, lengths)
            if replayed is not None:
                return [(logits[-1:], hidden[-1:]) if last_only else (logits, hidden) for logits, hidden in replayed]
        # rows of one CacheBlock next to each other (the gathered path reads each block once); undone below
        order = sorted(range(b), key=lambda i: id(caches[i].block)) if gather else list(range(b))
        feeds, caches, lengths, spans = ([xs[i] for i in order] for xs in (feeds, caches, lengths, spans))
        t = max(max(lengths), -(-self.MIN_ROWS // b))
        device = feeds[0].device
        tokens = torch.stack([torch.cat((f, f[-1:].expand(t - n))) for f, n in zip(feeds, lengths)])  # [B, T]
        starts = torch.tensor([c.length for c in caches], device=device)
        ends = starts + torch.tensor(lengths, device=device)
        longest = max(s.start + s.rows for s in spans)
        positions, mask = row_positions(starts, ends, t, longest)
        x, cos, sin = self._embed(tokens, positions)
        where = Rows(tuple(caches), tuple(spans))
        if gather:
            runs, first = [], 0
            for i in range(1, b + 1):
                if i == b or caches[i].block is not caches[first].block:
                    slots = torch.tensor([c.slot for c in caches[first:i]], device=device)
                    runs.append((caches[first].block, first, slots))
                    first = i
            where = Rows(tuple(caches), tuple(spans), tuple(runs), positions, mask)
        for layer in self.model.layers:
            x = layer(x, cos, sin, None, where)
        for cache, n in zip(caches, lengths):
            cache.length += n
        back = sorted(range(b), key=order.__getitem__)  # result i is request order[i]'s
        if last_only:  # the real last row of each request; the LM head sees at least MIN_ROWS rows
            x = x[torch.arange(b, device=device), torch.tensor(lengths, device=device) - 1]  # [B, hidden]
            if b < self.MIN_ROWS:
                x = torch.cat((x, x[-1:].expand(self.MIN_ROWS - b, -1)))
            hidden = self.model.norm(x)
            logits = self.lm_head(hidden).float()
            return [(logits[i : i + 1], hidden[i : i + 1]) for i in back]
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden).float()
        return [(logits[i, : lengths[i]], hidden[i, : lengths[i]]) for i in back]

    def forward_gathered(
        self, tokens: torch.Tensor, block: CacheBlock, slots: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph-safe batched pass over one CacheBlock: row b's tokens [T] go to slot slots[b] at
        positions starts[b] .. (a row shorter than T repeats its last token at ends[b] - 1), attending over
        the block's first `length` positions; every position-dependent number is a tensor on the device.
        Returns logits [B, T, vocab] float32 and hidden [B, T, hidden]; leaves cache lengths to the caller."""
        positions, mask = row_positions(starts, ends, tokens.shape[1], length)
        x, cos, sin = self._embed(tokens, positions)
        where = Rows((), (), ((block, 0, slots),), positions, mask)
        for layer in self.model.layers:
            x = layer(x, cos, sin, None, where)
        hidden = self.model.norm(x)
        return self.lm_head(hidden).float(), hidden

    def forward_slots(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        start: torch.Tensor,
        steps: SlotSteps | None = None,
        length: int | None = None,
        kernel: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph-safe pass: tokens [batch, T] at positions start .. start + T - 1, `start` a 0-d tensor on
        the device, all below `length` (default: the cache's max_len); attends over the cache's first `length`
        positions through a mask and leaves cache.length to the caller.
        Returns logits [batch, T, vocab] in float32 and hidden [batch, T, hidden], every row. `steps`: the
        pass's three pieces (engine.cuda_graphs passes compiled ones); by default SLOT_STEPS, run eagerly.
        `kernel`: a pass of one token attends through decode_attention (Triton) instead of SDPA."""
        embed, layer_step, head = steps or SLOT_STEPS
        kernel = kernel and tokens.numel() == 1
        x, cos, sin, positions = embed(self, tokens, start)
        mask = torch.arange(length or cache.max_len, device=tokens.device)[None, :] <= positions[:, None]
        # The key length is a symbolic size to torch.compile: one compiled layer step serves every bucket
        # (the whole cache's length, where the slice is the tensor itself, compiles apart).
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        for i, layer in enumerate(self.model.layers):
            x = layer_step(layer, x, cos, sin, Slots(cache.k[i], cache.v[i], positions, mask, kernel))
        return head(self, x)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Token embeddings and the rotary cos, sin of `positions`: [T, head_dim] for positions [T] (shared by
        the batch), [B, 1, T, head_dim] for positions [B, T] (a position per row; 1 broadcasts over heads)."""
        freqs = positions.float()[..., None] * self.inv_freq  # [..., T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        if positions.dim() == 2:
            emb = emb[:, None]
        x = self.model.embed_tokens(tokens)
        return x, emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _slots_embed(model: Transformer, tokens: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The graph-safe pass's first piece: embeddings, rotary cos and sin, and the positions [T]."""
    positions = start + torch.arange(tokens.shape[1], device=tokens.device)
    return (*model._embed(tokens, positions), positions)


def _slots_layer(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, where: Slots) -> torch.Tensor:
    """One decoder layer of the graph-safe pass. It reads no Python number that differs between layers, so
    torch.compile of this function compiles once per pass shape and serves every layer (the layer's
    parameters are inputs), instead of tracing the whole depth: an 80-layer model compiles like one layer."""
    return layer(x, cos, sin, None, where)


def _slots_head(model: Transformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last piece: the final norm and the LM head -> (logits float32, hidden)."""
    hidden = model.model.norm(x)
    return model.lm_head(hidden).float(), hidden


SlotSteps = tuple[Callable, Callable, Callable]
SLOT_STEPS: SlotSteps = (_slots_embed, _slots_layer, _slots_head)
