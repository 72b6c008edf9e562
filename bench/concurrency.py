"""Many users at once: aggregate tokens/s, time to first token and inter-token latency of concurrent
streams through the served path (gRPC client -> cluster.server -> RayBackend -> scheduler -> actors).

For each acceptance setting one RayBackend and gRPC server start in this process (loopback, a free port,
serve.max_active_requests = the most streams asked, so that no stream of a round waits in the queue), one
at a time. For each mode, draft length K (--draft-tokens) and stream count c, c client threads, each with
its own channel (connected beforehand, as a user's would be) and its own synthetic prompt, send a greedy
request of --max-tokens tokens at once (EOS ignored, so every stream does the same work), and time events:
  - TTFT  from sending to the first streamed event carrying tokens
  - ITL   each later event's gap since the previous one, divided among its tokens (one sample per token)
  - tok/s all tokens of the round / the round's wall time (first send to last final message)
  - decode tok/s the tokens after each stream's first event / the time from the earliest first event to
    the last final message: the rate once prompts are in (a short --max-tokens leaves tok/s mostly TTFT)
Each timed round follows an untimed one of the same mode, K and streams (--no-warmup skips it): the first
passes of a batch shape allocate caches and, on a GPU, capture CUDA graphs. Prints one table (p50 and p99 of TTFT and ITL, speed-up over the same mode and K at 1 stream, ratio to ar
at the same streams, draft tokens accepted per speculative step, and the scheduler's own split of a step
after the prompt's: draft, verify and other ms; the prefill's target pass is apart, prefill_ms per request
in the JSON; "ahead": draft ms per step spent during verification, pipelining's overlap) and writes the rows
as JSON. With --pipeline on,off each setting gets its own backend and the same rounds, and the JSON's
pipelined_over_sequential gives their ratios.

Dummy weights accept almost nothing and have no judge, so acceptance can be replayed (decoding.replay_trace,
engine.trace): --standard-trace for the standard rows, --judge-trace for the judge rows, which then run in
mode standard with the judge trace replayed (no judge file needed). Figures with replayed acceptance are
labelled "replayed" with their trace, in the table and the JSON; their text is meaningless. A trace caps
acceptance at its own K, so a K sweep above it measures cost without gain. MEAN:K:runs draws prefix runs
(engine.trace.AcceptanceTrace.synthetic): whole blocks accepted as often as a^K, which pipelining needs.
Without a trace a mode runs for real (e.g. config/qwen-coder.yaml, which has a judge file).

    python3 -m bench.concurrency --config config/tiny.yaml --streams 1,4 --max-tokens 16 --judge-trace 3.0:4 --out /tmp/conc.json

Client and server share this process (and its GIL); at many streams on few cores that is part of the
figures. Each active request holds a KV cache of decoding.max_seq_len in every model actor: lower it with
--set for many streams on a GPU. Only the public gRPC API is used, so how the scheduler runs concurrent
requests (interleaved step by step, or batched) is what is measured, not assumed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import torch
import yaml
from tqdm import tqdm

from bench import header, write_results
from bench.serve_cpu import Tally, _Loop, served, synthetic_prompts
from cluster.client import Final, JudgeserveClient
from engine.config import Config, Mode, load_config
from engine.trace import AcceptanceTrace, TraceError, TraceReplayer


@dataclass(frozen=True)
class Replay:
    """An acceptance trace for decoding.replay_trace: its file, a short name for the table, its full label."""

    path: Path
    short: str
    label: str


@dataclass(frozen=True)
class Series:
    """Rows of one mode of --modes (`kind`): their label, the mode requests ask for, the replay (None: real)."""

    kind: Mode
    label: str
    mode: Mode
    replay: Replay | None


@dataclass
class StreamLog:
    """What one client stream saw."""

    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None  # s
    itl: list[float] = field(default_factory=list)  # s, one per token after the first event's
    tokens: int = 0
    accepted: int = 0  # draft tokens accepted, over the request's speculative steps
    speculative_steps: int = 0
    final: tuple | None = None  # (token ids, steps, pb.Timings) of the final message: the per-step split
    error: str = ""


def trace_for(spec: str, mode: str, folder: Path) -> Replay:
    """FILE (engine.trace format), MEAN:K (a synthetic binomial trace written into `folder`) or MEAN:K:runs
    (synthetic prefix runs: whole blocks accepted as often as a^K, what pipelining's reuse depends on)."""
    if Path(spec).is_file():
        trace, path = AcceptanceTrace.load(Path(spec)), Path(spec).resolve()
        return Replay(path, path.name, TraceReplayer(trace).label)
    try:
        mean, k, *shape = spec.split(":")
        if shape not in ([], ["runs"]):
            raise ValueError(spec)
        trace = AcceptanceTrace.synthetic(float(mean), int(k), runs=bool(shape))
    except ValueError as err:  # TraceError is one too: an impossible mean for K
        detail = str(err) if isinstance(err, TraceError) else "neither a trace file nor MEAN:K[:runs]"
        raise SystemExit(f"--{mode}-trace {spec}: {detail}") from None
    trace = replace(trace, mode=mode)  # synthetic() says judge; the label should say which rows it stands for
    path = folder / f"{mode}-synthetic-{spec.replace(':', '-')}.json"
    trace.save(path)
    return Replay(path, f"synthetic {spec}", TraceReplayer(trace).label)


def one_stream(address: str, text: str, mode: Mode, k: int | None, args: argparse.Namespace,
               go: threading.Barrier, log: StreamLog) -> None:
    """Runs one request and fills `log`; failures land in log.error (with the gRPC status), it never raises."""
    try:
        with JudgeserveClient(address) as client:
            client.health(timeout=60)  # opens the channel before the clock starts
            go.wait()
            log.start = last = time.perf_counter()
            events = client.stream(messages=[{"role": "user", "content": text}], max_tokens=args.max_tokens,
                                   mode=mode.value, draft_tokens=k, ignore_eos=True, timeout=args.timeout)
            for event in events:
                now = time.perf_counter()
                if isinstance(event, Final):
                    log.end = now
                    if event.result["finish_reason"] == "error":
                        log.error = f"finish_reason error: {event.error}"
                    msg = event.message
                    log.speculative_steps = msg.speculative_steps
                    log.accepted = round(msg.mean_accepted_per_step * msg.speculative_steps)
                    log.final = (event.result["token_ids"], event.result["steps"], msg.timings)
                elif event.token_ids:
                    n = len(event.token_ids)
                    if log.ttft is None:
                        log.ttft = now - log.start
                    else:
                        log.itl.extend([(now - last) / n] * n)
                    log.tokens += n
                    last = now
            if not log.end:
                log.error = "the server ended the stream without a final message"
    except grpc.RpcError as err:
        log.error = f"gRPC {err.code().name}: {err.details()}"
        go.abort()  # a stream that could not connect releases the others rather than leaving them waiting
    except threading.BrokenBarrierError:
        log.error = "not sent: another stream of the round failed to connect"


def run_round(address: str, prompts: list[str], series: Series, k: int | None, c: int,
              args: argparse.Namespace) -> list[StreamLog]:
    """c streams sent at once (a barrier releases them together); raises SystemExit if any failed."""
    logs = [StreamLog() for _ in range(c)]
    go = threading.Barrier(c)
    threads = [threading.Thread(target=one_stream, args=(address, prompts[i], series.mode, k, args, go, logs[i]))
               for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(i, log.error) for i, log in enumerate(logs) if log.error]
    if failed:
        i, error = failed[0]
        raise SystemExit(f"{series.label}, K={k or '-'}, {c} streams: {len(failed)} of {c} streams failed; stream {i}: {error}")
    return logs


def summarize(logs: list[StreamLog]) -> dict:
    """One row's figures from a round's streams (ms for latencies)."""
    end = max(log.end for log in logs)
    wall = end - min(log.start for log in logs)
    tokens = sum(log.tokens for log in logs)
    ttft = [1e3 * log.ttft for log in logs if log.ttft is not None]
    decoding = end - min(log.start + (log.ttft or 0.0) for log in logs)
    later = sum(len(log.itl) for log in logs)  # itl holds one sample per token after the first event
    itl = [1e3 * x for log in logs for x in log.itl]
    steps = sum(log.speculative_steps for log in logs)
    split = Tally()  # the scheduler's own per-step timers: where a step's time went
    for log in logs:
        split.add(*log.final)

    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)), 2) if xs else None

    return {
        "tokens": tokens,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(tokens / wall, 2),
        "decode_tokens_per_s": round(later / decoding, 2) if later and decoding > 0 else None,
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
        "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
        "accepted_per_step": round(sum(log.accepted for log in logs) / steps, 3) if steps else None,
        **{name: round(ms, 2) for name, ms in split.per_step_ms().items()},
    }


