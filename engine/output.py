"""A request's growing output: token ids with provenance, incremental text, and when to stop.

Stop rules, in order: a stop token id (kept), EOS (kept in ids, never in text; unless ignore_eos),
max_tokens, then stop strings (the text ends before the stop string; ids end with the token that
completed it). Text deltas never end inside a UTF-8 character, so the deltas joined equal the final text.
Not for: choosing tokens (engine.verify, engine.sampling).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from engine.verify import Provenance


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the client or a deadline
    ERROR = "error"


@dataclass
class Output:
    tokenizer: Tokenizer
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    provenance: list[Provenance] = field(default_factory=list)
    text: str = ""  # the text streamed so far: the concatenation of every delta
    finish: FinishReason | None = None

    def extend(self, tokens: list[int], provenance: list[Provenance]) -> str:
        """Appends one step's tokens; returns the new text (possibly empty). Sets `finish` when done."""
        p = self.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.tokenizer.eos_ids))
        for tok, prov in zip(tokens, provenance):
            self.token_ids.append(tok)
            self.provenance.append(prov)
            if tok in stop_ids:
                self.finish = FinishReason.STOP
                break
            if len(self.token_ids) >= p.max_tokens:
                self.finish = FinishReason.LENGTH
                break
        full = self.tokenizer.decode(self.token_ids)
        if p.stop:
            full = self._cut_at_stop_string(full)
        if self.finish is None:
            full = full.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its other bytes
            full = full[: len(full) - self._stop_prefix_len(full)]
        if not full.startswith(self.text):
            # A tokenizer whose decode is not prefix-stable; keep the stream consistent, emit nothing now.
            return ""
        delta = full[len(self.text) :]
        self.text = full
        return delta

    def _stop_prefix_len(self, full: str) -> int:
        """The length of the longest tail of `full` that begins a stop string: held back from the stream
        until the next tokens tell whether the stop string completes (then it is cut, never streamed)."""
        longest = max((len(s) for s in self.params.stop), default=1) - 1
        for n in range(min(len(full), longest), 0, -1):
            if any(s.startswith(full[-n:]) for s in self.params.stop):
                return n
        return 0

    def _cut_at_stop_string(self, full: str) -> str:
        window = max(len(s) for s in self.params.stop)
        begin = max(0, len(self.text) - window)
        hits = [(i, s) for s in self.params.stop if (i := full.find(s, begin)) >= 0]
        if not hits:
            return full
        index, stop = min(hits)
        # Keep the ids up to the token that completed the first stop string.
        while len(self.token_ids) > 1 and stop in self.tokenizer.decode(self.token_ids[:-1])[begin:]:
            self.token_ids.pop()
            self.provenance.pop()
        self.finish = FinishReason.STOP
        return full[:index]
