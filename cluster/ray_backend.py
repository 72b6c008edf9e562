"""`RayBackend`: the Backend of cluster.backend over the Ray actors of actors/, for cluster.server.

It starts (or joins) Ray and places the actors as `plan_placement` says: the N target shards in one
STRICT_PACK placement group (one CPU-or-GPU bundle each, so a TP group never spans nodes), the draft worker
beside them with a bundle of its own, on rank 0's GPU, in a group of its own, or in rank 0's process
(serve.draft_placement);
the judge scorer shares bundle 0 with target rank 0 (actors.judge_scorer says why) and the scheduler the
group's last bundle, both without resources of their own. Joining a cluster never refuses for its size: the
pending placement groups are what an autoscaler adds nodes for, and `ready()` waits for them (logging what
is missing) up to serve.placement_timeout_s. `ready()` then finishes the start (the shards' process group,
the judge, which must be loaded for the target's fingerprint, and the scheduler) and is True once every
actor is up.

Requests are checked here, in the driver, by engine.decode.Engine.make_request itself (on `_Models`, the
parts of an Engine it reads, built from the actors' info), and each stream relays the scheduler's records
as StepEvents through a cluster.backend.StreamTracker, which keeps what is streamed equal to the
Completion and supplies one if the scheduler fails. Same contract as LocalBackend.

Not for: the decoding loop (actors.scheduler), the gRPC edge (cluster.server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import ray
from ray._private import ray_constants  # private: see _loopback_only
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.draft_worker import DraftWorker
from actors.judge_scorer import JudgeScorer
from actors.messages import Admitted, EventRecord, RecordError, stream_item_from_bytes
from actors.scheduler import Scheduler, completion_from_record, event_from_record, generate_input, tokenizer_for
from actors.target_group import form_group
from actors.target_shard import TargetShard
from cluster.backend import BackendNotReady, RequestIdInUse, StreamTracker, describe
from engine.config import Config, DraftPlacement, Mode, ServeConfig
from engine.decode import Completion, Engine, Request, StepEvent
from engine.model import ModelArgs
from engine.output import FinishReason
from engine.sampling import SamplingParams
from engine.tokenizer import ChatMessage, Tokenizer

log = logging.getLogger("judgeserve.ray_backend")



# How often a start that waits for the cluster to grow logs what it still waits for.
PLACEMENT_PROGRESS_S = 10.0


class BackendStartError(RuntimeError):
    """The Ray cluster cannot hold the actors as configured; the message says what is missing."""


@dataclass(frozen=True)
class Slot:
    """Where one actor runs: bundle `bundle` of placement group `group`, and what it reserves there."""

    group: int
    bundle: int
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Placement:
    """The placement groups of one deployment (every group STRICT_PACK: one node each) and each role's slot.

    Group 0 is the target's, one bundle per shard. The judge scorer and the scheduler reserve nothing: the
    judge shares rank 0's bundle (it scores rank 0's hidden states), the scheduler group 0's last bundle
    (beside the shards it drives)."""

    groups: tuple[tuple[dict[str, float], ...], ...]
    shards: tuple[Slot, ...]
    draft: Slot | None  # None: in target rank 0's process (in_rank0)

    @property
    def judge(self) -> Slot:
        return Slot(0, 0, 0, 0)

    @property
    def scheduler(self) -> Slot:
        return Slot(0, len(self.groups[0]) - 1, 0, 0)

    def requested(self) -> dict[str, float]:
        """Resources of all bundles together, by name (CPU, GPU)."""
        total: dict[str, float] = {}
        for bundle in (b for group in self.groups for b in group):
            for name, amount in bundle.items():
                total[name] = total.get(name, 0) + amount
        return total


def plan_placement(serve: ServeConfig, cuda: bool) -> Placement:
    """The bundles and slots for serve.tensor_parallel shards and serve.draft_placement. Every model actor
    reserves serve.cpus_per_actor CPUs and, on CUDA, a GPU; with share_gpu the draft and rank 0 split one, with
    in_rank0 the draft is no actor (rank 0 holds it)."""
    cpus, gpu = serve.cpus_per_actor, 1 if cuda else 0

    def bundle(actors: int) -> dict[str, float]:
        return {"CPU": cpus * actors, **({"GPU": 1} if cuda else {})}

    world = serve.tensor_parallel
    target = [bundle(1) for _ in range(world)]
    shards = [Slot(0, rank, cpus, gpu) for rank in range(world)]
    extra: list[tuple[dict[str, float], ...]] = []
    draft: Slot | None = None
    if serve.draft_placement is DraftPlacement.OWN_GPU:
        target.append(bundle(1))
        draft = Slot(0, world, cpus, gpu)
    elif serve.draft_placement is DraftPlacement.SHARE_GPU:
        target[0] = bundle(2)
        shards[0] = Slot(0, 0, cpus, gpu / 2)
        draft = Slot(0, 0, cpus, gpu / 2)
    elif serve.draft_placement is DraftPlacement.OWN_NODE:
        extra.append((bundle(1),))
        draft = Slot(1, 0, cpus, gpu)
    return Placement((tuple(target), *extra), tuple(shards), draft)


@dataclass(frozen=True)
class _Loaded:
    """What describe and make_request read of an engine.weights.LoadedModel."""

    name: str
    args: ModelArgs
    fingerprint: str


@dataclass(frozen=True)
class _JudgeInfo:
    """What describe and Engine.default_threshold read of an engine.judge.JudgeHead."""

    target_name: str
    target_fingerprint: str
    threshold: float


class _Models:
    """The parts of an Engine that Engine.make_request and cluster.backend.describe read, for models that
    live in actors: so requests are checked by the engine's own rules, not a copy of them."""

    make_request = Engine.make_request
    default_threshold = Engine.default_threshold

    def __init__(self, config: Config, tokenizer: Tokenizer, target: _Loaded, draft: _Loaded, judge: _JudgeInfo | None):
        self.config, self.tokenizer = config, tokenizer
        self.target, self.draft, self.judge = target, draft, judge
        self.max_seq_len = config.decoding.max_seq_len


