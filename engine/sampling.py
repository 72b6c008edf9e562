"""Per-request sampling parameters and the logits -> distribution transform shared by draft and target.

Speculative sampling is exact for whatever distribution both models sample from, so the draft's q and the
target's p go through the same `probabilities` (temperature, then top-k, then top-p) before verification.
Not for: stop conditions on text (engine.output) or verification (engine.verify).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (and so is anything below GREEDY_BELOW)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh seed per request
    stop: tuple[str, ...] = ()  # output ends before the first occurrence of any of these
    stop_token_ids: tuple[int, ...] = ()  # output ends after any of these (the token is kept)
    ignore_eos: bool = False
    _checked: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens < 1:
            problems.append("max_tokens must be at least 1")
        if not (0.0 <= self.temperature <= 100.0):
            problems.append("temperature must be in [0, 100]")
        if self.top_k < 0:
            problems.append("top_k must be >= 0 (0 turns it off)")
        if not (0.0 < self.top_p <= 1.0):
            problems.append("top_p must be in (0, 1]")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            problems.append("seed must be in [0, 2^63)")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            problems.append(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_STRING_CHARS} chars")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        # logits / 1e-137 overflow to inf and softmax gives NaN (found by tests/cluster/test_fuzz.py);
        # a temperature this small is argmax anyway (vLLM's _SAMPLING_EPS is the same 1e-5).
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [..., vocab] float32 -> probabilities [..., vocab] after temperature, top-k and top-p."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        # The most likely token always stays: a top_p below float32's smallest value rounds to 0, which
        # would drop every token (found by tests/cluster/test_fuzz.py).
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """probs: [..., vocab] -> token ids [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


def next_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits: [vocab] -> one token: argmax when greedy, else a sample."""
    if params.greedy:
        return int(logits.argmax())
    return int(sample(probabilities(logits, params), gen))
