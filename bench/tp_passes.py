"""Pass latency of a tensor-parallel target, without Ray: where a TP rank's verification time goes.

    source .device/bootstrap.sh && python3 -m bench.tp_passes --model dummy:llama-3.1-70b --quantize int8 \
        --compile --rows 1,2,17,33 --profile 1,17 --out $OUT/tp_passes.json

One process per rank on this node (NCCL on GPUs, gloo with --device cpu), each loading its shard as a
target shard actor does (engine.weights.load_model; CUDA graphs, and torch.compile with --compile). After a
--prompt-len prefill, each row count's pass runs 12 times from the same cache length, and rank 0 reports
the median wall time (a pass and its sync, what actors.target_shard times as a verification's compute),
next to the same number of all-reduces alone (2 per layer, [rows, hidden] in the model's dtype, captured in
one graph on GPUs), so a row count's cost splits into the collectives and the rest. --profile names row
counts whose replay torch.profiler records on rank 0: the kernels that take the time, by total.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import command_line, median_ms, sync, write_results
from engine.config import ModelSpec
from engine.cuda_graphs import CudaGraphs
from engine.tp import exit_rank
from engine.weights import load_model


def _all_reduces(n: int, rows: int, hidden: int, dtype: torch.dtype, device: torch.device):
    """A callable running n all-reduces of [rows, hidden], as one captured graph on a GPU."""
    x = torch.ones(rows, hidden, dtype=dtype, device=device)

    def run() -> None:
        for _ in range(n):
            dist.all_reduce(x)

    if device.type != "cuda":
        return run
    run()  # warm-up outside the capture: NCCL sets up its buffers
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def _profile(fn, top: int) -> list[str]:
    """The `top` kernels of three calls of fn by total device time, as table lines."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top).splitlines()


@torch.inference_mode()
def _rank(rank: int, world: int, init: str, args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(minutes=5), **({"device_id": device} if cuda else {}))
    try:
        spec = ModelSpec(model=args.model, dtype=args.dtype, quantize=args.quantize)
        graphs = CudaGraphs(compile=args.compile, capture=cuda, attention_kernel=cuda and args.attention_kernel)
        t = time.perf_counter()
        loaded = load_model(
            spec, device=device, max_seq_len=args.max_seq_len, rank=rank, world=world, graphs=graphs, stack=args.stack
        )
        load_s = time.perf_counter() - t
        model, hidden = loaded.model, loaded.args.hidden_size
        dtype = model.model.embed_tokens.weight.dtype
        cache = model.new_cache(args.max_seq_len)
        model(torch.arange(args.prompt_len, device=device)[None] % 1000, cache, last_only=True)
        record: dict = {"load_s": round(load_s, 1), "pass_ms": {}, "all_reduces_ms": {}, "first_pass_s": {}, "profile": {}}
        for rows in args.rows:
            tokens = (torch.arange(rows, device=device)[None] * 7) % 1000

            def one_pass(tokens=tokens) -> None:
                cache.length = args.prompt_len
                model(tokens, cache)

            t = time.perf_counter()
            one_pass()  # the first pass of a shape captures (and compiles) its graph
            sync(device)
            record["first_pass_s"][rows] = round(time.perf_counter() - t, 1)
            record["pass_ms"][rows] = median_ms(one_pass, device)
            reduces = _all_reduces(2 * loaded.args.num_layers, rows, hidden, dtype, device)
            record["all_reduces_ms"][rows] = median_ms(reduces, device)
            if cuda and rows in args.profile:
                lines = _profile(one_pass, args.top)
                if rank == 0:
                    record["profile"][rows] = lines
            if rank == 0:
                print(f"{rows} rows: pass {record['pass_ms'][rows]:.2f} ms, its {2 * loaded.args.num_layers} "
                      f"all-reduces alone {record['all_reduces_ms'][rows]:.2f} ms (first pass "
                      f"{record['first_pass_s'][rows]:.1f} s)", flush=True)
        if rank == 0:
            report(args, world, record)
        # Captured NCCL kernels go before the communicator does, or the process hangs at exit
        # (engine.cuda_graphs): the model's graphs and the all-reduces' last graph.
        model.graphs = graphs = reduces = None
        gc.collect()
        sync(device)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank()  # its report written, its group destroyed: skip the interpreter's teardown (gloo's exit race)


def report(args: argparse.Namespace, world: int, record: dict) -> None:
    """Rank 0's table and JSON, written before the teardown."""
    cuda = args.device == "cuda"
    card = f"{world} x {torch.cuda.get_device_name()}" if cuda else f"CPU ({world} processes)"
    for rows, lines in record["profile"].items():
        print(f"profile, {rows} rows, rank 0 (3 passes):", *lines, sep="\n")
    print(f"{card}, {args.model} {args.dtype} {args.quantize}, TP={world}; ms per pass by rows:")
    print("| rows | pass | all-reduces alone | rest |")
    print("|---:|---:|---:|---:|")
    for rows in args.rows:
        p, r = record["pass_ms"][rows], record["all_reduces_ms"][rows]
        print(f"| {rows} | {p:.2f} | {r:.2f} | {p - r:.2f} |", flush=True)
    write_results(args.out, {
        "benchmark": "bench.tp_passes",
        "card": card,
        "date": datetime.date.today().isoformat(),
        "command": command_line("bench.tp_passes", args.argv),
        "shapes": {"target": args.model, "dtype": args.dtype, "quantize": args.quantize, "world": world,
                   "stack_projections": args.stack},
        "compile": args.compile,
        **record,
    })


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dummy:llama-3.1-70b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="none", choices=("none", "int8"))
    ap.add_argument("--world", type=int, default=2, help="tensor-parallel ranks (one GPU each)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--compile", action="store_true", help="runtime.compile: torch.compile before capture")
    ap.add_argument("--stack", action="store_true", help="runtime.stack_projections: q/k/v and gate/up stacked")
    ap.add_argument("--attention-kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="runtime.attention_kernel: one-row passes attend through engine.attention_kernel (GPU)")
    ap.add_argument("--rows", type=lambda s: [int(r) for r in s.split(",")], default=[1, 2, 17, 33])
    ap.add_argument("--profile", type=lambda s: [int(r) for r in s.split(",")], default=[],
                    help="row counts to profile (GPU only)")
    ap.add_argument("--top", type=int, default=15, help="kernels per profile")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("tp_passes.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs; this machine has {torch.cuda.device_count()}")
    args.argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.world, f"file://{tmp}/store", args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
