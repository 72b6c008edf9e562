"""engine.model: parity with transformers per family, incremental decode, KV rollback, bf16 batch invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from engine.model import ModelArgs, Transformer, masked_attention, rope_inv_freq
from engine.weights import dummy_model, load_checkpoint

CPU = torch.device("cpu")
VOCAB = 300

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short on purpose: the test prompt runs past it, so the llama3 frequency scaling changes the logits.
    "original_max_position_embeddings": 16,
}


def _hf_config(case: str) -> transformers.PretrainedConfig:
    if case == "qwen2":  # q, k, v biases
        return transformers.Qwen2Config(num_hidden_layers=3, tie_word_embeddings=False, **_COMMON)
    if case == "qwen2-tied":
        return transformers.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, **_COMMON)
    if case == "llama3-rope":
        # transformers 5.x keeps theta and the scaling together in `rope_parameters`.
        return transformers.LlamaConfig(num_hidden_layers=3, rope_parameters=dict(_LLAMA3), **_COMMON)
    if case == "mistral":
        return transformers.MistralConfig(num_hidden_layers=2, sliding_window=None, **_COMMON)
    raise AssertionError(case)


def _hf_model(case: str, folder) -> torch.nn.Module:
    torch.manual_seed(1234)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(case), dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        # The default init leaves biases and norms at 0 / 1; randomise them so the parity covers them.
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "proj.bias")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    hf.save_pretrained(folder)  # safetensors
    assert list(folder.glob("*.safetensors")), "save_pretrained wrote no safetensors"
    return hf


@pytest.mark.parametrize("stacked", [False, True], ids=["as-loaded", "stacked"])
@pytest.mark.parametrize("case", ["qwen2", "qwen2-tied", "llama3-rope", "mistral"])
def test_logits_match_transformers(case, stacked, tmp_path):
    """Also once q/k/v and gate/up are stacked (Transformer.stack_projections, as engine.weights.load_model
    serves them): the same products, biases included (qwen2)."""
    hf = _hf_model(case, tmp_path)
    ours = load_checkpoint(tmp_path, torch.float32, CPU).eval()
    if stacked:
        ours.stack_projections()
        assert ours.stacked and not hasattr(ours.model.layers[0].mlp, "up_proj")
    prompt = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = hf(prompt).logits.float()
        logits, hidden = ours(prompt, ours.new_cache(64))
    assert logits.shape == (1, 40, VOCAB) and hidden.shape == (1, 40, 64)
    diff = (logits - expected).abs().max().item()
    assert diff < 1e-4, f"{case}: max abs logit difference {diff}"


def test_tied_checkpoint_shares_embedding_and_lm_head(tmp_path):
    hf = _hf_model("qwen2-tied", tmp_path)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ours = load_checkpoint(tmp_path, torch.float32, CPU)
    assert torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)


def test_tied_dummy_model_shares_embedding_and_lm_head():
    """Tied shapes (llama-3.2-1b, qwen2.5-coder-0.5b) must hold one matrix, not two, at benchmark scale too."""
    from engine.shapes import SHAPES

    args = ModelArgs.from_hf({**SHAPES["tiny"], "tie_word_embeddings": True})
    model = dummy_model(args, seed=0, noise=0.0, dtype=torch.float32, device=CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_llama3_rope_frequencies_match_transformers_and_are_scaled():
    """The llama3 parity case only covers the scaling if scaling moves the frequencies it uses."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _hf_config("llama3-rope")
    args = ModelArgs.from_hf(config.to_dict())
    plain = ModelArgs.from_hf({**config.to_dict(), "rope_parameters": {"rope_theta": 10000.0}})
    assert args.rope_scaling is not None and plain.rope_scaling is None
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, CPU)
    torch.testing.assert_close(rope_inv_freq(args), expected.float(), atol=1e-7, rtol=1e-6)
    assert not torch.allclose(rope_inv_freq(args), rope_inv_freq(plain))


