"""GPU baseline at real shapes with dummy (random) weights: the roofline, our autoregressive decode, HF
`generate` on the same shape, and verification-pass latency against one-token decode, in one device run.

    source .device/bootstrap.sh && python3 -m bench.gpu --out $OUT/gpu.json

Random weights do the same work as real ones at the same shape; no acceptance is measured here (the
speculative figures need acceptance traces, a later benchmark).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from engine.config import Mode, parse_config
from engine.decode import Engine
from engine.sampling import SamplingParams
from engine.shapes import SHAPES

VERIFY_ROWS = (1, 2, 3, 5, 9, 17, 33, 65)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the decode roofline's denominator."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 20
    for _ in range(n):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * n / (time.perf_counter() - t)


def engine_for(target: str, draft: str, max_seq_len: int) -> Engine:
    cfg = parse_config(
        {
            "name": "gpu-bench",
            "target": {"model": f"dummy:{target}", "dtype": "bfloat16"},
            "draft": {"model": f"dummy:{draft}", "dtype": "bfloat16"},
            "decoding": {"mode": "ar", "max_seq_len": max_seq_len},
            "runtime": {"device": "cuda"},
        },
        base=Path("."),
    )
    return Engine.from_config(cfg)


def timed_generate(engine: Engine, prompt: list[int], n: int) -> float:
    req = engine.make_request(prompt_ids=prompt, mode=Mode.AR, params=SamplingParams(max_tokens=n, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(req)
    torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.inference_mode()
def pass_latency_ms(engine: Engine, prompt_len: int) -> dict[int, float]:
    model, cache = engine.target.model, engine.target.model.new_cache(prompt_len + 128)
    model(torch.randint(0, 1000, (1, prompt_len), device="cuda"), cache, last_only=True)
    out = {}
    for rows in VERIFY_ROWS:
        times = []
        for _ in range(12):
            cache.length = prompt_len
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(torch.randint(0, 1000, (1, rows), device="cuda"), cache)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[rows] = round(1000 * statistics.median(times[2:]), 3)
    return out


@torch.inference_mode()
def hf_tokens_per_s(shape: str, prompt: list[int], n: int) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    x = torch.tensor([prompt], device="cuda")
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    model.generate(x, max_new_tokens=8, min_new_tokens=8, **kw)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del model
    torch.cuda.empty_cache()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="llama-3.1-8b")
    ap.add_argument("--draft", default="llama-3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = ap.parse_args()

    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    engine = engine_for(args.target, args.draft, args.prompt_len + args.new_tokens + 128)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.target.model.parameters())
    prompt = torch.randint(0, 1000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    timed_generate(engine, prompt, 16)  # warm-up
    full, first = timed_generate(engine, prompt, args.new_tokens), timed_generate(engine, prompt, 1)
    ar = args.new_tokens / full
    ar_decode = (args.new_tokens - 1) / (full - first)
    latency = pass_latency_ms(engine, args.prompt_len)
    del engine
    torch.cuda.empty_cache()
    hf = hf_tokens_per_s(args.target, prompt, args.new_tokens)

    ceiling = bw / weight_bytes
    print(f"{card}; {args.target} target, bf16, dummy weights, batch 1, {args.prompt_len}-token prompt, "
          f"{args.new_tokens} new tokens")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB; ceiling {ceiling:.1f} tokens/s")
    print("| method | tokens/s | of ceiling |")
    print("|---|---:|---:|")
    for name, v in (("judgeserve ar (eager, with prefill)", ar), ("judgeserve ar decode only", ar_decode),
                    ("HF transformers generate", hf)):
        print(f"| {name} | {v:.1f} | {v / ceiling:.0%} |")
    print("verification pass latency (ms) by tokens in the pass: "
          + ", ".join(f"{r}: {ms:.2f}" for r, ms in latency.items()))
    record = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "command": "python3 -m bench.gpu " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "shapes": {"target": args.target, "draft": args.draft, "dtype": "bfloat16", "weights": "dummy"},
        "copy_bandwidth_tb_per_s": round(bw / 1e12, 3),
        "ceiling_tokens_per_s": round(ceiling, 1),
        "ar_tokens_per_s": round(ar, 2),
        "ar_decode_tokens_per_s": round(ar_decode, 2),
        "hf_tokens_per_s": round(hf, 2),
        "verify_latency_ms": latency,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
