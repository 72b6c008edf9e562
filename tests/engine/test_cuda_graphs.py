"""engine.cuda_graphs on the CPU: the graph-safe pass (`Transformer.forward_slots`) and the replay
bookkeeping, run without capture (the same inputs, outputs and cache moves; tests/gpu captures for real)."""

from __future__ import annotations

import functools

import pytest
import torch

from engine.config import Mode, load_config
from engine.cuda_graphs import CudaGraphs
from engine.decode import Engine
from engine.sampling import SamplingParams
from engine.weights import dummy_model
from tests.conftest import TINY_YAML

CPU = torch.device("cpu")


def test_the_graph_safe_pass_equals_the_eager_pass_and_writes_the_same_cache(tiny_args):
    model = dummy_model(tiny_args, 0, 0.0, torch.float32, CPU).eval()
    model.exact_rows = False
    prompt = torch.randint(0, tiny_args.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    block = torch.randint(0, tiny_args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    eager, slots = model.new_cache(64), model.new_cache(64)
    with torch.inference_mode():
        for cache in (eager, slots):
            model(prompt, cache)
        want_logits, want_hidden = model(block, eager)
        logits, hidden = model.forward_slots(block, slots, torch.tensor(slots.length))
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)
    end = eager.length
    torch.testing.assert_close(slots.k[:, :, :, :end], eager.k[:, :, :, :end])
    torch.testing.assert_close(slots.v[:, :, :, :end], eager.v[:, :, :, :end])


@pytest.mark.parametrize("kernel", [False, True])
def test_compiled_graph_safe_pass_writes_the_cache_in_place_and_compiles_one_layer(tiny_args, kernel):
    """torch.compile (runtime.compile) of the graph-safe pass as engine.cuda_graphs does it, piece by piece:
    the same logits and cache as eager; one compiled layer step serving every layer (the generated code
    holds one layer, not the model's depth); and the cache written by the write_kv op on the cache itself,
    not cloned and copied back every pass (which cost 0.46 ms of an 8B decode on an H100,
    docs/performance.md). Inductor on the CPU makes the same choices. Compiled passes over key buckets of 16
    and 32 (a symbolic length) equal the eager pass over the whole cache. With the attention kernel
    (runtime.attention_kernel; Triton's interpreter here), its op does the write, on the cache too."""
    from torch._inductor.utils import run_and_get_code

    from engine.model import SLOT_STEPS

    model = dummy_model(tiny_args, 0, 0.0, torch.float32, CPU).eval()
    model.exact_rows = False
    prompt = torch.randint(0, tiny_args.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    eager, compiled = model.new_cache(64), model.new_cache(64)
    steps = tuple(torch.compile(f, fullgraph=True, dynamic=False) for f in SLOT_STEPS)
    with torch.inference_mode():
        for cache in (eager, compiled):
            model(prompt, cache)
        for token, bucket in ((7, 16), (8, 32)):
            want, _ = model.forward_slots(torch.tensor([[token]]), eager, torch.tensor(eager.length))
            got, code = run_and_get_code(
                model.forward_slots, torch.tensor([[token]]), compiled, torch.tensor(compiled.length), steps, bucket, kernel
            )
            torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
            tol = {"rtol": 1e-5, "atol": 1e-6} if kernel else {}  # the kernel's sums run in its own order
            torch.testing.assert_close(compiled.k, eager.k, **tol)
            torch.testing.assert_close(compiled.v, eager.v, **tol)
            eager.length += 1
            compiled.length += 1
    assert tiny_args.num_layers > 1
    code = "\n".join(code)
    calls = [code.count(f"torch.ops.judgeserve.{op}.default(") for op in ("write_kv", "decode_attention")]
    assert calls == ([0, 1] if kernel else [1, 0])  # one layer compiled, once, for all layers; written in place


def test_replays_move_the_cache_and_warm_up_leaves_valid_entries_alone(tiny_args):
    model = dummy_model(tiny_args, 0, 0.0, torch.float32, CPU).eval()
    model.exact_rows = False
    graphs = model.graphs = CudaGraphs(max_rows=8, capture=False)
    cache = model.new_cache(64)
    prompt = torch.arange(7)[None] + 40
    with torch.inference_mode():
        model(prompt, cache)  # the prefill: its own graph, padded to max_rows (8) rows
        assert len(graphs) == 1 and cache.length == 7
        before = cache.k[:, :, :, :7].clone()
        model(torch.tensor([[5]]), cache)  # the first one-token pass sets up its graph (warming up at the end)
        assert len(graphs) == 2 and cache.length == 8
        torch.testing.assert_close(cache.k[:, :, :, :7], before)
        model(torch.tensor([[6]]), cache)
        model(torch.tensor([[1, 2, 3]]), cache)
        assert len(graphs) == 3 and cache.length == 12
        model(torch.arange(9)[None], cache)  # longer than max_rows: eagerly
        assert len(graphs) == 3 and cache.length == 21
        cache.length = 0
        model(torch.arange(9)[None], cache)  # a prompt longer than max_rows prefills eagerly too
        assert len(graphs) == 3 and cache.length == 9


@torch.inference_mode()
def test_a_prefill_replays_a_graph_padded_to_a_bucket_of_rows(tiny_args):
    """Prompts of 5, 11 and 16 tokens share the 16-row prefill graph (PREFILL_FLOOR), 17 and 30 the 32-row
    one, 33 the last, capped at max_rows: each gives the eager prefill's logits and hidden states for its own
    rows only and leaves its own positions of the cache as the eager prefill does (the padding writes past
    them, where the decode that follows writes over it: its passes equal too)."""
    from engine.cuda_graphs import PREFILL_FLOOR

    model = dummy_model(tiny_args, 0, 0.0, torch.float32, CPU).eval()
    model.exact_rows = False
    graphs = CudaGraphs(max_rows=40, capture=False)
    gen = torch.Generator().manual_seed(5)
    shapes = []
    eager, graphed = model.new_cache(128), model.new_cache(128)  # reused, as the engine reuses its caches
    for n in (5, 11, 16, 17, 30, 33):
        prompt = torch.randint(0, tiny_args.vocab_size, (1, n), generator=gen)
        for last_only in (True, False):
            for cache in (eager, graphed):
                cache.length = 0
            model.graphs = None
            want = model(prompt, eager, last_only=last_only)
            model.graphs = graphs
            got = model(prompt, graphed, last_only=last_only)
            assert graphed.length == eager.length == n
            for g, w in zip(got, want):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(graphed.k[:, :, :, :n], eager.k[:, :, :, :n])
            torch.testing.assert_close(graphed.v[:, :, :, :n], eager.v[:, :, :, :n])
        for token in (3, 9):  # decoding on: the padding's keys past n are written over, never read
            model.graphs = None
            want, _ = model(torch.tensor([[token]]), eager)
            model.graphs = graphs
            got, _ = model(torch.tensor([[token]]), graphed)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        shapes.append(len(graphs))
    # graphs: prefills of 16 rows (n = 5, 11, 16), 32 (17, 30) and 40 (33), and the one-token decode's
    assert PREFILL_FLOOR == 16 and shapes == [2, 2, 2, 3, 3, 4]


@torch.inference_mode()
def test_graphs_attend_over_a_bucket_of_the_cache_not_all_of_it(tiny_args):
    """A pass through CudaGraphs attends over the cache's first L positions, L its end rounded up to a power
    of two (at least KEY_FLOOR; at most max_len): one graph per bucket a pass shape meets, each pass equal
    to the eager pass, at bucket edges too. NaN values past the bucket would poison a pass that read them,
    even masked (0 x NaN): none does."""
    from engine.cuda_graphs import KEY_FLOOR

    model = dummy_model(tiny_args, 0, 0.0, torch.float32, CPU).eval()
    model.exact_rows = False
    graphs = CudaGraphs(max_rows=8, capture=False)
    max_len = 2 * KEY_FLOOR + 40  # buckets KEY_FLOOR, 2 * KEY_FLOOR, then the whole cache
    eager, graphed = model.new_cache(max_len), model.new_cache(max_len)
    prompt = torch.randint(0, tiny_args.vocab_size, (1, KEY_FLOOR - 8), generator=torch.Generator().manual_seed(3))
    for cache in (eager, graphed):
        model(prompt, cache)
    gen = torch.Generator().manual_seed(4)
    buckets = []
    while eager.length + 3 <= max_len:
        rows = 3 if eager.length % 2 else 1
        tokens = torch.randint(0, tiny_args.vocab_size, (1, rows), generator=gen)
        model.graphs = None
        want, _ = model(tokens, eager)
        bucket = min(max(KEY_FLOOR, 1 << (eager.length - 1).bit_length()), max_len)
        graphed.v[:, :, :, bucket:] = float("nan")
        model.graphs = graphs
        got, _ = model(tokens, graphed)
        graphed.v[:, :, :, graphed.length :] = 0.0  # not yet written: harmless for the passes to come
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        buckets.append((rows, bucket))
    assert {b for _, b in buckets} == {KEY_FLOOR, 2 * KEY_FLOOR, max_len}
    assert len(graphs) == len(set(buckets)) == 6  # one-row and three-row passes, in each bucket


@torch.inference_mode()
def test_one_compiled_layer_step_serves_every_key_bucket(tiny_args):
    """The key length is symbolic to torch.compile (as engine.cuda_graphs compiles SLOT_STEPS): passes over
    buckets of 64, 128 and 256 keys trace the layer step once, not once per bucket (each trace an inductor
    compile on a GPU, tens of seconds for a tuned one-row pass)."""
    from torch._dynamo.testing import CompileCounter

    from engine.model import SLOT_STEPS

    model = dummy_model(tiny_args, 0, 0.0, torch.float32, CPU).eval()
    counters = [CompileCounter() for _ in SLOT_STEPS]
    steps = tuple(torch.compile(f, backend=c, fullgraph=True, dynamic=False) for f, c in zip(SLOT_STEPS, counters))
    cache = model.new_cache(512)
    model(torch.arange(40)[None], cache)
    for length in (64, 128, 256):
        model.forward_slots(torch.tensor([[5]]), cache, torch.tensor(cache.length), steps, length)
    assert [c.frame_count for c in counters] == [1, 1, 1]


def plain_and_graphed(config, graphs, prompts, mode: Mode, max_tokens: int):
    """One engine runs every pass eagerly, the other through `graphs()` (a CudaGraphs per model; no capture
    on a CPU); both use the masked attention of the GPU path (exact_rows off). -> the graphed engine, and
    (plain, graphed) outputs per prompt."""
    engines = []
    for graphed in (False, True):
        engine = Engine.from_config(config)
        for loaded in (engine.target, engine.draft):
            loaded.model.exact_rows = False
            loaded.model.graphs = graphs() if graphed else None
        engines.append(engine)
    params = SamplingParams(max_tokens=max_tokens)
    outs = [[e.generate(e.make_request(prompt=p, mode=mode, params=params)) for e in engines] for p in prompts]
    return engines[1], outs


@pytest.mark.parametrize("mode", [Mode.AR, Mode.STANDARD, Mode.JUDGE])
def test_greedy_output_through_the_graph_path_equals_the_plain_path(judge_config, mode):
    """Every pass, prefills included, goes through CudaGraphs in one engine, eagerly in the other."""
    prompts = ("The quick", "def f(x):", "Once upon a time")
    engine, outs = plain_and_graphed(judge_config, functools.partial(CudaGraphs, capture=False), prompts, mode, 40)
    for prompt, (plain, graphed) in zip(prompts, outs):
        assert graphed.token_ids == plain.token_ids, prompt
        assert graphed.steps == plain.steps
    assert len(engine.target.model.graphs) >= 1
    if mode.is_speculative:
        assert len(engine.draft.model.graphs) >= 1


def test_the_runtime_section_picks_the_attention_kernel():
    from engine.cuda_graphs import graphs_for

    cuda = {"runtime.device": "cuda"}
    assert graphs_for(load_config(TINY_YAML, cuda).runtime).attention_kernel  # on by default
    assert not graphs_for(load_config(TINY_YAML, {**cuda, "runtime.attention_kernel": False}).runtime).attention_kernel


def test_cuda_graphs_on_a_cpu_is_refused_in_the_config():
    with pytest.raises(ValueError, match="cuda_graphs"):
        load_config(TINY_YAML, {"runtime.cuda_graphs": True})
    assert not load_config(TINY_YAML).runtime.graphed
    assert load_config(TINY_YAML, {"runtime.device": "cuda"}).runtime.graphed


@torch.inference_mode()
def test_batched_passes_over_a_cache_block_replay_shared_graphs(tiny_args):
    """forward_batch over slots of one CacheBlock goes through CudaGraphs.run_rows (no capture on a CPU):
    each request gets its own eager pass's results, batches of 3 and 4 rows share one graph (rows rounded
    up to a power of two, the padding row in the scratch slot), and the other slots stay untouched. A
    prefill of one request is forward's: its own graph if it fits max_rows (8), else eager."""
    model = dummy_model(tiny_args, 0, 0.0, torch.float32, CPU).eval()
    model.exact_rows = False
    graphs = model.graphs = CudaGraphs(max_rows=8, capture=False)
    block = model.new_block(64, 6)
    plain = [model.new_cache(64) for _ in range(4)]
    slots = [block.caches[s] for s in (4, 1, 2, 0)]
    for i, (a, b) in enumerate(zip(plain, slots)):
        prefix = torch.randint(0, tiny_args.vocab_size, (1, 5 + 3 * i), generator=torch.Generator().manual_seed(i))
        model.graphs = None
        model(prefix, a)
        model.graphs = graphs
        model(prefix, b)  # prefills of 5 and 8 tokens: a graph each (one per slot); 11 and 14: eager
    assert len(graphs) == 2
    untouched = block.k[:, [3, 5]].clone()

    def step(rows: int, feeds: list[int], seed: int) -> None:
        news = [torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(seed + i)) for i, n in enumerate(feeds)]
        got = model.forward_batch(news, slots[:rows])
        model.graphs = None
        want = model.forward_batch(news, plain[:rows])
        model.graphs = graphs
        for (logits, hidden), (want_logits, want_hidden) in zip(got, want):
            torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)

    step(3, [1, 1, 1], 10)
    step(4, [2, 1, 3, 1], 20)
    step(4, [3, 3, 1, 2], 30)
    assert len(graphs) == 2 + 2  # (4 rows, T 1) and (4 rows, T 3): the 3-row batch took the 4-row graph
    for a, b in zip(plain, slots):
        assert a.length == b.length
        torch.testing.assert_close(b.k[:, :, :, : b.length], a.k[:, :, :, : a.length], rtol=1e-5, atol=1e-5)
    assert torch.equal(block.k[:, [3, 5]], untouched)  # nobody's slots (padding rows write the scratch slot)
