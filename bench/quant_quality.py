"""How close weight-only int8 (engine.quant) keeps the real pair: the quality figure that goes next to int8's
speed (docs/performance.md). Teacher-forced over GSM8K-train reference solutions (questions past those
mined for the judge), for the target and the draft: how often the int8 model's next-token choice is the
original's, the mean KL divergence from the original's next-token distribution to the int8 one's, and both
models' perplexity of the reference text.

    python3 -m bench.quant_quality [--config config/qwen-coder.yaml] [--n 40] [--out bench/results/quant_quality_qwen.json]

Runs on the CPU (the real weights live here); int8 runs eagerly there, so only quality is measured, not speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from bench import write_results
from engine.config import Quantize, load_config
from engine.model import Transformer
from engine.weights import load_model
from training.tasks import Gsm8kTask

_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, not part of the prose


@torch.inference_mode()
def compare(plain: Transformer, quant: Transformer, sequences: list[tuple[list[int], list[int]]]) -> dict:
    """Teacher-forced comparison over (prompt ids, continuation ids) pairs, scored at every continuation
    token: top-1 agreement, mean KL(plain || quant) in nats, and each model's perplexity."""
    agree = kl = nll_plain = nll_quant = 0.0
    count = 0
    for prompt, continuation in sequences:
        ids = torch.tensor([prompt + continuation])
        logits = []
        for model in (plain, quant):
            out, _ = model(ids, model.new_cache(ids.shape[1] + 1))
            logits.append(out[0, len(prompt) - 1 : -1].float().log_softmax(-1))  # predicts each continuation token
        lp, lq = logits
        target = torch.tensor(continuation)
        agree += float((lp.argmax(-1) == lq.argmax(-1)).sum())
        kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
        nll_plain -= float(lp.gather(1, target[:, None]).sum())
        nll_quant -= float(lq.gather(1, target[:, None]).sum())
        count += len(continuation)
    return {
        "tokens": count,
        "top1_agreement": round(agree / count, 4),
        "mean_kl_nats": float(f"{kl / count:.4g}"),
        "perplexity": round(math.exp(nll_plain / count), 3),
        "perplexity_int8": round(math.exp(nll_quant / count), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("config/qwen-coder.yaml"))
    ap.add_argument("--gsm8k", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--offset", type=int, default=5000, help="first question (the judge was mined on the first few hundred)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant_quality_qwen.json"))
    args = ap.parse_args()
    config = load_config(args.config)
    lines = args.gsm8k.read_text().splitlines()[args.offset : args.offset + args.n]
    rows = [json.loads(line) for line in lines]
    results = {}
    for role in ("target", "draft"):
        spec = getattr(config, role)
        plain = load_model(spec, max_seq_len=config.decoding.max_seq_len)
        quant = load_model(spec.model_copy(update={"quantize": Quantize.INT8}), max_seq_len=config.decoding.max_seq_len)
        tok = plain.tokenizer
        sequences = []
        for row in rows:
            solution, _, answer = row["answer"].partition("####")
            text = _CALCULATOR.sub("", solution).strip() + f"\nThe answer is {answer.strip()}."
            prompt = Gsm8kTask("", row["question"], answer.strip(), program=False).messages()  # the miner's prompt
            sequences.append((tok.chat(prompt), tok.encode(text)))
        results[role] = {"model": spec.model, "dtype": spec.dtype.value}
        results[role] |= compare(plain.model, quant.model, tqdm(sequences, desc=f"{role} bf16 vs int8"))
        print(f"{role} {spec.model}: {results[role]}", flush=True)
    write_results(
        args.out,
        {
            "card": "CPU (quality only: int8 runs eagerly here)",
            "date": datetime.date.today().isoformat(),
            "command": f"python3 -m bench.quant_quality --config {args.config} --offset {args.offset} --n {args.n}",
            "data": f"GSM8K-train reference solutions {args.offset}..{args.offset + len(rows) - 1}, teacher-forced",
            **results,
        },
    )


if __name__ == "__main__":
    main()
