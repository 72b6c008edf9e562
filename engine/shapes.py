"""Named model shapes for dummy (random) weights: the real models' config.json fields, and tiny ones for tests.

Benchmarks at real shapes use these, since the GPU machine cannot receive real weights; `dummy:<name>` in a
config picks one, `dummy:/path/config.json` takes any other.
"""

from __future__ import annotations

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = 128256, tie: bool = False, rope_factor: float = 8.0
) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE, factor=rope_factor),
        "tie_word_embeddings": tie,
        "max_position_embeddings": 131072,
        "eos_token_id": [128001, 128008, 128009],
    }


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool) -> dict:
    return {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tie,
        "max_position_embeddings": 32768,
        "eos_token_id": 151645,
    }


SHAPES: dict[str, dict] = {
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, tie=True, rope_factor=32.0),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, tie=True, rope_factor=32.0),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8),
    "llama-3.1-405b": _llama(16384, 53248, 126, 128, 8),
    "qwen2.5-coder-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, tie=True),
    # as MODELS.md's GGUF loads: its LM head is a tensor of its own (the model card's 1.54B counts it tied)
    "qwen2.5-coder-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, tie=False),
    # Tests: a byte vocabulary (256 bytes + eos + spares) so the byte tokenizer drives them with text.
    "tiny": {**_qwen2(64, 128, 4, 4, 2, 272, tie=False), "eos_token_id": 256},
    "tiny-llama": {**_llama(64, 160, 3, 4, 1, vocab=272), "eos_token_id": 256},
    # TP=8 on CPUs (the 405B layout, tests and bench runs over gloo): 8 heads and 8 kv heads split 8 ways.
    "tiny-tp8": {**_llama(64, 128, 2, 8, 8, vocab=272), "eos_token_id": 256},
}
