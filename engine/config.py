"""The typed configuration tree: one YAML file under config/ -> one frozen `Config`.

Every section is a frozen pydantic model with `extra="forbid"`, so a misspelt key or an impossible value
fails at load time with the dotted path of the field and what to change. Relative paths inside a config
file are resolved against that file's folder, so `config/qwen-coder.yaml` can name `judges/x.safetensors`.

Not for: per-request parameters (see engine.sampling.SamplingParams) or anything Ray- or gRPC-specific
beyond plain values (later sections carry those as plain data).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the field and the fix."""


class Mode(str, enum.Enum):
    """How tokens are produced. AR and STANDARD are lossless; JUDGE is lossy by design."""

    AR = "ar"  # target only, one token per forward pass
    STANDARD = "standard"  # speculative decoding, standard verification (exactly the target's output)
    JUDGE = "judge"  # speculative decoding, standard OR judge verification (may differ from the target)

    @property
    def is_speculative(self) -> bool:
        return self is not Mode.AR


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Quantize(str, enum.Enum):
    NONE = "none"
    INT8 = "int8"  # weight-only, per output feature (engine.quant); lossy


class DraftPlacement(str, enum.Enum):
    """Where the draft worker runs relative to the target's shards (cluster.ray_backend places the actors)."""

    OWN_GPU = "own_gpu"  # its own bundle in the target's STRICT_PACK group: the shards' node, its own GPU (or CPUs)
    SHARE_GPU = "share_gpu"  # in target rank 0's bundle: the GPU of rank 0 (a small draft beside a large target)
    OWN_NODE = "own_node"  # a placement group of its own: any node with room, e.g. a smaller GPU node type
    IN_RANK0 = "in_rank0"  # no actor of its own: loaded in target rank 0's process, on its GPU (one CUDA context)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class ModelSpec(_Section):
    """Where one model's weights come from and how they are held in memory."""

    model: str = Field(
        description=(
            "a registered name (`judgeserve models list`), a Hugging Face checkpoint folder "
            "(config.json + safetensors), a .gguf file (converted once and cached), or "
            "`dummy:<shape>` for random weights at a named shape or a config.json path"
        )
    )
    dtype: DType = Field(DType.FLOAT32, description="weights and activations")
    quantize: Quantize = Field(
        Quantize.NONE,
        description=(
            "int8: the linear layers' weights held as int8 with per-feature scales (engine.quant), half the "
            "bytes a decode pass reads. LOSSY: the model's output changes slightly (docs/performance.md "
            "measures it) for this model; on a draft it changes only acceptance, not what standard verification "
            "outputs. Faster on a GPU with runtime.compile: one-token passes (decode, drafting) about 1.5x; passes "
            "of 2-128 rows run a Triton kernel (engine.int8_kernel), an 8B verification about 0.8x bf16's time"
        ),
    )
    seed: int = Field(0, ge=0, description="dummy weights only: the random seed")
    noise: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description=(
            "dummy weights only: relative Gaussian perturbation added to the seed's weights, so that a "
            "tiny draft agrees with a tiny target often but not always"
        ),
    )

    @property
    def is_dummy(self) -> bool:
        return self.model.startswith("dummy:")


class DecodingConfig(_Section):
    mode: Mode = Field(Mode.JUDGE, description="default mode for requests that do not name one")
    draft_tokens: int = Field(8, ge=1, le=128, description="K: draft tokens proposed per step")
    max_seq_len: int = Field(4096, ge=16, le=131072, description="KV cache length: prompt + output")
    max_new_tokens: int = Field(256, ge=1, description="default max_tokens of a request")
    replay_trace: Path | None = Field(
        None,
        description=(
            "benchmarks on dummy weights only: every speculative step accepts as this acceptance trace's next "
            "step did (engine.trace); the output text is meaningless and labelled replayed"
        ),
    )
    replay_guesses: bool = Field(
        False,
        description=(
            "with replay_trace and serve.pipeline: a block drafted ahead after a fully accepted block counts as "
            "guessed right at the trace's per-token acceptance rate (dummy models never agree on the bonus), so "
            "pipelining's reuse can be measured on dummy weights"
        ),
    )

    @model_validator(mode="after")
    def _fits(self) -> "DecodingConfig":
        if self.draft_tokens + 2 > self.max_seq_len:
            raise ValueError("draft_tokens + 2 must fit in max_seq_len")
        if self.replay_guesses and self.replay_trace is None:
            raise ValueError("replay_guesses needs replay_trace")
        return self


