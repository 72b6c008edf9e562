"""The gRPC edge of judgeserve: the async `Judgeserve` servicer, the health service, and `serve`.

The servicer checks every field and size of a request (EdgeLimits, the one place these caps live),
turns it into an engine Request through a `Backend` (cluster.backend), and relays the backend's
StepEvents and final Completion as protos/judgeserve.proto messages. A client's cancellation or deadline
cancels the handler task, which closes the backend stream and so stops the request's work within one step.
Security at the edge: an optional bearer token (checked with hmac.compare_digest by a server interceptor;
health checks are exempt), optional TLS, a capped receive size; nothing from the wire is ever unpickled.

Not for: decoding, scheduling or Ray (the backend does those); wire types (protos/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import re
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster.backend import Backend, BackendNotReady, RequestIdInUse
from cluster.client import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, read_token
from cluster.metrics import Metrics, RequestMetrics
from engine.config import Mode
from engine.decode import Completion, RequestError, StepEvent
from engine.output import FinishReason
from engine.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
from engine.tokenizer import ChatMessage
from engine.verify import Provenance
from protos import judgeserve_pb2 as pb
from protos import judgeserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from engine.config import Config
    from engine.decode import Request

log = logging.getLogger("judgeserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Judgeserve"].full_name  # "judgeserve.v1.Judgeserve"
DEFAULT_GRACE_S = 10.0  # seconds in-flight requests get to finish on SIGINT/SIGTERM
HEALTH_POLL_S = 0.2  # how often health re-reads backend.serving()
ERROR_TEXT = "the server failed while decoding this request; details are in its log"


class ServeError(RuntimeError):
    """The server cannot start as asked (an address in use, unreadable TLS files); the message says why."""


@dataclass(frozen=True)
class EdgeLimits:
    """Every cap the server puts on what a client sends (sizes in bytes, counts, characters).

    The receive limit bounds the memory one call can take before any check runs; the rest bound the
    work a request can ask for. Model-dependent limits (prompt + max_tokens <= max_seq_len, vocabulary)
    are checked by the backend against the loaded models.
    """

    max_message_bytes: int = 4 * 1024 * 1024  # gRPC receive (and send) limit per message
    max_prompt_chars: int = 1_000_000  # raw prompt, or all chat contents together
    max_prompt_bytes: int = 2 * 1024 * 1024  # the same, as UTF-8
    max_messages: int = 256  # chat turns
    max_prompt_ids: int = 131_072  # prompt token ids (the largest max_seq_len a config allows)
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_string_chars: int = MAX_STOP_STRING_CHARS
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 128
    max_concurrent_rpcs: int = 1024  # beyond this gRPC answers RESOURCE_EXHAUSTED


CHAT_ROLES = frozenset({"system", "user", "assistant"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")

MODE_FROM_PB = {pb.MODE_AR: Mode.AR, pb.MODE_STANDARD: Mode.STANDARD, pb.MODE_JUDGE: Mode.JUDGE}
MODE_TO_PB = {mode: value for value, mode in MODE_FROM_PB.items()}
PROVENANCE_TO_PB = {
    Provenance.TARGET: pb.PROVENANCE_TARGET,
    Provenance.MATCHED: pb.PROVENANCE_MATCHED,
    Provenance.JUDGE: pb.PROVENANCE_JUDGE,
    Provenance.CORRECTION: pb.PROVENANCE_CORRECTION,
    Provenance.BONUS: pb.PROVENANCE_BONUS,
}
FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


# ---- request checks and message conversion ----------------------------------------------------------


@dataclass(frozen=True)
class GenerateArgs:
    """A GenerateRequest after the edge checks, in engine terms."""

    request_id: str  # "" = let the server assign one
    prompt: str | None
    messages: list[ChatMessage] | None
    prompt_ids: list[int] | None
    params: SamplingParams
    mode: Mode | None  # None = the server's default
    draft_tokens: int | None
    threshold: float | None


def check_request_id(request_id: str, limits: EdgeLimits, *, required: bool) -> str:
    if not request_id:
        if required:
            raise RequestError("request_id: required")
        return ""
    if len(request_id) > limits.max_request_id_chars or not _REQUEST_ID.fullmatch(request_id):
        raise RequestError(f"request_id: at most {limits.max_request_id_chars} characters of [A-Za-z0-9._:-]")
    return request_id


def _check_text(field: str, chars: int, utf8_bytes: int, limits: EdgeLimits) -> None:
    if chars > limits.max_prompt_chars or utf8_bytes > limits.max_prompt_bytes:
        raise RequestError(
            f"{field}: at most {limits.max_prompt_chars} characters and {limits.max_prompt_bytes} bytes of UTF-8"
        )


def parse_generate(msg: pb.GenerateRequest, limits: EdgeLimits, default_max_tokens: int) -> GenerateArgs:
    """Checks every field of a GenerateRequest; raises RequestError whose message starts with the field."""
    request_id = check_request_id(msg.request_id, limits, required=False)

    prompt = messages = prompt_ids = None
    which = msg.WhichOneof("input")
    if which is None:
        raise RequestError("input: give one of prompt, messages or prompt_ids")
    if which == "prompt":
        prompt = msg.prompt
        _check_text("prompt", len(prompt), len(prompt.encode("utf-8")), limits)
    elif which == "messages":
        turns = msg.messages.messages
        if not turns:
            raise RequestError("messages: at least one message")
        if len(turns) > limits.max_messages:
            raise RequestError(f"messages: at most {limits.max_messages} messages")
        for i, turn in enumerate(turns):
            if turn.role not in CHAT_ROLES:
                raise RequestError(f"messages[{i}].role: one of {', '.join(sorted(CHAT_ROLES))}")
        _check_text(
            "messages",
            sum(len(t.content) for t in turns),
            sum(len(t.content.encode("utf-8")) for t in turns),
            limits,
        )
        messages = [{"role": t.role, "content": t.content} for t in turns]
    else:
        if len(msg.prompt_ids.ids) > limits.max_prompt_ids:
            raise RequestError(f"prompt_ids: at most {limits.max_prompt_ids} ids")
        prompt_ids = list(msg.prompt_ids.ids)

    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens
    if max_tokens < 1:
        raise RequestError("max_tokens: must be at least 1")
    if not 0.0 <= msg.temperature <= 100.0:  # also refuses NaN
        raise RequestError("temperature: must be in [0, 100]")
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise RequestError("top_p: must be in (0, 1]")
    if msg.HasField("seed") and msg.seed >= 2**63:
        raise RequestError("seed: must be in [0, 2^63)")
    if len(msg.stop) > limits.max_stop_strings:
        raise RequestError(f"stop: at most {limits.max_stop_strings} strings")
    if any(not s or len(s) > limits.max_stop_string_chars for s in msg.stop):
        raise RequestError(f"stop: every string must have 1 to {limits.max_stop_string_chars} characters")
    if len(msg.stop_token_ids) > limits.max_stop_token_ids:
        raise RequestError(f"stop_token_ids: at most {limits.max_stop_token_ids} ids")

    if msg.mode == pb.MODE_UNSPECIFIED:
        mode = None
    elif msg.mode in MODE_FROM_PB:
        mode = MODE_FROM_PB[msg.mode]
    else:
        raise RequestError(f"mode: unknown value {msg.mode}")
    threshold = msg.judge_threshold if msg.HasField("judge_threshold") else None
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise RequestError("judge_threshold: must be in [0, 1]")
    draft_tokens = msg.draft_tokens if msg.HasField("draft_tokens") else None
    if draft_tokens is not None and not 1 <= draft_tokens <= 128:
        raise RequestError("draft_tokens: must be in [1, 128]")

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=msg.temperature,
        top_p=top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )
    return GenerateArgs(request_id, prompt, messages, prompt_ids, params, mode, draft_tokens, threshold)


def engine_request_for(backend: Backend, args: GenerateArgs) -> "Request":
    """The backend's tokenized, model-checked Request for checked edge arguments; raises RequestError."""
    return backend.make_request(
        prompt=args.prompt,
        messages=args.messages,
        prompt_ids=args.prompt_ids,
        params=args.params,
        mode=args.mode,
        draft_tokens=args.draft_tokens,
        threshold=args.threshold,
    )


