"""`judgeserve demo`: the whole system once, in one command (the README's quick start runs it).

Starts a local Ray in this process (loopback only), places the actors of the config (draft worker, target
shards, judge scorer, scheduler), serves gRPC on a free loopback port, and streams the same prompt through
a gRPC client once per mode the models allow (ar, standard, and judge when a judge is configured), printing
the text as it arrives and each mode's statistics; then it shuts everything down.

Not for: serving (`judgeserve serve`) or measuring (bench/serve_cpu.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from cluster.client import Final, JudgeserveClient, summary
from cluster.ray_backend import BackendStartError, RayBackend
from cluster.server import ServeError, build_server
from engine.config import Mode, load_config

LOADING_DOTS_S = 5.0  # seconds between progress dots while the actors load the models


def _stream_modes(address: str, prompt: str, max_tokens: int, modes: list[str]) -> list[dict]:
    """Client side (a worker thread): one streamed request per mode; returns their results."""
    results = []
    with JudgeserveClient(address) as client:
        info = client.model_info()
        print(f"\nserving {info['target']['name']} (draft {info['draft']['name']}) at {address}", file=sys.stderr)
        for mode in modes:
            print(f"\n== mode {mode} ==", file=sys.stderr)
            messages = [{"role": "user", "content": prompt}]
            for event in client.stream(messages=messages, max_tokens=max_tokens, mode=mode, timeout=3600):
                if isinstance(event, Final):
                    results.append(event.result)
                    print("\n-- " + summary(event.result), file=sys.stderr)
                else:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
    return results


async def _demo(backend: RayBackend, prompt: str, max_tokens: int, modes: list[str]) -> list[dict]:
    server, port = await build_server(backend, host="127.0.0.1", port=0)
    await server.start()
    try:
        print("loading the models into the Ray actors ", end="", file=sys.stderr, flush=True)
        started = time.perf_counter()
        ready = asyncio.ensure_future(backend.ready())
        while not ready.done():
            await asyncio.wait((ready,), timeout=LOADING_DOTS_S)
            print(".", end="", file=sys.stderr, flush=True)
        if not ready.result():
            raise ServeError("the Ray actors failed to start (see the log above)")
        print(f" ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return await asyncio.to_thread(_stream_modes, f"127.0.0.1:{port}", prompt, max_tokens, modes)
    finally:
        await server.stop(1)


def cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, {"serve.ray_address": None})
    modes = [Mode.AR.value, Mode.STANDARD.value] + ([Mode.JUDGE.value] if config.judge.path else [])
    try:
        backend = RayBackend(config)
    except BackendStartError as err:
        print(f"judgeserve demo: {err}", file=sys.stderr)
        return 1
    try:
        results = asyncio.run(_demo(backend, args.prompt, args.max_tokens, modes))
    except ServeError as err:
        print(f"judgeserve demo: {err}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    base = results[0]["tokens_per_second"]
    print("\nmode       tokens/s  speedup  accepted/step  judge-accepted", file=sys.stderr)
    for r in results:
        speedup = r["tokens_per_second"] / base if base else float("nan")
        print(
            f"{r['mode']:9} {r['tokens_per_second']:9.2f} {speedup:7.2f}x {r['mean_accepted_per_step']:14.2f} "
            f"{r['judge_accepted_tokens']:15d}",
            file=sys.stderr,
        )
    if config.judge.path:
        print("(judge mode is lossy by design: its text may differ from the target's; ar and standard are exact)", file=sys.stderr)
    return 0 if all(r["finish_reason"] != "error" for r in results) else 1
