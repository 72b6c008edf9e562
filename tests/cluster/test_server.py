"""The gRPC server over LocalBackend and the tiny pair: a real grpc.aio server on 127.0.0.1, port 0.

The servers run on an asyncio loop in a background thread; the tests talk to them through the blocking
JudgeserveClient (and the raw stub for malformed requests), so no async test plugin is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.backend import BackendNotReady, LocalBackend
from cluster.client import Final, JudgeserveClient
from cluster.server import EdgeLimits, TLSFiles
from engine.config import Mode, load_config
from engine.decode import Completion, Engine
from engine.judge import JudgeHead
from engine.sampling import SamplingParams
from protos import judgeserve_pb2 as pb
from protos import judgeserve_pb2_grpc as pb_grpc
from tests.conftest import EventLoopThread

TINY_YAML = Path(__file__).resolve().parents[2] / "config" / "tiny.yaml"
TOKEN = "test-token-0123456789"
PROMPT = "The quick"
LONG = 4000  # max_tokens of requests that must still be running when cancelled (ar mode, ignore_eos)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Expected:
    """What the in-process engine produces, computed before any server exists (the engine is shared)."""

    by_mode: dict[Mode, Completion]
    stop_token: int  # a token emitted in the middle of a multi-token step
    stopped: Completion  # PROMPT in standard mode with stop_token_ids=(stop_token,)


@pytest.fixture(scope="module")
def engine() -> Engine:
    # A longer cache than tiny.yaml's so that a request can outlive a short deadline whatever the CPU.
    eng = Engine.from_config(load_config(TINY_YAML, {"decoding.max_seq_len": 4096}))
    # A lenient judge (a large bias): it accepts draft tokens the standard rule rejects, so judge mode's
    # output differs from the target's here and the lossy path is exercised.
    w = torch.randn(eng.target.args.hidden_size, generator=torch.Generator().manual_seed(7))
    eng.judge = JudgeHead(w, 20.0, 0.5, eng.target.name, eng.target.fingerprint)
    return eng


@pytest.fixture(scope="module")
def expected(engine) -> Expected:
    # On one worker thread, as LocalBackend runs the engine (and much faster than the main thread on a
    # loaded 2-core machine, where torch's intra-op threads spin against other processes).
    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(_expected, engine).result()


def _expected(engine: Engine) -> Expected:
    by_mode = {}
    for mode in Mode:
        request = engine.make_request(**_input(mode), params=SamplingParams(max_tokens=12), mode=mode)
        by_mode[mode] = engine.generate(request)
    # A stop token that appears first inside a step of three or more tokens, so the engine's last step
    # carries tokens past it that the Completion drops (the server must not stream them).
    request = engine.make_request(prompt=PROMPT, params=SamplingParams(max_tokens=24), mode=Mode.STANDARD)
    events = list(engine.stream(request))
    seen, stop = set(), None
    for ev in events:
        if len(ev.tokens) >= 3 and ev.tokens[1] not in seen:
            stop = ev.tokens[1]
            break
        seen.update(ev.tokens)
    assert stop is not None, "the tiny pair no longer makes a multi-token step here; pick another PROMPT"
    params = SamplingParams(max_tokens=24, stop_token_ids=(stop,))
    stopped = engine.generate(engine.make_request(prompt=PROMPT, params=params, mode=Mode.STANDARD))
    return Expected(by_mode, stop, stopped)


def _input(mode: Mode) -> dict:
    """Each mode's test request uses another kind of input, so all three are covered."""
    if mode is Mode.AR:
        return {"prompt_ids": list(PROMPT.encode())}
    if mode is Mode.STANDARD:
        return {"messages": [{"role": "user", "content": PROMPT}]}
    return {"prompt": PROMPT}


@dataclass
class Servers:
    loop: EventLoopThread
    backend: LocalBackend
    target: str  # no token
    secured: str  # requires TOKEN


@pytest.fixture(scope="module")
def servers(engine, expected):
    loop, backend = EventLoopThread(), LocalBackend(engine)
    started = [loop.start_server(backend), loop.start_server(backend, token=TOKEN)]
    (_, plain), (_, secured) = started
    yield Servers(loop, backend, f"127.0.0.1:{plain}", f"127.0.0.1:{secured}")
    for server, _ in started:
        loop.run(server.stop(0))
    backend.close()
    loop.close()


@pytest.fixture
def client(servers):
    with JudgeserveClient(servers.target) as c:
        yield c


