"""Text <-> token ids for the engine: the checkpoint's own tokenizer, or a byte tokenizer for dummy models.

The engine only ever calls `encode`, `decode`, `chat` and reads `eos_ids`; the draft and target of a pair
must share one vocabulary, and the target's tokenizer and chat template are used for both.
Not for: incremental detokenization and stop strings (engine.output does that on top of `decode`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

ChatMessage = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class Tokenizer(Protocol):
    vocab_size: int
    eos_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...


class HFTokenizer:
    """A transformers tokenizer loaded from a checkpoint folder (tokenizer.json + chat template)."""

    def __init__(self, folder: Path, eos_ids: tuple[int, ...]):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(folder))
        self.vocab_size = len(self._tok)
        extra = (self._tok.eos_token_id,) if self._tok.eos_token_id is not None else ()
        self.eos_ids = tuple(dict.fromkeys(eos_ids + extra))
        self.has_chat_template = bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not self.has_chat_template:
            return self.encode("\n".join(m["content"] for m in messages) + "\n")
        out = self._tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; `eos` is 256; ids past 256 (a dummy model's larger vocabulary) decode
    to nothing. Enough to drive random-weight models with text in tests and benchmarks."""

    EOS = 256

    def __init__(self, vocab_size: int):
        if vocab_size <= self.EOS:
            raise ValueError("a byte tokenizer needs a vocabulary of at least 257 ids")
        self.vocab_size = vocab_size
        self.eos_ids = (self.EOS,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.encode(text)