def delta_message(event: StepEvent) -> pb.Delta:
    return pb.Delta(
        text=event.text, token_ids=event.tokens, provenance=[PROVENANCE_TO_PB[p] for p in event.provenance]
    )


def final_message(done: Completion) -> pb.Final:
    t = done.timings
    return pb.Final(
        finish_reason=FINISH_TO_PB[done.finish_reason],
        mode=MODE_TO_PB[done.mode],
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        steps=done.steps,
        speculative_steps=done.speculative_steps,
        draft_tokens_accepted=done.draft_tokens_accepted,
        mean_accepted_per_step=done.mean_accepted_per_step,
        judge_accepted_tokens=done.judge_accepted_tokens,
        wall_seconds=t.total_s,
        tokens_per_second=done.tokens_per_second,
        timings=pb.Timings(
            draft_seconds=t.draft_s,
            verify_seconds=t.verify_s,
            prefill_seconds=t.prefill_s,
            judge_seconds=t.judge_s,
            total_seconds=t.total_s,
            overhead_seconds=t.overhead_s,
            # Only the Ray scheduler's timings (actors.scheduler.ServeTimings) tell compute from waiting;
            # in-process the phase is all compute.
            draft_compute_seconds=getattr(t, "draft_compute_s", t.draft_s),
            verify_compute_seconds=getattr(t, "verify_compute_s", t.verify_s),
            judge_compute_seconds=getattr(t, "judge_compute_s", t.judge_s),
            transport_seconds=getattr(t, "transport_s", 0.0),
        ),
        error=ERROR_TEXT if done.finish_reason is FinishReason.ERROR else "",
    )