def plan(modes: list[Mode], config: Config, standard: Replay | None, judge: Replay | None) -> dict[Path | None, list[Series]]:
    """Series grouped by the trace their backend replays (each group is one backend start)."""
    groups: dict[Path | None, list[Series]] = {}
    for mode in modes:
        if mode is Mode.STANDARD:
            s = Series(mode, f"standard (replayed {standard.short})" if standard else "standard", mode, standard)
        elif mode is Mode.JUDGE and judge is not None:
            s = Series(mode, f"judge (replayed {judge.short})", Mode.STANDARD, judge)
        elif mode is Mode.JUDGE:
            if config.judge.path is None:
                raise SystemExit("judge mode needs --judge-trace or a config with judge.path (dummy weights have no judge)")
            s = Series(mode, "judge", mode, None)
        else:
            continue  # ar: placed below, on a backend started anyway
        groups.setdefault(s.replay.path if s.replay else None, []).append(s)
    if Mode.AR in modes:  # replay does not touch ar steps, so any backend serves them: the first one
        groups.setdefault(next(iter(groups), None), []).insert(0, Series(Mode.AR, "ar", Mode.AR, None))
    return groups


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/tiny.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. runtime.device=cuda or target.model=dummy:llama-3.1-8b (YAML values)")
    ap.add_argument("--modes", default="ar,standard,judge")
    ap.add_argument("--streams", default="1,4,16,64", help="concurrent streams per round")
    ap.add_argument("--draft-tokens", help="K values to sweep, e.g. 4,8,16 (default: the config's)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--standard-trace", metavar="FILE|MEAN:K", help="acceptance replayed in the standard rows")
    ap.add_argument("--judge-trace", metavar="FILE|MEAN:K", help="acceptance replayed in the judge rows (run as standard)")
    ap.add_argument("--pipeline", metavar="on|off|on,off",
                    help="serve.pipeline of the backends (default: the config's); with on,off every row runs on both, "
                         "and the JSON's pipelined_over_sequential compares them (drafting ahead wants the draft on "
                         "its own GPU, serve.draft_placement=own_gpu, and on dummy weights replayed guesses, "
                         "decoding.replay_guesses=true, with a :runs trace)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed round at the same mode, K and streams before each timed one (the first "
                         "passes of a batch shape allocate caches and capture CUDA graphs)")
    ap.add_argument("--timeout", type=float, default=900.0, help="deadline of each request, s")
    ap.add_argument("--out", type=Path, default=Path("bench/results/concurrency.json"))
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    streams = sorted({int(c) for c in args.streams.split(",")})
    modes = [Mode(m) for m in args.modes.split(",")]
    most = max(streams)
    overrides: dict = {"serve.max_active_requests": most}  # every stream of a round runs; --set may say otherwise
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    # each backend gets its replay trace below, so guesses are replayed there (the config alone would refuse
    # replay_guesses without a trace)
    guesses = bool(overrides.pop("decoding.replay_guesses", False))
    config = load_config(args.config, overrides)
    if "serve.max_queued_requests" not in overrides and config.serve.max_queued_requests < most:
        # room for a round's streams while the last round's handlers still finish (the server counts them)
        config = config.model_copy(update={"serve": config.serve.model_copy(update={"max_queued_requests": most})})
    ks = [int(k) for k in args.draft_tokens.split(",")] if args.draft_tokens else [config.decoding.draft_tokens]
    pipelines = [config.serve.pipeline]
    if args.pipeline:
        try:
            pipelines = [{"on": True, "off": False}[x] for x in dict.fromkeys(args.pipeline.split(","))]
        except KeyError:
            raise SystemExit(f"--pipeline {args.pipeline}: on, off or on,off") from None
    prompts = [text for _, text in synthetic_prompts(most)]  # a different prompt per stream

    tmp = tempfile.TemporaryDirectory(prefix="judgeserve-traces-")
    standard = trace_for(args.standard_trace, "standard", Path(tmp.name)) if args.standard_trace else None
    judge = trace_for(args.judge_trace, "judge", Path(tmp.name)) if args.judge_trace else None
    groups = plan(modes, config, standard, judge)
    for s in (s for g in groups.values() for s in g if s.replay):
        over = [k for k in ks if k > AcceptanceTrace.load(s.replay.path).draft_tokens]
        if over:
            print(f"note: {s.label} at K={over}: the trace accepts at most its own K per step", file=sys.stderr)

    per_backend = sum(len(streams) * (1 if s.mode is Mode.AR else len(ks)) for g in groups.values() for s in g)
    rounds = len(pipelines) * per_backend
    bar = tqdm(total=rounds, desc="rounds")
    loop, rows = _Loop(), []
    for pipeline, (path, group) in ((p, g) for p in pipelines for g in groups.items()):
        replay = {"replay_trace": path, "replay_guesses": guesses and path is not None}
        decoding = config.decoding.model_copy(update=replay)
        backend, server, address = served(config.model_copy(update={"decoding": decoding}), loop, {"pipeline": pipeline})
        try:
            for s in group:
                for k in [None] if s.mode is Mode.AR else ks:
                    for c in streams:
                        if not args.no_warmup:
                            run_round(address, prompts, s, k, c, args)
                        bar.set_description(f"{s.label} K={k} streams={c} pipeline={pipeline}")
                        row = {"mode": s.label, "kind": s.kind.value, "request_mode": s.mode.value, "k": k, "streams": c,
                               "pipeline": pipeline, "replayed": s.replay.label if s.replay else None}
                        rows.append(row | summarize(run_round(address, prompts, s, k, c, args)))
                        bar.update()
        finally:
            loop.run(server.stop(0))
            backend.close()
    bar.close()
    tmp.cleanup()

    by_key = {(r["mode"], r["k"], r["streams"], r["pipeline"]): r for r in rows}
    for r in rows:
        one = by_key.get((r["mode"], r["k"], 1, r["pipeline"]))
        ar = by_key.get(("ar", None, r["streams"], r["pipeline"]))
        r["speedup_over_1_stream"] = round(r["tokens_per_s"] / one["tokens_per_s"], 3) if one else None
        r["ratio_to_ar"] = round(r["tokens_per_s"] / ar["tokens_per_s"], 3) if ar else None
    # as --modes lists them, sequential before pipelined
    rows.sort(key=lambda r: (modes.index(Mode(r["kind"])), r["k"] or 0, r["streams"], r["pipeline"]))
    pipelined_over_sequential = {
        f"{r['mode']} K={r['k'] or '-'} streams={r['streams']}": round(r["tokens_per_s"] / seq["tokens_per_s"], 3)
        for r in rows
        if r["pipeline"] and (seq := by_key.get((r["mode"], r["k"], r["streams"], False)))
    }

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    width = max(len(r["mode"]) for r in rows)
    print(f"\n{'mode':{width}} {'K':>3} {'streams':>7} {'pipe':>4} {'tok/s':>8} {'decode':>7} {'x 1 stream':>10} "
          f"{'x ar':>6} "
          f"{'TTFT p50':>9} {'p99 ms':>7} {'ITL p50':>8} {'p99 ms':>7} {'acc/step':>8} {'draft':>6} {'verify':>6} "
          f"{'other ms/step':>13} {'ahead':>6}")
    for r in rows:
        print(f"{r['mode']:{width}} {f(r['k'], 'd'):>3} {r['streams']:7d} {'on' if r['pipeline'] else 'off':>4} "
              f"{r['tokens_per_s']:8.1f} "
              f"{f(r['decode_tokens_per_s'], '.1f'):>7} "
              f"{f(r['speedup_over_1_stream'], '.2f'):>10} {f(r['ratio_to_ar'], '.2f'):>6} "
              f"{f(r['ttft_ms_p50'], '.1f'):>9} {f(r['ttft_ms_p99'], '.1f'):>7} {f(r['itl_ms_p50'], '.2f'):>8} "
              f"{f(r['itl_ms_p99'], '.2f'):>7} {f(r['accepted_per_step'], '.2f'):>8} {r['draft_ms']:6.1f} "
              f"{r['verify_ms']:6.1f} {r['judge_ms'] + r['overhead_ms']:13.1f} {r['overlapped_draft_ms']:6.1f}")
    for replay in {s.replay for g in groups.values() for s in g if s.replay}:
        print(f"{replay.short}: {replay.label}; the text of those rows is meaningless")
    for name, ratio in pipelined_over_sequential.items():
        print(f"pipelined / sequential, {name}: {ratio:.3f}")

    cuda = config.runtime.device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    card = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    result = {
        **header("bench.concurrency", f"{gpus} x {card}" if gpus > 1 else card, argv),
        "config": args.config,
        "overrides": args.set,
        "shapes": {"target": config.target.model, "draft": config.draft.model, "dtype": config.target.dtype.value},
        "max_tokens": args.max_tokens,
        "rows": rows,
        **({"pipelined_over_sequential": pipelined_over_sequential} if pipelined_over_sequential else {}),
        **single_stream_figures(rows),
    }
    write_results(args.out, result)


def single_stream_figures(rows: list[dict]) -> dict:
    """The GPU issue's names for the one-stream figures: {mode}_tokens_per_s, the best K's for each mode."""
    best: dict[str, float] = {}
    for r in rows:
        if r["streams"] == 1:
            key = f"{r['kind']}_tokens_per_s"
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    return best


if __name__ == "__main__":
    main()
