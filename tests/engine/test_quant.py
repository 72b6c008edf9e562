"""engine.quant: weight-only int8. Each weight rounds to within half a step of its row's scale; the quantized
model stays close to the original; every pass kind runs on it (eager, graph-safe, batched); the engine's
exactness guarantees hold relative to the quantized target; the config refuses what it does not know."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError, Mode, load_config
from engine.decode import Engine
from engine.quant import KERNEL_MAX_ROWS, QMAX, Int8Linear, int8_matmul, quantize_int8
from engine.sampling import SamplingParams
from engine.weights import dummy_model
from tests.conftest import TINY_YAML

CPU = torch.device("cpu")


def _model(args, dtype=torch.float32):
    return dummy_model(args, 0, 0.0, dtype, CPU).eval()


def test_int8_linear_rounds_each_weight_to_within_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        linear.weight[3] *= 50  # one row far larger: its own scale, the others keep theirs
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (40,)
    assert int(q.weight.abs().amax(dim=1).min()) == QMAX  # each row uses its full range
    err = (q.dequantized() - linear.weight).abs()
    assert bool((err <= q.scales[:, None] / 2 + 1e-7).all())
    x = torch.randn(5, 96)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantized(), linear.bias), rtol=1e-5, atol=1e-5)
    assert (q(x) - linear(x)).abs().max() < 0.02 * linear(x).abs().max()


def test_quantize_replaces_every_layer_product_and_an_untied_head(tiny_args):
    model = quantize_int8(_model(tiny_args))
    layers = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear | Int8Linear)]
    assert layers and all(isinstance(m, Int8Linear) for m in layers)
    assert len(layers) == 7 * tiny_args.num_layers
    assert isinstance(model.lm_head, Int8Linear)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding stays whole
    tied = quantize_int8(_model(dataclasses.replace(tiny_args, tie_word_embeddings=True)))
    assert isinstance(tied.lm_head, nn.Linear) and tied.lm_head.weight is tied.model.embed_tokens.weight


def test_stacking_int8_layers_equals_quantizing_stacked_layers(tiny_args):
    """Per-output scales: stacking q/k/v and gate/up after quantizing gives the same int8 weights, scales and
    logits as quantizing the stacked layers, so the loader's order (quantize as it loads, stack last) is
    free. A row-parallel layer (summed over ranks) cannot be stacked along its outputs."""
    after = quantize_int8(_model(tiny_args))
    after.stack_projections()
    stacked_first = _model(tiny_args)
    stacked_first.stack_projections()
    before = quantize_int8(stacked_first)
    want, got = before.state_dict(), after.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert isinstance(after.model.layers[0].self_attn.qkv_proj, Int8Linear)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(after(tokens, after.new_cache(32))[0], before(tokens, before.new_cache(32))[0])
    down = after.model.layers[0].mlp.down_proj
    down.row_parallel = True
    with pytest.raises(ValueError, match="row-parallel"):
        Int8Linear.stacked([down, down])


@torch.inference_mode()
def test_quantized_model_stays_close_to_the_original(tiny_args):
    """Teacher-forced over 64 positions: the int8 model's next-token choice is the original's at nearly all,
    and its logits are within a few percent (random weights; the real pair is measured in
    docs/performance.md)."""
    plain, quant = _model(tiny_args), quantize_int8(_model(tiny_args))
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    want, _ = plain(tokens, plain.new_cache(128))
    got, _ = quant(tokens, quant.new_cache(128))
    assert not torch.equal(got, want)  # quantized for real
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.9, f"top-1 agreement {agree:.2f}"
    assert (got - want).norm() / want.norm() < 0.05


@torch.inference_mode()
def test_graph_safe_and_batched_passes_run_on_int8_weights(tiny_args):
    model = quantize_int8(_model(tiny_args))
    model.exact_rows = False
    prompt = torch.randint(0, tiny_args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    block = torch.randint(0, tiny_args.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    eager, slots = model.new_cache(64), model.new_cache(64)
    for cache in (eager, slots):
        model(prompt, cache)
    want, _ = model(block, eager)
    got, _ = model.forward_slots(block, slots, torch.tensor(slots.length))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    other = model.new_cache(64)
    model(prompt[:, :5], other)
    (batched, _), _ = model.forward_batch([block[0], block[0, :2]], [model.new_cache(64), other])
    assert batched.shape == (4, tiny_args.vocab_size)


def test_engine_guarantees_hold_relative_to_the_int8_target():
    """Greedy speculative output equals the int8 target's own autoregressive output (the anchor, for the
    quantized model)."""
    overrides = {"target.quantize": "int8", "draft.quantize": "int8"}
    quant = Engine.from_config(load_config(TINY_YAML, overrides))
    plain = Engine.from_config(load_config(TINY_YAML))
    assert isinstance(quant.target.model.lm_head, Int8Linear) and isinstance(quant.draft.model.lm_head, Int8Linear)
    for prompt in ("The quick", "def f(x):", "1 2 3 4"):
        outs = {}
        for mode in (Mode.AR, Mode.STANDARD):
            req = quant.make_request(prompt=prompt, mode=mode, params=SamplingParams(max_tokens=40))
            outs[mode] = quant.generate(req).token_ids
        assert outs[Mode.STANDARD] == outs[Mode.AR], prompt
    assert quant.target.fingerprint == plain.target.fingerprint  # the same checkpoint, held differently


def test_config_refuses_an_unknown_quantization():
    with pytest.raises(ConfigError, match="quantize"):
        load_config(TINY_YAML, {"target.quantize": "int4"})


def test_quality_comparison_scores_identical_models_as_identical(tiny_args):
    """bench.quant_quality's teacher-forced comparison: a model against itself agrees everywhere with zero
    divergence; against its int8 copy, less than everywhere, with a positive divergence."""
    from bench.quant_quality import compare

    plain, quant = _model(tiny_args), quantize_int8(_model(tiny_args))
    gen = torch.Generator().manual_seed(5)
    sequences = [(torch.randint(0, 256, (6,), generator=gen).tolist(), torch.randint(0, 256, (30,), generator=gen).tolist())
                 for _ in range(3)]
    same = compare(plain, plain, sequences)
    assert same["tokens"] == 90 and same["top1_agreement"] == 1.0 and abs(same["mean_kl_nats"]) < 1e-6
    assert same["perplexity"] == same["perplexity_int8"]
    other = compare(plain, quant, sequences)
    assert other["mean_kl_nats"] > 0 and 0.8 <= other["top1_agreement"] < 1.0


def test_greedy_answer_comparison_counts_identical_and_differing_answers():
    """bench.quant_quality --answers on the tiny pair: both targets answer every question; identical answers
    and first differing positions account for all of them."""
    from bench.quant_quality import greedy_answers
    from training.tasks import Gsm8kTask

    tasks = [Gsm8kTask(f"q{i}", f"What is {i} + {i}?", str(2 * i), program=False) for i in range(3)]
    report = greedy_answers(load_config(TINY_YAML), tasks, max_tokens=24)
    assert report["questions"] == 3 and 0 <= report["accuracy_bf16"] <= 1 and 0 <= report["accuracy_int8"] <= 1
    assert report["identical_answers"] + len(report["first_differing_token"]) == 3
    assert all(0 <= i <= 24 for i in report["first_differing_token"])


@pytest.fixture
def interpreted_kernel():
    """engine.int8_kernel, its Triton kernel run by Triton's interpreter (tests/conftest.py sets it up)."""
    from engine import int8_kernel

    assert int8_kernel.INTERPRETED
    return int8_kernel


