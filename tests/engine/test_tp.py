"""engine.tp: TP=2 over gloo on CPU matches the unsharded model, whether the ranks slice a full model
(apply_tp) or load only their shards of a checkpoint (engine.weights); shards and names; refusals of
uneven splits."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.model import ModelArgs, Transformer
from engine.quant import quantize_int8
from engine.shapes import SHAPES
from engine.tp import RowParallelLinear, apply_tp, exit_rank, shard_dim
from engine.weights import dummy_model, load_checkpoint

CPU = torch.device("cpu")
WORLD = 2
PROMPT = [[72, 101, 108, 108, 111, 44, 32, 119]]  # "Hello, w" in the byte vocabulary
VERIFY = [[111, 114, 108, 100, 33]]  # a 5-token verification-sized pass
GREEDY_TOKENS = 20
MAX_LEN = 64


def _tiny(shape: str = "tiny") -> Transformer:
    args = ModelArgs.from_hf(SHAPES[shape])
    return dummy_model(args, seed=0, noise=0.0, dtype=torch.float32, device=CPU).eval()


@torch.no_grad()
def _passes(model: Transformer) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of a prefill, three one-token decodes, a 5-token pass, and a 5-token pass after rolling back
    3 positions; then a greedy (argmax) continuation of the prompt in a fresh cache."""
    cache = model.new_cache(MAX_LEN)
    logits = [model(torch.tensor(PROMPT), cache)[0]]  # [1, 8, vocab]
    for _ in range(3):
        token = logits[-1][:, -1:].argmax(-1)  # [1, 1]
        logits.append(model(token, cache)[0])  # [1, 1, vocab]
    logits.append(model(torch.tensor(VERIFY), cache)[0])  # [1, 5, vocab]
    cache.truncate(cache.length - 3)
    logits.append(model(torch.tensor(VERIFY), cache)[0])

    cache = model.new_cache(MAX_LEN)
    step, _ = model(torch.tensor(PROMPT), cache, last_only=True)  # [1, 1, vocab]
    greedy = []
    for _ in range(GREEDY_TOKENS):
        greedy.append(int(step[0, -1].argmax()))
        step, _ = model(torch.tensor([[greedy[-1]]]), cache)
    return logits, greedy


def _worker(
    rank: int, init_file: str, out_dir: str, checkpoint: str | None, world: int = WORLD, shape: str = "tiny",
    quantize: bool = False,
) -> None:
    """One rank: apply_tp of the tiny model, or with `checkpoint` a shard-only load of that folder; with
    `quantize`, the shard's weights then int8 (engine.quant)."""
    torch.set_num_threads(1)  # several ranks on a small CPU machine
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        if checkpoint is None:
            model = apply_tp(_tiny(shape), rank, world)
        else:
            model = load_checkpoint(Path(checkpoint), torch.float32, CPU, rank=rank, world=world).eval()
        if quantize:
            quantize_int8(model)
        logits, greedy = _passes(model)
        kv_heads = model.new_cache(MAX_LEN).k.shape[2]
        torch.save({"logits": logits, "greedy": greedy, "kv_heads": kv_heads}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears its connections down while the other still reads from them
    finally:
        dist.destroy_process_group()
    exit_rank()  # results saved, group destroyed: skip the interpreter's teardown (gloo's exit race)


def _spawn(tmp: Path, checkpoint: Path | None, world: int = WORLD, shape: str = "tiny", quantize: bool = False) -> list[dict]:
    folder = None if checkpoint is None else str(checkpoint)
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp), folder, world, shape, quantize), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory) -> list[dict]:
    """One spawn of two gloo ranks serves all the TP=2 checks (process start-up dominates the cost)."""
    return _spawn(tmp_path_factory.mktemp("tp"), None)


@pytest.fixture(scope="module")
def shard_loaded_runs(tmp_path_factory, write_checkpoint) -> list[dict]:
    """The same passes on two ranks that each read only their shard of the tiny model saved as a checkpoint."""
    folder = write_checkpoint(_tiny(), SHAPES["tiny"], torch.float32)
    return _spawn(tmp_path_factory.mktemp("tp-loaded"), folder)


