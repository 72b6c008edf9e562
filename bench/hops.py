"""What a Ray Compiled Graph hop costs on this machine, by what the actors do between hops.

The step graph (actors.step_graph) in miniature, with the nodes' work replaced by a body of a fixed length:
the driver writes a step's input; the draft's place reads it and works (its second node, speculate's place,
follows), the shard's place reads the input in one node (begin's) and the draft's output in another
(finish's) and works, and the driver reads the outputs in the step graph's order. Each working node stamps
time.time() on entry and exit (one host, one clock), so a step splits into three hops with the work taken
out: driver -> draft, draft -> shard, shard -> driver (medians over the steps after the first few).

Bodies: none (the hops alone, back to back), sleep (the process idles, as a node waiting on its GPU may),
spin (Python busy, holding the GIL) and cuda (products of a 2048 x 2048 matrix, each read back: a decode
loop's syncs; only with a GPU). A Compiled Graph channel's reader polls shared memory (Ray's
PlasmaObjectHeader::ReadAcquire: yield, try the semaphore, look again) rather than sleeping, and
docs/performance.md (measurement 4) records how much a hop costs once its reader has waited a body long.

`--pin` times every body a second time with the graph's threads (each node's and the driver's) on one core:
a polling reader holds the channel's header semaphore between its looks, so the writer's sealing
`sem_wait` sleeps in the kernel and must be woken into the moment the reader lets go; on one core the
reader's yield hands the core straight to the writer it woke.

`--chain N` times a graph the step graph is not (yet): N steps in one execution, each draft node fed the
previous step's shard output with no trip through the driver, the driver reading every step's output. Its
transport per step is what several steps per execution would cost a served step on this machine.

`--handoff` (a GPU) times what the draft -> shard hop costs a step when the shard's work must follow the
draft's on one GPU, two ways, alternating: the block through the channel (the draft reads its tokens back,
the shard copies them in: the step graph's way) and the block left on the device (the draft writes it into
a buffer the shard opened through CUDA IPC, records an interprocess event and returns at once; the shard's
stream waits on that event, so its work is queued behind the draft's before the draft's is done). Bodies
are fixed counts of 4096 x 4096 bfloat16 products; each step checks that the shard read that step's block.

    python3 -m bench.hops --body-ms 12 --steps 60 --pin --chain 4 --out bench/results/hops.json
    python3 -m bench.hops --bodies none --handoff 60,40 --out bench/results/hops_handoff.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import ray
import torch
from ray.dag import InputNode, MultiOutputNode
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from bench import header, write_results

BODIES = ("none", "sleep", "spin", "cuda")
HOPS = ("driver -> draft", "draft -> shard", "shard -> driver")
CORES = os.sched_getaffinity(0)  # this process's, taken at import: before any thread of it is pinned


def work(body: str, ms: float) -> None:
    if body == "sleep":
        time.sleep(ms / 1e3)
    elif body in ("spin", "cuda"):
        end = time.perf_counter() + ms / 1e3
        x = torch.randn(2048, 2048, device="cuda") if body == "cuda" else None
        while time.perf_counter() < end:
            if x is not None:
                (x @ x).sum().item()


def pin(core: int | None) -> None:
    """Puts the calling thread on `core` (None: on every core this process may use)."""
    os.sched_setaffinity(0, {core} if core is not None else CORES)


def stamped(inp: list) -> list:
    """A working node: inp [body, ms, core, sent, stamps...] -> inp with this node's entry and exit stamps
    (its thread put on `core` first)."""
    pin(inp[2])
    start = time.time()
    work(inp[0], inp[1])
    return [*inp, start, time.time()]


@ray.remote
class Draft:
    def step(self, inp: list) -> list:
        return stamped(inp)

    def speculate(self, inp: list, drafted: list) -> None:
        return None


@ray.remote
class Shard:
    def begin(self, inp: list) -> list:
        return inp

    def finish(self, begun: list, drafted: list) -> list:
        return stamped(drafted)

    def verify(self, drafted: list) -> list:  # a chained step's: no batch to begin
        return stamped(drafted)


BLOCK = 8  # tokens a handed-off block holds


@ray.remote
class HandoffDraft:
    """The draft's place: `products` products, then the step's block (step, step + 1, ...) into a buffer."""

    def __init__(self, products: int):
        self.x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        self.y = torch.empty_like(self.x)
        self.products = products
        self.block = torch.zeros(BLOCK, dtype=torch.long, device="cuda")
        self.ramp = torch.arange(BLOCK, device="cuda")
        self.ready = torch.cuda.Event(interprocess=True)

    def handles(self) -> tuple:
        """What the shard opens the block and the event with (CUDA IPC handles; both stay alive here)."""
        return reduce_tensor(self.block)[1], self.ready.ipc_handle()

    def step(self, inp: list) -> list:
        way, step = inp[0], inp[1]
        start = time.time()
        for _ in range(self.products):
            torch.mm(self.x, self.x, out=self.y)
        torch.add(self.ramp, step, out=self.block)  # after the products, in stream order
        if way == "device":
            self.ready.record()  # no read back: the shard's stream waits on this
            return [*inp, None, start, time.time()]
        return [*inp, self.block.tolist(), start, time.time()]

    def speculate(self, inp: list, drafted: list) -> None:
        return None


@ray.remote
class HandoffShard:
    def __init__(self, products: int):
        self.x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        self.y = torch.empty_like(self.x)
        self.products = products

    def open(self, handles: tuple) -> None:
        block, ready = handles
        self.block = rebuild_cuda_tensor(*block)
        self.ready = torch.cuda.Event.from_ipc_handle(torch.cuda.current_device(), ready)

    def begin(self, inp: list) -> list:
        return inp

    def finish(self, begun: list, drafted: list) -> list:
        way, step, tokens = drafted[0], drafted[1], drafted[-3]
        start = time.time()
        if way == "device":
            torch.cuda.current_stream().wait_event(self.ready)
            block = self.block.clone()
        else:
            block = torch.tensor(tokens, device="cuda")
        for _ in range(self.products):
            torch.mm(self.x, self.x, out=self.y)
        seen = (block + (self.y[0, 0] * 0).long()).tolist()  # read back after the products, as a verification's verdict
        return [seen == list(range(step, step + BLOCK)), *drafted[-2:], start, time.time()]


def handoff(products: tuple[int, int], steps: int, skip: int = 5) -> dict:
    """Median ms a step (the driver's write to its read of the shard's output) with the block through the
    channel and left on the device, alternating step by step; and whether every step read its own block."""
    share = {"num_cpus": 0, "num_gpus": 0.5}
    draft, shard = HandoffDraft.options(**share).remote(products[0]), HandoffShard.options(**share).remote(products[1])
    ray.get(shard.open.remote(ray.get(draft.handles.remote())))
    with InputNode() as inp:
        drafted = draft.step.bind(inp)
        speculated = draft.speculate.bind(inp, drafted)
        verified = shard.finish.bind(shard.begin.bind(inp), drafted)
        dag = MultiOutputNode([drafted, speculated, verified]).experimental_compile()
    walls: dict[str, list[float]] = {"channel": [], "device": []}
    bodies: dict[str, list[float]] = {"channel": [], "device": []}
    right = 0
    for i in range(2 * (steps + skip)):
        way = ("channel", "device")[i % 2]
        sent = time.time()
        *_, verified = ray.get(dag.execute([way, i]))
        back = time.time()
        right += verified[0]
        if i >= 2 * skip:
            walls[way].append(1e3 * (back - sent))
            # the shard's node, entry to exit: its products, and (device) the draft's it waited behind
            bodies[way].append(1e3 * (verified[4] - verified[3]))
    dag.teardown()
    out = {f"{way} step": round(statistics.median(v), 3) for way, v in walls.items()}
    out.update({f"{way} shard node": round(statistics.median(v), 3) for way, v in bodies.items()})
    out["device saves"] = round(out["channel step"] - out["device step"], 3)
    out["blocks read right"] = f"{right}/{2 * (steps + skip)}"
    return out


def measure(dag, body: str, ms: float, steps: int, core: int | None, chain: int = 1, skip: int = 5) -> dict:
    """Median ms of each hop (and their sum) over the executions after the first `skip`, every graph thread
    on `core` (None: unpinned)."""
    pin(core)
    stamps = []
    for _ in range(steps + skip):
        *_, verified = ray.get(dag.execute([body, ms, core, time.time()]))  # read as the scheduler reads: all
        stamps.append([*verified[3:], time.time()])
    pin(None)
    return hop_medians(stamps[skip:], chain)


def chained(draft, shard, chain: int):
    """The graph of `chain` steps an execution: the first as the step graph's, each next draft node fed the
    shard's output of the step before; every step's output to the driver."""
    with InputNode() as inp:
        verified = shard.finish.bind(shard.begin.bind(inp), draft.step.bind(inp))
        outs = [verified]
        for _ in range(chain - 1):
            verified = shard.verify.bind(draft.step.bind(verified))
            outs.append(verified)
        return MultiOutputNode(outs).experimental_compile()


def hop_medians(stamps: list[list[float]], chain: int = 1) -> dict:
    """Per execution [sent, (draft in, draft out, shard in, shard out) x chain, back] (seconds) -> the median
    ms of each hop (draft -> shard and, chained, shard -> draft over every step) and of the execution's
    transport (`sum`: the whole execution less the nodes' bodies, draft in -> out and shard in -> out), and
    with a chain that per step."""
    ms = [[1e3 * (b - a) for a, b in itertools.pairwise(s)] for s in stamps]  # every span, the bodies at 1, 3, 5, ...
    spans = {
        "driver -> draft": [m[0] for m in ms],
        "draft -> shard": [m[i] for m in ms for i in range(2, 4 * chain, 4)],
        "shard -> draft": [m[i] for m in ms for i in range(4, 4 * chain, 4)],
        "shard -> driver": [m[-1] for m in ms],
    }
    out = {hop: round(statistics.median(v), 3) for hop, v in spans.items() if v}
    transport = [sum(m[0::2]) for m in ms]
    out["sum"] = round(statistics.median(transport), 3)
    if chain > 1:
        out["per step"] = round(statistics.median(transport) / chain, 3)
    return out


def show(name: str, spans: dict) -> None:
    print(f"{name:14s}", "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in spans.items()), "ms", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--body-ms", type=float, default=12.0, help="each working node's body, ms")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--bodies", default=",".join(BODIES), help="of " + ", ".join(BODIES) + " (cuda needs a GPU)")
    ap.add_argument("--pin", action="store_true", help="time each body again with the graph's threads on one core")
    ap.add_argument("--chain", type=int, default=0, help="time each body again in a graph of this many steps chained")
    ap.add_argument("--handoff", metavar="DRAFT,SHARD", help="time the block's hand-off with these product counts (GPU)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/hops.json"))
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    bodies = [b for b in args.bodies.split(",") if b != "cuda" or gpu]
    ray.init(num_gpus=int(gpu), include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
    try:
        share = {"num_cpus": 0, "num_gpus": 0.5 if gpu else 0}  # both on one GPU, as serve.draft_placement=share_gpu
        draft, shard = Draft.options(**share).remote(), Shard.options(**share).remote()
        with InputNode() as inp:
            drafted = draft.step.bind(inp)
            speculated = draft.speculate.bind(inp, drafted)
            verified = shard.finish.bind(shard.begin.bind(inp), drafted)
            dag = MultiOutputNode([drafted, speculated, verified]).experimental_compile()
        core = min(CORES)
        runs = [(body, None) for body in bodies] + ([(body, core) for body in bodies] if args.pin else [])
        hops = {}
        for body, on in runs:
            name = body if on is None else f"{body} pinned"
            hops[name] = measure(dag, body, 0.0 if body == "none" else args.body_ms, args.steps, on)
            show(name, hops[name])
        dag.teardown()
        if args.chain > 1:  # actors of its own (Ray gives an actor one compiled graph), on the GPU the others free
            for actor in (draft, shard):
                ray.kill(actor)
            draft, shard = Draft.options(**share).remote(), Shard.options(**share).remote()
            dag = chained(draft, shard, args.chain)
            for body in bodies:
                name = f"{body} chain {args.chain}"
                hops[name] = measure(dag, body, 0.0 if body == "none" else args.body_ms, args.steps, None, args.chain)
                show(name, hops[name])
            dag.teardown()
        if args.handoff and gpu:
            for actor in (draft, shard):
                ray.kill(actor)
            counts = tuple(int(n) for n in args.handoff.split(","))
            hops["handoff"] = handoff((counts[0], counts[1]), args.steps)
            show("handoff", hops["handoff"])
    finally:
        ray.shutdown()
    return write_results(args.out, {
        **header("bench.hops", torch.cuda.get_device_name() if gpu else "CPU", argv),
        "body_ms": args.body_ms,
        "steps": args.steps,
        "hop_ms": hops,
    })


if __name__ == "__main__":
    main()
