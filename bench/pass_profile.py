"""Where one pass's time goes: the kernels of a pass of R rows, grouped into matrix products, attention and
the rest, at a real shape on dummy weights, through the pass the engine decodes with (captured CUDA graphs,
torch.compile'd unless --no-compile; the device's kernels as torch.profiler records them inside the graphs).

    source .device/bootstrap.sh && python3 -m bench.pass_profile --rows 1,2,9,17 --out $OUT/pass_profile.json

Per row count: the pass's wall time, the kernels' summed time (the gap between the two is the device idling
between kernels), the time of each group, and the costliest kernels by name, each per pass. On a CPU
(--device cpu: the tests) the same passes' operators are grouped instead, by their self CPU time.

Asked by measurement 2 (docs/performance.md): a pass of 2 rows costs about 1.5x a pass of one on an H100
(8.11 against 5.56 ms), its products running cuBLAS where a one-row pass's run inductor's reductions, and its
attention SDPA where a one-row pass's runs engine.attention_kernel; which of the two holds the difference is
what this measures.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import header, sync, write_results
from engine.config import ModelSpec, RuntimeConfig
from engine.cuda_graphs import graphs_for
from engine.weights import load_model

# kernel or operator name fragments, first match wins (lower case)
GROUPS = (
    # inductor's kernels are named after every op fused into them: one with a product in it is a product
    # (a one-row pass's tuned reductions, the norm or rotary before them riding along)
    ("matrix products", ("_mm_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "_partials", "_combine", "softmax")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitkreduce", "aten::mm", "aten::addmm", "aten::linear", "aten::bmm", "mm_", "int8")),
)
# in a bf16 pass the only float32 products are attention's: SDPA's math path over the masked cache
FLOAT32_PRODUCTS = ("f32f32_f32f32", "gemmsn_nn_kernel<float")


def group_of(name: str, float32: bool = False) -> str:
    """The group of a kernel or operator; `float32`: the pass runs in float32 (its products are all float32)."""
    low = name.lower()
    if not float32 and any(p in low for p in FLOAT32_PRODUCTS):
        return "attention"
    return next((group for group, parts in GROUPS if any(p in low for p in parts)), "other")


@torch.inference_mode()
def profile_rows(model, cache, prompt_len: int, rows: int, passes: int, device: torch.device, vocab: int, float32: bool) -> dict:
    """One pass of `rows` tokens after a prompt of `prompt_len`, warmed (captured, compiled), then `passes`
    of them timed and profiled: per pass ms."""
    tokens = torch.randint(0, vocab, (1, rows), device=device)

    def one_pass() -> None:
        cache.length = prompt_len
        model(tokens, cache)

    for _ in range(3):
        one_pass()
    sync(device)
    t = time.perf_counter()
    for _ in range(passes):
        one_pass()
    sync(device)
    wall = (time.perf_counter() - t) / passes
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            one_pass()
        sync(device)
    by_name: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0 and (not cuda or event.device_type == torch.autograd.DeviceType.CUDA):
            by_name[event.key] += us / 1e3 / passes
    groups = collections.Counter()
    for name, ms in by_name.items():
        groups[group_of(name, float32)] += ms
    return {
        "wall_ms": round(wall * 1e3, 3),
        "kernels_ms": round(sum(by_name.values()), 3),
        "groups_ms": {g: round(groups[g], 3) for g in ("matrix products", "attention", "other")},
        "top": {name[:120]: round(ms, 4) for name, ms in by_name.most_common(12)},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the graphed pass")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True, help="replay captured CUDA graphs (GPU)")
    ap.add_argument("--rows", default="1,2,9,17")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/pass_profile.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    spec = ModelSpec(model=args.model, dtype=args.dtype)
    # the engine's own graphs for this runtime (its defaults: the one-row attention kernel with CUDA)
    graphs = graphs_for(RuntimeConfig(device=args.device, cuda_graphs=args.graphs and cuda, compile=args.compile and cuda))
    loaded = load_model(spec, device=device, max_seq_len=args.max_seq_len, graphs=graphs)
    model = loaded.model
    cache = model.new_cache(args.max_seq_len)
    vocab = min(1000, loaded.args.vocab_size)
    with torch.inference_mode():
        model(torch.randint(0, vocab, (1, args.prompt_len), device=device), cache, last_only=True)
    passes = {}
    for rows in (int(r) for r in args.rows.split(",")):
        passes[str(rows)] = p = profile_rows(model, cache, args.prompt_len, rows, args.passes, device, vocab, args.dtype == "float32")
        groups = "  ".join(f"{g} {ms:.3f}" for g, ms in p["groups_ms"].items())
        print(f"{rows:3d} rows: wall {p['wall_ms']:.3f} ms, kernels {p['kernels_ms']:.3f} ms ({groups})", flush=True)
    return write_results(args.out, {
        **header("bench.pass_profile", torch.cuda.get_device_name(device) if cuda else "CPU", argv),
        "shapes": {"model": args.model, "dtype": args.dtype, "compile": graphs is not None and args.compile, "graphs": graphs is not None},
        "prompt_len": args.prompt_len,
        "passes": passes,
    })


if __name__ == "__main__":
    main()