def test_from_hf_accepts_both_rope_layouts():
    v4 = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "rope_scaling": {k: v for k, v in _LLAMA3.items() if k != "rope_theta"},
    }
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(_LLAMA3)
    assert ModelArgs.from_hf(v4) == ModelArgs.from_hf(v5)
    legacy = {**v4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert dict(ModelArgs.from_hf(legacy).rope_scaling)["rope_type"] == "linear"


def test_from_hf_refuses_unsupported_model_type():
    cfg = {**_hf_config("qwen2").to_dict(), "model_type": "gpt2"}
    with pytest.raises(ValueError, match="gpt2"):
        ModelArgs.from_hf(cfg)


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_from_hf_refuses_unsupported_rope_type(layout):
    cfg = _hf_config("llama3-rope").to_dict()
    cfg.pop("rope_parameters", None)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    cfg[layout] = {**yarn, "rope_theta": 10000.0} if layout == "rope_parameters" else yarn
    with pytest.raises(ValueError, match="yarn"):
        ModelArgs.from_hf(cfg)


# ---- the KV cache ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_f32(tiny_args) -> Transformer:
    return dummy_model(tiny_args, seed=3, noise=0.0, dtype=torch.float32, device=CPU).eval()


def _tokens(n: int, seed: int, vocab: int = 272) -> torch.Tensor:  # [1, n]
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("exact_rows", [True, False])
@pytest.mark.parametrize("chunk", [1, 5])
@torch.no_grad()
def test_incremental_decode_equals_prefill(tiny_f32, exact_rows, chunk):
    # 140 tokens: longer than EXACT_MAX_ROWS, so the prefill takes the masked path and the chunks the
    # row-by-row one (with exact_rows on).
    model = tiny_f32
    tokens = _tokens(140, seed=11)
    model.exact_rows = exact_rows
    try:
        full, full_hidden = model(tokens, model.new_cache(160))
        cache = model.new_cache(160)
        parts = [model(tokens[:, i : i + chunk], cache) for i in range(0, 140, chunk)]
    finally:
        model.exact_rows = True
    logits = torch.cat([p[0] for p in parts], dim=1)
    hidden = torch.cat([p[1] for p in parts], dim=1)
    assert cache.length == 140
    assert logits.shape == full.shape
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden, full_hidden, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kept", [0, 2])
@torch.no_grad()
def test_kv_rollback_equals_fresh_cache(tiny_f32, kept):
    """Prefix, then 6 draft tokens of which `kept` survive, roll back, then other tokens: the cache and the
    next logits are those of a cache that only ever saw the surviving tokens."""
    model = tiny_f32
    prefix, drafted, other = _tokens(20, 1), _tokens(6, 2), _tokens(7, 3)
    cache = model.new_cache(64)
    model(prefix, cache)
    model(drafted, cache)
    assert cache.length == 26
    cache.truncate(20 + kept)
    logits, _ = model(other, cache)

    accepted = torch.cat([prefix, drafted[:, :kept], other], dim=1)
    fresh = model.new_cache(64)
    fresh_logits, _ = model(accepted, fresh)
    length = accepted.shape[1]
    assert cache.length == fresh.length == length
    torch.testing.assert_close(cache.k[:, :, :, :length], fresh.k[:, :, :, :length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :, :length], fresh.v[:, :, :, :length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, -1], fresh_logits[:, -1], atol=1e-5, rtol=1e-5)


def test_truncate_refuses_to_grow(tiny_f32):
    cache = tiny_f32.new_cache(16)
    with torch.no_grad():
        tiny_f32(_tokens(4, 5), cache)
    with pytest.raises(ValueError):
        cache.truncate(5)
    with pytest.raises(ValueError):
        cache.truncate(-1)


@torch.no_grad()
def test_kv_cache_overflow_raises(tiny_f32):
    cache = tiny_f32.new_cache(32)
    with pytest.raises(ValueError, match="overflow"):
        tiny_f32(_tokens(33, 6), cache)
    tiny_f32(_tokens(30, 6), cache)
    with pytest.raises(ValueError, match="overflow"):
        tiny_f32(_tokens(3, 7), cache)


# ---- bfloat16 batch invariance ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_len", [2, 9])  # K = 1 and K = 8 verification passes
@pytest.mark.parametrize("seed", [8, 21])
@pytest.mark.parametrize("stacked", [False, True], ids=["as-loaded", "stacked"])
@torch.no_grad()
def test_bf16_decode_bitwise_equals_verification_pass(tiny_args, block_len, seed, stacked):
    """exact_rows: a token's logits, hidden state and KV entries do not depend on how many tokens share its
    pass, so greedy speculative decoding equals autoregressive decoding in bfloat16 too (docs/engine.md).
    The KV entries matter as much as the logits: a differing value changes every later token's logits."""
    model = dummy_model(tiny_args, seed=0, noise=0.0, dtype=torch.bfloat16, device=CPU).eval()
    if stacked:
        model.stack_projections()
    prefix, block = _tokens(23, seed), _tokens(block_len, seed + 1)
    end = 23 + block_len

    one = model.new_cache(64)
    model(prefix, one)
    singles = [model(block[:, i : i + 1], one) for i in range(block_len)]
    logits_one = torch.cat([s[0] for s in singles], dim=1)
    hidden_one = torch.cat([s[1] for s in singles], dim=1)

    verify = model.new_cache(64)
    model(prefix, verify)
    logits_verify, hidden_verify = model(block, verify)

    assert logits_one.dtype == torch.float32 and hidden_one.dtype == torch.bfloat16
    for i in range(block_len):
        assert torch.equal(logits_one[:, i], logits_verify[:, i]), f"logits of block token {i} differ"
        assert torch.equal(hidden_one[:, i], hidden_verify[:, i]), f"hidden of block token {i} differs"
    for name, a, b in (("keys", one.k, verify.k), ("values", one.v, verify.v)):
        differ = (a[:, :, :, :end] != b[:, :, :, :end]).nonzero()
        where = sorted({(int(d[0]), int(d[3])) for d in differ})
        assert not where, f"cached {name} differ at (layer, position) {where}"


# ---- batched passes over several requests' caches ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("feeds", [(1, 1), (1, 9, 3), (2, 1, 1, 5), (1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("last_only", [False, True])
@torch.no_grad()
def test_batched_pass_equals_each_request_alone(tiny_args, dtype, feeds, last_only):
    """Requests at different positions feeding different numbers of tokens in one forward_batch: each one's
    logits, hidden states and cache entries are those of its own pass, and no request's cache sees
    another's. In bfloat16 bitwise (what keeps a batched request's greedy output equal to the same request
    run alone); float32 matrix products on the CPU take other kernels for other row counts (last bits)."""
    same = torch.equal if dtype is torch.bfloat16 else lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=0)
    model = dummy_model(tiny_args, seed=0, noise=0.0, dtype=dtype, device=CPU).eval()
    prefixes = [_tokens(7 + 5 * i, seed=30 + i)[0] for i in range(len(feeds))]
    news = [_tokens(n, seed=50 + i)[0] for i, n in enumerate(feeds)]

    alone, batched = [], []
    for prefix in prefixes:
        for caches in (alone, batched):
            caches.append(model.new_cache(64))
            model(prefix[None], caches[-1])
    expected = [model(new[None], cache, last_only=last_only) for new, cache in zip(news, alone)]
    got = model.forward_batch(news, batched, last_only=last_only)

    for i, ((logits, hidden), (want_logits, want_hidden)) in enumerate(zip(got, expected)):
        assert same(logits, want_logits[0]), f"logits of request {i} differ"
        assert same(hidden, want_hidden[0]), f"hidden states of request {i} differ"
        a, b = batched[i], alone[i]
        assert a.length == b.length == prefixes[i].numel() + feeds[i]
        assert same(a.k[:, :, :, : a.length], b.k[:, :, :, : b.length]), f"cached keys of request {i} differ"
        assert same(a.v[:, :, :, : a.length], b.v[:, :, :, : b.length]), f"cached values of request {i} differ"


