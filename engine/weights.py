"""Builds a ready `Transformer` (+ its tokenizer) from a `ModelSpec`: checkpoint folder, cached GGUF, a
registered name fetched into the cache, or dummy random weights at a named shape.

Not for: downloading (engine.fetch) or deciding dtypes (the config does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import DType, ModelSpec
from engine.model import ModelArgs, Transformer, rope_inv_freq
from engine.shapes import SHAPES
from engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as configured; the message says why and what to do."""


@dataclass
class LoadedModel:
    name: str  # what the config named, for logs, ModelInfo and judge metadata
    model: Transformer
    tokenizer: Tokenizer
    fingerprint: str  # identifies the weights (see `fingerprint`), for judge heads

    @property
    def args(self) -> ModelArgs:
        return self.model.args


def fingerprint(model: Transformer) -> str:
    """A short hash of the final norm's weights and the shape: distinct per checkpoint, the same across
    dtypes (hashed in bfloat16) and devices, and cheap. Judge heads record it to refuse a foreign target."""
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


def _build(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:  # to_empty gives every module a new Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    # RoPE frequencies stay float32 whatever the weights' dtype (as in transformers); set after the cast.
    model.inv_freq = rope_inv_freq(args).to(device)
    return model


def load_checkpoint(folder: Path, dtype: torch.dtype, device: torch.device) -> Transformer:
    from safetensors.torch import load_file

    args = ModelArgs.from_hf(json.loads((folder / "config.json").read_text()))
    model = _build(args, device, dtype)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing:
        raise ModelLoadError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        params = model.state_dict()
        for name in expected:
            params[name].copy_(state[name])
    del unexpected  # extra tensors (for example rotary caches of old checkpoints) are ignored
    return model


def dummy_model(args: ModelArgs, seed: int, noise: float, dtype: torch.dtype, device: torch.device) -> Transformer:
    """Random weights in the usual initialisation (normal, std 0.02; norms 1). With `noise`, every weight
    gets a further Gaussian kick of `noise` times its own scale from a second stream, so a draft built
    from the target's seed agrees with it often but not always."""
    model = _build(args, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    kick = torch.Generator(device=device).manual_seed(seed + 1_000_003)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
            if noise > 0:
                scale = 0.02 if not name.endswith("norm.weight") else 0.1
                p.add_(torch.randn(p.shape, generator=kick, device=device, dtype=p.dtype) * noise * scale)
    return model


def load_model(spec: ModelSpec, *, device: str | torch.device = "cpu", max_seq_len: int) -> LoadedModel:
    device = torch.device(device)
    dtype = TORCH_DTYPES[spec.dtype]
    if spec.is_dummy:
        args = ModelArgs.from_hf(_shape_config(spec.model[len("dummy:") :]))
        _check_fits(args, max_seq_len, spec.model)
        model = dummy_model(args, spec.seed, spec.noise, dtype, device)
        tokenizer: Tokenizer = ByteTokenizer(args.vocab_size)
    else:
        folder = resolve_checkpoint(spec.model)
        try:
            model = load_checkpoint(folder, dtype, device)
        except (KeyError, ValueError) as err:
            raise ModelLoadError(f"{folder}: {err}") from None
        _check_fits(model.args, max_seq_len, spec.model)
        tokenizer = HFTokenizer(folder, model.args.eos_token_ids)
    model.eval().requires_grad_(False)
    # Row-by-row attention buys bfloat16 batch invariance on the CPU (docs/engine.md); on a GPU it would
    # cost a kernel launch per row and layer, and the GPU path makes its own guarantees.
    model.exact_rows = device.type == "cpu"
    if device.type == "cuda":
        # cuDNN's attention builds an execution plan per new key length: 3 ms of host time per call, every
        # decode step (measured on an H100, torch 2.11). The other SDPA kernels have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return LoadedModel(spec.model, model, tokenizer, fingerprint(model))
