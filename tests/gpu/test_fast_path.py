"""The GPU fast path against the plain path, on a GPU: CUDA-graph replays give the same greedy output as
eager passes, and greedy speculative output through graphs equals autoregressive output (float32 tiny pair,
TF32 off, so the only differences are the order of sums)."""

from __future__ import annotations

import pytest
import torch

from engine.config import Mode, load_config
from engine.decode import Engine
from engine.sampling import SamplingParams
from tests.conftest import TINY_YAML

PROMPTS = ("The quick", "def f(x):", "Once upon a time", "1 2 3 4")


@pytest.fixture(scope="module")
def engines():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    graphed = Engine.from_config(load_config(TINY_YAML, {"runtime.device": "cuda"}))
    eager = Engine.from_config(load_config(TINY_YAML, {"runtime.device": "cuda", "runtime.cuda_graphs": False}))
    compiled = Engine.from_config(load_config(TINY_YAML, {"runtime.device": "cuda", "runtime.compile": True}))
    assert graphed.target.model.graphs is not None and eager.target.model.graphs is None
    assert compiled.target.model.graphs.compile
    return graphed, eager, compiled


def _tokens(engine: Engine, prompt: str, mode: Mode) -> list[int]:
    request = engine.make_request(prompt=prompt, mode=mode, params=SamplingParams(max_tokens=48))
    return engine.generate(request).token_ids


@pytest.mark.parametrize("mode", [Mode.AR, Mode.STANDARD])
def test_graph_replays_give_the_eager_greedy_output(engines, mode):
    graphed, eager, compiled = engines
    for prompt in PROMPTS:
        want = _tokens(eager, prompt, mode)
        assert _tokens(graphed, prompt, mode) == want, prompt
        assert _tokens(compiled, prompt, mode) == want, prompt
    assert len(graphed.target.model.graphs) >= 1 and len(compiled.target.model.graphs) >= 1  # captured for real


def test_greedy_speculative_output_through_graphs_equals_autoregressive(engines):
    graphed = engines[0]
    for prompt in PROMPTS:
        assert _tokens(graphed, prompt, Mode.STANDARD) == _tokens(graphed, prompt, Mode.AR), prompt
    assert len(graphed.draft.model.graphs) >= 1


def test_prefills_of_every_row_bucket_and_past_them_give_the_eager_greedy_output(engines):
    """Prompts of 10 to 200 tokens: prefills through graphs of 16, 32, 64 and 128 rows (padded), and one
    longer than max_rows, which prefills eagerly; greedy output as the eager engine's, compiled too."""
    graphed, eager, compiled = engines
    for n in (10, 29, 47, 100, 200):
        prompt = "".join(chr(97 + (i * 7) % 26) for i in range(n))  # the tiny pair's tokenizer: a token a byte
        want = _tokens(eager, prompt, Mode.AR)
        assert _tokens(graphed, prompt, Mode.AR) == want, n
        assert _tokens(compiled, prompt, Mode.AR) == want, n
    rows = {key[2] for key in graphed.target.model.graphs._graphs if isinstance(key[0], int)}
    assert {16, 32, 64, 128} <= rows  # the prefills' buckets were captured


@torch.inference_mode()
def test_captured_batched_passes_equal_eager_batched_passes(engines):
    """Requests in slots of one CacheBlock: a batch through a captured graph (CudaGraphs.run_rows) gives the
    logits of the same batch run eagerly, over several steps of ragged feeds and batch sizes."""
    graphed, eager, _ = engines
    model, graphs = graphed.target.model, graphed.target.model.graphs
    block = model.new_block(128, 8)
    caches = {"graphs": block.caches[:5], "eager": [model.new_cache(128) for _ in range(5)]}
    for i in range(5):
        prompt = torch.arange(3 + 4 * i, device="cuda")[None] + 7 * i
        for c in (caches["graphs"][i], caches["eager"][i]):
            model(prompt, c)
    for step, feeds in enumerate([[1, 1, 1, 1, 1], [5, 1, 3, 2, 1], [1, 1, 1], [4, 4, 4, 4, 4]]):
        news = [torch.randint(0, 200, (n,), device="cuda", generator=None) for n in feeds]
        got = model.forward_batch(news, caches["graphs"][: len(feeds)])
        model.graphs = None
        try:
            want = model.forward_batch(news, caches["eager"][: len(feeds)])
        finally:
            model.graphs = graphs
        for (logits, _), (want_logits, _) in zip(got, want):
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert any(key[0] == "rows" for key in graphs._graphs), "no batched pass was captured"


def test_compiled_int8_passes_give_the_eager_int8_greedy_output():
    """Weight-only int8 (engine.quant) through torch.compile and capture, where inductor fuses the weights'
    conversion into the products, against the same int8 model run eagerly."""
    int8 = {"runtime.device": "cuda", "target.quantize": "int8", "draft.quantize": "int8"}
    eager = Engine.from_config(load_config(TINY_YAML, {**int8, "runtime.cuda_graphs": False}))
    compiled = Engine.from_config(load_config(TINY_YAML, {**int8, "runtime.compile": True}))
    for prompt in PROMPTS:
        for mode in (Mode.AR, Mode.STANDARD):
            assert _tokens(compiled, prompt, mode) == _tokens(eager, prompt, mode), (prompt, mode)
    assert len(compiled.target.model.graphs) >= 1


@pytest.mark.parametrize("rows", [2, 17, 33, 64, 100, 128])
def test_int8_kernel_equals_the_converted_weight_product(rows):
    """engine.int8_kernel compiled for the GPU, at the 8B's shapes, against cuBLAS on the converted weight."""
    from engine.quant import int8_matmul

    gen = torch.Generator(device="cuda").manual_seed(rows)
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
        s = torch.rand(n, device="cuda", generator=gen).to(torch.bfloat16) / 1000
        x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
        want = (x.float() @ w.float().T) * s.float()
        got = int8_matmul(x, w, s)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,heads,kv_heads", [(128, 32, 8), (128, 32, 4), (64, 14, 2)])
def test_decode_attention_kernel_equals_the_rotary_write_and_sdpa(dtype, dim, heads, kv_heads):
    """engine.attention_kernel compiled for the GPU at the 8B's, a 70B TP=2 rank's and Qwen2.5-0.5B's head
    shapes, against the rotary, write_kv and masked SDPA in float32: the output within the dtype's rounding,
    the new key and value written at the position and nothing else."""
    from engine.model import decode_attention
    from tests.engine.test_attention_kernel import inputs, reference

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for pos, length in ((0, 64), (31, 64), (32, 64), (383, 512), (1000, 1024)):
        q, k, v, cos, sin, keys, values = inputs(dim, heads, kv_heads, 1024, dtype, "cuda", seed=pos)
        positions = torch.tensor([pos], device="cuda")
        want, want_keys, want_values = reference(q, k, v, cos, sin, keys, values, positions, length)
        before = keys.clone(), values.clone()
        got = decode_attention(q, k, v, cos, sin, keys, values, positions, length)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(keys[:, :, pos].float(), want_keys[:, :, pos], rtol=tol, atol=tol)
        assert torch.equal(values[:, :, pos], v[None])
        others = torch.arange(1024, device="cuda") != pos
        assert torch.equal(keys[:, :, others], before[0][:, :, others])
        assert torch.equal(values[:, :, others], before[1][:, :, others])
