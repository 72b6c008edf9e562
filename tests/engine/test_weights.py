"""engine.weights: a tensor-parallel rank's shard-only load of a checkpoint is apply_tp's shard of the full
model, reads sharded tensors as slices only, refuses what apply_tp refuses, and keeps the whole model's
fingerprint and args. (TP=2 forward passes of shard-loaded ranks: tests/engine/test_tp.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors
import torch

from engine.config import ModelSpec, Quantize
from engine.model import ModelArgs, Transformer
from engine.shapes import SHAPES
from engine.tp import apply_tp, local_args, shard_dim
from engine.quant import quantize_int8
from engine.weights import ModelLoadError, _build, _materialise, dummy_model, load_checkpoint, load_model

CPU = torch.device("cpu")
F32 = torch.float32
WORLD = 2
CASES = {
    "qwen2": SHAPES["tiny"],  # q, k, v biases (column-parallel, split with their outputs)
    "qwen2-tied": {**SHAPES["tiny"], "tie_word_embeddings": True},
    "llama": {**SHAPES["tiny-llama"], "num_key_value_heads": 2},  # tiny-llama's single kv head cannot split
}


def _random_model(config: dict) -> Transformer:
    """dummy_model's weights with random norms too, so replicated tensors differ from one another."""
    model = dummy_model(ModelArgs.from_hf(config), seed=3, noise=0.0, dtype=F32, device=CPU)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, write_checkpoint):
    """A bfloat16 checkpoint (loaded as float32 below, so the dtype conversion is exercised too)."""
    config = CASES[request.param]
    return write_checkpoint(_random_model(config), config, torch.bfloat16)


def _tied(folder) -> bool:
    return bool(json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"))


class _SpyOpen:
    """safetensors.safe_open recording every read as (name, "whole" or "slice", shape of what was read)."""

    real = safetensors.safe_open

    def __init__(self, reads: list[tuple[str, str, tuple[int, ...]]], *args, **kwargs):
        self._file, self._reads = self.real(*args, **kwargs), reads

    def __enter__(self):
        self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def keys(self):
        return self._file.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self._file.get_tensor(name)
        self._reads.append((name, "whole", tuple(tensor.shape)))
        return tensor

    def get_slice(self, name: str) -> _SpySlice:
        return _SpySlice(name, self._file.get_slice(name), self._reads)


class _SpySlice:
    def __init__(self, name: str, inner, reads: list):
        self._name, self._inner, self._reads = name, inner, reads

    def get_shape(self) -> list[int]:  # header only
        return self._inner.get_shape()

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self._inner[index]
        self._reads.append((self._name, "slice", tuple(tensor.shape)))
        return tensor


@pytest.mark.parametrize("rank", range(WORLD))
def test_shard_load_equals_apply_tp_of_full_load(checkpoint, rank):
    want = apply_tp(load_checkpoint(checkpoint, F32, CPU), rank, WORLD)
    got = load_checkpoint(checkpoint, F32, CPU, rank=rank, world=WORLD)
    assert got.args == want.args
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
    assert [(layer.self_attn.n_heads, layer.self_attn.n_kv) for layer in got.model.layers] == [
        (layer.self_attn.n_heads, layer.self_attn.n_kv) for layer in want.model.layers
    ]
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for name, tensor in want_state.items():
        assert got_state[name].dtype == tensor.dtype == F32, name
        assert torch.equal(got_state[name], tensor), name
    tied = got.args.tie_word_embeddings
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    assert torch.equal(got.inv_freq, want.inv_freq)


def test_sharded_tensors_are_read_as_the_ranks_slice_only(checkpoint, monkeypatch):
    reads: list[tuple[str, str, tuple[int, ...]]] = []
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _SpyOpen(reads, *a, **k))
    local = load_checkpoint(checkpoint, F32, CPU, rank=1, world=WORLD).state_dict()
    names = [name for name, _, _ in reads]
    assert len(names) == len(set(names)), "a tensor was read twice"
    assert set(names) == set(local) - ({"lm_head.weight"} if _tied(checkpoint) else set())
    for name, how, shape in reads:
        assert how == ("whole" if shard_dim(name) is None else "slice"), name
        assert shape == tuple(local[name].shape), f"{name}: read {shape}, the rank holds {tuple(local[name].shape)}"
    assert any(how == "slice" for _, how, _ in reads)