@pytest.mark.parametrize("rows", [2, 5, 17, 64, 100, 128])
@pytest.mark.parametrize(("n", "k"), [(200, 512), (64, 1024), (96, 300), (128, 2048)])
def test_int8_kernel_equals_the_product_of_the_dequantized_weight(interpreted_kernel, rows, n, k):
    """Outputs past a tile's edge (n = 200, 96), inputs split over programs (k = 1024, 2048: split-K; 2048
    in whole tiles, without masks) or not a whole number of steps (k = 300), and row counts up to a full
    block (128: the most engine.quant sends it), in bfloat16 as the GPU runs it."""
    gen = torch.Generator().manual_seed(rows * n + k)
    linear = nn.Linear(k, n, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    q = Int8Linear(linear.to(torch.bfloat16))
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    got = int8_matmul(x, q.weight, q.scales)
    want = (x.float() @ q.weight.float().T) * q.scales.float()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    assert torch.equal(got, int8_matmul(x, q.weight, q.scales))  # no atomics: repeatable
    with pytest.raises(ValueError, match="at most 128 rows"):
        interpreted_kernel.partial_products(torch.zeros(129, k, dtype=torch.bfloat16), q.weight)
    assert KERNEL_MAX_ROWS <= interpreted_kernel.MAX_ROWS  # engine.quant never sends it more


def test_int8_kernel_splits_the_inputs_when_the_outputs_are_few(interpreted_kernel):
    """Enough programs to fill the card: a 4096-wide output (32 tiles) splits its inputs, an LM head does
    not; a split always divides the inputs into whole steps."""
    split = interpreted_kernel._splits
    assert split(4096, 4096, 264) == 16 and split(4096, 4096, 64) == 2
    assert split(128256, 4096, 264) == 1
    assert split(4096, 300, 264) == 1  # 300 is not a whole number of 128-wide steps
    for n, k in [(4096, 14336), (8192, 14336), (1024, 8192)]:
        assert k % (split(n, k, 264) * interpreted_kernel.STEP) == 0


def test_int8_kernel_op_compiles_with_its_epilogue(interpreted_kernel):
    """Under torch.compile the kernel is one opaque op whose declared shape (its fake) is the real one, and
    the sum, scale and cast after it compile around it to the eager result."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (128, 2048), dtype=torch.int8, generator=gen)
    s = (torch.rand(128, generator=gen) / 100).to(torch.bfloat16)
    x = torch.randn(17, 2048, generator=gen).to(torch.bfloat16)
    compiled = torch.compile(int8_matmul, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x, w, s), int8_matmul(x, w, s))
