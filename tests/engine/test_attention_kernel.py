"""engine.attention_kernel in Triton's interpreter (tests/conftest.py sets it up on a CPU; tests/gpu runs it
compiled): one token's rotary, cache write and attention against what it replaces (apply_rope, write_kv
and SDPA over the key bucket through a mask), and the graph-safe pass with it against the pass without."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from engine.config import Mode, load_config
from engine.cuda_graphs import CudaGraphs
from engine.model import apply_rope, decode_attention, write_kv
from engine.weights import dummy_model
from tests.conftest import TINY_YAML
from tests.engine.test_cuda_graphs import plain_and_graphed


def inputs(dim: int, heads: int, kv_heads: int, max_len: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A token's q [heads, dim], k, v [kv_heads, dim] before the rotary, cos, sin [dim] of an arbitrary angle,
    and a layer's cache [1, kv_heads, max_len, dim] of random keys and values."""
    gen = torch.Generator(device).manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    angle = torch.rand(dim // 2, generator=gen, device=device) * 6.28
    angle = torch.cat((angle, angle))
    return (
        draw(heads, dim), draw(kv_heads, dim), draw(kv_heads, dim), angle.cos().to(dtype), angle.sin().to(dtype),
        draw(1, kv_heads, max_len, dim), draw(1, kv_heads, max_len, dim),
    )


def reference(q, k, v, cos, sin, keys, values, positions, length):
    """The ops decode_attention replaces, as Attention runs them for a one-row Slots pass, in float32."""
    f32 = [x.float() for x in (q, k, v, cos, sin)]
    q, k, v, cos, sin = f32
    keys, values = keys.float().clone(), values.float().clone()
    rotated_q = apply_rope(q[None, :, None], cos[None], sin[None])
    rotated_k = apply_rope(k[None, :, None], cos[None], sin[None])
    write_kv(keys, values, positions, rotated_k, v[None, :, None])
    mask = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(
        rotated_q, keys[:, :, :length], values[:, :, :length], attn_mask=mask, enable_gqa=q.shape[0] != k.shape[0]
    )
    return out[0, :, 0], keys, values


SHAPES = [(16, 4, 2), (64, 14, 2)]  # (head_dim, heads, kv_heads): the tiny pair's; Qwen2.5-0.5B's
# (position, key bucket) about BLOCK = 32; a bucket may be the whole cache, of any length (80: then the
# position is below it, as the cache's last one is)
POSITIONS = [(0, 64), (31, 64), (32, 64), (63, 64), (70, 128), (79, 80), (127, 128)]


@pytest.mark.parametrize("dim,heads,kv_heads", SHAPES)
def test_decode_attention_equals_the_rotary_write_and_masked_sdpa(dim, heads, kv_heads):
    """float32: the same output and the same cache, at block edges and in later buckets; every cache entry
    but the new position's is left as it was, bit for bit."""
    from engine.attention_kernel import BLOCK

    assert BLOCK == 32  # POSITIONS sit on its edges
    for pos, length in POSITIONS:
        q, k, v, cos, sin, keys, values = inputs(dim, heads, kv_heads, 160, torch.float32, seed=pos)
        positions = torch.tensor([pos])
        want, want_keys, want_values = reference(q, k, v, cos, sin, keys, values, positions, length)
        before_keys, before_values = keys.clone(), values.clone()
        got = decode_attention(q, k, v, cos, sin, keys, values, positions, length)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keys, want_keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values, want_values, rtol=0, atol=0)
        others = torch.arange(160) != pos
        assert torch.equal(keys[:, :, others], before_keys[:, :, others]), pos
        assert torch.equal(values[:, :, others], before_values[:, :, others]), pos


def test_decode_attention_in_bfloat16_rounds_like_the_cache():
    """bfloat16 in and out: the output within bfloat16's rounding of the float32 reference on the same
    inputs; the key written is the float32 rotary rounded to bfloat16 (the interpreter's rounding may differ
    from the GPU's in the last bit), the value as given."""
    q, k, v, cos, sin, keys, values = inputs(64, 14, 2, 96, torch.bfloat16, seed=5)
    positions = torch.tensor([40])
    want, want_keys, _ = reference(q, k, v, cos, sin, keys, values, positions, 64)
    got = decode_attention(q, k, v, cos, sin, keys, values, positions, 64)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(keys[:, :, 40], want_keys[:, :, 40].to(torch.bfloat16))
    assert torch.equal(values[:, :, 40], v[None])


