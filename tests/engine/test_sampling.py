"""engine.sampling at the edges of its ranges (cases the gRPC fuzz test found)."""

from __future__ import annotations

import torch

from engine.sampling import SamplingParams, next_token, probabilities


def test_a_vanishing_temperature_decodes_greedily():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.9])
    params = SamplingParams(temperature=1.5e-137)
    assert params.greedy
    assert next_token(logits, params, torch.Generator().manual_seed(0)) == 1


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.9])
    probs = probabilities(logits, SamplingParams(temperature=0.7, top_p=8.5e-131))
    assert torch.equal(probs, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert next_token(logits, SamplingParams(temperature=0.7, top_p=8.5e-131), torch.Generator().manual_seed(0)) == 1