def _wait_idle(backend: LocalBackend, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while backend.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not backend.running, f"engine generators still open: {sorted(backend.running)}"


# ---- outputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_greedy_stream_equals_in_process_engine(client, expected, mode):
    want = expected.by_mode[mode]
    events = list(client.stream(**_input(mode), max_tokens=12, mode=mode.value))
    *deltas, final = events
    assert isinstance(final, Final) and not any(isinstance(e, Final) for e in deltas)
    got = final.result
    assert got.keys() == want.as_dict().keys()  # the keys of `judgeserve generate --json`
    assert got["token_ids"] == want.token_ids
    assert got["text"] == want.text == "".join(d.text for d in deltas)
    assert 0 < got["timings"]["prefill_s"] <= got["timings"]["verify_s"]
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert all(len(d.provenance) == len(d.token_ids) for d in deltas)
    assert got["provenance"] == [p.name.lower() for p in want.provenance]
    assert got["completion_tokens"] == len(want.token_ids)
    for key in ("finish_reason", "mode", "prompt_tokens", "steps", "mean_accepted_per_step", "judge_accepted_tokens"):
        assert got[key] == want.as_dict()[key], key
    assert len({d.request_id for d in deltas} | {final.request_id}) == 1


def test_the_judge_case_above_is_lossy(expected):
    """Guards the fixture: the judge-mode comparison must cover judge-accepted tokens, not only matches."""
    judged = expected.by_mode[Mode.JUDGE]
    assert judged.judge_accepted_tokens > 0
    assert judged.token_ids != expected.by_mode[Mode.STANDARD].token_ids


def test_stream_stops_where_the_completion_stops(client, expected):
    want = expected.stopped
    events = list(client.stream(PROMPT, max_tokens=24, stop_token_ids=[expected.stop_token], mode="standard"))
    streamed = [t for e in events[:-1] for t in e.token_ids]
    assert streamed == want.token_ids == events[-1].result["token_ids"]
    assert streamed[-1] == expected.stop_token and events[-1].result["finish_reason"] == "stop"


def test_sampled_requests_with_a_seed_are_reproducible(client):
    kwargs = dict(max_tokens=6, temperature=0.8, top_p=0.9, top_k=50, seed=3, mode="standard")
    assert client.generate(PROMPT, **kwargs)["token_ids"] == client.generate(PROMPT, **kwargs)["token_ids"]


# ---- edge checks and authentication -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, field",
    [
        ({}, "input"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "temperature": 101.0}, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "judge_threshold": 1.5}, "judge_threshold"),
        ({"prompt": "hi", "draft_tokens": 0}, "draft_tokens"),
        ({"prompt": "hi", "stop": ["x"] * 17}, "stop"),
        ({"prompt": "hi", "stop": ["x" * 257]}, "stop"),
        ({"prompt": "hi", "request_id": "no spaces"}, "request_id"),
        ({"prompt": "hi", "request_id": "a" * 129}, "request_id"),
        ({"prompt": "hi", "mode": 9}, "mode"),
        ({"prompt": "x" * (EdgeLimits().max_prompt_chars + 1)}, "prompt"),
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt_ids": pb.TokenIds(ids=[10**6])}, "prompt_ids"),
        ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="hi")])}, "messages[0].role"),
        ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),  # prompt + max_tokens past max_seq_len
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_invalid_field_is_refused_naming_the_field(servers, fields, field):
    with grpc.insecure_channel(servers.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.JudgeserveStub(channel).Generate(pb.GenerateRequest(**fields), timeout=10))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_oversized_message_is_refused_before_parsing(servers):
    with grpc.insecure_channel(servers.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.JudgeserveStub(channel).Generate(pb.GenerateRequest(prompt="x" * (5 << 20)), timeout=10))
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_abort_needs_a_valid_request_id(client):
    with pytest.raises(grpc.RpcError) as err:
        client.abort("")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("request_id:")
    assert client.abort("nobody") is False


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_bearer_token_is_required_when_configured(servers, token):
    with JudgeserveClient(servers.secured, token=token) as c:
        for call in (c.model_info, lambda: c.generate(PROMPT, max_tokens=2), lambda: c.abort("x")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"  # probes need no secret


def test_bearer_token_lets_the_right_client_in(servers):
    with JudgeserveClient(servers.secured, token=TOKEN) as c:
        assert c.model_info()["target"]["name"] == "dummy:tiny"
        assert c.generate(PROMPT, max_tokens=2, mode="ar")["completion_tokens"] == 2


# ---- cancellation, deadlines, abort -------------------------------------------------------------------


def test_client_cancellation_closes_the_engine_generator(client, servers):
    stream = client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, mode="ar", request_id="cancel-me")
    for _ in range(2):
        next(stream)
    stream.close()  # cancels the call
    _wait_idle(servers.backend)
    assert 2 <= servers.backend.closed_early["cancel-me"] < LONG


