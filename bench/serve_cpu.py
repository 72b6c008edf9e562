"""The serving path's overhead: tokens/s through gRPC and the Ray actors against the in-process engine.

One run, the same prompts (HumanEval and GSM8K-train chain-of-thought questions, greedy); for each served
path (its own actor set, one at a time) every prompt runs in-process and then served, so that both sides of
each ratio share the machine's drift:
  - in_process    engine.decode.Engine, runtime.threads torch threads (the baseline)
  - served        a gRPC client -> cluster.server -> RayBackend -> scheduler -> the step graph as a Ray
                  Compiled Graph (serve.compiled_graph, the default) -> draft worker, target shard
                  (serve.cpus_per_actor torch threads each; set equal to runtime.threads so each pass has
                  the same cores), pipelined or not as serve.pipeline (or --pipeline) says
  - served_calls  the same with plain actor calls for the step graph (serve.compiled_graph false)
  - served_pipelined, served_sequential   the config's step graph with serve.pipeline on and off: with
                  both, the JSON's pipelined_over_sequential compares them (on dummy weights replay the
                  guesses too: decoding.replay_guesses)
Greedy outputs must be equal (checked and reported). Prints one table: tokens/s, ratio to in-process, and
the per-step split the scheduler's own timers report (draft, verify and judge compute on the critical
path; transport: the wait on the actors beyond that compute; scheduling: the rest; draft compute
overlapped with verification), and writes the figures as JSON.

    python3 -m bench.serve_cpu --humaneval 3 --gsm8k 3 --max-tokens 128 --out bench/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
import yaml
from tqdm import tqdm

from bench import header, write_results
from bench.engine_cpu import add_prompt_arguments, prompts
from cluster.client import Final, JudgeserveClient
from cluster.ray_backend import RayBackend, plan_placement
from cluster.server import build_server, final_message
from engine.config import Config, Mode, load_config
from engine.decode import Engine
from engine.sampling import SamplingParams

PHASES = ("draft", "verify", "judge", "overhead")
# name -> what the served path changes in the config's serve section
PATHS = {
    "served": {"compiled_graph": True},
    "served_calls": {"compiled_graph": False},
    "served_pipelined": {"pipeline": True},  # pipelined against sequential: the same actors otherwise
    "served_sequential": {"pipeline": False},
}


@dataclass
class Tally:
    """Requests' final figures added up; per_step_ms splits a step after the prompt's (the prefill's target
    pass, which Final.steps and verify_seconds count, is left out and given per request as prefill_ms)."""

    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    phase: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # seconds on the critical path
    prefill: float = 0.0  # of phase["verify"]: the prompts' target passes
    overlapped: float = 0.0  # draft seconds spent during verification (pipelining)
    transport: float = 0.0  # of overhead: waiting on the actors beyond their compute
    outputs: list = field(default_factory=list)

    def add(self, token_ids: list[int], steps: int, t) -> None:
        """t: a pb.Timings."""
        self.tokens += len(token_ids)
        self.steps += steps
        self.seconds += t.total_seconds
        for phase in PHASES:
            self.phase[phase] += getattr(t, f"{phase}_seconds")
        self.prefill += t.prefill_seconds
        self.overlapped += t.draft_compute_seconds - t.draft_seconds
        self.transport += t.transport_seconds
        self.outputs.append(token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def per_step_ms(self) -> dict:
        requests = len(self.outputs)
        s = max(self.steps - requests, 1)  # the steps after each prompt's
        split = {f"{p}_ms": 1e3 * v / s for p, v in self.phase.items()}
        split["verify_ms"] = 1e3 * (self.phase["verify"] - self.prefill) / s
        split["prefill_ms"] = 1e3 * self.prefill / max(requests, 1)  # per request
        split["overlapped_draft_ms"] = 1e3 * self.overlapped / s
        split["transport_ms"] = 1e3 * self.transport / s
        split["scheduling_ms"] = split["overhead_ms"] - split["transport_ms"]
        return split


class _Loop:
    """The served side's event loop (server and RayBackend) on a thread; the client blocks on the main one."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 900.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def served(config: Config, loop: _Loop, update: dict) -> tuple[RayBackend, object, str]:
    serve = config.serve.model_copy(update=update)
    backend = RayBackend(config.model_copy(update={"serve": serve}))

    async def start():
        server, port = await build_server(backend, host="127.0.0.1", port=0)
        await server.start()
        assert await backend.ready(), "the actors failed to start"
        return server, port

    server, port = loop.run(start())
    return backend, server, f"127.0.0.1:{port}"


def run_served(client: JudgeserveClient, ids: list[int], mode: Mode, max_tokens: int, tally: Tally) -> None:
    *_, final = client.stream(prompt_ids=ids, max_tokens=max_tokens, mode=mode.value, timeout=3600)
    assert isinstance(final, Final) and final.result["finish_reason"] != "error", final
    tally.add(final.result["token_ids"], final.result["steps"], final.message.timings)