@pytest.fixture(scope="module")
def unsharded() -> tuple[list[torch.Tensor], list[int]]:
    return _passes(_tiny())


def test_tp2_logits_match_unsharded(tp_runs, unsharded):
    want, _ = unsharded
    got = tp_runs[0]["logits"]
    assert [g.shape for g in got] == [w.shape for w in want]
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=lambda m, i=i: f"pass {i}: {m}")


def test_tp2_ranks_return_identical_logits(tp_runs):
    for a, b in zip(tp_runs[0]["logits"], tp_runs[1]["logits"]):
        assert torch.equal(a, b)


def test_tp2_greedy_equals_unsharded(tp_runs, unsharded):
    _, want = unsharded
    assert tp_runs[0]["greedy"] == want
    assert tp_runs[1]["greedy"] == want


def test_tp2_shard_loaded_ranks_match_unsharded_and_apply_tp(shard_loaded_runs, tp_runs, unsharded):
    """The same float32 weights, read shard-only: within TP's rounding of the unsharded model, and bitwise
    the ranks that sliced the full model."""
    want, want_greedy = unsharded
    for run in shard_loaded_runs:
        for i, (g, w) in enumerate(zip(run["logits"], want)):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=lambda m, i=i: f"pass {i}: {m}")
        assert all(torch.equal(g, t) for g, t in zip(run["logits"], tp_runs[0]["logits"]))
        assert run["greedy"] == want_greedy
        assert run["kv_heads"] == SHAPES["tiny"]["num_key_value_heads"] // WORLD


def test_tp8_logits_match_unsharded(tmp_path):
    # The 405B layout (config/llama-8b-405b.yaml: TP=8) over gloo, on a shape whose heads split 8 ways.
    runs = _spawn(tmp_path, None, world=8, shape="tiny-tp8")
    want, want_greedy = _passes(_tiny("tiny-tp8"))
    for run in runs:
        for got, ref in zip(run["logits"], want):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        assert run["greedy"] == want_greedy
        assert run["kv_heads"] == 1


def test_tp2_int8_shards_stay_close_to_the_unsharded_int8_model(tmp_path, unsharded):
    """Each rank quantizes its own slices (engine.quant): column-parallel rows keep the unsharded scales,
    a row-parallel half gets its own, so TP=2 int8 is close to TP=1 int8, and both to the float model."""
    runs = _spawn(tmp_path, None, quantize=True)
    want, _ = _passes(quantize_int8(_tiny()))
    plain, _ = unsharded
    for got, ref, fp in zip(runs[0]["logits"], want, plain):
        assert not torch.equal(got, fp)
        assert (got - ref).norm() / ref.norm() < 0.03, float((got - ref).norm() / ref.norm())  # measured 0.009
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["logits"], runs[1]["logits"]))
    assert runs[0]["greedy"] == runs[1]["greedy"]