def test_uneven_world_refused_like_apply_tp_before_any_file_is_opened(checkpoint, monkeypatch):
    with pytest.raises(ValueError) as by_apply_tp:
        apply_tp(load_checkpoint(checkpoint, F32, CPU), 0, 3)

    def no_open(*args, **kwargs):
        raise AssertionError("a weights file was opened")

    monkeypatch.setattr(safetensors, "safe_open", no_open)
    with pytest.raises(ValueError) as by_loader:
        load_checkpoint(checkpoint, F32, CPU, rank=0, world=3)
    with pytest.raises(ValueError) as by_load_model:
        load_model(ModelSpec(model=str(checkpoint)), max_seq_len=64, rank=0, world=3)
    assert "not divisible by 3" in str(by_apply_tp.value)
    assert str(by_loader.value) == str(by_load_model.value) == str(by_apply_tp.value)


def test_load_model_shards_keep_the_whole_models_args_and_fingerprint(checkpoint):
    spec = ModelSpec(model=str(checkpoint))
    whole = load_model(spec, max_seq_len=64)
    assert whole.args == whole.model.args
    for rank in range(WORLD):
        shard = load_model(spec, max_seq_len=64, rank=rank, world=WORLD)
        assert shard.fingerprint == whole.fingerprint
        assert shard.args == whole.args
        assert shard.model.args == local_args(whole.args, WORLD)
        assert not any(p.requires_grad for p in shard.model.parameters())


def test_dummy_shard_is_apply_tp_of_the_whole_dummy():
    """Dummy weights are drawn whole on every rank (so the ranks agree) and then sliced; with `stack`
    (runtime.stack_projections) the loader then stacks the rank's own q/k/v and gate/up slices."""
    spec = ModelSpec(model="dummy:tiny", seed=5)
    whole = load_model(spec, max_seq_len=64)
    shard = load_model(spec, max_seq_len=64, rank=1, world=WORLD)
    want = apply_tp(whole.model, 1, WORLD).state_dict()
    got = shard.model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert (shard.fingerprint, shard.args) == (whole.fingerprint, whole.args)
    stacked = load_model(spec, max_seq_len=64, rank=1, world=WORLD, stack=True)
    assert stacked.model.stacked and not shard.model.stacked
    mlp, attn = shard.model.model.layers[0].mlp, shard.model.model.layers[0].self_attn
    both = stacked.model.model.layers[0]
    assert torch.equal(both.mlp.gate_up_proj.weight, torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)))
    qkv = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
    assert torch.equal(both.self_attn.qkv_proj.weight, qkv)


def test_shape_disagreeing_with_config_refused(checkpoint, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] // 2}))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight has shape \[.*\], config.json implies"):
        load_checkpoint(folder, F32, CPU, rank=0, world=WORLD)


def test_missing_tensor_refused(checkpoint, tmp_path):
    folder = tmp_path / "half"
    shutil.copytree(checkpoint, folder)
    next(iter(sorted(folder.glob("*.safetensors")))).unlink()
    with pytest.raises(ModelLoadError, match="checkpoint lacks"):
        load_checkpoint(folder, F32, CPU, rank=1, world=WORLD)


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, WORLD)])
def test_int8_loads_quantize_as_they_go_and_equal_quantizing_afterwards(checkpoint, rank, world):
    """A checkpoint and a dummy model loaded with quantize int8 hold the weights quantize_int8 gives of the
    plain load, and no layer waits in the model's dtype while a later one is read: when a layer's first
    tensor is filled, every earlier layer's products are int8 already (what lets a 70B rank in int8 load
    on an 80 GB card)."""
    int8 = Quantize.INT8
    plain = load_checkpoint(checkpoint, F32, CPU, rank=rank, world=world)
    _assert_same(load_checkpoint(checkpoint, F32, CPU, rank=rank, world=world, quantize=int8), quantize_int8(plain))
    args = ModelArgs.from_hf(json.loads((checkpoint / "config.json").read_text()))
    drawn = dummy_model(args, 4, 0.1, F32, CPU, rank, world, quantize=int8)
    _assert_same(drawn, quantize_int8(dummy_model(args, 4, 0.1, F32, CPU, rank, world)))

    model, seen = _build(args, F32, world), []

    def fill(name: str, param: torch.Tensor) -> None:
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if i is not None and i not in seen:
            earlier = [m for layer in model.model.layers[:i] for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            assert not earlier, f"layer {i} filled while {len(earlier)} earlier products are not int8"
            seen.append(i)
        param.fill_(0.01)

    _materialise(model, CPU, fill, int8)
    assert seen == list(range(args.num_layers))
    assert all(not isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())


def _assert_same(got: Transformer, want: Transformer) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