def synthetic_prompts(n: int) -> list[tuple[str, str]]:
    """Prompts for dummy-weight runs (the GPU machine has no data sets): their text does not matter."""
    return [("synthetic", f"Request {i}: write a short story about the number {i}, in plain words.") for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/qwen-coder.yaml")
    add_prompt_arguments(ap, per_source=4, max_tokens=128)
    ap.add_argument("--synthetic", type=int, default=0, help="N synthetic prompts instead of the data sets")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in-process and per actor")
    ap.add_argument("--modes", default="standard,ar")
    ap.add_argument("--pipeline", choices=["on", "off"], help="default: the config's serve.pipeline")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. runtime.device=cuda or target.model=dummy:llama-3.1-8b (YAML values)",
    )
    ap.add_argument("--paths", default="served,served_calls", help=f"served paths to measure (of {', '.join(PATHS)})")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_cpu.json"))
    args = ap.parse_args()

    overrides = {"runtime.threads": args.threads, "serve.cpus_per_actor": args.threads}
    if args.pipeline:
        overrides["serve.pipeline"] = args.pipeline == "on"
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    config = load_config(args.config, overrides)
    modes = [Mode(m) for m in args.modes.split(",")]
    engine = Engine.from_config(config)
    items = synthetic_prompts(args.synthetic) if args.synthetic else prompts(args.humaneval, args.gsm8k, args.gsm8k_path)
    work = [engine.tokenizer.chat([{"role": "user", "content": text}]) for _, text in items]
    loop = _Loop()
    os.environ.setdefault("RAY_worker_niceness", "0")  # as cluster.ray_backend's local Ray: actors at nice 0
    # CPUs enough for one actor set's bundles (TP=2 asks for three actors' worth), else its placement waits
    needed = plan_placement(config.serve, config.runtime.device.startswith("cuda")).requested().get("CPU", 0)
    cpus = max(2 * args.threads, int(needed))
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
    # One actor set at a time (a 2-GPU machine holds one). Each prompt runs in-process, then served, so that
    # both sides of a ratio see the same drift of a shared machine (on 2 cores runs differ by ~10%).
    paths = args.paths.split(",")
    tallies = {(m, p, side): Tally() for m in modes for p in paths for side in ("in_process", "served")}
    for name in paths:
        backend, server, address = served(config, loop, PATHS[name])
        with JudgeserveClient(address) as client:
            for mode in modes:
                # untimed: the first passes of each shape allocate and, on a GPU, capture CUDA graphs
                req = engine.make_request(prompt_ids=work[0], mode=mode, params=SamplingParams(max_tokens=args.max_tokens))
                engine.generate(req)
                run_served(client, work[0], mode, args.max_tokens, Tally())
                for ids in tqdm(work, desc=f"in_process / {name} {mode.value}"):
                    req = engine.make_request(prompt_ids=ids, mode=mode, params=SamplingParams(max_tokens=args.max_tokens))
                    c = engine.generate(req)
                    tallies[mode, name, "in_process"].add(c.token_ids, c.steps, final_message(c).timings)
                    run_served(client, ids, mode, args.max_tokens, tallies[mode, name, "served"])
        loop.run(server.stop(0))
        backend.close()
    ray.shutdown()

    rows = []
    for (mode, name, side), tally in tallies.items():
        ref = tallies[mode, name, "in_process"]
        rows.append(
            {
                "mode": mode.value,
                "path": name if side == "served" else f"in_process (beside {name})",
                "tokens": tally.tokens,
                "tokens_per_s": round(tally.tokens_per_s, 3),
                "ratio_to_in_process": round(tally.tokens_per_s / ref.tokens_per_s, 3),
                "identical_outputs": sum(a == b for a, b in zip(tally.outputs, ref.outputs)),
                "prompts": len(tally.outputs),
                "per_step_ms": {k: round(x, 2) for k, x in tally.per_step_ms().items()},
                "steps": tally.steps,
            }
        )
    print(f"\n{'mode':9} {'path':28} {'tok/s':>7} {'ratio':>6} {'same':>5}  per step (ms): draft verify judge | transport scheduling | overlapped draft")
    for r in rows:
        s = r["per_step_ms"]
        print(
            f"{r['mode']:9} {r['path']:28} {r['tokens_per_s']:7.2f} {r['ratio_to_in_process']:6.3f} "
            f"{r['identical_outputs']:>2}/{r['prompts']:<2}  {s['draft_ms']:6.1f} {s['verify_ms']:6.1f} {s['judge_ms']:5.1f} | "
            f"{s['transport_ms']:6.2f} {s['scheduling_ms']:6.2f} | {s['overlapped_draft_ms']:6.1f}"
        )
    card = (
        torch.cuda.get_device_name()
        if config.runtime.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU only"
    )
    result = {
        **header("bench.serve_cpu", card),
        # served tokens/s over in-process tokens/s per mode and served path (the GPU issue's key)
        "e2e_over_inprocess": {f"{r['mode']} {r['path']}": r["ratio_to_in_process"] for r in rows if r["path"] in PATHS},
        # the same prompts through the same actors, pipelined and not (each against its own in-process run)
        "pipelined_over_sequential": {
            m.value: round(tallies[m, "served_pipelined", "served"].tokens_per_s / tallies[m, "served_sequential", "served"].tokens_per_s, 3)
            for m in modes
            if {"served_pipelined", "served_sequential"} <= set(paths)
        },
        "config": args.config,
        "overrides": args.set,
        "device": config.runtime.device,
        "target": config.target.model,
        "draft": config.draft.model,
        "dtype": config.target.dtype.value,
        "draft_tokens": config.decoding.draft_tokens,
        "pipeline": config.serve.pipeline,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "prompts": {"synthetic": args.synthetic} if args.synthetic else {"humaneval": args.humaneval, "gsm8k": args.gsm8k},
        "rows": rows,
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
