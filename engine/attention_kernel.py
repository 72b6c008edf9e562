"""One-row attention for the graph-safe pass on a GPU: the new token's rotary, its cache write and its
attention in two Triton kernels.

A one-token pass (a decode, each draft token) spent about 15 us a layer in eight small kernels between
its products (an 8B on an H200, bench/results/tp_passes_8b_bf16_profile_h200.json): two for the rotary,
two cache writes (index_copy_), four for the masked softmax over the whole key bucket. Here, split-softmax
attention (flash-decoding) over the keys below the position only:
- `_partials`, one program per (query head, block of BLOCK keys): rotates its query and the new key,
  scores its block of cached keys and the new key, and keeps the block's maximum, sum of exponentials and
  exponential-weighted values. The new key and value come from registers, not the cache, and the one
  program per kv head whose block holds the position writes them there: no program reads what another
  writes. Blocks at or past the position read nothing.
- `_combine`, one program per query head: rescales the blocks' partial sums to a common maximum and adds
  them.
Sums run in float32 in a fixed order, so a pass is repeatable bit for bit; the rotated query and key are
rounded to the model's dtype first, as the cache holds them.

Called through the op `judgeserve::decode_attention` (engine.model, one-row Slots passes with
runtime.attention_kernel), which torch.compile and CUDA graphs take whole. The CPU tests run these kernels
in Triton's interpreter (TRITON_INTERPRET=1) against the rotary, write and SDPA they replace.

Not for: passes of more than one row (verifications and prefills keep SDPA), batches, key buckets of more
than engine.cuda_graphs.ATTENTION_KERNEL_MAX_KEYS (a program per block and one combining program per head
holding every block's partial sums: fine at 64 blocks, not at thousands), CPUs outside tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 32  # keys per program of _partials


@triton.jit
def _rotated(x_ptr, cos_ptr, sin_ptr, d, HALF: tl.constexpr, live):
    """A head vector's two halves after the half-rotation rotary (x cos + rotate_half(x) sin), in float32
    math, rounded to x's dtype."""
    x1 = tl.load(x_ptr + d, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + d, mask=live, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + d, mask=live, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + d, mask=live, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + d, mask=live, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + d, mask=live, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    return (x1 * c1 - x2 * s1).to(dtype), (x2 * c2 + x1 * s2).to(dtype)


@triton.jit
def _partials(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, pos_ptr, part_ptr,
    keys_head, keys_pos, values_head, values_pos, blocks, scale,
    GROUP: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    head, block = tl.program_id(0), tl.program_id(1)
    kv = head // GROUP
    pos = tl.load(pos_ptr)
    d = tl.arange(0, HALF_BLOCK)
    live = d < HALF
    q1, q2 = _rotated(q_ptr + head * 2 * HALF, cos_ptr, sin_ptr, d, HALF, live)
    k1, k2 = _rotated(k_ptr + kv * 2 * HALF, cos_ptr, sin_ptr, d, HALF, live)
    v1 = tl.load(v_ptr + kv * 2 * HALF + d, mask=live, other=0.0)
    v2 = tl.load(v_ptr + kv * 2 * HALF + HALF + d, mask=live, other=0.0)

    j = block * BLOCK + tl.arange(0, BLOCK)
    cached = (j < pos)[:, None] & live[None, :]
    new = (j == pos)[:, None]
    at_k = keys_ptr + kv * keys_head + j[:, None] * keys_pos + d[None, :]
    at_v = values_ptr + kv * values_head + j[:, None] * values_pos + d[None, :]
    key1 = tl.where(new, k1[None, :], tl.load(at_k, mask=cached, other=0.0)).to(tl.float32)
    key2 = tl.where(new, k2[None, :], tl.load(at_k + HALF, mask=cached, other=0.0)).to(tl.float32)
    val1 = tl.where(new, v1[None, :], tl.load(at_v, mask=cached, other=0.0)).to(tl.float32)
    val2 = tl.where(new, v2[None, :], tl.load(at_v + HALF, mask=cached, other=0.0)).to(tl.float32)

    seen = j <= pos
    scores = tl.sum(key1 * q1.to(tl.float32)[None, :], 1) + tl.sum(key2 * q2.to(tl.float32)[None, :], 1)
    scores = tl.where(seen, scores * scale, float("-inf"))
    top = tl.max(scores, 0)  # -inf for a block past the position, whose weights exp(-inf) are then all 0
    weights = tl.exp(scores - tl.where(top > float("-inf"), top, 0.0))
    out = part_ptr + (head * blocks + block) * (2 * HALF + 2)
    tl.store(out + d, tl.sum(weights[:, None] * val1, 0), mask=live)
    tl.store(out + HALF + d, tl.sum(weights[:, None] * val2, 0), mask=live)
    tl.store(out + 2 * HALF, top)
    tl.store(out + 2 * HALF + 1, tl.sum(weights, 0))

    # the first program of the kv head whose block holds the position; as a bound on d, not `live & writer`
    # (Triton's interpreter makes a bool vector & a bool scalar an int32 mask, which store refuses)
    writer = (block == pos // BLOCK) & (head % GROUP == 0)
    writes = d < tl.where(writer, HALF, 0)
    tl.store(keys_ptr + kv * keys_head + pos * keys_pos + d, k1, mask=writes)
    tl.store(keys_ptr + kv * keys_head + pos * keys_pos + HALF + d, k2, mask=writes)
    tl.store(values_ptr + kv * values_head + pos * values_pos + d, v1, mask=writes)
    tl.store(values_ptr + kv * values_head + pos * values_pos + HALF + d, v2, mask=writes)


@triton.jit
def _combine(
    part_ptr, pos_ptr, out_ptr, blocks,
    DIM: tl.constexpr, DIM_BLOCK: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr,
):
    head = tl.program_id(0)
    pos = tl.load(pos_ptr)
    b = tl.arange(0, BLOCKS)
    used = (b < blocks) & (b <= pos // BLOCK)  # block 0 always: its first key is seen
    row = part_ptr + (head * blocks + b) * (DIM + 2)
    top = tl.load(row + DIM, mask=used, other=float("-inf"))
    total = tl.load(row + DIM + 1, mask=used, other=0.0)
    scale = tl.exp(top - tl.max(top, 0))  # 0 for the blocks not used
    d = tl.arange(0, DIM_BLOCK)
    acc = tl.load(row[:, None] + d[None, :], mask=used[:, None] & (d < DIM)[None, :], other=0.0)
    out = tl.sum(scale[:, None] * acc, 0) / tl.sum(scale * total, 0)
    tl.store(out_ptr + head * DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < DIM)


def decode_attention(q, k, v, cos, sin, keys, values, positions: torch.Tensor, length: int) -> torch.Tensor:
    """One token's attention: q [heads, dim], k, v [kv_heads, dim] before the rotary; cos, sin [dim] of its
    position positions[0] (a tensor on the device); keys, values [1, kv_heads, max_len, dim], the layer's
    cache, which gets the rotated key and the value at that position when it is below `length` (the key
    bucket: the pass reads no key at or past it). Returns the attention of the rotated query over the keys
    up to the position, [heads, dim], in q's dtype (SDPA's default scale, 1/sqrt(dim))."""
    heads, dim = q.shape
    kv_heads = k.shape[0]
    if dim % 2 or heads % kv_heads or keys.shape[0] != 1 or keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError(f"decode_attention: unsupported shapes q {tuple(q.shape)}, k {tuple(k.shape)}, keys {tuple(keys.shape)}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    blocks = triton.cdiv(length, BLOCK)
    half = dim // 2
    part = torch.empty(heads, blocks, dim + 2, dtype=torch.float32, device=q.device)
    _partials[(heads, blocks)](
        q, k, v, cos, sin, keys, values, positions, part,
        keys.stride(1), keys.stride(2), values.stride(1), values.stride(2), blocks, dim**-0.5,
        GROUP=heads // kv_heads, HALF=half, HALF_BLOCK=triton.next_power_of_2(half), BLOCK=BLOCK,
    )
    out = torch.empty_like(q)
    _combine[(heads,)](
        part, positions, out, blocks,
        DIM=dim, DIM_BLOCK=triton.next_power_of_2(dim), BLOCKS=triton.next_power_of_2(blocks), BLOCK=BLOCK,
    )
    return out
