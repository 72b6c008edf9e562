"""A small Python client of the judgeserve gRPC service, and the `judgeserve client` command.

  with JudgeserveClient("127.0.0.1:50051") as c:
      result = c.generate("def fib(n):", max_tokens=64)      # the keys of `judgeserve generate --json`
      for event in c.stream(messages=[{"role": "user", "content": "hi"}]):
          ...                                                  # Delta per step, then one Final

Imports only grpc and the generated stubs (no torch), so it runs on machines without the models.
Not for: serving (cluster.server) or anything the server checks again anyway beyond building messages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import judgeserve_pb2 as pb
from protos import judgeserve_pb2_grpc as pb_grpc

DEFAULT_HOST = "127.0.0.1"  # shared with cluster.server: where `serve` binds and `client` connects
DEFAULT_PORT = 50051  # the conventional gRPC port
TOKEN_ENV = "JUDGESERVE_TOKEN"  # the bearer token, when not given as a file


def _enum_name(enum, value: int, prefix: str) -> str:
    """pb.Mode MODE_STANDARD -> "standard" (the engine's spelling, as in `generate --json`)."""
    return enum.Name(value).removeprefix(prefix).lower()


@dataclass(frozen=True)
class Delta:
    """One decoding step's tokens."""

    request_id: str
    text: str
    token_ids: list[int]
    provenance: list[str]  # one per token: target, matched, judge, correction or bonus


@dataclass(frozen=True)
class Final:
    """The end of a stream; `result` has the keys of `judgeserve generate --json` (Completion.as_dict)."""

    request_id: str
    result: dict
    error: str = ""  # finish_reason "error" only: what failed, in words
    message: pb.Final | None = None  # the wire message, with every field (e.g. timings' compute split)


def read_token(token_file: str | Path | None) -> str | None:
    """A bearer token from a file (surrounding whitespace dropped) or $JUDGESERVE_TOKEN; None for neither."""
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


class JudgeserveClient:
    """A blocking client over one channel. `target` is HOST:PORT; `token` the server's bearer token;
    `tls_ca` a PEM file of the CA (or self-signed certificate) to trust, which turns TLS on."""

    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None):
        # gRPC's default 4 MiB receive limit is ample: the server sends one step's tokens per message.
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(target, creds)
        else:
            self._channel = grpc.insecure_channel(target)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.JudgeserveStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "JudgeserveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        mode: str | None = None,
        judge_threshold: float | None = None,
        draft_tokens: int | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[Delta | Final]:
        """Yields a Delta per decoding step, then one Final. Exactly one of prompt (raw text), messages (chat
        turns) or prompt_ids. Leaving the loop early cancels the request on the server. Raises
        grpc.RpcError for refused requests (INVALID_ARGUMENT names the field) and deadlines (timeout, s)."""
        request = pb.GenerateRequest(
            request_id=request_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=list(stop),
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
            mode=pb.Mode.Value(f"MODE_{mode.upper()}") if mode else pb.MODE_UNSPECIFIED,
            judge_threshold=judge_threshold,
            draft_tokens=draft_tokens,
        )
        if prompt is not None:
            request.prompt = prompt
        if messages is not None:
            request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        if prompt_ids is not None:
            request.prompt_ids.ids.extend(prompt_ids)
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        text, ids, provenance = [], [], []
        try:
            for response in call:
                if response.HasField("delta"):
                    d = response.delta
                    prov = [_enum_name(pb.Provenance, p, "PROVENANCE_") for p in d.provenance]
                    text.append(d.text)
                    ids.extend(d.token_ids)
                    provenance.extend(prov)
                    yield Delta(response.request_id, d.text, list(d.token_ids), prov)
                elif response.HasField("final"):
                    f = response.final
                    yield Final(response.request_id, _result("".join(text), ids, provenance, f), f.error, f)
        finally:
            call.cancel()  # no-op once the stream has ended; frees the server's work if the caller left early

    def generate(self, prompt: str | None = None, **kwargs) -> dict:
        """Runs one request to the end; returns the keys of `judgeserve generate --json`. Takes stream's
        arguments."""
        for event in self.stream(prompt, **kwargs):
            if isinstance(event, Final):
                return event.result
        raise RuntimeError("the server ended the stream without a final message")

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        """Ends an active request (its stream ends with finish_reason abort); False if none had this id."""
        reply = self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout, metadata=self._metadata)
        return reply.found

    def model_info(self, timeout: float | None = None) -> dict:
        """The served models, judge and defaults (the same dict as cluster.backend.describe)."""
        r = self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self._metadata)

        def model(m: pb.ModelDescription) -> dict:
            return {
                "name": m.name,
                "family": m.family,
                "layers": m.layers,
                "hidden_size": m.hidden_size,
                "vocab_size": m.vocab_size,
                "dtype": m.dtype,
                "fingerprint": m.fingerprint,
            }

        return {
            "name": r.name,
            "target": model(r.target),
            "draft": model(r.draft) if r.HasField("draft") else None,
            "judge": {
                "present": r.judge.present,
                "target_name": r.judge.target_name,
                "target_fingerprint": r.judge.target_fingerprint,
                "default_threshold": r.judge.default_threshold,
            },
            "default_mode": _enum_name(pb.Mode, r.default_mode, "MODE_"),
            "default_draft_tokens": r.default_draft_tokens,
            "default_max_tokens": r.default_max_tokens,
            "max_seq_len": r.max_seq_len,
            "lossy_note": r.lossy_note,
        }

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", ... ("" = the whole server)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _result(text: str, ids: list[int], provenance: list[str], f: pb.Final) -> dict:
    """Completion.as_dict's keys and rounding, from the streamed tokens and the final statistics."""
    t = f.timings
    return {
        "text": text,
        "token_ids": ids,
        "provenance": provenance,
        "finish_reason": _enum_name(pb.FinishReason, f.finish_reason, "FINISH_REASON_"),
        "mode": _enum_name(pb.Mode, f.mode, "MODE_"),
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "steps": f.steps,
        "mean_accepted_per_step": round(f.mean_accepted_per_step, 4),
        "judge_accepted_tokens": f.judge_accepted_tokens,
        "tokens_per_second": round(f.tokens_per_second, 3),
        "wall_seconds": round(f.wall_seconds, 4),
        "timings": {
            "draft_s": round(t.draft_seconds, 4),
            "verify_s": round(t.verify_seconds, 4),
            "prefill_s": round(t.prefill_seconds, 4),
            "judge_s": round(t.judge_seconds, 4),
            "total_s": round(t.total_seconds, 4),
            "overhead_s": round(t.overhead_seconds, 4),
            "transport_s": round(t.transport_seconds, 4),
        },
    }