class JudgeConfig(_Section):
    path: Path | None = Field(None, description="judge head file (safetensors); none disables judge mode")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="accept when sigmoid(score) > threshold; default: the file's own"
    )


class RuntimeConfig(_Section):
    device: str = Field("cpu", description="torch device for the in-process engine: cpu or cuda[:N]")
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads; default: all cores")
    cuda_graphs: bool | None = Field(
        None,
        description=(
            "replay captured CUDA graphs for the passes after a prefill (engine.cuda_graphs); null: on with CUDA "
            "(a CPU has no graphs)"
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile each graphed pass before its capture: fuses the small kernels between the matrix "
            "products and tunes one-row passes' products (measured in docs/performance.md); costs compile time at "
            "the first pass of each shape (about 30 s for an 8B's one-row pass on an H100, seconds for others)"
        ),
    )

    attention_kernel: bool = Field(
        True,
        description=(
            "graphed one-token passes (decode, drafting) over up to 2,048 keys compute the new token's rotary, cache "
            "write and attention in two Triton kernels (engine.attention_kernel) instead of eight small ones around "
            "SDPA; false: SDPA, as passes of more rows or keys do (docs/performance.md)"
        ),
    )
    stack_projections: bool = Field(
        False,
        description=(
            "hold each layer's q/k/v and gate/up weights as one matrix each (Transformer.stack_projections): 4 "
            "products per layer instead of 7, the same results up to rounding. Measured on H200s: passes of 2 to "
            "17 rows (verifications) 5-15% faster, one-row passes (decode, drafting) up to 11% slower, judge "
            "decoding 8B/70B no faster: off by default (docs/performance.md)"
        ),
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError("device must be cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _graphs_need_cuda(self) -> "RuntimeConfig":
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError("cuda_graphs: true needs device cuda (a CPU has no graphs)")
        if self.compile and not self.graphed:
            raise ValueError("compile: true needs CUDA graphs (device cuda, cuda_graphs not false)")
        return self

    @property
    def graphed(self) -> bool:
        """Whether the models' passes replay CUDA graphs."""
        return self.device.startswith("cuda") if self.cuda_graphs is None else self.cuda_graphs


class ServeConfig(_Section):
    """Serving over Ray and gRPC (actors/, cluster/ray_backend.py); the in-process engine ignores it."""

    tensor_parallel: int = Field(1, ge=1, le=8, description="target shards (TP ranks), one Ray actor each")
    pipeline: bool = Field(
        True,
        description=(
            "draft block t+1 while the target verifies block t, assuming block t is accepted in full; the "
            "speculative block is dropped unless it was (output is the same either way). Pays with the draft on "
            "a device of its own, most where drafting a block takes about as long as verifying it (a 3B draft "
            "for a 70B target on 2 x H100: 1.37x; a 1B 1.25x; docs/performance.md)"
        ),
    )
    compiled_graph: bool | None = Field(
        None,
        description=(
            "run each step as one Ray Compiled Graph (channels set up once) instead of plain actor calls; null: "
            "on with CUDA, off on CPU (measured: it cut a step's transport to a third on H200s, but its "
            "channel-polling threads took a 2-core CPU's cores from the models: docs/performance.md)"
        ),
    )

    block_handoff: bool = Field(
        False,
        description=(
            "greedy draft blocks go from the draft worker to target rank 0 on the device (a buffer shared through "
            "CUDA IPC, ordered by an interprocess event, so the verification is queued behind the drafting before "
            "it ends) instead of through the step graph's channel; needs TP=1 and, with CUDA, the draft on rank 0's "
            "GPU (share_gpu); on CPU a shared-memory file (the two actors must share a node). Off by default: "
            "served, it gained 0.7% tokens/s on an H100 and 1.5% on an H200 (docs/performance.md, measurement 4). "
            "Output is the same either way (actors.handoff)"
        ),
    )

    host: str = Field("127.0.0.1", description="address the gRPC server binds (loopback: this machine only)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int | None = Field(
        9464, ge=0, le=65535, description="Prometheus /metrics port on serve.host; 0 picks a free one, null turns it off"
    )
    ray_address: str | None = Field(
        None, description="a running Ray cluster to join (ray.init address); none starts a local Ray on loopback"
    )
    cpus_per_actor: int = Field(
        1, ge=1, le=1024, description="CPUs reserved for, and torch threads of, the draft worker and each shard"
    )
    max_active_requests: int = Field(
        8,
        ge=1,
        le=1024,
        description=(
            "requests the scheduler runs at once, their steps batched into one pass of each model (continuous "
            "batching; each holds a KV cache per model); more wait"
        ),
    )
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description=(
            "longest a batch of steps waits for a running request's next step before it leaves without it "
            "(normally every running request's step is ready at once and nothing waits)"
        ),
    )
    ar_tokens_per_call: int = Field(
        8,
        ge=1,
        le=64,
        description=(
            "autoregressive tokens one step of the actors decodes (target passes, each fed the last token), so "
            "that a token costs a pass, not a pass and a Ray round trip; streamed in groups of up to this many. "
            "Only where the step's batch is autoregressive decoding alone (a prefill or a verification in it "
            "takes one token); 1: a round trip per token. Output is the same either way. A request that arrives "
            "meanwhile waits for the call to end (8 passes: about 75 ms for an 8B on an H100); 4 per call measured "
            "0.931 of the in-process rate served, 8 per call 0.978 (docs/performance.md)"
        ),
    )
    draft_tokens_by_load: dict[int, int] = Field(
        default_factory=lambda: {32: 8},
        description=(
            "K under load: {running requests: largest K}, the entry of the largest count <= the running requests "
            "applies; empty: a request's own K always. Default: K at most 8 from 32 running requests on (measured "
            "on an H100, 1B/8B, mean acceptance 19.7: at 64 streams K=8 gave 864 tokens/s, K=16 745, K=32 602; "
            "up to 16 streams K=16 was best: docs/performance.md)"
        ),
    )
    max_queued_requests: int = Field(
        64,
        ge=0,
        le=100_000,
        description=(
            "requests that may wait for a slot beyond max_active_requests; the server refuses more at once "
            "with RESOURCE_EXHAUSTED (a full queue only adds latency a client could spend elsewhere)"
        ),
    )
    health_check_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description=(
            "seconds between liveness checks of the actors; when one has died the server restarts them all "
            "(health NOT_SERVING meanwhile)"
        ),
    )
    draft_placement: DraftPlacement = Field(
        DraftPlacement.OWN_GPU,
        description=(
            "own_gpu: beside the shards on their node with a GPU (or CPUs) of its own; share_gpu: on target rank "
            "0's GPU (the 70B and 405B configs: 2 and 8 GPUs in all); own_node: anywhere the cluster has room, "
            "so the autoscaler may add a smaller node for it (each draft block then crosses the network); "
            "in_rank0: no actor of its own, the draft model loaded in target rank 0's process, so drafting and "
            "verifying share one CUDA context and a block reaches the verification without a hop (two processes "
            "on one GPU time-slice it; docs/performance.md, measurement 4); needs serve.pipeline false and "
            "tensor_parallel 1"
        ),
    )
    placement_timeout_s: float = Field(
        900.0,
        gt=0,
        le=86400,
        description=(
            "seconds to wait for the cluster to place the actors (an autoscaler starting nodes for them: cloud "
            "GPU nodes take minutes) before giving up with what was missing"
        ),
    )
    actor_env: dict[str, str] = Field(
        default_factory=lambda: {"GOMP_SPINCOUNT": "20000"},
        description=(
            "environment variables of the draft worker's and target shards' processes (NCCL_*, CUDA_*, OpenMP); "
            "the default lets OpenMP's threads spin only briefly between a pass's kernels before they sleep: on "
            "CPU the draft's and the target's passes alternate on the same cores (docs/performance.md)"
        ),
    )
    @field_validator("draft_tokens_by_load")
    @classmethod
    def _caps_in_range(cls, caps: dict[int, int]) -> dict[int, int]:
        for running, k in caps.items():
            if running < 1 or not 1 <= k <= 128:
                raise ValueError(f"{running}: {k}: running requests must be >= 1 and K in [1, 128]")
        return caps

    max_record_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="largest msgpack record between actors, in bytes (a 131072-token prompt needs about 640 KiB)",
    )


