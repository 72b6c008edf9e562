"""The offline batch job: prompts from a JSONL file in, one completion with its statistics per line out.

    judgeserve batch --config C --input prompts.jsonl --output out.jsonl
    ray job submit --working-dir . -- python -m cluster.batch --config C --input /data/in.jsonl --output /data/out.jsonl

Every input line runs through a cluster.backend Backend, the same actors `serve` uses (cluster.ray_backend;
`--no-ray`: the engine in this process), with up to serve.max_active_requests in flight.

Input: one JSON object per line (`BatchLine`); blank lines are skipped. Output: one JSON object per input
line, in the order they finish: `id` and `line` (1-based), then the keys of `judgeserve generate --json`
(text, token_ids, provenance, finish_reason, mode, prompt_tokens, completion_tokens, steps,
mean_accepted_per_step, judge_accepted_tokens, tokens_per_second, wall_seconds, timings). A line that
cannot run (not JSON, an unknown field, a prompt too long for the model) gets a record with `error` saying
what is wrong and where, and the job goes on; so does a request the backend failed.

Resumable: each record is written and flushed as its request finishes. A re-run with the same output first
keeps the records of finished lines (those without `error`), dropping error records and a truncated last
line (a job killed mid-write), then runs every other line: none is done twice, none is lost.

Not for: serving over gRPC (cluster.server), request checks of the wire (cluster.server.parse_generate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

from cluster.backend import Backend, BackendNotReady
from cluster.server import GenerateArgs, engine_request_for, make_backend
from engine.config import Config, Mode
from engine.decode import Completion
from engine.output import FinishReason
from engine.sampling import SamplingParams

log = logging.getLogger("judgeserve.batch")


class BatchError(RuntimeError):
    """The job cannot run at all (unreadable input, backend not starting); the message says why."""


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(description="system, user or assistant")
    content: str


# The fields of a BatchLine that are SamplingParams fields of the same name and type (max_tokens aside: its
# default comes from the config).
SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos"})


class BatchLine(BaseModel):
    """One input line. Exactly one of prompt, messages or prompt_ids; the rest are optional sampling
    fields with the gRPC GenerateRequest's meaning (protos/judgeserve.proto)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(None, min_length=1, description="the record's id in the output; default: line-N")
    prompt: str | None = Field(None, description="raw text, sent as is (no chat template)")
    messages: list[ChatTurn] | None = Field(None, description="chat turns, through the target's chat template")
    prompt_ids: list[int] | None = Field(None, description="token ids, sent as they are")
    max_tokens: int | None = Field(None, description="default: the config's decoding.max_new_tokens")
    temperature: float = Field(0.0, description="0 = greedy")
    top_p: float = 1.0
    top_k: int = Field(0, description="0 = off")
    seed: int | None = None
    stop: tuple[str, ...] = Field((), description="stop strings")
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    mode: Mode | None = Field(None, description="ar, standard or judge; default: the config's decoding.mode")
    draft_tokens: int | None = Field(None, description="K; default: the config's decoding.draft_tokens")
    judge_threshold: float | None = None

    @model_validator(mode="after")
    def _one_input(self) -> BatchLine:
        given = [k for k in ("prompt", "messages", "prompt_ids") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages or prompt_ids (got {', '.join(given) or 'none'})")
        return self

    def generate_args(self, request_id: str, default_max_tokens: int) -> GenerateArgs:
        """This line as the server's checked arguments (SamplingParams checks the values; raises ValueError)."""
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        params = SamplingParams(max_tokens=max_tokens, **self.model_dump(include=SAMPLING_FIELDS))
        messages = [t.model_dump() for t in self.messages] if self.messages is not None else None
        return GenerateArgs(
            request_id,
            self.prompt,
            messages,
            self.prompt_ids,
            params,
            self.mode,
            self.draft_tokens,
            self.judge_threshold,
        )


@dataclass(frozen=True)
class Job:
    """One input line to run: its 1-based number and its id (the line's own, else line-N)."""

    line: int
    id: str
    spec: BatchLine | None  # None: the line is invalid, `problem` says why
    problem: str = ""


def read_jobs(path: Path) -> Iterator[Job]:
    """The input's non-blank lines, parsed; an invalid line becomes a Job with its problem."""
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            default_id = f"line-{number}"
            try:
                spec = BatchLine.model_validate_json(text)
            except ValidationError as err:
                raw = _id_of(text)
                yield Job(number, raw or default_id, None, f"line {number}: {_validation_message(err)}")
                continue
            job_id = spec.id or default_id
            if job_id in seen:
                yield Job(number, job_id, None, f"line {number}: id {job_id!r} is also the id of line {seen[job_id]}")
                continue
            seen[job_id] = number
            yield Job(number, job_id, spec)


def _id_of(text: str) -> str | None:
    """The `id` of a line that failed validation, when it has a usable one (so its error record is found)."""
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"]:
            return data["id"]
    return None


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":  # our own validator's message, without pydantic's "Value error, "
            msg = str(e["ctx"]["error"])
        else:
            msg = e["msg"]
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def finished_ids(path: Path) -> set[str]:
    """Rewrites an earlier run's output to the records of finished lines (valid JSON, no `error`), dropping
    error records and a truncated last line, and returns their ids. A missing file: none finished."""
    if not path.exists():
        return set()
    kept, ids = [], set()
    with path.open(encoding="utf-8") as f:
        for text in f:
            try:
                record = json.loads(text)
            except ValueError:  # a line cut short by a killed job; it is run again
                continue
            if isinstance(record, dict) and "error" not in record and isinstance(record.get("id"), str):
                kept.append(text if text.endswith("\n") else text + "\n")
                ids.add(record["id"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one, never half of each
    return ids


@dataclass
class Summary:
    lines: int = 0  # non-blank input lines
    skipped: int = 0  # finished by an earlier run
    done: int = 0  # finished now
    errors: int = 0  # error records written now
    tokens: int = 0  # completion tokens generated now
    seconds: float = 0.0


async def run_batch(
    backend: Backend, config: Config, input_path: Path, output_path: Path, *, progress: bool = True
) -> Summary:
    """Runs every unfinished line of input_path through the backend, appending a record per line to
    output_path; up to serve.max_active_requests at once."""
    start = time.perf_counter()
    done_before = finished_ids(output_path)
    jobs = list(read_jobs(input_path))
    todo = [j for j in jobs if j.id not in done_before or j.spec is None]
    summary = Summary(lines=len(jobs), skipped=len(jobs) - len(todo))
    log.info("%d lines, %d finished earlier, %d to run", summary.lines, summary.skipped, len(todo))
    if not await backend.ready():
        raise BatchError("the backend failed to start (see the log above)")
    default_max_tokens = config.decoding.max_new_tokens
    queue = iter(todo)
    bar = tqdm(
        total=summary.lines,
        initial=summary.skipped,
        unit="prompt",
        file=sys.stderr,
        disable=not progress,
        mininterval=2,
    )
    with output_path.open("a", encoding="utf-8") as out:

        async def worker() -> None:
            for job in queue:  # one shared iterator: each job goes to exactly one worker
                record = await _run_one(backend, job, default_max_tokens)
                _write(out, record)
                if "error" in record:
                    summary.errors += 1
                    log.warning("%s (line %d): %s", job.id, job.line, record["error"])
                else:
                    summary.done += 1
                    summary.tokens += record["completion_tokens"]
                bar.update(1)

        try:
            await asyncio.gather(*(worker() for _ in range(config.serve.max_active_requests)))
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


async def _run_one(backend: Backend, job: Job, default_max_tokens: int) -> dict:
    head = {"id": job.id, "line": job.line}
    if job.spec is None:
        return {**head, "error": job.problem}
    try:
        request = engine_request_for(backend, job.spec.generate_args(f"batch-{job.line}", default_max_tokens))
        completion = None
        async with contextlib.aclosing(backend.stream(f"batch-{job.line}", request)) as items:
            async for item in items:
                if isinstance(item, Completion):
                    completion = item
    except ValueError as err:  # RequestError (prompt too long, bad token id ...) and SamplingParams' checks
        return {**head, "error": f"line {job.line}: {err}"}
    except BackendNotReady as err:  # the actors failed and are restarting: a re-run retries this line
        return {**head, "error": f"line {job.line}: {err}"}
    record = {**head, **completion.as_dict()}
    if completion.finish_reason is FinishReason.ERROR:
        record["error"] = f"line {job.line}: the backend failed while decoding (see the job's log); a re-run retries it"
    return record


def _write(out: IO[str], record: dict) -> None:
    # One write of one whole line, then flush: a killed job leaves at most its last line cut short.
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


# ---- the `judgeserve batch` command ---------------------------------------------------------------------


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    from cluster.cli import DEFAULT_CONFIG

    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--input", type=Path, required=True, help="JSONL, one request per line (cluster.batch)")
    parser.add_argument("--output", type=Path, required=True, help="JSONL records, appended; a re-run resumes")
    parser.add_argument("--ray-address", help="join this running Ray cluster (default serve.ray_address)")
    parser.add_argument("--no-ray", action="store_true", help="run the engine in this process, without Ray")
    parser.add_argument("--tensor-parallel", type=int, help="target shards (default serve.tensor_parallel)")
    parser.add_argument("--device", help="override runtime.device (cpu, cuda)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still logged)")


def cmd_batch(args: argparse.Namespace) -> int:
    """`judgeserve batch`: 0 when every line has a finished record, 1 when some have error records (fix
    the input or the cluster and run it again: finished lines are kept)."""
    from cluster.ray_backend import BackendStartError
    from engine.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        "runtime.device": args.device,
        "serve.ray_address": args.ray_address,
        "serve.tensor_parallel": args.tensor_parallel,
    }
    config = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    if not args.input.is_file():
        print(f"judgeserve batch: input {args.input} is not a file", file=sys.stderr)
        return 1
    try:
        backend = make_backend(config, args.no_ray)
        try:
            summary = asyncio.run(
                _until_signalled(run_batch(backend, config, args.input, args.output, progress=not args.no_progress))
            )
        finally:
            backend.close()
    except (BatchError, BackendStartError, OSError) as err:
        print(f"judgeserve batch: {err}", file=sys.stderr)
        return 1
    if summary is None:
        log.info("stopped by a signal; finished lines are in %s, a re-run does the rest", args.output)
        return 1
    log.info(
        "batch done: %d lines, %d finished earlier, %d now (%d tokens), %d errors, %.1f s -> %s",
        summary.lines,
        summary.skipped,
        summary.done,
        summary.tokens,
        summary.errors,
        summary.seconds,
        args.output,
    )
    return 1 if summary.errors else 0


async def _until_signalled(work) -> Summary | None:
    """Runs `work` until it ends or SIGINT/SIGTERM (`ray job stop`) arrives; then cancels it (in-flight
    requests stop within a step; their lines have no record yet, so a re-run does them) and returns None."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if (
    __name__ == "__main__"
):  # `python -m cluster.batch ...`, the same as `judgeserve batch` (a `ray job submit` entry point)
    from cluster.cli import main

    sys.exit(main(["batch", *sys.argv[1:]]))
