"""A Triton kernel for y = (x W_q^T) * s with a few activation rows: int8 weights [out, in] read once, converted
in registers, multiplied on tensor cores; one bf16/fp16 activation block of up to 128 rows (engine.quant
sends it every pass of 2 to 128 rows on a GPU: verifications, and prefill graphs up to their top bucket).

A verification pass (K+1 rows) and a draft's first pass after a fully accepted block (2 rows) are bound by
reading the weights, like a one-token decode, so int8 weights should halve their time too. Neither cuBLAS
nor inductor does that here (bench/int8_matmul.py, on an H100 with torch 2.11): converting the weight to
bf16 in memory first costs 4.7x bf16's product, and inductor's fused forms 2.5x. This kernel reads each
int8 tile once (an 8B's 17-token verification: 6.5 ms against bf16's 8.3); the rows are padded to 16
(tensor cores' smallest block), which costs no weight reads.

Work split: one program per (BLOCK_N outputs, 1/split of the inputs); the split over the inputs (split-K)
keeps enough programs in flight when the outputs are few (a 1024-wide projection is 8 tiles of 128 for 132
SMs). Tile shapes are tuned per shape on first use; the split is fixed by the shape, so that the partial
sums' buffer is known before the kernel runs.
Each split writes its float32 partial sums to its own slice, summed afterwards in a fixed order: the
result does not depend on scheduling (no atomics), so a pass is repeatable bit for bit. The sum, the
scales and the cast are engine.quant's, outside the kernel's op, where inductor fuses them into one kernel
with what follows (inside the op they were three more launches per product, which made the kernel slower
than bf16 on the small q/k/v/o matrices: docs/performance.md).

Called through engine.quant.Int8Linear (a torch custom op, so torch.compile and CUDA graphs treat it as
one opaque kernel). The CPU tests run this same kernel in Triton's interpreter (TRITON_INTERPRET=1),
where the product is done in float32 since numpy has no bfloat16 (as it is for a float32 model, without
TF32, so that its passes agree with its one-row passes).

At 65-128 rows (a prefill graph's top bucket) it still beats converting the weight to bf16 first, 3.2x
on a 70B rank's MLP matrices (bench/results/int8_matmul_128rows_h200.json: 0.117 against 0.376 ms), though
there it takes about twice bf16's time on the same card: its conversions and products, not the weight
reads, set its pace (26% of the card's bf16 peak at 128 rows, against cuBLAS's 50%).

Not for: a prefill of more than 128 rows (bound by compute: cuBLAS on a converted weight), CPUs outside
tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 128  # one block of rows (BLOCK_M, a power of two of at least 16)
SPLIT_TILE = 128  # outputs per program as the split heuristic counts them (configs use 64 to 256)
STEP = 64  # a split's inputs are a whole number of these
# Tile shapes tried per (rows block, outputs, inputs, split) on a kernel's first call (Triton's autotuner,
# which times each): what suits the memory system differs between a 1024-wide projection and an LM head.
CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in (
        (64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 5), (256, 64, 8, 4),
        (128, 256, 8, 3), (64, 256, 4, 3), (256, 128, 8, 3), (32, 256, 4, 4),
    )
]


@triton.autotune(configs=CONFIGS[:1] if INTERPRETED else CONFIGS, key=["n", "k", "k_per_split", "BLOCK_M"])
@triton.heuristics({
    # Masks along the inputs would stop Triton from loading a row's bytes as one vector: leave them out
    # where the tiles divide the split (every real model's shapes).
    "EVEN_K": lambda a: a["k_per_split"] % a["BLOCK_K"] == 0,
    "EVEN_N": lambda a: a["n"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, partial_ptr, rows, n, k, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    end = (split + 1) * k_per_split  # the splits divide the inputs exactly (_splits)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * k_per_split, end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_at, w_at = x_ptr + rm[:, None] * k + rk[None, :], w_ptr + rn[:, None] * k + rk[None, :]
        if EVEN_K and EVEN_N:
            a = tl.load(x_at, mask=rm[:, None] < rows, other=0.0)
            b = tl.load(w_at)
        else:
            a = tl.load(x_at, mask=(rm[:, None] < rows) & (rk[None, :] < end), other=0.0)
            b = tl.load(w_at, mask=(rn[:, None] < n) & (rk[None, :] < end), other=0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b.to(a.dtype)))
    out = partial_ptr + split * rows * n + rm[:, None] * n + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < rows) & (rn[None, :] < n))


def _splits(n: int, k: int, programs: int) -> int:
    """Splits of the inputs: a power of two that divides them into whole STEPs, enough that the programs
    fill the card (`programs` wanted in flight), at most 16."""
    tiles, split = triton.cdiv(n, SPLIT_TILE), 1
    while split < 16 and tiles * split < programs and k % (2 * split * STEP) == 0:
        split *= 2
    return split


def splits(device: torch.device, n: int, k: int) -> int:
    """How many partial sums partial_products gives for an [n, k] weight on `device`."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return _splits(n, k, 2 * sms)


def partial_products(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x weight^T as float32 partial sums [splits, rows, out] (their sum is the product) for x [rows <=
    MAX_ROWS, in] (bf16/fp16/fp32, contiguous) and weight int8 [out, in] (contiguous). The sum, scale and
    cast are left to the caller, so that torch.compile fuses them with what follows (engine.quant)."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"the int8 kernel takes at most {MAX_ROWS} rows, got {rows}")
    split = splits(x.device, n, k)
    partial = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)
    _int8_matmul_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)](
        x, weight, partial, rows, n, k, k // split,
        BLOCK_M=max(16, triton.next_power_of_2(rows)), DOT_FP32=INTERPRETED or x.dtype == torch.float32,
    )
    return partial