@torch.no_grad()
def test_batched_pass_refuses_an_overflow_before_writing(tiny_f32):
    small, roomy = tiny_f32.new_cache(8), tiny_f32.new_cache(64)
    with pytest.raises(ValueError, match="overflow"):
        tiny_f32.forward_batch([_tokens(4, 1)[0], _tokens(9, 2)[0]], [roomy, small])
    assert roomy.length == small.length == 0


@pytest.mark.parametrize("layout", ["one block", "two blocks, interleaved"])
@torch.no_grad()
def test_batched_pass_over_cache_blocks_equals_each_request_alone(tiny_f32, layout):
    """The gathered path (caches that are slots of CacheBlocks, rows not exact: how a GPU runs a batch, one
    indexed write, one gather and one attention call per layer) gives each request its own pass's results,
    whatever order its rows and blocks come in; the block's other slots are untouched."""
    model = tiny_f32
    feeds = (1, 9, 3, 5, 1)
    blocks = [model.new_block(64, 4), model.new_block(64, 4)]
    if layout == "one block":
        slots = [blocks[0].caches[s] for s in (2, 0, 3, 1)] + [blocks[1].caches[0]]
    else:
        slots = [blocks[1].caches[1], blocks[0].caches[3], blocks[1].caches[0], blocks[0].caches[0], blocks[1].caches[3]]
    prefixes = [_tokens(7 + 5 * i, seed=60 + i)[0] for i in range(len(feeds))]
    news = [_tokens(n, seed=80 + i)[0] for i, n in enumerate(feeds)]
    model.exact_rows = False
    try:
        alone = []
        for prefix, cache in zip(prefixes, slots):
            alone.append(model.new_cache(64))
            model(prefix[None], alone[-1])
            model(prefix[None], cache)
        expected = [model(new[None], cache) for new, cache in zip(news, alone)]
        untouched = [c.k.clone() for b in blocks for c in b.caches if c not in slots]
        got = model.forward_batch(news, slots)
    finally:
        model.exact_rows = True
    for i, ((logits, hidden), (want_logits, want_hidden)) in enumerate(zip(got, expected)):
        torch.testing.assert_close(logits, want_logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden, want_hidden[0], atol=1e-5, rtol=0)
        n = alone[i].length
        assert slots[i].length == n
        torch.testing.assert_close(slots[i].k[:, :, :, :n], alone[i].k[:, :, :, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(slots[i].v[:, :, :, :n], alone[i].v[:, :, :, :n], atol=1e-5, rtol=0)
    others = [c.k for b in blocks for c in b.caches if c not in slots]
    assert all(torch.equal(a, b) for a, b in zip(others, untouched))


@pytest.mark.parametrize("name, billions", [
    ("llama-3.2-1b", 1.24), ("llama-3.2-3b", 3.21), ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55),
    ("llama-3.1-405b", 405.85), ("qwen2.5-coder-0.5b", 0.49),
    ("qwen2.5-coder-1.5b", 1.78),  # its card's 1.54B ties the head; the GGUF the engine runs holds its own
])
def test_named_shapes_have_their_models_published_sizes(name, billions):
    """Benchmarks on dummy weights stand for the real models only if the shapes are theirs (model cards'
    parameter counts, to 10 million)."""
    from engine.shapes import SHAPES

    assert round(ModelArgs.from_hf(SHAPES[name]).num_parameters / 1e9, 2) == billions


@pytest.mark.parametrize("heads, kv_heads, batch_mask", [(8, 2, False), (8, 2, True), (4, 4, False), (6, 1, True)])
def test_masked_attention_folds_query_groups_as_sdpa_gqa_attends(heads, kv_heads, batch_mask):
    """The query heads of a key head folded into its rows attend as SDPA's enable_gqa does, for a mask per
    pass [T, L] or per batch row [B, 1, T, L] (the graph-safe and batched passes' shapes)."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, t, n, d = 2, 5, 16, 8
    q = torch.randn(b, heads, t, d, generator=g)
    keys, values = torch.randn(b, kv_heads, n, d, generator=g), torch.randn(b, kv_heads, n, d, generator=g)
    ends = torch.tensor([[9, 16], [11, 13]]) if batch_mask else torch.tensor([[12]])
    rows = torch.arange(t)
    mask = torch.arange(n)[None, None, None, :] <= (ends[:, :1, None, None] - t + rows[:, None])
    mask = mask if batch_mask else mask[0, 0]  # [B, 1, T, L] or [T, L]
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(masked_attention(q, keys, values, mask), want, rtol=1e-5, atol=1e-5)