def test_deadline_closes_the_engine_generator(client, servers):
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, mode="ar", request_id="late", timeout=0.3):
            pass
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(servers.backend)
    assert servers.backend.closed_early["late"] < LONG


def test_abort_ends_running_and_queued_requests_with_finish_reason_abort(client, servers):
    running = client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, mode="ar", request_id="abort-me")
    first = next(running)
    # The same id while active is refused; a second request queues behind the first.
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, max_tokens=2, request_id="abort-me")
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS
    with grpc.insecure_channel(servers.target) as channel:
        queued = pb_grpc.JudgeserveStub(channel).Generate(
            pb.GenerateRequest(prompt=PROMPT, max_tokens=4, request_id="queued"), timeout=20
        )
        deadline = time.monotonic() + 10
        while not client.abort("queued"):  # False until the server has registered it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (only,) = list(queued)
    assert only.final.finish_reason == pb.FINISH_REASON_ABORT and only.final.completion_tokens == 0
    assert "abort-me" in servers.backend.running  # the queued abort did not disturb the running request

    assert client.abort("abort-me") is True
    *rest, final = [first, *running]
    result = final.result
    assert result["finish_reason"] == "abort"
    assert 1 <= result["completion_tokens"] == len(result["token_ids"]) < LONG
    assert result["token_ids"] == [t for d in rest for t in d.token_ids]
    assert result["text"] == "".join(d.text for d in rest)
    _wait_idle(servers.backend)


def test_a_queued_request_past_its_deadline_leaves_the_queue(client, servers):
    running = client.stream(PROMPT, max_tokens=LONG, ignore_eos=True, mode="ar", request_id="hold")
    next(running)
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, max_tokens=2, request_id="waiting", timeout=0.3)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waiting" not in servers.backend.closed_early  # it never reached the engine
    assert client.abort("hold") is True
    assert list(running)[-1].result["finish_reason"] == "abort"
    assert client.generate(PROMPT, max_tokens=2, mode="ar")["completion_tokens"] == 2  # the turn was passed on
    _wait_idle(servers.backend)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["no-ray", "ray"])