def _compiled_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of TP=2: the graph-safe pass eagerly and through torch.compile of its pieces, the layer step
    (with its in-place all-reduces) compiled once for every layer, as engine.cuda_graphs compiles a shard."""
    from engine.model import SLOT_STEPS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    try:
        model = apply_tp(_tiny(), rank, WORLD)
        model.exact_rows = False
        eager, compiled = model.new_cache(MAX_LEN), model.new_cache(MAX_LEN)
        with torch.inference_mode():
            for cache in (eager, compiled):
                model(torch.tensor(PROMPT), cache)
            steps = tuple(torch.compile(f, fullgraph=True, dynamic=False) for f in SLOT_STEPS)
            want, _ = model.forward_slots(torch.tensor(VERIFY), eager, torch.tensor(eager.length))
            got, _ = model.forward_slots(torch.tensor(VERIFY), compiled, torch.tensor(compiled.length), steps)
        torch.save({"want": want, "got": got, "k": (eager.k, compiled.k)}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_tp2_compiled_layer_steps_equal_the_eager_pass(tmp_path):
    mp.spawn(_compiled_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(run["got"], run["want"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(*run["k"])


def test_tp2_cache_holds_local_kv_heads(tp_runs):
    assert [run["kv_heads"] for run in tp_runs] == [SHAPES["tiny"]["num_key_value_heads"] // WORLD] * WORLD


def test_shards_keep_names_and_tile_the_full_weights():
    # No collective runs before a forward pass, so sharding needs no process group.
    full = _tiny().state_dict()
    shards = [apply_tp(_tiny(), rank, WORLD).state_dict() for rank in range(WORLD)]
    assert all(list(s) == list(full) for s in shards)
    for name, tensor in full.items():
        module = name.split(".")[-2]
        if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # weights and q, k, v biases
            dim = 0
        elif module in ("o_proj", "down_proj"):
            dim = 1
        else:  # embedding, norms, LM head: replicated
            assert all(torch.equal(s[name], tensor) for s in shards), name
            continue
        assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), tensor), name


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_dummy_shards_are_apply_tp_of_the_whole_dummy(noise):
    # A rank of a dummy 70B must not draw the whole model: dummy_model keeps only its slices, and must still
    # give exactly the shard apply_tp takes of the whole model (the random streams stay in step).
    args = ModelArgs.from_hf(SHAPES["tiny"])
    for rank in range(WORLD):
        want = apply_tp(dummy_model(args, 5, noise, torch.float32, CPU), rank, WORLD).state_dict()
        got = dummy_model(args, 5, noise, torch.float32, CPU, rank=rank, world=WORLD).state_dict()
        assert list(got) == list(want)
        assert all(torch.equal(got[name], want[name]) for name in want)


def test_shard_dim_follows_megatrons_split():
    layer = "model.layers.7"
    attn = [shard_dim(f"{layer}.self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert attn == [0, 0, 0, 1]  # heads by output features; o_proj by input features
    assert [shard_dim(f"{layer}.mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")] == [0, 0, 1]
    assert shard_dim(f"{layer}.self_attn.q_proj.bias") == 0  # with its output features
    assert shard_dim(f"{layer}.self_attn.o_proj.bias") is None  # added once, after the all-reduce
    replicated = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", f"{layer}.input_layernorm.weight")
    assert [shard_dim(name) for name in replicated] == [None] * len(replicated)


def test_apply_tp_updates_modules_and_args():
    model = apply_tp(_tiny(), 1, WORLD)
    attn = model.model.layers[0].self_attn
    assert (attn.n_heads, attn.n_kv) == (2, 1)
    assert isinstance(attn.o_proj, RowParallelLinear) and attn.o_proj.in_features == 32
    assert isinstance(model.model.layers[0].mlp.down_proj, RowParallelLinear)
    a = model.args
    assert (a.num_heads, a.num_kv_heads, a.intermediate_size, a.head_dim, a.hidden_size) == (2, 1, 64, 16, 64)
    with pytest.raises(ValueError, match="already applied"):
        apply_tp(model, 1, WORLD)
    stacked = _tiny()
    stacked.stack_projections()  # q/k/v stacked whole would be split at the wrong features
    with pytest.raises(ValueError, match="before Transformer.stack_projections"):
        apply_tp(stacked, 1, WORLD)


def test_world_3_refused_for_4_heads():
    with pytest.raises(ValueError, match=r"world=3 .*num_heads=4, num_kv_heads=2, intermediate_size=128 not"):
        apply_tp(_tiny(), 0, 3)


def test_single_kv_head_refused_at_tp2():
    with pytest.raises(ValueError, match=r"num_kv_heads=1 not divisible by 2"):
        apply_tp(_tiny("tiny-llama"), 0, WORLD)


def test_rank_out_of_range_refused():
    with pytest.raises(ValueError, match="rank=2, world=2"):
        apply_tp(_tiny(), 2, WORLD)
