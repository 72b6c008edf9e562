"""Benchmarks: each module's docstring gives its command; results are small JSON files under bench/results/."""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run: Callable[[], None], device: torch.device, repeats: int = 12, skip: int = 2) -> float:
    """The median wall time of `run` in ms, each call synced before and after, the first `skip` left out."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(times[skip:]), 3)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command a result file records: the benchmark's module and its arguments as given (sys.argv's
    unless a caller passed its own), quoted so that it can be pasted into a shell."""
    return shlex.join(["python3", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def header(module: str, card: str, argv: list[str] | None = None) -> dict:
    """The fields every result file starts with: the benchmark, the card it ran on, the date, the command."""
    return {"benchmark": module, "card": card, "date": datetime.date.today().isoformat(), "command": command_line(module, argv)}


def write_results(out: Path, record: dict) -> dict:
    """Writes a benchmark's results as indented JSON (the folder made if missing), says where, returns them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record
