"""Builds a ready `Transformer` (+ its tokenizer) from a `ModelSpec`: checkpoint folder, cached GGUF, a
registered name fetched into the cache, or dummy random weights at a named shape; whole, or one
tensor-parallel rank's shard of it.

A rank of a real checkpoint reads only its own slices from the safetensors files (`load_checkpoint`), so
70B and 405B load with each GPU holding its shard and no more. Dummy weights are drawn one whole tensor
at a time, in the same order on every rank (every rank must draw the same random numbers), and each rank
keeps its slice, so a rank of a dummy 70B also holds its shard plus one tensor, never the 141 GB model.
Either way the result is the model engine.tp.apply_tp gives of the whole one: engine.tp.shard_dim says which
tensor is split along which dim.

Not for: downloading (engine.fetch), deciding dtypes (the config does) or the tensor-parallel layout
itself (engine.tp).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine.config import DType, ModelSpec, Quantize
from engine.cuda_graphs import CudaGraphs
from engine.model import ModelArgs, Transformer, rope_inv_freq
from engine.quant import quantize_part
from engine.shapes import SHAPES
from engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from engine.tp import check_tp, local_part, shard_dim, shard_modules, shard_span

TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as configured; the message says why and what to do."""


@dataclass
class LoadedModel:
    name: str  # what the config named, for logs, ModelInfo and judge metadata
    model: Transformer  # a tensor-parallel rank's shard when loaded with world > 1
    tokenizer: Tokenizer
    fingerprint: str  # identifies the weights (see `fingerprint`), for judge heads; the same on every rank
    args: ModelArgs  # the whole model's shape (model.args is the shard's), for ModelInfo


def fingerprint(model: Transformer) -> str:
    """A short hash of the final norm's weights and the shape: distinct per checkpoint, the same across
    dtypes (hashed in bfloat16) and devices, and cheap. Judge heads record it to refuse a foreign target.
    It reads only what tensor parallelism leaves whole (the norm is replicated; family, widths, depth and
    vocabulary are not divided), so every rank's shard gives the unsharded model's fingerprint."""
    a = model.args
    h = hashlib.sha256(f"{a.family}:{a.hidden_size}:{a.num_layers}:{a.vocab_size}".encode())
    h.update(model.model.norm.weight.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_checkpoint(model: str) -> Path:
    """The HF checkpoint folder for a config's `model` string (not a dummy)."""
    from engine import fetch  # only real checkpoints need the registry and the cache

    if model in fetch.MODELS:
        folder = fetch.cached_model_dir(model)
        if folder is None:
            pair = next((p for p, names in fetch.PAIRS.items() if model in names), model)
            raise ModelLoadError(f"model {model!r} is not in the cache yet: run `judgeserve models fetch {pair}`")
        return folder
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return fetch.cached_gguf_dir(path)
    if (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(fetch.MODELS))
    raise ModelLoadError(
        f"model {model!r} is neither a registered name ({known}), a checkpoint folder with config.json, "
        f"a .gguf file, nor dummy:<shape> (shapes: {', '.join(SHAPES)})"
    )


def _shape_config(shape: str) -> dict:
    if shape in SHAPES:
        return SHAPES[shape]
    path = Path(shape).expanduser()
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    raise ModelLoadError(f"unknown dummy shape {shape!r}: use one of {', '.join(SHAPES)} or a config.json path")


def _check_fits(args: ModelArgs, max_seq_len: int, what: str) -> None:
    if args.sliding_window is not None and max_seq_len > args.sliding_window:
        raise ModelLoadError(
            f"{what} uses sliding-window attention ({args.sliding_window} tokens), which this engine does not "
            f"implement: set decoding.max_seq_len <= {args.sliding_window}"
        )


def checkpoint_args(folder: Path) -> ModelArgs:
    """The whole model's shape, from the folder's config.json (no weights read)."""
    try:
        return ModelArgs.from_hf(json.loads((folder / "config.json").read_text()))
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"{folder}: {err}") from None


def meta_transformer(args: ModelArgs) -> Transformer:
    """The model's modules on the meta device: shapes and dtypes, no memory, no values."""
    with torch.device("meta"), _no_init():
        return Transformer(args)


_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_")  # what nn.Linear and nn.Embedding call


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