class Config(_Section):
    """The whole configuration of one judgeserve deployment."""

    name: str = Field(description="a short name for logs and ModelInfo")
    target: ModelSpec
    draft: ModelSpec
    decoding: DecodingConfig = DecodingConfig()
    judge: JudgeConfig = JudgeConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _draft_placement_allows(self) -> "Config":
        serve, placement = self.serve, self.serve.draft_placement
        # with CUDA rank 0 must see the buffer's GPU; on CPU the buffer's file must be on rank 0's node
        if self.runtime.device.startswith("cuda"):
            apart = placement is not DraftPlacement.SHARE_GPU
        else:
            apart = placement is DraftPlacement.OWN_NODE
        if serve.block_handoff and (serve.tensor_parallel > 1 or apart or placement is DraftPlacement.IN_RANK0):
            raise ValueError(
                "serve.block_handoff needs tensor_parallel 1 and the draft worker on rank 0's GPU (share_gpu; on "
                "CPU, on its node): the block goes to rank 0 alone, through memory both processes map (with "
                "draft_placement in_rank0 it is already in rank 0's process)"
            )
        if placement is DraftPlacement.IN_RANK0 and serve.pipeline:
            raise ValueError(
                "serve.pipeline needs the draft in a process of its own: with draft_placement in_rank0 a block "
                "drafted ahead would wait for the verification it was meant to overlap; set serve.pipeline false"
            )
        if placement is DraftPlacement.IN_RANK0 and serve.tensor_parallel > 1:
            raise ValueError(
                "draft_placement in_rank0 needs tensor_parallel 1: rank 0 drafts and verifies in one step, and "
                "the other ranks would need its block before its verification's collectives"
            )
        return self

    @model_validator(mode="after")
    def _judge_mode_has_judge(self) -> "Config":
        if self.decoding.mode is Mode.JUDGE and self.judge.path is None:
            raise ValueError("decoding.mode is judge but judge.path is not set: set judge.path or pick standard")
        return self


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Makes relative file paths in the raw YAML absolute against the config file's folder."""
    for section in ("target", "draft"):
        spec = data.get(section)
        if isinstance(spec, dict) and isinstance(spec.get("model"), str):
            model = spec["model"]
            looks_like_path = "/" in model or model.endswith((".gguf", ".json"))
            if model.startswith("dummy:") and model.endswith(".json") and not Path(model[6:]).is_absolute():
                spec["model"] = "dummy:" + str(base / model[6:])
            elif looks_like_path and not model.startswith("dummy:") and not Path(model).expanduser().is_absolute():
                spec["model"] = str(base / model)
    for section, key in (("judge", "path"), ("decoding", "replay_trace")):
        part = data.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            p = Path(part[key]).expanduser()
            part[key] = str(p if p.is_absolute() else base / p)
    return data


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see engine/config.py for the fields)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, *, base: Path, source: str = "<config>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(_resolve_paths(dict(data), base))
    except ValidationError as err:
        raise ConfigError(f"{source} is not a valid judgeserve config:\n{_format_errors(err)}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Loads and validates one YAML config; `overrides` maps dotted keys to values (CLI flags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (the shipped ones are in config/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
    return parse_config(data, base=path.resolve().parent, source=str(path))
