"""cluster.metrics: what one stream's events and Completion add to the counters (no server needed)."""

from __future__ import annotations

from prometheus_client import generate_latest

from cluster.metrics import Metrics
from engine.config import Mode
from engine.decode import Completion, StepEvent
from engine.output import FinishReason
from engine.verify import Provenance as P


def _value(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_a_stream_counts_drafts_acceptance_by_position_and_latencies():
    metrics = Metrics(lambda: (2, 3))
    observed = metrics.request()
    observed.step(StepEvent([1], [P.TARGET], "a"))  # prefill
    observed.step(StepEvent([2, 3, 4], [P.MATCHED, P.JUDGE, P.CORRECTION], "bcd"))  # 2 of K accepted
    observed.step(StepEvent([5, 6], [P.MATCHED, P.BONUS], "ef"))  # K = 1, all accepted
    observed.step(StepEvent([7], [P.CORRECTION], "g"))  # none accepted
    done = Completion("abcdefg", [1, 2, 3, 4, 5, 6, 7], [], FinishReason.LENGTH, 5, Mode.JUDGE, 4, 3, 7, 3, 1)
    observed.done(done)

    assert _value(metrics, "judgeserve_spec_decode_num_drafts_total") == 3
    assert _value(metrics, "judgeserve_spec_decode_num_draft_tokens_total") == 7
    assert _value(metrics, "judgeserve_spec_decode_num_accepted_tokens_total") == 3
    assert _value(metrics, "judgeserve_judge_accepted_tokens_total") == 1
    per_pos = "judgeserve_spec_decode_num_accepted_tokens_per_pos_total"
    assert [_value(metrics, per_pos, {"position": str(i)}) for i in range(3)] == [2, 1, 0]
    assert _value(metrics, "judgeserve_generation_tokens_total") == 7
    assert _value(metrics, "judgeserve_time_to_first_token_seconds_count") == 1
    assert _value(metrics, "judgeserve_inter_token_latency_seconds_count") == 6  # per token after the first step
    assert _value(metrics, "judgeserve_e2e_request_latency_seconds_count") == 1
    assert _value(metrics, "judgeserve_requests_total", {"finish_reason": "length", "mode": "judge"}) == 1
    assert _value(metrics, "judgeserve_num_requests_running") == 2
    assert _value(metrics, "judgeserve_num_requests_waiting") == 3
    assert b"judgeserve_spec_decode_num_drafts_total 3.0" in generate_latest(metrics.registry)