@contextmanager
def _no_init() -> Iterator[None]:
    """nn.Linear's and nn.Embedding's initialisers as no-ops, for a model built on the meta device: its
    tensors hold no values to initialise, and PyTorch's meta kernels for them are Python references whose
    first call imports torch._dynamo (about 2 s of CPU in every process that loads a model: each actor's
    start-up, the in-process engine's). Building is single-threaded (at load), so the swap is not seen."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(nn.init, name, _keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _build(args: ModelArgs, dtype: torch.dtype, world: int = 1, group: dist.ProcessGroup | None = None) -> Transformer:
    """The model on the meta device (no memory) in `dtype`; with world > 1 at one rank's shapes. _materialise
    allocates it."""
    model = meta_transformer(args)
    if world > 1:
        shard_modules(model, world, group)  # still on meta: only the local shapes are ever allocated
    return model.to(dtype)  # cast on meta: allocating first would take float32, twice bfloat16's bytes


def _materialise(
    model: Transformer, device: torch.device, fill: Callable[[str, torch.Tensor], None], quantize: Quantize
) -> Transformer:
    """Allocates a _build model on `device` a part at a time (embedding, each decoder layer, final norm, LM
    head: named_parameters' order), `fill(name, parameter)` writing each parameter. With int8 a decoder
    layer (and an untied LM head) is quantized as soon as it is filled, so the peak is the quantized model
    plus one layer in the model's dtype, never the whole model in it."""
    m = model.model
    parts = [("model.embed_tokens", m.embed_tokens), *((f"model.layers.{i}", x) for i, x in enumerate(m.layers))]
    parts.append(("model.norm", m.norm))
    if not model.args.tie_word_embeddings:
        parts.append(("lm_head", model.lm_head))
    with torch.no_grad():
        for prefix, part in parts:
            part.to_empty(device=device)
            for name, param in part.named_parameters():
                fill(f"{prefix}.{name}", param)
            if quantize is Quantize.INT8:
                quantize_part(model, part)
    if model.args.tie_word_embeddings:  # the head still holds the meta parameter: tie it again
        model.lm_head.weight = m.embed_tokens.weight
    # RoPE frequencies stay float32 whatever the weights' dtype (as in transformers); set after the cast.
    model.inv_freq = rope_inv_freq(model.args).to(device)
    return model


def load_checkpoint(
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    rank: int = 0,
    world: int = 1,
    group: dist.ProcessGroup | None = None,
    quantize: Quantize = Quantize.NONE,
) -> Transformer:
    """The safetensors checkpoint in `folder`, on `device` in `dtype` (its linear layers in int8 with
    `quantize`, engine.quant); with world > 1, rank `rank`'s tensor-parallel shard of it: the model
    `engine.tp.apply_tp(full, rank, world, group)` gives (names, shapes, values, RowParallelLinear modules,
    local `args` and head counts).

    Memory: the parameters are allocated once, at the rank's shapes, and filled one tensor at a time. A
    sharded tensor (`engine.tp.shard_dim`) is read as the rank's slice only (safetensors' get_slice copies
    just those elements out of the memory-mapped file), so no rank ever materialises a full sharded tensor;
    a replicated one (embedding, norms, LM head) is read whole. Peak: the shard on `device`, plus one tensor
    as read, in host memory (at most the embedding or the LM head).

    Raises ValueError (engine.tp.check_tp) for a split that does not divide, and ModelLoadError for missing
    tensors or shapes that disagree with config.json; both before any tensor is read.
    """
    from safetensors import safe_open

    args = checkpoint_args(folder)
    check_tp(args, rank, world, group)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    model = _build(args, dtype, world, group)
    params = model.state_dict()  # on meta: the names and the rank's shapes
    expected = set(params) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    with ExitStack() as stack:
        # Headers first (safe_open maps the file and parses its header only): which file holds each tensor.
        where = {}
        for f in files:
            st = stack.enter_context(safe_open(str(f), framework="pt"))
            where.update((name, st) for name in st.keys() if name in expected)  # noqa: SIM118 (not a dict)
        missing = expected - set(where)  # tensors not named in `expected` (e.g. old rotary caches) are ignored
        if missing:
            raise ModelLoadError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        dims = {name: shard_dim(name) if world > 1 else None for name in where}
        for name, st in where.items():
            want = list(params[name].shape)  # the rank's shape; the file holds the whole tensor
            if dims[name] is not None:
                want[dims[name]] *= world
            if (shape := list(st.get_slice(name).get_shape())) != want:
                raise ModelLoadError(f"{folder}: {name} has shape {shape}, config.json implies {want}")

        def fill(name: str, param: torch.Tensor) -> None:
            st, dim = where[name], dims[name]
            if dim is None:
                tensor = st.get_tensor(name)
            else:
                tensor_slice = st.get_slice(name)
                span = shard_span(tensor_slice.get_shape()[dim], rank, world)
                tensor = tensor_slice[(slice(None),) * dim + (span,)]
            param.copy_(tensor)  # to the device and dtype of the parameter

        _materialise(model, device, fill, quantize)
    return model


def dummy_model(
    args: ModelArgs,
    seed: int,
    noise: float,
    dtype: torch.dtype,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    group: dist.ProcessGroup | None = None,
    quantize: Quantize = Quantize.NONE,
) -> Transformer:
    """Random weights in the usual initialisation (normal, std 0.02; norms 1). With `noise`, every weight
    gets a further Gaussian kick of `noise` times its own scale from a second stream, so a draft built
    from the target's seed agrees with it often but not always. With `quantize` int8, the linear layers
    are quantized as they are drawn (engine.quant).

    With world > 1, rank `rank`'s tensor-parallel shard of that same model (apply_tp of the whole one, which
    the tests check): every tensor is drawn whole in the whole model's order, so the random streams stay in
    step on every rank, and only the rank's slice is kept. Peak memory is the shard plus the largest tensor.
    """
    model = _build(args, dtype, world, group)
    whole = dict(meta_transformer(args).named_parameters())  # the whole shapes; no memory
    gen = torch.Generator(device=device).manual_seed(seed)
    kick = torch.Generator(device=device).manual_seed(seed + 1_000_003)

    def fill(name: str, param: torch.Tensor) -> None:
        dim = shard_dim(name) if world > 1 else None
        p = param if dim is None else torch.empty(whole[name].shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
        if noise > 0:
            scale = 0.02 if not name.endswith("norm.weight") else 0.1
            p.add_(torch.randn(p.shape, generator=kick, device=device, dtype=p.dtype) * noise * scale)
        if dim is not None:
            param.copy_(local_part(p, dim, rank, world))

    return _materialise(model, device, fill, quantize)


def load_model(
    spec: ModelSpec,
    *,
    device: str | torch.device = "cpu",
    max_seq_len: int,
    rank: int = 0,
    world: int = 1,
    group: dist.ProcessGroup | None = None,
    graphs: CudaGraphs | None = None,
    stack: bool = False,
) -> LoadedModel:
    """The model `spec` names, ready for inference; with world > 1, rank `rank`'s tensor-parallel shard
    (engine.tp), whose forward passes run collectives on `group` (None: the default group, which may be
    formed after loading). A real checkpoint is read shard-only (`load_checkpoint`); a dummy model is drawn
    a tensor at a time, identically on every rank, each keeping its slices (`dummy_model`). `args` and `fingerprint` describe the whole model either
    way. A split that does not divide raises engine.tp.check_tp's ValueError before any weight is read.
    With `graphs` (engine.cuda_graphs.graphs_for), the passes (and prefills of up to 128 tokens) replay CUDA
    graphs; with spec.quantize int8, the linear layers hold int8 weights (engine.quant). With `stack`
    (runtime.stack_projections), each layer's q, k, v and gate, up products come stacked into one matrix each
    (Transformer.stack_projections)."""
    device = torch.device(device)
    dtype = TORCH_DTYPES[spec.dtype]
    if spec.is_dummy:
        args = ModelArgs.from_hf(_shape_config(spec.model[len("dummy:") :]))
        _check_fits(args, max_seq_len, spec.model)
        check_tp(args, rank, world, group)
        model = dummy_model(args, spec.seed, spec.noise, dtype, device, rank, world, group, spec.quantize)
        tokenizer: Tokenizer = ByteTokenizer(args.vocab_size)
    else:
        folder = resolve_checkpoint(spec.model)
        args = checkpoint_args(folder)
        _check_fits(args, max_seq_len, spec.model)
        model = load_checkpoint(folder, dtype, device, rank=rank, world=world, group=group, quantize=spec.quantize)
        tokenizer = HFTokenizer(folder, args.eos_token_ids)
    if stack:  # q/k/v and gate/up as one product each: fewer, larger products per layer (runtime.stack_projections)
        model.stack_projections()
    model.eval().requires_grad_(False)
    # Row-by-row attention buys bfloat16 batch invariance on the CPU (docs/engine.md); on a GPU it would
    # cost a kernel launch per row and layer, and the GPU path makes its own guarantees.
    model.exact_rows = device.type == "cpu"
    if device.type == "cuda":
        # cuDNN's attention builds an execution plan per new key length: 3 ms of host time per call, every
        # decode step (measured on an H100, torch 2.11). The other SDPA kernels have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)
        model.graphs = graphs
    return LoadedModel(spec.model, model, tokenizer, fingerprint(model), args)