def test_a_position_past_the_key_bucket_writes_nothing_and_attends_over_the_bucket():
    """A graph's warm-up runs at the cache's last position, which may lie past the bucket (a power of two
    of at least 64 keys when it is shorter than the cache: whole blocks): the pass then reads the bucket's
    keys only, as the masked SDPA does (NaN past it would show), and writes no key (none is valid there)."""
    pos, length = 150, 64
    q, k, v, cos, sin, keys, values = inputs(16, 4, 2, 160, torch.float32, seed=9)
    keys[:, :, length:], values[:, :, length:] = float("nan"), float("nan")
    positions = torch.tensor([pos])
    want, _, _ = reference(q, k, v, cos, sin, keys, values, positions, length)
    before = keys.clone(), values.clone()
    got = decode_attention(q, k, v, cos, sin, keys, values, positions, length)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(keys.nan_to_num(), before[0].nan_to_num())  # a write would put a number for a NaN
    assert torch.equal(values.nan_to_num(), before[1].nan_to_num())


@torch.inference_mode()
def test_the_graph_safe_pass_through_the_kernel_equals_the_pass_through_sdpa(tiny_args):
    """The tiny model's one-token graph-safe passes across a block edge (positions 29..34), with the kernel
    and without: the same logits and caches; a pass of 3 tokens takes SDPA either way (the same bits)."""
    model = dummy_model(tiny_args, 0, 0.0, torch.float32, torch.device("cpu")).eval()
    model.exact_rows = False
    prompt = torch.randint(0, tiny_args.vocab_size, (1, 29), generator=torch.Generator().manual_seed(1))
    plain, fused = model.new_cache(96), model.new_cache(96)
    for cache in (plain, fused):
        model(prompt, cache)
    for token in (3, 9, 27, 81, 243, 5):
        want, _ = model.forward_slots(torch.tensor([[token]]), plain, torch.tensor(plain.length), length=64)
        got, _ = model.forward_slots(torch.tensor([[token]]), fused, torch.tensor(fused.length), length=64, kernel=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain.length += 1
        fused.length += 1
    # (a later layer's keys and values differ in float32 rounding, as its input does)
    torch.testing.assert_close(fused.k, plain.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.v, plain.v, rtol=1e-5, atol=1e-6)
    block, start = torch.tensor([[4, 5, 6]]), torch.tensor(plain.length)
    want, _ = model.forward_slots(block, plain, start, length=64)
    got, _ = model.forward_slots(block, plain, start, length=64, kernel=True)  # the same cache, rewritten
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", [Mode.AR, Mode.STANDARD])
def test_greedy_output_through_graphs_with_the_kernel_equals_the_plain_path(mode):
    """The engine with every pass through CudaGraphs (no capture on a CPU) and its one-token passes (the
    target's decodes, the draft's proposals) through the kernel, against the plain engine: the same
    greedy tokens and steps. Short: the interpreter takes about 0.1 s a kernel call."""
    graphs = functools.partial(CudaGraphs, capture=False, attention_kernel=True)
    _, [(plain, fused)] = plain_and_graphed(load_config(TINY_YAML), graphs, ["def f(x):"], mode, 10)
    assert fused.token_ids == plain.token_ids and len(plain.token_ids) == 10
    assert fused.steps == plain.steps


@torch.inference_mode()
def test_buckets_past_the_kernels_bound_attend_through_sdpa(tiny_args, monkeypatch):
    """CudaGraphs takes one-token passes through the kernel for key buckets of up to
    ATTENTION_KERNEL_MAX_KEYS keys, and longer ones through SDPA (the kernel holds a bucket's partial sums
    at once)."""
    import engine.model
    from engine.cuda_graphs import ATTENTION_KERNEL_MAX_KEYS

    calls = []

    def counted(*args):
        calls.append(args[-1])  # the pass's key bucket
        return decode_attention(*args)

    monkeypatch.setattr(engine.model, "decode_attention", counted)
    model = dummy_model(tiny_args, 0, 0.0, torch.float32, torch.device("cpu")).eval()
    model.exact_rows = False
    model.graphs = CudaGraphs(capture=False, attention_kernel=True)
    cache = model.new_cache(ATTENTION_KERNEL_MAX_KEYS + 64)
    model(torch.tensor([[1, 2, 3]]), cache)
    model(torch.tensor([[4]]), cache)
    assert calls and set(calls) == {64}
    calls.clear()
    cache.length = ATTENTION_KERNEL_MAX_KEYS  # the next pass's bucket is the whole cache, past the bound
    model(torch.tensor([[5]]), cache)
    assert calls == [] and cache.length == ATTENTION_KERNEL_MAX_KEYS + 1