def model_info_message(info: dict) -> pb.ModelInfoResponse:
    """cluster.backend.describe's dict -> ModelInfoResponse."""
    return pb.ModelInfoResponse(
        name=info["name"],
        target=pb.ModelDescription(**info["target"]),
        draft=pb.ModelDescription(**info["draft"]) if info["draft"] is not None else None,
        judge=pb.JudgeDescription(**info["judge"]),
        default_mode=MODE_TO_PB[Mode(info["default_mode"])],
        default_draft_tokens=info["default_draft_tokens"],
        default_max_tokens=info["default_max_tokens"],
        max_seq_len=info["max_seq_len"],
        lossy_note=info["lossy_note"],
    )


# ---- the servicer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MalformedRequest:
    """Bytes that do not parse as the method's request message (what _add_judgeserve hands the servicer)."""

    why: str


def _parse_or_malformed(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as err:
            return MalformedRequest(f"request: not a valid {message_type.DESCRIPTOR.full_name} message ({err})")

    return parse


async def _refuse_malformed(request, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)


def _add_judgeserve(servicer: "JudgeserveServicer", server: grpc.aio.Server) -> None:
    """The generated add_JudgeserveServicer_to_server, except that bytes that are not the request message
    reach the method as a MalformedRequest, answered INVALID_ARGUMENT, instead of failing inside gRPC's
    deserializer (which answers UNKNOWN)."""
    service = pb.DESCRIPTOR.services_by_name["Judgeserve"]
    handlers = {}
    for method in service.methods:
        request_type, response_type = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_parse_or_malformed(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class JudgeserveServicer(pb_grpc.JudgeserveServicer):
    def __init__(self, backend: Backend, limits: EdgeLimits = EdgeLimits(), metrics: Metrics | None = None):
        self.backend, self.limits = backend, limits
        self.metrics = metrics or Metrics(backend.load)
        self.admitted = 0  # Generate calls past the checks and not yet ended: running or queued in the backend

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        await _refuse_malformed(request, context)
        observed = self.metrics.request()
        try:
            args = parse_generate(request, self.limits, self.backend.model_info()["default_max_tokens"])
            # Tokenized on the event loop: a thread pool would run encodes concurrently, which HF fast
            # tokenizers do not support ("Already borrowed"). EdgeLimits bounds the cost.
            engine_request = engine_request_for(self.backend, args)
        except ValueError as err:  # RequestError, and SamplingParams' own checks
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except BackendNotReady as err:
            self.metrics.refused.labels(reason="unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        running, waiting = self.backend.capacity()
        if self.admitted >= running + waiting:
            # Refused before any work: a queue past its bound only adds latency that the client could spend
            # on another replica (Ray Serve and vLLM's routers shed load the same way).
            self.metrics.refused.labels(reason="overload").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"overloaded: {self.admitted} requests are running or queued, the bound is {running} running + "
                f"{waiting} queued (serve.max_active_requests, serve.max_queued_requests); retry later",
            )
        self.admitted += 1
        try:
            async for response in self._generate(args, engine_request, observed, context):
                yield response
        finally:
            self.admitted -= 1

    async def _generate(
        self,
        args: GenerateArgs,
        engine_request: "Request",
        observed: RequestMetrics,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.GenerateResponse]:
        request_id = args.request_id or uuid.uuid4().hex
        log.info(
            "request %s: %s, %d prompt tokens, max_tokens %d",
            request_id,
            engine_request.mode.value,
            len(engine_request.prompt_ids),
            engine_request.params.max_tokens,
        )
        try:
            async with contextlib.aclosing(self.backend.stream(request_id, engine_request)) as items:
                async for item in items:
                    if isinstance(item, Completion):
                        log.info(
                            "request %s: %s, %d tokens, %.2f tokens/s",
                            request_id,
                            item.finish_reason.value,
                            item.completion_tokens,
                            item.tokens_per_second,
                        )
                        observed.done(item)
                        yield pb.GenerateResponse(request_id=request_id, final=final_message(item))
                        return
                    if item.tokens or item.text:
                        observed.step(item)
                        yield pb.GenerateResponse(request_id=request_id, delta=delta_message(item))
        except RequestIdInUse as err:
            log.info("request %s: refused, the id is in use", request_id)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(err))
        except BackendNotReady as err:  # a part of the backend failed under this request: it is lost
            log.warning("request %s: unavailable: %s", request_id, err)
            self.metrics.refused.labels(reason="unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except asyncio.CancelledError:
            log.info("request %s: cancelled by the client or its deadline", request_id)
            raise

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await _refuse_malformed(request, context)
        try:
            request_id = check_request_id(request.request_id, self.limits, required=True)
        except RequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        found = await self.backend.abort(request_id)
        log.info("abort %s: %s", request_id, "aborting" if found else "not active")
        return pb.AbortResponse(found=found)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        await _refuse_malformed(request, context)
        try:
            return model_info_message(self.backend.model_info())
        except BackendNotReady as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))


