"""int8-weight matrix products of a few rows (a verification pass's) against bf16's, one GPU, one run.

    source .device/bootstrap.sh && python3 -m bench.int8_matmul --out $OUT/int8_matmul.json

A K+1-token verification multiplies K+1 activation rows by every weight: still bound by reading the
weights, so int8 could halve its time as it does a decode's. Which way of computing y = (x W_q^T) * s gets
there is an empirical question per torch version; each candidate is timed on the linear layers of the
8B and of a 70B tensor-parallel rank, next to the bf16 product measured in the same run:
- `bf16`: cuBLAS on a bf16 copy of the weight (the baseline: what the unquantized model does);
- `widen`: the weight converted to bf16 in memory, then cuBLAS (engine.quant's path for long passes);
- `compiled`: torch.compile of the expression (one row: the tuned reduction the decode uses);
- `kernel`: engine.int8_kernel (engine.quant's path for 2-128 rows: `--rows 65,128` measures it against
  `widen` for a prefill graph's top bucket, which converted the weights until 2026-11-27).

`--rows 1 --splits 1,4,8` weighs one-row products split over their inputs (each row of the weight summed in
S slices, then the slices summed: two reductions, the first with S times as many outputs in flight), the
question a one-row pass's profile left (docs/performance.md: the 4,096-output products run at 40-70% of the
bandwidth the wide ones reach), in bf16 and int8; S=1 is the unsplit one-row reduction, the passes' form today.
Its answer on an H100 (2026-11-27, bench/results/int8_matmul_one_row_splits_h100.json): only the bf16 square
products ran faster split, and splitting them in the engine's pass made it slower (docs/performance.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import header, write_results
from engine import int8_kernel
from engine.quant import int8_matmul

# (name, out features, in features): the 8B's projections and MLP matrices, and a 70B TP=2 rank's MLP
SHAPES = (
    ("8b q", 4096, 4096),
    ("8b k/v", 1024, 4096),
    ("8b gate/up", 14336, 4096),
    ("8b down", 4096, 14336),
    ("70b/2 gate/up", 14336, 8192),
    ("70b/2 down", 8192, 14336),
)


def product(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype)) * s


def split_product(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, splits: int) -> torch.Tensor:
    """x [1, in] times w [out, in] (bf16, or int8 with scales s), each output's sum taken over `splits`
    slices of the inputs and then across them, in float32 as inductor's one-row reduction sums."""
    n, k = w.shape
    parts = (x.view(1, splits, k // splits).float() * w.view(n, splits, k // splits).float()).sum(-1)
    out = parts.sum(-1) if s is None else parts.sum(-1) * s.float()
    return out[None].to(x.dtype)


def time_ms(fn, *args: torch.Tensor, reps: int = 20) -> float:
    """GPU time per call: `reps` calls captured in one CUDA graph, as the engine runs its passes (timed
    eagerly, Python's launch costs would be most of a 20-microsecond product)."""
    for _ in range(3):  # compiles and tunes outside the capture
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,17,33", help="activation rows per product (a K+1 verification's)")
    p.add_argument("--splits", default="", help="one-row products split S ways over the inputs, e.g. 1,4,8")
    p.add_argument("--out", type=Path, help="JSON results file")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    torch._dynamo.config.recompile_limit = 1024  # every (rows, shape) is its own specialisation
    torch._inductor.config.coordinate_descent_tuning = True  # as engine.cuda_graphs compiles a one-row pass
    compiled = torch.compile(product, dynamic=False)
    split = torch.compile(split_product, dynamic=False)
    splits = [int(n) for n in args.splits.split(",") if n]
    results = []
    for name, n, k in SHAPES:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        s = torch.rand(n, dtype=torch.bfloat16, device="cuda") / 1000
        wb = w.to(torch.bfloat16)
        for m in rows_list:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            row = {"shape": name, "out": n, "in": k, "rows": m}
            row["bf16_ms"] = time_ms(F.linear, x, wb)
            row["widen_ms"] = time_ms(product, x, w, s)
            try:
                err = (compiled(x, w, s).float() - product(x, w, s).float()).abs().max().item()
                row["compiled_ms"], row["compiled_max_err"] = time_ms(compiled, x, w, s), err
            except Exception as e:  # a form inductor fails to compile is a result, not a crash
                row["compiled_ms"], row["compiled_error"] = None, f"{type(e).__name__}: {e}"[:300]
            if m <= int8_kernel.MAX_ROWS:
                err = (int8_matmul(x, w, s).float() - product(x, w, s).float()).abs().max().item()
                row["kernel_ms"], row["kernel_max_err"] = time_ms(int8_matmul, x, w, s), err
                row["kernel_int8_tb_per_s"] = n * k / row["kernel_ms"] / 1e9
                row["kernel_config"] = str(int8_kernel._int8_matmul_kernel.best_config)
            if m == 1:
                wants = {"bf16": F.linear(x, wb), "int8": product(x, w, s)}
                for n_split in splits:
                    for dtype, weight, scales in (("bf16", wb, None), ("int8", w, s)):
                        want = wants[dtype]
                        err = (split(x, weight, scales, n_split).float() - want.float()).abs().max().item()
                        ms = time_ms(split, x, weight, scales, n_split)
                        row[f"split{n_split}_{dtype}_ms"], row[f"split{n_split}_{dtype}_max_err"] = ms, err
                        row[f"split{n_split}_{dtype}_tb_per_s"] = n * k * weight.element_size() / ms / 1e9
            results.append(row)
            print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    print(f"\n{'shape':<14} {'rows':>4} {'bf16':>8} {'widen':>8} {'compiled':>9} {'kernel':>8} {'TB/s':>6}  (ms per product; the kernel's int8 bytes / time)")
    for r in results:
        cells = [f"{r[c]:.3f}" if r.get(c) is not None else "fail" for c in ("bf16_ms", "widen_ms", "compiled_ms", "kernel_ms")]
        print(f"{r['shape']:<14} {r['rows']:>4} {cells[0]:>8} {cells[1]:>8} {cells[2]:>9} {cells[3]:>8} {r.get('kernel_int8_tb_per_s', 0):>6.2f}")
    for r in results:
        if any(key.startswith("split") for key in r):
            cells = ", ".join(f"S={n_split} bf16 {r[f'split{n_split}_bf16_ms'] * 1e3:.1f} us "
                              f"({r[f'split{n_split}_bf16_tb_per_s']:.2f} TB/s), int8 {r[f'split{n_split}_int8_ms'] * 1e3:.1f} "
                              f"us ({r[f'split{n_split}_int8_tb_per_s']:.2f} TB/s)" for n_split in splits)
            print(f"one row, {r['shape']}: {cells}")
    if args.out:
        write_results(args.out, {
            **header("bench.int8_matmul", torch.cuda.get_device_name()),
            "torch": torch.__version__,
            "products": results,
        })


if __name__ == "__main__":
    main()