# ---- the `judgeserve client` command ------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}", help="the server, HOST:PORT")
    parser.add_argument("--prompt", required=True, help="the user message (chat template applied; see --raw)")
    parser.add_argument("--raw", action="store_true", help="send --prompt as raw text, without the chat template")
    parser.add_argument("--mode", choices=["ar", "standard", "judge"], help="default: the server's")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument("--draft-tokens", type=int, help="K; default: the server's")
    parser.add_argument("--judge-threshold", type=float, help="judge mode: accept when sigmoid(score) > this")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the keys of generate --json)")
    parser.add_argument("--request-id", default="", help="an id for `Abort` and the server's log")
    parser.add_argument("--timeout", type=float, help="deadline in seconds; the server stops the request then")
    parser.add_argument("--token-file", type=Path, help=f"the server's bearer token (the file's text; or {TOKEN_ENV})")
    parser.add_argument("--tls-ca", type=Path, help="PEM certificate to trust; turns TLS on")


def cmd_client(args: argparse.Namespace) -> int:
    """`judgeserve client`: one request to a running server; text to stdout, statistics to stderr."""
    try:
        with JudgeserveClient(args.target, read_token(args.token_file), args.tls_ca) as client:
            result = None
            events = client.stream(
                args.prompt if args.raw else None,
                messages=None if args.raw else [{"role": "user", "content": args.prompt}],
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop or (),
                mode=args.mode,
                judge_threshold=args.judge_threshold,
                draft_tokens=args.draft_tokens,
                request_id=args.request_id,
                timeout=args.timeout,
            )
            for event in events:
                if isinstance(event, Final):
                    result = event.result
                    if event.error:
                        print(f"judgeserve: the server failed: {event.error}", file=sys.stderr)
                elif args.stream and not args.json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
    except grpc.RpcError as err:
        print(f"judgeserve: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the stream's cleanup has cancelled the request on the server
        return 130
    if result is None:
        print("judgeserve: the server ended the stream without a final message", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    if not args.stream:
        sys.stdout.write(result["text"])
    print("\n--\n" + summary(result), file=sys.stderr)
    return 0 if result["finish_reason"] != "error" else 1


def summary(r: dict) -> str:
    """One line of a result's statistics (the keys of `generate --json`)."""
    return (
        f"{r['completion_tokens']} tokens in {r['wall_seconds']:.2f} s ({r['tokens_per_second']:.2f} tokens/s), "
        f"mode {r['mode']}, {r['steps']} steps, {r['mean_accepted_per_step']:.2f} draft tokens accepted per step, "
        f"{r['judge_accepted_tokens']} judge-accepted, finish: {r['finish_reason']}"
    )
