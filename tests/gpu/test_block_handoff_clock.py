"""actors.handoff on a GPU: the verification queued behind a hand-off reads the block the drafting wrote, and
its clock (BlockHandoff.since_taken) counts the verification, not its wait for the drafting."""

from __future__ import annotations

import time

import torch

from actors.handoff import BlockHandoff

DRAFTING_S = 0.2


def test_take_waits_for_the_drafting_and_its_clock_does_not_count_the_wait():
    own = BlockHandoff.create(torch.device("cuda"), rows=2)  # the same process on both sides: no IPC needed
    drafting = torch.cuda.Stream()
    block = torch.arange(7, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(drafting):  # the draft worker's side: a long drafting, then the block
        torch.cuda._sleep(int(DRAFTING_S * 2e9))  # GPU cycles; at most ~2 GHz, so at least DRAFTING_S
        own.put({1: block * 3})
    t0 = time.perf_counter()
    taken = own.take(1, 7)
    clock = own.since_taken()
    read = (taken + 1).tolist()
    verify_s, wall_s = clock(), time.perf_counter() - t0
    assert read == (block * 3 + 1).tolist()
    assert wall_s > DRAFTING_S / 4  # the read did wait for the drafting
    assert verify_s < wall_s / 4  # and the clock did not count it