# ---- authentication, TLS, the server -----------------------------------------------------------------


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED); health checks pass, so
    load balancers and orchestrators can probe without the secret."""

    EXEMPT_PREFIX = "/grpc.health.v1.Health/"

    def __init__(self, token: str):
        if not token:
            raise ValueError("token: empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(self.EXEMPT_PREFIX) or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        return _deny(handler) if handler is not None else None

    def _authorized(self, metadata) -> bool:
        given = [value for key, value in (metadata or ()) if key == "authorization"]
        if len(given) != 1 or not isinstance(given[0], str):
            return False
        return hmac.compare_digest(given[0].encode(), self._expected)


async def _unauthenticated(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization metadata)")


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that refuses the call; the request bytes are never deserialized."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unauthenticated)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_unauthenticated)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_unauthenticated)
    return grpc.stream_stream_rpc_method_handler(_unauthenticated)


@dataclass(frozen=True)
class TLSFiles:
    cert: Path  # PEM certificate chain of the server
    key: Path  # PEM private key


@dataclass
class _Served:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    ready: asyncio.Task  # sets SERVING once backend.ready(); its result is that bool
    metrics: Metrics


async def _build(
    backend: Backend,
    host: str,
    port: int,
    token: str | None,
    tls: TLSFiles | None,
    limits: EdgeLimits,
) -> _Served:
    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(token)] if token else None,
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    metrics = Metrics(backend.load)
    _add_judgeserve(JudgeserveServicer(backend, limits, metrics), server)
    status = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await status.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    _enable_reflection(server)

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is not None:
            creds = grpc.ssl_server_credentials([(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except (RuntimeError, OSError) as err:  # grpc says RuntimeError for an address in use; OSError: TLS files
        raise ServeError(f"cannot listen on {address}: {err}") from None
    if bound == 0:
        raise ServeError(f"cannot listen on {address}")
    if token and tls is None and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("a bearer token without TLS on %s: the token crosses the network in clear text", host)

    async def set_health(serving: bool) -> None:
        for name in ("", SERVICE_NAME):
            await status.set(
                name, health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            )

    async def mark_ready() -> bool:
        ok = await backend.ready()
        if ok:
            await set_health(True)
            asyncio.ensure_future(follow_health())
        return ok

    async def follow_health() -> None:
        """Health follows backend.serving() (a backend restarting failed actors is NOT_SERVING) until the
        server stops; a graceful shutdown sets NOT_SERVING for good."""
        stopped = asyncio.ensure_future(server.wait_for_termination())
        serving = True
        while not stopped.done():
            now = backend.serving()
            if now != serving:
                log.warning("health: %s", "SERVING again" if now else "NOT_SERVING (the backend is incomplete)")
                await set_health(now)
                serving = now
            await asyncio.wait((stopped,), timeout=HEALTH_POLL_S)

    return _Served(server, bound, status, asyncio.ensure_future(mark_ready()), metrics)


def _enable_reflection(server: grpc.aio.Server) -> None:
    try:
        from grpc_reflection.v1alpha import reflection  # optional: grpcio-reflection
    except ImportError:
        return
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


async def build_server(
    backend: Backend,
    host: str = DEFAULT_HOST,
    port: int = 0,
    token: str | None = None,
    tls: TLSFiles | None = None,
    limits: EdgeLimits = EdgeLimits(),
) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server: Judgeserve, grpc.health.v1 (NOT_SERVING until backend.ready(),
    then SERVING) and reflection when grpcio-reflection is installed. port 0 picks a free port; the
    bound port is returned. Call `await server.start()`, and `await server.stop(grace)` at the end."""
    served = await _build(backend, host, port, token, tls, limits)
    return served.server, served.port


