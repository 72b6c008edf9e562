"""The judge head and its file format.

A judge is a linear head on the target's last-layer hidden state of each draft token (Bachmann et al.
2025): score_i = w . h_i + b, accept when sigmoid(score_i) > threshold. About `hidden` + 1 parameters.

File format (safetensors): tensors `weight` [hidden] and `bias` [1] in float32; metadata
  format            "judgeserve-judge/1"
  threshold         the default threshold (a float, as text)
  target_name       the model the head was trained on (for messages)
  target_fingerprint engine.weights.fingerprint of that model; loading on another target is refused
  hidden_size       the hidden size, checked against the target
  trained           free text: data, date, figures (optional)
Not for: training (see the judge training pipeline) or the accept rule (engine.verify).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "judgeserve-judge/1"


class JudgeError(ValueError):
    """A judge file that cannot be used with this target; the message says why."""


@dataclass(frozen=True)
class JudgeHead:
    weight: torch.Tensor  # [hidden] float32
    bias: float
    threshold: float
    target_name: str
    target_fingerprint: str
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[0]

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., hidden] -> judge logits [...] (float32; sigmoid of these is the probability)."""
        return hidden.float() @ self.weight.to(hidden.device) + self.bias

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {
            "format": FORMAT,
            "threshold": repr(float(self.threshold)),
            "target_name": self.target_name,
            "target_fingerprint": self.target_fingerprint,
            "hidden_size": str(self.hidden_size),
            **self.notes,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.float().contiguous(), "bias": torch.tensor([float(self.bias)])}
        save_file(tensors, str(path), metadata=meta)


def load_judge(path: str | Path, *, target_name: str, target_fingerprint: str, hidden_size: int) -> JudgeHead:
    """Loads a judge file for a target, refusing one that was trained for another target."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"judge file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except Exception as err:  # safetensors raises several types for a damaged file
        raise JudgeError(f"{path} is not a judge file: {err}") from None
    if meta.get("format") != FORMAT:
        raise JudgeError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("target_fingerprint") != target_fingerprint:
        raise JudgeError(
            f"{path} was trained for target {meta.get('target_name')!r} (fingerprint "
            f"{meta.get('target_fingerprint')}), but the loaded target is {target_name!r} (fingerprint "
            f"{target_fingerprint}); a judge reads its own target's hidden states, so train one for this target "
            "(`judgeserve judge train`) or use standard mode"
        )
    if weight.shape != (hidden_size,):
        raise JudgeError(f"{path}: weight shape {tuple(weight.shape)} does not match hidden size {hidden_size}")
    notes = {k: v for k, v in meta.items() if k not in {"format", "threshold", "target_name", "target_fingerprint", "hidden_size"}}
    return JudgeHead(
        weight=weight.float(),
        bias=float(bias.reshape(-1)[0]),
        threshold=float(meta["threshold"]),
        target_name=meta.get("target_name", ""),
        target_fingerprint=target_fingerprint,
        notes=notes,
    )
