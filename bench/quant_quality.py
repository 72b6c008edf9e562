"""How close weight-only int8 (engine.quant) keeps the real pair: the quality figure that goes next to int8's
speed (docs/performance.md). Teacher-forced over GSM8K-train reference solutions (questions past those
mined for the judge), for the target and the draft: how often the int8 model's next-token choice is the
original's, the mean KL divergence from the original's next-token distribution to the int8 one's, and both
models' perplexity of the reference text. With `--answers N`, the target also answers the first N questions
greedily in bf16 and in int8 (standard decoding: exactly each target's greedy output): GSM8K accuracy of
each, how many answers are identical, and where the first differing token falls.

    python3 -m bench.quant_quality [--config config/qwen-coder.yaml] [--n 40] [--answers 20] [--out bench/results/quant_quality_qwen.json]

Runs on the CPU (the real weights live here); int8 runs eagerly there, so only quality is measured, not speed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from bench import header, write_results
from engine.config import Config, Mode, Quantize, load_config
from engine.decode import Engine
from engine.model import Transformer
from engine.sampling import SamplingParams
from engine.weights import load_model
from training.tasks import Gsm8kTask, load_tasks, select

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


def greedy_answers(config: Config, tasks: list[Gsm8kTask], max_tokens: int) -> dict:
    """Each task answered greedily by the config's target in its dtype and in int8 (standard decoding, the
    draft as configured): accuracy of both, identical answers, and the first differing token's index."""
    int8 = config.model_copy(update={"target": config.target.model_copy(update={"quantize": Quantize.INT8})})
    outs = {}
    for name, cfg in (("bf16", config), ("int8", int8)):
        engine = Engine.from_config(cfg)
        params = SamplingParams(max_tokens=max_tokens)
        outs[name] = [
            engine.generate(engine.make_request(messages=t.messages(), params=params, mode=Mode.STANDARD))
            for t in tqdm(tasks, desc=f"answers, target {name}")
        ]
        del engine
    same, first_diff = 0, []
    for a, b in zip(outs["bf16"], outs["int8"]):
        if a.token_ids == b.token_ids:
            same += 1
        else:
            first_diff.append(next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                                   min(len(a.token_ids), len(b.token_ids))))
    return {
        "questions": len(tasks),
        "max_tokens": max_tokens,
        "accuracy_bf16": round(sum(t.outcome(c.text).correct for t, c in zip(tasks, outs["bf16"])) / len(tasks), 3),
        "accuracy_int8": round(sum(t.outcome(c.text).correct for t, c in zip(tasks, outs["int8"])) / len(tasks), 3),
        "identical_answers": same,
        "first_differing_token": sorted(first_diff),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("config/qwen-coder.yaml"))
    ap.add_argument("--gsm8k", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--offset", type=int, default=5000, help="first question (the judge was mined on the first few hundred)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--answers", type=int, default=0, help="also answer this many questions greedily, bf16 and int8")
    ap.add_argument("--max-tokens", type=int, default=320, help="answer length limit for --answers")
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
        del plain, quant
    if args.answers:
        tasks = select(load_tasks(f"gsm8k:{args.gsm8k}"), args.offset, args.answers)
        results["greedy_answers"] = greedy_answers(config, tasks, args.max_tokens)
        print(f"greedy answers: {results['greedy_answers']}", flush=True)
    write_results(
        args.out,
        {
            **header("bench.quant_quality", "CPU (quality only: int8 runs eagerly here)"),
            "data": f"GSM8K-train reference solutions {args.offset}..{args.offset + len(rows) - 1}, teacher-forced",
            **results,
        },
    )


if __name__ == "__main__":
    main()
