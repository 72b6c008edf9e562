"""The `judgeserve` command: one entry point for every way in.

  judgeserve models list | fetch NAME       the real weights (MODELS.md) into the local cache
  judgeserve generate --config C --prompt T in-process generation, no Ray
  judgeserve serve --config C               the gRPC server over Ray actors (--no-ray: in-process)
  judgeserve client --target H:P --prompt T one request to a running server
  judgeserve batch --config C --input I --output O   a JSONL file of prompts through the actors, resumable
  judgeserve demo [--config C]              serve + one streamed request per mode, then stop
  judgeserve judge mine | train | eval      label mismatches, fit and evaluate a judge head (docs/judge.md)

Errors a user can cause (bad config, missing model, bad request) print one clear message and exit 1;
tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_CONFIG = "config/qwen-coder.yaml"
DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def _cmd_models(args: argparse.Namespace) -> int:
    from engine import fetch

    if args.action == "list":
        for name, what, folder in fetch.list_models():
            print(f"{name:32} {what}\n{'':32} {folder or 'not fetched'}")
        for pair, (target, draft) in fetch.PAIRS.items():
            print(f"{pair:32} pair: target {target}, draft {draft}")
        return 0
    if not args.name:
        raise SystemExit("judgeserve models fetch: name a pair or model (see `judgeserve models list`)")
    for name, folder in fetch.fetch(args.name).items():
        print(f"{name}: {folder}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine.config import Mode, load_config
    from engine.decode import Engine
    from engine.sampling import SamplingParams

    overrides = {"runtime.device": args.device} if args.device else {}
    if args.replay_trace:
        overrides["decoding.replay_trace"] = str(args.replay_trace.resolve())
    config = load_config(args.config, overrides)
    params = SamplingParams(
        max_tokens=args.max_tokens or config.decoding.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    engine = Engine.from_config(config)
    prompt = {"prompt": args.prompt} if args.raw else {"messages": [{"role": "user", "content": args.prompt}]}
    request = engine.make_request(
        **prompt,
        params=params,
        mode=Mode(args.mode) if args.mode else None,
        draft_tokens=args.draft_tokens,
        threshold=args.judge_threshold,
    )
    replayed = _trace(engine, request, args)
    if args.json:
        result = engine.generate(request)
        print(json.dumps(result.as_dict() | ({"replayed": replayed} if replayed else {})))
        _save_trace(engine, args)
        return 0
    events = engine.stream(request)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            result = done.value
            break
        sys.stdout.write(event.text)
        sys.stdout.flush()
    from cluster.client import summary

    print("\n--\n" + summary(result.as_dict()), file=sys.stderr)
    if replayed:
        print(f"{replayed}: the text is meaningless, the speed is the trace's", file=sys.stderr)
    _save_trace(engine, args)
    return 0


def _trace(engine, request, args: argparse.Namespace) -> str | None:
    """--record-trace attaches a recorder; returns the label of a replayed run (decoding.replay_trace) or None."""
    from engine.trace import TraceRecorder, TraceReplayer

    if (args.record_trace or args.replay_trace) and not request.mode.is_speculative:
        raise SystemExit("judgeserve generate: a trace needs --mode standard or judge")
    if args.record_trace:
        source = f"{engine.config.name}: {engine.target.name} / {engine.draft.name}"
        engine.acceptance_hook = TraceRecorder(source, request.mode.value, request.draft_tokens)
    hook = engine.acceptance_hook
    return hook.label if isinstance(hook, TraceReplayer) else None


def _save_trace(engine, args: argparse.Namespace) -> None:
    """Writes the recorded trace; a file of the same mode and K gets these steps appended (one call per
    prompt builds a trace over many)."""
    from engine.trace import AcceptanceTrace, TraceError

    if not args.record_trace:
        return
    trace = engine.acceptance_hook.trace
    if args.record_trace.exists():
        try:
            old = AcceptanceTrace.load(args.record_trace)
        except TraceError as err:
            raise SystemExit(f"judgeserve generate: --record-trace: {err} (not overwritten)") from None
        if (old.mode, old.draft_tokens) != (trace.mode, trace.draft_tokens):
            raise SystemExit(
                f"judgeserve generate: --record-trace: {args.record_trace} holds a {old.mode} trace with K="
                f"{old.draft_tokens}, this run is {trace.mode} with K={trace.draft_tokens} (not overwritten)"
            )
        old.accepted += trace.accepted
        old.judged += trace.judged
        trace = old
    trace.save(args.record_trace)
    print(f"{args.record_trace}: {len(trace.accepted)} steps, {trace.mean_tokens_per_step:.2f} tokens per step",
          file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    from cluster.server import cmd_serve

    return cmd_serve(args)


def _cmd_client(args: argparse.Namespace) -> int:
    from cluster.client import cmd_client

    return cmd_client(args)


def _cmd_batch(args: argparse.Namespace) -> int:
    from cluster.batch import cmd_batch

    return cmd_batch(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import cmd_demo

    return cmd_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="judgeserve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list or fetch the real model weights")
    models.add_argument("action", choices=["list", "fetch"])
    models.add_argument("name", nargs="?", help="a pair (qwen-coder) or a model name")
    models.set_defaults(func=_cmd_models)

    gen = sub.add_parser("generate", help="generate in-process (no Ray, no server)")
    gen.add_argument("--config", default=DEFAULT_CONFIG)
    gen.add_argument("--prompt", required=True, help="the user message (chat template applied; see --raw)")
    gen.add_argument("--raw", action="store_true", help="send --prompt as raw text, without the chat template")
    gen.add_argument("--mode", choices=["ar", "standard", "judge"], help="default: the config's decoding.mode")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--draft-tokens", type=int, help="K; default: the config's decoding.draft_tokens")
    gen.add_argument(
        "--judge-threshold", type=float, help="judge mode: accept when sigmoid(score) > this; 1.0 = lossless"
    )
    gen.add_argument("--device", help="override runtime.device (cpu, cuda)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    trace = gen.add_mutually_exclusive_group()
    trace.add_argument(
        "--record-trace", type=Path, metavar="FILE",
        help="write each step's acceptance (engine.trace); appended to FILE's steps if it holds a trace of this mode and K",
    )
    trace.add_argument(
        "--replay-trace", type=Path, metavar="FILE",
        help="accept as the trace's steps did (dummy weights at real shapes; the output says replayed)",
    )
    gen.set_defaults(func=_cmd_generate)

    from cluster.batch import add_batch_arguments
    from cluster.client import add_client_arguments
    from cluster.server import add_serve_arguments

    serve = sub.add_parser("serve", help="serve the config's models over gRPC")
    add_serve_arguments(serve)
    serve.set_defaults(func=_cmd_serve)
    client = sub.add_parser("client", help="send one request to a running server")
    add_client_arguments(client)
    client.set_defaults(func=_cmd_client)
    batch = sub.add_parser("batch", help="run a JSONL file of prompts through the actors into a JSONL of completions")
    add_batch_arguments(batch)
    batch.set_defaults(func=_cmd_batch)
    demo = sub.add_parser("demo", help="serve with an embedded Ray and stream one request in each mode")
    demo.add_argument("--config", default=DEFAULT_CONFIG)
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.set_defaults(func=_cmd_demo)
    from training.cli import add_judge_parser

    add_judge_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from engine.config import ConfigError
    from engine.decode import RequestError
    from engine.fetch import FetchError
    from engine.judge import JudgeError
    from engine.trace import TraceError
    from engine.weights import ModelLoadError
    from training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RequestError, FetchError, JudgeError, ModelLoadError, TraceError, TrainingError) as err:
        print(f"judgeserve: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # SamplingParams and similar field checks
        print(f"judgeserve: invalid argument: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