@dataclass
class _Active:
    aborted: bool = False
    admitted: bool = False  # the scheduler knows the request (its first stream item arrived)
    items: ray.ObjectRefGenerator | None = field(default=None, repr=False)


class RayBackend:
    """Serves the config's models with the actors of actors/; `ray_address` joins a running cluster
    (default: serve.ray_address, else a local Ray on loopback that `close` shuts down)."""

    def __init__(self, config: Config, ray_address: str | None = None):
        self.config = config
        serve = config.serve
        self._cuda = config.runtime.device.startswith("cuda")
        self._max_bytes = serve.max_record_bytes
        self._placement = plan_placement(serve, self._cuda)
        self._owns_ray = _start_ray(ray_address or serve.ray_address, self._placement.requested())
        log.info("placement groups (STRICT_PACK): %s", "; ".join(f"{list(g)}" for g in self._placement.groups))
        self._groups: list = []
        self._judge: ray.actor.ActorHandle | None = None
        self._scheduler: ray.actor.ActorHandle | None = None
        self._models: _Models | None = None
        self._startup: asyncio.Future | None = None
        self._supervisor: asyncio.Future | None = None
        self._check_now: asyncio.Event | None = None  # set by a stream that saw an actor fail
        self._active: dict[str, _Active] = {}
        self.restarts: list[float] = []  # seconds each restart of the actors took, for tests and logs
        self._restarting = False
        self._create_actors()

    # ---- Backend -------------------------------------------------------------------------------------

    def make_request(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        prompt_ids: Sequence[int] | None = None,
        params: SamplingParams,
        mode: Mode | None,
        draft_tokens: int | None,
        threshold: float | None,
    ) -> Request:
        return self._ready_models().make_request(
            prompt=prompt,
            messages=messages,
            prompt_ids=prompt_ids,
            params=params,
            mode=mode,
            draft_tokens=draft_tokens,
            threshold=threshold,
        )

    async def stream(self, request_id: str, request: Request) -> AsyncIterator[StepEvent | Completion]:
        if request_id in self._active:
            raise RequestIdInUse(f"request_id: {request_id!r} is already active")
        models = self._ready_models()
        active = self._active[request_id] = _Active()
        tracker = StreamTracker(models.tokenizer, request)
        completed = False  # the scheduler's Completion arrived: its task is over
        try:
            active.items = self._scheduler.generate.remote(generate_input(request_id, request).to_bytes())
            try:
                async for ref in active.items:
                    item = stream_item_from_bytes(await ref, self._max_bytes)
                    if isinstance(item, Admitted):
                        active.admitted = True
                        if active.aborted:  # abort() came before the scheduler knew the request
                            self._scheduler.abort.remote(request_id)
                    elif isinstance(item, EventRecord):
                        yield tracker.step(event_from_record(item))
                    else:
                        completed = True
                        yield completion_from_record(item)
                        return
                raise RecordError("the scheduler's stream ended without a completion")
            except RecordError:
                log.exception("request %s failed", request_id)
                yield tracker.completion(FinishReason.ERROR)
            except ray.exceptions.RayError as err:
                # An actor died (killed, out of memory, its node lost): the request's state died with it.
                # The supervisor restarts the actors; the client gets UNAVAILABLE and may retry.
                log.error("request %s lost: %s", request_id, _first_line(err))
                if self._check_now is not None:
                    self._check_now.set()
                raise BackendNotReady(
                    f"request lost: an actor of the serving system failed ({_first_line(err)}); the server is "
                    "restarting its actors (health NOT_SERVING until they are up): retry"
                ) from None
        finally:
            del self._active[request_id]
            if not completed and active.items is not None:
                # Closed early (client cancellation or deadline) or failed: stop the scheduler's task now;
                # its clean-up releases the request's caches in every actor. Not recursive: that would also
                # cancel the release calls the clean-up submits (children of the cancelled task).
                with contextlib.suppress(ray.exceptions.RayError, ValueError):
                    ray.cancel(active.items, recursive=False)

    async def abort(self, request_id: str) -> bool:
        active = self._active.get(request_id)
        if active is None:
            return False
        active.aborted = True
        if active.admitted:
            await self._scheduler.abort.remote(request_id)
        return True

    def model_info(self) -> dict:
        return describe(self._ready_models())

    async def ready(self) -> bool:
        if self._startup is None:
            self._startup = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._startup)
        except Exception:
            log.exception("the Ray actors failed to start")
            return False
        if self._supervisor is None:
            self._check_now = asyncio.Event()
            self._supervisor = asyncio.ensure_future(self._supervise())
        return True

    def serving(self) -> bool:
        return self._models is not None

    def load(self) -> tuple[int, int]:
        # The scheduler runs serve.max_active_requests at once in arrival order; the rest wait in it.
        running = min(len(self._active), self.config.serve.max_active_requests)
        return running, len(self._active) - running

    def capacity(self) -> tuple[int, int]:
        return self.config.serve.max_active_requests, self.config.serve.max_queued_requests

    # ---- observability and shutdown ------------------------------------------------------------------

    async def actor_stats(self) -> dict:
        """Request ids holding state in each actor (all empty when nothing runs), tokens emitted by each
        request whose stream was closed early (when it was stopped), and pipelining counts."""
        scheduler = await self._scheduler.stats.remote()
        target = list(await asyncio.gather(*(s.active.remote() for s in self._shards)))
        return {
            "scheduler": scheduler["active"],
            "cancelled": scheduler["cancelled"],
            "stopped_at_step": scheduler["stopped_at_step"],
            # read after the shards' active lists: a release that empties rank 0's list has recorded the
            # request's passes by then (both happen in one call), so an idle snapshot always has them
            "target_passes": await self._shards[0].released.remote(),
            "draft": await self._draft_call("active").remote(),
            "target": target,
            "judge": await self._judge.active.remote() if self._judge is not None else [],
            "pipelined_blocks": scheduler["pipelined_blocks"],
            "pipelined_blocks_used": scheduler["pipelined_blocks_used"],
            "batches": scheduler["batches"],  # step-graph executions carrying steps, and the steps they carried
            "batched_steps": scheduler["batched_steps"],
        }

    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        """The live set by role ("scheduler", "draft", "judge", "target0".."targetN-1"), for fault tests."""
        roles = {"scheduler": self._scheduler, "draft": self._draft, "judge": self._judge}
        roles.update({f"target{rank}": shard for rank, shard in enumerate(self._shards)})
        return {role: actor for role, actor in roles.items() if actor is not None}

    def close(self) -> None:
        """Kills the actors and removes the placement group (and stops a Ray this backend started)."""
        for task in (self._startup, self._supervisor):
            if task is not None and not task.done():
                task.cancel()
        self._kill_actors()
        if self._owns_ray:
            ray.shutdown()

    # ---- failures --------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Checks every serve.health_check_s (at once when a stream saw a failure) that each actor answers;
        when one is dead, restarts them all. Every request in flight is lost then (its stream raises
        BackendNotReady): its caches lived in the actors, and a target shard cannot rejoin its process group
        alone, so the set restarts as one, as it started."""
        interval = self.config.serve.health_check_s
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), interval)
            self._check_now.clear()
            dead = await self._dead_actors()
            if not dead:
                continue
            log.error("actors died: %s; restarting the serving actors (health NOT_SERVING)", ", ".join(dead))
            self._models = None  # new requests get UNAVAILABLE, health follows serving()
            self._restarting = True
            t0 = time.perf_counter()
            attempt = 0
            while True:
                attempt += 1
                self._kill_actors()
                self._create_actors()
                self._startup = asyncio.ensure_future(self._start())
                try:
                    await self._startup
                    break
                except Exception:
                    log.exception("restart attempt %d failed; trying again", attempt)
                    await asyncio.sleep(min(30.0, interval * 2**attempt))
            self._restarting = False
            self.restarts.append(time.perf_counter() - t0)
            log.warning("serving again: actors restarted in %.2f s", self.restarts[-1])

    async def _dead_actors(self) -> list[str]:
        """Roles whose actor does not answer `active()`: a dead actor's call fails at once. A busy one
        answers after its current pass (actors run one call at a time), which is not a failure."""

        async def alive(actor: ray.actor.ActorHandle) -> bool:
            try:
                await actor.active.remote()
                return True
            except ray.exceptions.RayError:
                return False

        roles = self.actors()
        answers = await asyncio.gather(*(alive(actor) for actor in roles.values()))
        return [role for role, ok in zip(roles, answers) if not ok]

    # ---- internals -----------------------------------------------------------------------------------

    def _create_actors(self) -> None:
        """The placement groups and every actor, all at once (their processes start and import in parallel);
        `_start` waits for them and hands the judge scorer and the scheduler what the shards loaded."""
        config = self.config
        self._groups = [placement_group(list(bundles), strategy="STRICT_PACK") for bundles in self._placement.groups]
        world = config.serve.tensor_parallel
        actor_env = {"env_vars": dict(config.serve.actor_env)}
        self._shards = [
            TargetShard.options(**self._at(slot), runtime_env=actor_env).remote(config, rank, world)
            for rank, slot in enumerate(self._placement.shards)
        ]
        self._draft = None  # in_rank0: rank 0 holds the draft (its draft_* methods)
        if self._placement.draft is not None:
            self._draft = DraftWorker.options(**self._at(self._placement.draft), runtime_env=actor_env).remote(config)
        self._judge = None
        if config.judge.path is not None:
            self._judge = JudgeScorer.options(**self._at(self._placement.judge)).remote(config)
        self._scheduler = Scheduler.options(**self._at(self._placement.scheduler)).remote(
            config, self._draft, self._shards, self._judge
        )

    def _kill_actors(self) -> None:
        for actor in self.actors().values():
            with contextlib.suppress(ray.exceptions.RayError, ValueError):
                ray.kill(actor)
        for group in self._groups:
            remove_placement_group(group)

    def _at(self, slot: Slot) -> dict:
        """Actor options that put an actor in its slot."""
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self._groups[slot.group], placement_group_bundle_index=slot.bundle
        )
        return {"num_cpus": slot.cpus, "num_gpus": slot.gpus, "scheduling_strategy": strategy}

    def _draft_call(self, name: str) -> ray.actor.ActorMethod:
        """The draft worker's method `name`: on its own actor, or (in_rank0) target rank 0's `draft_<name>`."""
        return getattr(self._draft, name) if self._draft is not None else getattr(self._shards[0], f"draft_{name}")

    def _ready_models(self) -> _Models:
        if self._models is None:
            why = "the actors are restarting after a failure" if self.restarts or self._restarting else (
                "the models are still loading"
            )
            raise BackendNotReady(f"{why} (health is NOT_SERVING until they are up); retry")
        return self._models

    async def _start(self) -> None:
        config = self.config
        await _placed(self._groups, self._placement.requested(), config.serve.placement_timeout_s)
        await form_group(self._shards)
        if config.serve.block_handoff:  # greedy blocks reach rank 0 on the device (actors.handoff)
            await self._shards[0].open_handoff.remote(await self._draft.handoff_handles.remote())
        target = await self._shards[0].info.remote()
        draft = await self._draft_call("info").remote()
        if draft["args"].vocab_size != target["args"].vocab_size:
            raise BackendStartError(
                f"draft vocabulary ({draft['args'].vocab_size}) differs from the target's ({target['args'].vocab_size})"
            )
        judge = None
        if self._judge is not None:
            info = await self._judge.load.remote(target["name"], target["fingerprint"], target["args"].hidden_size)
            judge = _JudgeInfo(info["target_name"], info["target_fingerprint"], info["threshold"])
        await self._scheduler.ready.remote(target["args"])
        self._models = _Models(
            config,
            tokenizer_for(config.target, target["args"]),
            _Loaded(target["name"], target["args"], target["fingerprint"]),
            _Loaded(draft["name"], draft["args"], draft["fingerprint"]),
            judge,
        )


def _start_ray(address: str | None, requested: dict[str, float]) -> bool:
    """Joins `address` (or $RAY_ADDRESS, which `ray job submit` sets for its drivers), or starts a local
    Ray bound to loopback sized for the requested resources (True: this process started it). A Ray already
    initialised in this process (a test's) is used as it is. A joined cluster's size is not checked here:
    an autoscaling cluster grows for the placement groups once they are created (`_placed` waits)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False)
        return False
    # Ray starts its workers at nice 15 by default; a serving node's actors should not yield their cores to
    # whatever else runs there (measured: the served path lost half its speed on a shared 2-core machine).
    # `ray job submit` does the same for its drivers.
    os.environ.setdefault("RAY_worker_niceness", "0")
    with _loopback_only():
        ray.init(
            num_cpus=int(requested.get("CPU", 0)),
            num_gpus=int(requested.get("GPU", 0)) or None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    # Token authentication is Ray's default for a new local cluster (2.60); RAY_AUTH_MODE=disabled turns it
    # off, which the log then says. (Setting the variable here would be too late: this process read Ray's
    # config at import, and its own GCS would refuse it.)
    log.info("embedded Ray: %s", local_ray_exposure())
    if not is_token_auth_enabled():
        log.warning("Ray token authentication is off (RAY_AUTH_MODE): any local user can run code in it")
    return True


@contextlib.contextmanager
def _loopback_only():
    """Makes the Ray that ray.init starts listen on loopback only. Ray replaces a loopback node address with
    this machine's network address unless it believes multi-node clusters are off, and then its GCS, raylet,
    agents and workers listen on every interface (measured: '::', 0.0.0.0 and the host's address, with
    _node_ip_address="127.0.0.1" given). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is that belief: the processes
    ray.init starts read it from the environment, this one read it into ray_constants at import. Both are
    restored afterwards, so a later ray.init in this process may join a real cluster."""
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            del os.environ[name]
        else:
            os.environ[name] = saved_env


def _shortfall(requested: dict[str, float]) -> str:
    """What the actors ask for against what the cluster has free, e.g. "GPU: 8 requested, 0 available"."""
    free = ray.available_resources()
    return "; ".join(
        f"{name}: {amount:g} requested, {free.get(name, 0):g} available" for name, amount in requested.items()
    )


async def _placed(groups: list, requested: dict[str, float], timeout_s: float) -> None:
    """Waits until every placement group is placed, logging what is missing every PLACEMENT_PROGRESS_S; an
    autoscaler sees the pending groups and starts nodes that fit them. Raises BackendStartError after
    timeout_s."""
    ready = asyncio.gather(*(group.ready() for group in groups))
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        try:
            await asyncio.wait_for(asyncio.shield(ready), min(PLACEMENT_PROGRESS_S, max(timeout_s - waited, 0.01)))
            return
        except TimeoutError:
            waited = time.monotonic() - start
        if waited >= timeout_s:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready  # retrieved here, not reported by the garbage collector as never retrieved
            raise BackendStartError(
                f"the cluster did not place the actors within serve.placement_timeout_s ({timeout_s:g} s): "
                f"{_shortfall(requested)}. Give the autoscaler a node type that holds the placement groups "
                "(ray_cluster.yaml, docs/deployment.md), add nodes, or lower serve.tensor_parallel or "
                "serve.cpus_per_actor"
            )
        log.info(
            "waiting for the autoscaler to add nodes: %s (%.0f s of serve.placement_timeout_s %g s)",
            _shortfall(requested),
            waited,
            timeout_s,
        )


def _first_line(err: BaseException) -> str:
    """A Ray error's first line (its full text repeats the remote traceback)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def local_ray_exposure() -> str:
    """Where the Ray this process started listens, and whether it checks tokens (for the log and tests)."""
    auth = "on" if is_token_auth_enabled() else "OFF"
    return f"GCS at {ray.get_runtime_context().gcs_address}, dashboard off, token authentication {auth}"
