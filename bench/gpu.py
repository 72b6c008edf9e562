"""GPU benchmark at real shapes with dummy (random) weights, in one device run: the roofline from the card's
copy bandwidth, our autoregressive decode with CUDA graphs and eagerly, HF `generate` on the same shape,
verification-pass latency against one-token decode, and speculative decoding with replayed acceptance.

    source .device/bootstrap.sh && python3 -m bench.gpu --out $OUT/gpu.json [--trace FILE] [--synthetic 19.7:32]

Random weights do the same work as real ones at the same shape but accept almost nothing, so the
speculative rows replay acceptance traces (engine.trace): recorded on the real pair on a CPU, or synthetic
at a given mean. Those rows are labelled replayed, next to DESIGN.md's prediction from this run's latencies.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench import header, median_ms, write_results
from engine.config import Mode, parse_config
from engine.decode import Engine
from engine.model import Transformer
from engine.sampling import SamplingParams
from engine.shapes import SHAPES
from engine.trace import AcceptanceTrace, TraceReplayer
from engine.weights import meta_transformer

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


def engine_for(
    target: str, draft: str, max_seq_len: int, runtime: dict, quantize: tuple[str, str] = ("none", "none")
) -> Engine:
    cfg = parse_config(
        {
            "name": "gpu-bench",
            "target": {"model": f"dummy:{target}", "dtype": "bfloat16", "quantize": quantize[0]},
            "draft": {"model": f"dummy:{draft}", "dtype": "bfloat16", "quantize": quantize[1]},
            "decoding": {"mode": "ar", "max_seq_len": max_seq_len},
            "runtime": {"device": "cuda", **runtime},
        },
        base=Path("."),
    )
    return Engine.from_config(cfg)


def timed_generate(engine: Engine, prompt: list[int], n: int, mode: Mode = Mode.AR, k: int | None = None) -> float:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    req = engine.make_request(prompt_ids=prompt, mode=mode, params=params, draft_tokens=k)
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(req)
    torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.inference_mode()
def pass_latency_ms(model: Transformer, max_len: int, prompt_len: int, rows_list: tuple[int, ...]) -> dict[int, float]:
    cache = model.new_cache(max_len)  # the engine's cache size: a compiled pass meets the shapes it knows
    model(torch.randint(0, 1000, (1, prompt_len), device="cuda"), cache, last_only=True)
    out = {}
    for rows in rows_list:

        def one_pass(rows: int = rows) -> None:
            cache.length = prompt_len
            model(torch.randint(0, 1000, (1, rows), device="cuda"), cache)

        out[rows] = median_ms(one_pass, torch.device("cuda"))
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


def replayed_run(engine: Engine, prompt: list[int], args: argparse.Namespace, trace: AcceptanceTrace, ar: float) -> dict:
    """Standard speculative decoding whose acceptance replays `trace`, with DESIGN.md's prediction from this
    run's own pass latencies: t_step = K t_draft + t_verify(K+1), tokens/s = E[n+1] / t_step."""
    k = trace.draft_tokens
    replayer = engine.acceptance_hook = TraceReplayer(trace)
    try:
        # warm-up: the same run (every request replays the trace from its start), so that every pass shape
        # it meets, the shorter blocks near max_tokens included, is captured (and compiled) before the timed run
        timed_generate(engine, prompt, args.new_tokens, Mode.STANDARD, k)
        before = replayer.steps
        seconds = timed_generate(engine, prompt, args.new_tokens, Mode.STANDARD, k)
        steps = replayer.steps - before
    finally:
        engine.acceptance_hook = None
    t_draft = pass_latency_ms(engine.draft.model, engine.max_seq_len, args.prompt_len, (1,))[1] / 1e3
    t_verify = pass_latency_ms(engine.target.model, engine.max_seq_len, args.prompt_len, (k + 1,))[k + 1] / 1e3
    per_step = (args.new_tokens - 1) / steps  # as replayed (the prefill gives the first token)
    predicted = per_step / (k * t_draft + t_verify)
    tokens_per_s = args.new_tokens / seconds
    return {
        "trace": replayer.label,
        "mode": trace.mode,
        "k": k,
        "tokens_per_step": round(per_step, 2),
        "speculative_steps": steps,
        "tokens_per_s": round(tokens_per_s, 2),
        "speedup": round(tokens_per_s / ar, 3),
        "predicted_tokens_per_s": round(predicted, 1),
        "draft_pass_ms": round(t_draft * 1e3, 3),
        "verify_pass_ms": round(t_verify * 1e3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="llama-3.1-8b")
    ap.add_argument("--draft", default="llama-3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("gpu.json"))
    ap.add_argument(
        "--paths", default="eager,graphs",
        help=(
            "of eager, graphs, compiled (runtime.compile: torch.compile before capture), compiled-sdpa (and "
            "runtime.attention_kernel false), compiled-int8 (and both models' weights int8: engine.quant, lossy), "
            "compiled-int8-draft (the draft's only); the last runs "
            "the speculative rows; each also as NAME-stacked (runtime.stack_projections true)"
        ),
    )
    ap.add_argument("--rows", default=",".join(map(str, VERIFY_ROWS)), help="tokens per pass for the latency table")
    ap.add_argument("--trace", type=Path, action="append", default=[], help="an acceptance trace to replay (engine.trace)")
    ap.add_argument(
        "--synthetic", action="append", default=[], metavar="MEAN:K",
        help="a synthetic trace of MEAN tokens per step at draft length K (default: 19.7:32, the paper's 8B/70B)",
    )
    ap.add_argument(
        "--speculative", action=argparse.BooleanOptionalAction, default=True,
        help="the replayed speculative rows (each new pass shape compiles anew on the compiled paths)",
    )
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="HF generate's row (slow to set up)")
    args = ap.parse_args()
    traces = [AcceptanceTrace.load(p) for p in args.trace]
    traces += [AcceptanceTrace.synthetic(float(m), int(k)) for m, k in (x.split(":") for x in args.synthetic or ["19.7:32"])]

    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    prompt = torch.randint(0, 1000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    every = {
        "eager": ({"cuda_graphs": False}, ("none", "none")),
        "graphs": ({"cuda_graphs": True}, ("none", "none")),
        "compiled": ({"compile": True}, ("none", "none")),
        # one-token passes' attention through SDPA, as before engine.attention_kernel
        "compiled-sdpa": ({"compile": True, "attention_kernel": False}, ("none", "none")),
        "compiled-int8": ({"compile": True}, ("int8", "int8")),
        "compiled-int8-draft": ({"compile": True}, ("none", "int8")),
    }
    # each path with q/k/v and gate/up stacked into one matrix each (runtime.stack_projections), for comparison
    every |= {f"{name}-stacked": ({**rt, "stack_projections": True}, q) for name, (rt, q) in every.items()}
    variants = {name: every[name] for name in args.paths.split(",")}
    fast = list(variants)[-1]  # the speculative runs use the last path measured (the fastest, in the default order)
    rows = tuple(int(r) for r in args.rows.split(","))
    ar, ar_decode, latency, setup_s, weight_bytes, speculative = {}, {}, {}, {}, {}, []
    for name, (runtime, quantize) in variants.items():
        engine = engine_for(args.target, args.draft, args.prompt_len + args.new_tokens + 128, runtime, quantize)
        model, target_args = engine.target.model, engine.target.args  # int8 weights are buffers; a tied LM head counts once
        held = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}.values()
        weight_bytes[name] = sum(t.numel() * t.element_size() for t in held)
        t = time.perf_counter()
        timed_generate(engine, prompt, 16)  # the first tokens: the graphs' capture and compilation
        setup_s[name] = time.perf_counter() - t
        # then the timed run's whole length once, untimed: its passes reach longer key buckets (engine.cuda_graphs),
        # each captured at its first pass, which would otherwise be timed
        timed_generate(engine, prompt, args.new_tokens)
        full, first = timed_generate(engine, prompt, args.new_tokens), timed_generate(engine, prompt, 1)
        ar[name] = args.new_tokens / full
        ar_decode[name] = (args.new_tokens - 1) / (full - first)
        print(f"{name}: ar {ar[name]:.1f} tokens/s (decode only {ar_decode[name]:.1f}), first 16 tokens "
              f"{setup_s[name]:.1f} s", flush=True)
        latency[name] = pass_latency_ms(engine.target.model, engine.max_seq_len, args.prompt_len, rows)
        if name == fast and args.speculative:
            speculative = [replayed_run(engine, prompt, args, trace, ar_decode[name]) for trace in traces]
        del engine
        torch.cuda.empty_cache()
    hf = hf_tokens_per_s(args.target, prompt, args.new_tokens) if args.hf else None

    # the bf16 model's bytes, whatever the paths held
    bf16_bytes = 2 * sum(p.numel() for p in meta_transformer(target_args).parameters())
    ceiling = bw / bf16_bytes
    print(f"{card}; {args.target} target, bf16, dummy weights, batch 1, {args.prompt_len}-token prompt, "
          f"{args.new_tokens} new tokens")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {bf16_bytes / 1e9:.2f} GB; ceiling {ceiling:.1f} tokens/s"
          + "".join(f"; {n}: {b / 1e9:.2f} GB held, ceiling {bw / b:.1f}" for n, b in weight_bytes.items() if b != bf16_bytes))
    print("| method | tokens/s | of its ceiling |")
    print("|---|---:|---:|")
    table = [(f"judgeserve ar, {name} (decode only: {ar_decode[name]:.1f})", ar[name], weight_bytes[name]) for name in variants]
    if hf is not None:
        table.append(("HF transformers generate", hf, bf16_bytes))
    for name, v, held in table:
        print(f"| {name} | {v:.1f} | {v / (bw / held):.0%} |")
    print("first 16 tokens (capture, compilation) s: " + ", ".join(f"{k} {v:.1f}" for k, v in setup_s.items()))
    print(f"speculative decoding {args.draft}/{args.target} ({fast}), acceptance REPLAYED from traces "
          "(dummy weights: the text is meaningless, the work per step is real):")
    print("| trace | K | tokens/step | tokens/s | speedup over ar | predicted tokens/s (DESIGN.md 3) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in speculative:
        print(f"| {r['trace']} | {r['k']} | {r['tokens_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['predicted_tokens_per_s']:.1f} |")
    for name in variants:
        print(f"verification pass latency (ms, {name}) by tokens in the pass: "
              + ", ".join(f"{r}: {ms:.2f}" for r, ms in latency[name].items()))
    record = {
        **header("bench.gpu", card),
        "shapes": {"target": args.target, "draft": args.draft, "dtype": "bfloat16", "weights": "dummy"},
        "quantize_by_path": {name: dict(zip(("target", "draft"), variants[name][1])) for name in variants},
        "copy_bandwidth_tb_per_s": round(bw / 1e12, 3),
        "ceiling_tokens_per_s": round(ceiling, 1),
        "weight_gb_by_path": {k: round(v / 1e9, 2) for k, v in weight_bytes.items()},
        "fast_path": fast,
        "ar_tokens_per_s": round(ar[fast], 2),
        "ar_decode_tokens_per_s": round(ar_decode[fast], 2),
        "ar_tokens_per_s_by_path": {k: round(v, 2) for k, v in ar.items()},
        "first_16_tokens_s_by_path": {k: round(v, 1) for k, v in setup_s.items()},
        "hf_tokens_per_s": None if hf is None else round(hf, 2),
        "verify_latency_ms": latency[fast],
        "verify_latency_ms_by_path": latency,
        "speculative_replayed": speculative,
        # the names: the first replayed row of each trace mode
        **{f"{m}_tokens_per_s": next(r["tokens_per_s"] for r in speculative if r["mode"] == m)
           for m in ("standard", "judge") if any(r["mode"] == m for r in speculative)},
    }
    write_results(args.out, record)


if __name__ == "__main__":
    main()