async def serve(
    backend: Backend,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    tls: TLSFiles | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    limits: EdgeLimits = EdgeLimits(),
    metrics_port: int | None = None,
) -> None:
    """Serves until SIGINT or SIGTERM, then drains: health NOT_SERVING, in-flight requests get grace_s.
    metrics_port: Prometheus /metrics on host:metrics_port (None: off)."""
    served = await _build(backend, host, port, token, tls, limits)
    await served.server.start()
    log.info("listening on %s:%d%s", host, served.port, " (TLS)" if tls else "")
    if metrics_port is not None:
        try:
            bound = served.metrics.serve_http(host, metrics_port)
        except OSError as err:
            await served.server.stop(0)
            raise ServeError(f"cannot serve metrics on {host}:{metrics_port}: {err}") from None
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((served.ready, stopping), return_when=asyncio.FIRST_COMPLETED)
        if served.ready.done():
            if not served.ready.result():
                raise ServeError("the backend failed to become ready (see the log above)")
            log.info("ready")
        await stopping
        log.info("shutting down: in-flight requests have %.0f s to finish", grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        served.ready.cancel()
        await served.health.enter_graceful_shutdown()
        await served.server.stop(grace_s)
        log.info("stopped")


# ---- the `judgeserve serve` command -------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from cluster.cli import DEFAULT_CONFIG

    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--host", help="address to bind (default serve.host, 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="gRPC port (default serve.port); 0 picks a free port")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default serve.metrics_port); -1: off")
    parser.add_argument(
        "--ray-address", help="join this running Ray cluster (default serve.ray_address; none: a local Ray in-process)"
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="run the engine in this process, without Ray (one request at a time)"
    )
    parser.add_argument("--tensor-parallel", type=int, help="target shards (default serve.tensor_parallel)")
    parser.add_argument(
        "--token-file", type=Path, help=f"require this bearer token (file contents; or set {TOKEN_ENV})"
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key, serve TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds to drain on SIGINT/SIGTERM")
    parser.add_argument("--device", help="override runtime.device (cpu, cuda)")


def load_serve_config(args: argparse.Namespace) -> "Config":
    """The config with the command line's overrides applied (and checked like the YAML)."""
    from engine.config import load_config

    overrides = {
        "runtime.device": args.device,
        "serve.host": args.host,
        "serve.port": args.port,
        "serve.ray_address": args.ray_address,
        "serve.tensor_parallel": args.tensor_parallel,
        "serve.metrics_port": args.metrics_port,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if args.metrics_port == -1:
        given["serve.metrics_port"] = None
    return load_config(args.config, given)


def make_backend(config: "Config", in_process: bool) -> Backend:
    """The Ray actors (joining serve.ray_address, else a local Ray on loopback), or the engine in this
    process. The Ray backend loads its models in the actors after the server is up (health says
    NOT_SERVING until then); the in-process one loads them here."""
    if in_process:
        from cluster.backend import LocalBackend
        from engine.decode import Engine

        return LocalBackend(Engine.from_config(config))
    from cluster.ray_backend import RayBackend

    return RayBackend(config)


def cmd_serve(args: argparse.Namespace) -> int:
    """`judgeserve serve`: serves the config's models over gRPC, through Ray actors unless --no-ray."""
    from cluster.ray_backend import BackendStartError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ServeError("--tls-cert and --tls-key go together")
        tls = TLSFiles(args.tls_cert, args.tls_key) if args.tls_cert else None
        token = read_token(args.token_file)
        config = load_serve_config(args)
        s = config.serve
        backend = make_backend(config, args.no_ray)
        try:
            asyncio.run(
                serve(
                    backend,
                    host=s.host,
                    port=s.port,
                    token=token,
                    tls=tls,
                    grace_s=args.grace,
                    metrics_port=s.metrics_port,
                )
            )
        finally:
            backend.close()
    except (ServeError, BackendStartError, OSError) as err:  # config, model and request errors: cluster.cli.main
        print(f"judgeserve serve: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # `python -m cluster.server --config ...`, the same as `judgeserve serve`
    _parser = argparse.ArgumentParser(prog="python -m cluster.server", description="serve judgeserve over gRPC")
    add_serve_arguments(_parser)
    sys.exit(cmd_serve(_parser.parse_args()))
