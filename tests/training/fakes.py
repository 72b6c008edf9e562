"""Fakes for the training tests: a tokenizer that shows token ids as text, and a task whose right labels are
known in advance."""

from __future__ import annotations

from dataclasses import replace

from engine.decode import Engine
from training.tasks import Outcome


class IdTokenizer:
    """Decodes ids as space-separated numbers (EOS dropped), so that a checker sees tokens, not bytes."""

    def __init__(self, eos_ids: tuple[int, ...], vocab_size: int):
        self.eos_ids, self.vocab_size = eos_ids, vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids if i not in self.eos_ids)

    def chat(self, messages) -> list[int]:
        return self.encode(messages[-1]["content"])


def id_engine(engine: Engine) -> Engine:
    """The same models, with IdTokenizer."""
    tok = IdTokenizer(engine.tokenizer.eos_ids, engine.tokenizer.vocab_size)
    return Engine(engine.config, replace(engine.target, tokenizer=tok), engine.draft, None)


class PrefixTask:
    """A fake task whose answer is its first `m` tokens (with IdTokenizer): a swapped-in draft token at answer
    position i changes the outcome exactly when i < m."""

    def __init__(self, task_id: str, prompt: str, m: int):
        self.id, self.prompt, self.m = task_id, prompt, m

    def messages(self):
        return [{"role": "user", "content": self.prompt}]

    def outcome(self, text: str) -> Outcome:
        return Outcome(" ".join(text.split()[: self.m]), True)
