"""Acceptance traces: how many draft tokens each speculative step accepted, recorded on a real-model run and
replayed on dummy weights at real shapes.

Real weights cannot reach the GPU machine, and random weights accept almost nothing, so a GPU benchmark of
speculative decoding replays a trace: every step does the real work (K draft passes, one verification of
K+1 tokens, the judge, the rollback), then accepts as many tokens as the recorded step did. The text of a
replayed run is meaningless and its speed is that of the recorded acceptance; every output of such a run
says "replayed" and names the trace. A synthetic trace (`synthetic`) stands in for acceptance no model
here produces, such as the paper's 19.7 tokens per step.

File format (JSON): {"format": "judgeserve-acceptance-trace/1", "source": what it was recorded on, "mode":
"standard" or "judge", "draft_tokens": K, "accepted": [n per speculative step], "judged": [of those n, how
many only the judge accepted]}.

Not for: choosing tokens (the replayed tokens are the draft's own, cut at the recorded length).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import DecodingConfig
from engine.verify import Verdicts, accepted_length, verdict_list

FORMAT = "judgeserve-acceptance-trace/1"


class TraceError(ValueError):
    """A trace file that cannot be replayed (the message says what is wrong)."""


@dataclass
class AcceptanceTrace:
    source: str
    mode: str  # how the recorded run accepted: standard or judge
    draft_tokens: int  # K of the recorded run
    accepted: list[int] = field(default_factory=list)  # n per speculative step, 0..K
    judged: list[int] = field(default_factory=list)  # of n, accepted by the judge alone

    @property
    def mean_tokens_per_step(self) -> float:
        """E[n + 1]: what a speculative step emits on average under this trace."""
        return 1 + sum(self.accepted) / len(self.accepted) if self.accepted else 0.0

    def save(self, path: Path) -> None:
        record = {"format": FORMAT, "source": self.source, "mode": self.mode, "draft_tokens": self.draft_tokens,
                  "accepted": self.accepted, "judged": self.judged}
        Path(path).write_text(json.dumps(record) + "\n")

    @classmethod
    def load(cls, path: Path) -> "AcceptanceTrace":
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise TraceError(f"{path}: not a readable trace ({err})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise TraceError(f"{path}: not a {FORMAT} file")
        trace = cls(str(record.get("source", "")), record.get("mode"), record.get("draft_tokens"),
                    record.get("accepted"), record.get("judged"))
        k = trace.draft_tokens
        if trace.mode not in ("standard", "judge") or not isinstance(k, int) or not 1 <= k <= 128:
            raise TraceError(f"{path}: mode must be standard or judge and draft_tokens in [1, 128]")
        steps = trace.accepted
        if not isinstance(steps, list) or not steps or not isinstance(trace.judged, list) or len(trace.judged) != len(steps):
            raise TraceError(f"{path}: accepted must be a non-empty list, judged a list of the same length")
        for n, j in zip(steps, trace.judged):
            if not (isinstance(n, int) and isinstance(j, int) and 0 <= j <= n <= k):
                raise TraceError(f"{path}: every step needs 0 <= judged <= accepted <= draft_tokens ({k})")
        return trace

    @classmethod
    def synthetic(
        cls, mean_tokens_per_step: float, draft_tokens: int, steps: int = 4096, seed: int = 0, runs: bool = False
    ) -> "AcceptanceTrace":
        """A judge trace whose steps emit `mean_tokens_per_step` on average: n ~ Binomial(K, p), p chosen for
        the mean (the paper's 8B/70B judge: about 19.7 tokens per step). With `runs`, n is the first
        rejection of independent draft tokens each accepted with probability a (a truncated geometric, a
        chosen for the mean): acceptance as a prefix, so whole blocks are accepted as often as a^K, which is
        what pipelining's reuse depends on."""
        k, want = draft_tokens, mean_tokens_per_step - 1
        if not 0 <= want <= k:
            raise TraceError(f"a mean of {mean_tokens_per_step} tokens per step needs 0 <= mean - 1 <= K ({k})")
        rng = random.Random(seed)
        if not runs:
            accepted = [sum(rng.random() < want / k for _ in range(k)) for _ in range(steps)]
        else:
            low, high = 0.0, 1.0  # E[n] = a (1 - a^K) / (1 - a) grows with a: bisect for the mean
            for _ in range(60):
                a = (low + high) / 2
                low, high = (a, high) if sum(a**i for i in range(1, k + 1)) < want else (low, a)
            accepted = []
            for _ in range(steps):
                n = 0
                while n < k and rng.random() < a:
                    n += 1
                accepted.append(n)
        shape = "prefix runs" if runs else "binomial"
        return cls(f"synthetic ({shape}): mean {mean_tokens_per_step} tokens per step", "judge", k, accepted, [0] * steps)

    @property
    def token_acceptance(self) -> float:
        """The per-token acceptance rate a prefix model fits to the trace: accepted tokens / (accepted tokens +
        steps that stopped at a rejection)."""
        accepted = sum(self.accepted)
        stopped = sum(n < self.draft_tokens for n in self.accepted)
        return accepted / (accepted + stopped) if accepted + stopped else 0.0


class TraceRecorder:
    """Engine hook that records each speculative step's acceptance and changes nothing."""

    def __init__(self, source: str, mode: str, draft_tokens: int):
        self.trace = AcceptanceTrace(source, mode, draft_tokens)

    def start(self) -> None:
        """A request begins (nothing to do: steps are appended in the order they run)."""

    def __call__(self, matched: Verdicts, judged: Verdicts | None) -> tuple[Verdicts, Verdicts | None]:
        n = accepted_length(matched, judged)
        self.trace.accepted.append(n)
        self.trace.judged.append(sum(not m for m in verdict_list(matched)[:n]))
        return matched, judged


class TraceReplayer:
    """Engine hook that replaces each speculative step's verdicts by the trace's next step (cycling): the
    first n - j draft tokens matched, the next j judged, the rest rejected (n clipped to this step's K).

    Each request replays the trace from its start (`start`; `for_request` for one of many concurrent
    requests), so a request replays the same steps whenever and beside whatever it runs: a benchmark's
    untimed round meets every pass shape of its timed round (the short blocks near max_tokens too), the
    served and in-process paths give the same output, and a recorded run replays step for step. Concurrent
    replayed requests therefore accept alike, step by step."""

    def __init__(self, trace: AcceptanceTrace, guesses: bool = False):
        self.trace, self.position = trace, 0
        self.guesses = guesses
        self.steps = 0  # replayed so far, all requests
        self._rng = random.Random(0)

    def start(self) -> None:
        """A request begins: its steps replay from the trace's first, its pipelined guesses from a fresh
        stream."""
        self.position = 0
        self._rng = random.Random(0)

    def for_request(self) -> TraceReplayer:
        """A replayer of the same trace for one of many concurrent requests (each keeps its own place)."""
        return TraceReplayer(self.trace, self.guesses)

    def guess_is_right(self) -> bool:
        """With `guesses` (decoding.replay_guesses): whether a pipelined guess of the bonus counts as right,
        drawn at the trace's per-token acceptance rate (on dummy weights the two models never agree)."""
        return self.guesses and self._rng.random() < self.trace.token_acceptance

    @property
    def label(self) -> str:
        guesses = f"; pipelined guesses right at {self.trace.token_acceptance:.3f}" if self.guesses else ""
        return f"replayed acceptance ({self.trace.mode} trace: {self.trace.source}{guesses})"

    def __call__(self, matched: Verdicts, judged: Verdicts | None) -> tuple[list[bool], list[bool]]:
        i = self.position % len(self.trace.accepted)
        self.position += 1
        self.steps += 1
        k = len(matched)
        n = min(self.trace.accepted[i], k)
        j = min(self.trace.judged[i], n)
        return [d < n - j for d in range(k)], [n - j <= d < n for d in range(k)]


AcceptanceHook = TraceRecorder | TraceReplayer


def replayer_for(decoding: DecodingConfig) -> TraceReplayer | None:
    """The replayer decoding.replay_trace asks for (the engine's and the scheduler's), or None."""
    path = decoding.replay_trace
    return TraceReplayer(AcceptanceTrace.load(path), decoding.replay_guesses) if path is not None else None

