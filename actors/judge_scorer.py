"""The judge scorer: a Ray actor holding the judge head (Bachmann et al. 2025).

`step` (a node of actors.step_graph) turns the target's hidden states of the K draft tokens into K verdicts
with the pure functions
of the engine: engine.verify.judge_accept over engine.judge.JudgeHead.scores. It keeps no per-request
state.

Placement. On CPU the judge is a step-graph node on rank 0's node (bundle 0 of the placement group, no
CPUs of its own: a dot product per draft token). On GPU it belongs on target rank 0's GPU: the same
placement-group bundle with a fractional GPU (rank 0 taking the rest), so that the hidden states, which
rank 0 computes, never leave the GPU; the step graph's on-device transport (a later issue) needs that.
Until then the shard returns the hidden states as a CPU tensor through the graph's channel and the head
runs on the CPU, which costs about a small tensor's hop (DESIGN.md section 2).

Not for: training heads, or combining the verdict with the standard rule (the scheduler does, through
engine.verify.accepted_length).
"""

from __future__ import annotations

import time

import ray
import torch

from actors.messages import Edge, Item, JudgeOutput, from_edge, read_step_input, to_edge
from engine.config import Config
from engine.judge import JudgeHead, load_judge
from engine.verify import judge_accept


def judge_verdicts(head: JudgeHead, hidden: torch.Tensor, threshold: float) -> list[bool]:
    """hidden: [K, hidden] -> [K] verdicts, sigmoid(w . h_i + b) > threshold."""
    return judge_accept(head.scores(hidden).cpu(), threshold).tolist()


@ray.remote
class JudgeScorer:
    """Scores draft tokens with the config's judge file, loaded (`load`) for the served target once the target
    shards are up: the actor is created beside them, so its start-up overlaps their model loading."""

    def __init__(self, config: Config):
        self.config = config
        self.max_bytes = config.serve.max_record_bytes

    def load(self, target_name: str, target_fingerprint: str, hidden_size: int) -> dict:
        """Loads the judge file for this target (refusing one trained for another target); returns what the
        backend describes of it (the threshold the file was calibrated at)."""
        self.head = load_judge(
            self.config.judge.path,
            target_name=target_name,
            target_fingerprint=target_fingerprint,
            hidden_size=hidden_size,
        )
        return {
            "target_name": self.head.target_name,
            "target_fingerprint": self.head.target_fingerprint,
            "threshold": self.head.threshold,
        }

    def step(self, inp: Edge, verified: Edge) -> Edge:
        """Step-graph node (actors.step_graph): the step's input and target rank 0's outputs -> per plan a
        JudgeOutput on the hidden states [K, hidden] of d_1..d_K where the plan asks (StepPlan.judge), else
        None, as one edge value (actors.messages.to_edge)."""
        plans, _ = read_step_input(inp, self.max_bytes)
        if not any(plan.judge for plan in plans):
            return to_edge([(None, None)] * len(plans))
        results: list[Item] = []
        for plan, (_, hidden) in zip(plans, from_edge(verified, self.max_bytes * len(plans))):
            if not plan.judge:
                results.append((None, None))
                continue
            t0 = time.perf_counter()
            verdicts = judge_verdicts(self.head, hidden, plan.threshold)
            results.append((JudgeOutput(verdicts, time.perf_counter() - t0).to_bytes(), None))
        return to_edge(results)

    def active(self) -> list[str]:
        """The judge holds no per-request state; here for symmetry with the other actors' checks."""
        return []