def test_serve_entry_point_drains_on_sigterm(backend):
    """`python -m cluster.server` (what `judgeserve serve` runs), in-process and over an embedded local Ray:
    logs the address, the metrics port and "ready", serves and counts in /metrics. On SIGTERM health turns
    NOT_SERVING (seen by a Watch opened before), new requests are refused, the stream running then finishes
    within the grace period, and the process exits 0. With Ray: every socket it and its children listen on
    is on loopback, Ray checks tokens, and after the exit none of its processes (actors, raylet, GCS) is left."""
    command = [sys.executable, "-m", "cluster.server", "--config", str(TINY_YAML), "--port", "0", "--grace", "60"]
    command += ["--metrics-port", "0"] + (["--no-ray"] if backend == "no-ray" else [])
    proc = subprocess.Popen(command, cwd=TINY_YAML.parents[1], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.rstrip().endswith(" ready"):
                break
        address = next(re.search(r"listening on (\S+)", x).group(1) for x in lines if "listening on" in x)
        metrics_url = next(re.search(r"metrics on (\S+)", x).group(1) for x in lines if "metrics on" in x)
        with JudgeserveClient(address) as c:
            result = c.generate(PROMPT, max_tokens=6, mode="standard", timeout=60)
            assert result["completion_tokens"] == 6
        metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        drafts = result["steps"] - 1  # every step after the prefill is speculative here
        assert f"judgeserve_spec_decode_num_drafts_total {float(drafts)}" in metrics
        assert 'judgeserve_requests_total{finish_reason="length",mode="standard"} 1.0' in metrics
        assert "judgeserve_time_to_first_token_seconds_count 1.0" in metrics
        family = psutil.Process(proc.pid).children(recursive=True)
        if backend == "ray":
            exposure = next(x for x in lines if "embedded Ray:" in x)
            assert re.search(r"GCS at 127\.0\.0\.1:\d+, dashboard off, token authentication on", exposure), exposure
            listening = _listening(psutil.Process(proc.pid), *family)
            assert len(listening) >= 4 and all(ip in LOOPBACK for ip, _ in listening), listening
            print(f"\n{len(listening)} listening sockets of the server and {len(family)} child processes, all on loopback")

        running = ThreadPoolExecutor(1).submit(_stream_to_the_end, address, 200)
        while not running.done() and not running_started.is_set():
            time.sleep(0.01)
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(0.2)
        with JudgeserveClient(address) as c, pytest.raises(grpc.RpcError) as refused:
            c.generate(PROMPT, max_tokens=2, timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        finish, tokens = running.result(timeout=120)
        assert (finish, tokens) == ("length", 200), "the running stream must finish within the grace period"
        _, rest = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in rest
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, [p.info if hasattr(p, "info") else p for p in alive]
        print(f"after SIGTERM: the running stream finished ({tokens} tokens), {len(gone)} child processes gone")
    finally:
        running_started.clear()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
running_started = threading.Event()  # _stream_to_the_end got its first token


def _stream_to_the_end(address: str, max_tokens: int) -> tuple[str, int]:
    with JudgeserveClient(address) as c:
        tokens = 0
        for event in c.stream(PROMPT, max_tokens=max_tokens, mode="ar", ignore_eos=True, timeout=120):
            if isinstance(event, Final):
                return event.result["finish_reason"], tokens
            tokens += len(event.token_ids)
            running_started.set()
    raise AssertionError("no final message")


def _listening(*processes: psutil.Process) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on."""
    found = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            found += [c.laddr[:2] for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    return found


def test_an_engine_failure_ends_the_stream_with_finish_reason_error(servers, engine):
    class FailsOnSecondStep:
        """The engine, except that its stream raises after the first step."""

        def __getattr__(self, name):
            return getattr(engine, name)

        def stream(self, request):
            steps = engine.stream(request)
            yield next(steps)
            steps.close()
            raise RuntimeError("injected failure")

    backend = LocalBackend(FailsOnSecondStep())

    server, port = servers.loop.start_server(backend)
    try:
        with JudgeserveClient(f"127.0.0.1:{port}") as c:
            *deltas, final = list(c.stream(PROMPT, max_tokens=8, mode="standard"))
        assert final.result["finish_reason"] == "error" and "log" in final.error
        assert final.result["token_ids"] == deltas[0].token_ids and len(deltas) == 1
        _wait_idle(backend)
    finally:
        servers.loop.run(server.stop(0))
        backend.close()


# ---- health and model info ----------------------------------------------------------------------------


def test_health_is_serving_once_ready(client):
    assert client.health() == "SERVING"
    assert client.health("judgeserve.v1.Judgeserve") == "SERVING"


def test_health_is_not_serving_until_the_backend_is_ready(servers, engine):
    class SlowBackend(LocalBackend):
        def __init__(self, engine):
            super().__init__(engine)
            self.go = asyncio.Event()

        async def ready(self) -> bool:
            await self.go.wait()
            return True

        def model_info(self) -> dict:  # as RayBackend's, before its actors are up
            if not self.go.is_set():
                raise BackendNotReady("the models are still loading")
            return super().model_info()

    backend = SlowBackend(engine)

    server, port = servers.loop.start_server(backend)
    try:
        with JudgeserveClient(f"127.0.0.1:{port}") as c:
            assert c.health() == "NOT_SERVING"
            for call in (lambda: c.generate(PROMPT, max_tokens=2), c.model_info):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            servers.loop.loop.call_soon_threadsafe(backend.go.set)
            deadline = time.monotonic() + 5
            while c.health() != "SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert c.generate(PROMPT, max_tokens=2)["completion_tokens"] == 2
    finally:
        servers.loop.run(server.stop(0))
        backend.close()


def test_model_info_describes_both_models_and_the_judge(client, servers, engine):
    info = client.model_info()
    assert info == servers.backend.model_info()
    assert info["target"] == {
        "name": "dummy:tiny",
        "family": "qwen2",
        "layers": 4,
        "hidden_size": 64,
        "vocab_size": 272,
        "dtype": "float32",
        "fingerprint": engine.target.fingerprint,
    }
    assert info["draft"]["fingerprint"] == engine.draft.fingerprint != engine.target.fingerprint
    assert info["judge"] == {
        "present": True,
        "target_name": "dummy:tiny",
        "target_fingerprint": engine.target.fingerprint,
        "default_threshold": 0.5,
    }
    assert (info["default_mode"], info["default_draft_tokens"], info["max_seq_len"]) == ("standard", 4, 4096)
    assert "lossy" in info["lossy_note"]


# ---- TLS ----------------------------------------------------------------------------------------------


def test_tls_server_with_a_self_signed_certificate(servers, engine, tmp_path):
    pytest.importorskip("cryptography", reason="cryptography makes the self-signed certificate")
    cert, key = _self_signed(tmp_path)
    backend = LocalBackend(engine)

    server, port = servers.loop.start_server(backend, tls=TLSFiles(cert, key), token=TOKEN)
    try:
        with JudgeserveClient(f"127.0.0.1:{port}", token=TOKEN, tls_ca=cert) as c:
            assert c.health(timeout=10) == "SERVING"
            assert c.model_info(timeout=10)["target"]["name"] == "dummy:tiny"
    finally:
        servers.loop.run(server.stop(0))
        backend.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
