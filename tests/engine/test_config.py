"""engine.config: the shipped configs load, and every bad config fails with the dotted path of the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Config, ConfigError, DraftPlacement, DType, Mode, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"

TINY = """\
name: t
target: {model: "dummy:tiny"}
draft: {model: "dummy:tiny", noise: 0.1}
decoding: {mode: standard}
"""


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(CONFIG_DIR / name)
    assert isinstance(config, Config) and config.name


def test_tiny_config_values():
    config = load_config(CONFIG_DIR / "tiny.yaml")
    assert config.target.is_dummy and config.target.model == "dummy:tiny"
    assert config.draft.noise == 0.1
    assert config.decoding.mode is Mode.STANDARD
    assert config.target.dtype is DType.FLOAT32


def test_qwen_coder_config_values():
    config = load_config(CONFIG_DIR / "qwen-coder.yaml")
    assert config.target.model == "qwen2.5-coder-1.5b-instruct"
    assert config.draft.model == "qwen2.5-coder-0.5b-instruct"
    assert not config.target.is_dummy


@pytest.mark.parametrize(
    ("name", "target", "tp"),
    [
        ("llama-8b-70b.yaml", "/models/Llama-3.1-70B-Instruct", 2),
        ("llama-8b-405b.yaml", "/models/Llama-3.1-405B-Instruct", 8),
    ],
)
def test_llama_gpu_configs_put_target_and_draft_on_tp_gpus_of_local_checkpoints(name, target, tp):
    config = load_config(CONFIG_DIR / name)
    assert config.target.model == target and config.draft.model == "/models/Llama-3.1-8B-Instruct"
    assert config.target.dtype is DType.BFLOAT16 and config.runtime.device == "cuda"
    assert config.serve.tensor_parallel == tp and config.serve.draft_placement is DraftPlacement.SHARE_GPU


def test_overrides_replace_values():
    config = load_config(CONFIG_DIR / "tiny.yaml", {"decoding.max_seq_len": 1024, "runtime.threads": 1})
    assert config.decoding.max_seq_len == 1024 and config.runtime.threads == 1


def test_config_is_frozen():
    config = load_config(CONFIG_DIR / "tiny.yaml")
    with pytest.raises(Exception):
        config.decoding.draft_tokens = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"serve.draft_placment": "own_node"}, "serve.draft_placment"),
        ({"decoding.draf_tokens": 4}, "decoding.draf_tokens"),
        ({"target.dtyp": "float32"}, "target.dtyp"),
        ({"extra_section.x": 1}, "extra_section"),
    ],
)
def test_misspelt_key_names_the_dotted_path(overrides, path):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "tiny.yaml", overrides)
    assert path in str(err.value)
    assert "unknown field" in str(err.value)


def test_misspelt_key_in_file_names_file_and_path(tmp_path):
    path = _write(tmp_path, TINY.replace("{mode: standard}", "{mode: standard, draf_tokens: 4}"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "decoding.draf_tokens" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"decoding.draft_tokens": 0}, "decoding.draft_tokens"),
        ({"decoding.draft_tokens": 129}, "decoding.draft_tokens"),
        ({"decoding.max_seq_len": 8}, "decoding.max_seq_len"),
        ({"decoding.mode": "fast"}, "decoding.mode"),
        ({"serve.draft_placement": "anywhere"}, "serve.draft_placement"),
        ({"serve.placement_timeout_s": 0}, "serve.placement_timeout_s"),
        ({"target.dtype": "int8"}, "target.dtype"),
        ({"draft.noise": -1.0}, "draft.noise"),
        ({"runtime.device": "tpu"}, "runtime.device"),
        ({"judge.threshold": 1.5}, "judge.threshold"),
    ],
)
def test_bad_value_names_the_field(overrides, path):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "tiny.yaml", overrides)
    assert path in str(err.value)


def test_draft_tokens_must_fit_max_seq_len():
    with pytest.raises(ConfigError, match="draft_tokens"):
        load_config(CONFIG_DIR / "tiny.yaml", {"decoding.draft_tokens": 100, "decoding.max_seq_len": 100})


def test_judge_mode_without_judge_path_is_refused():
    with pytest.raises(ConfigError, match="judge.path"):
        load_config(CONFIG_DIR / "tiny.yaml", {"decoding.mode": "judge"})


def test_judge_mode_is_the_default_and_needs_a_judge(tmp_path):
    path = _write(tmp_path, TINY.replace("decoding: {mode: standard}\n", ""))
    with pytest.raises(ConfigError, match="judge.path"):
        load_config(path)


def test_relative_judge_path_resolves_against_config_folder(tmp_path):
    path = _write(tmp_path, TINY.replace("{mode: standard}", "{mode: judge}") + "judge: {path: judges/h.safetensors}\n")
    config = load_config(path)
    assert config.judge.path == tmp_path / "judges" / "h.safetensors"
    assert config.decoding.mode is Mode.JUDGE


def test_bad_yaml_is_a_config_error(tmp_path):
    path = _write(tmp_path, "name: [unclosed\ntarget: {model: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_missing_required_section_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "name: x\ntarget: {model: 'dummy:tiny'}\ndecoding: {mode: standard}\n"))
    assert "draft" in str(err.value)
