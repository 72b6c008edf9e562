"""Forward-pass latency of the real pair on this CPU, float32 against bfloat16, for the passes decoding uses:
a one-token decode and verification passes of K+1 tokens, after a 100-token prompt at a new length each time.

    python3 -m bench.pass_latency [--config config/qwen-coder.yaml] [--out bench/results/pass_latency.json]

Picks the dtype: the faster one that keeps greedy speculative output equal to autoregressive output
(tests/engine/test_real_pair.py checks the latter for bfloat16).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench import header, write_results
from engine.config import load_config
from engine.weights import TORCH_DTYPES, load_checkpoint, resolve_checkpoint

PASSES = (1, 5, 9, 17)


def median_ms(model, rows: int, repeats: int = 5) -> float:
    cache = model.new_cache(1024)
    model(torch.randint(0, 1000, (1, 100)), cache, last_only=True)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(torch.randint(0, 1000, (1, rows)), cache)
        times.append(time.perf_counter() - t)
        cache.truncate(cache.length - rows + 1)  # the next pass lands at a new length, as in decoding
    return 1000 * statistics.median(times)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/qwen-coder.yaml")
    ap.add_argument("--out", type=Path, default=Path("bench/results/pass_latency.json"))
    args = ap.parse_args()
    config = load_config(args.config)
    table = {}
    for role, spec in (("target", config.target), ("draft", config.draft)):
        folder = resolve_checkpoint(spec.model)
        for dtype in ("float32", "bfloat16"):
            model = load_checkpoint(folder, TORCH_DTYPES[type(spec.dtype)(dtype)], torch.device("cpu"))
            table[f"{role} {dtype}"] = {rows: round(median_ms(model, rows), 1) for rows in PASSES}
            del model
    print(f"median ms per pass ({torch.get_num_threads()} threads); columns: tokens in the pass")
    print("| model | " + " | ".join(str(r) for r in PASSES) + " |")
    print("|---|" + "---:|" * len(PASSES))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[r]:.0f}" for r in PASSES) + " |")
    record = {
        **header("bench.pass_latency", "CPU (this machine: 2 cores, no GPU)"),
        "median_ms_per_pass": table,
    }
    write_results(args.out, record)


if __name__ == "__main__":
    main()
