"""actors.handoff on a GPU: the verification queued behind a hand-off reads the block the drafting wrote, and
its clock (BlockHandoff.since_taken) counts the verification, not its wait for the drafting."""

from __future__ import annotations

import time

import torch

from actors.handoff import BlockHandoff


def test_take_waits_for_the_drafting_and_its_clock_does_not_count_the_wait():
    own = BlockHandoff.create(torch.device("cuda"), rows=2)  # the same process on both sides: no IPC needed
    drafting = torch.cuda.Stream()
    block = torch.arange(7, device="cuda")
    began, drew = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(drafting):  # the draft worker's side: a long drafting, then the block
        began.record()
        torch.cuda._sleep(1_000_000_000)  # GPU clock cycles: a drafting of a few hundred ms (its own events time it)
        drew.record()
        own.put({1: block * 3})
    taken = own.take(1, 7)
    clock = own.since_taken()
    read = (taken + 1).tolist()
    verify_s, wall_s = clock(), time.perf_counter() - t0
    drafting_s = began.elapsed_time(drew) / 1e3
    assert read == (block * 3 + 1).tolist()
    assert drafting_s > 0.01 and wall_s > 0.9 * drafting_s  # the read did wait for the drafting
    assert verify_s < drafting_s / 4  # and the clock did not count it
