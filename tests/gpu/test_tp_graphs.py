"""Tensor-parallel shards through CUDA graphs on two GPUs: captured passes hold the NCCL all-reduces, and give
the eager TP=2 passes' greedy output (single-request decode and verification passes, and batched passes over
a CacheBlock). Needs 2 GPUs (the nvidia-h100-x2 machine); skips otherwise. A rank that hangs dumps its
stacks after a minute (a collective one rank never joins would otherwise stall the suite silently)."""

from __future__ import annotations

import faulthandler
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.cuda_graphs import CudaGraphs
from engine.model import ModelArgs
from engine.shapes import SHAPES
from engine.weights import dummy_model

WORLD = 2
MAX_LEN = 128
STEPS = 16

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 GPUs")


@torch.inference_mode()
def _run(model, graphs: CudaGraphs | None) -> dict:
    """Greedy decoding of one request (one-token passes, then a 5-token verification-shaped pass each 4th
    step), and three batched steps of four requests in one CacheBlock; the argmaxes and last logits."""
    model.graphs = graphs
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(MAX_LEN)
    logits, _ = model(torch.tensor([[72, 101, 108, 108, 111]], device=device), cache)
    tokens = []
    for step in range(STEPS):
        tokens.append(int(logits[0, -1].argmax()))
        feed = [tokens[-1]] + ([7, 8, 9, 10] if step % 4 == 3 else [])
        logits, _ = model(torch.tensor([feed], device=device), cache)
        if len(feed) > 1:
            cache.truncate(cache.length - 4)  # as a rejected block's rollback
    block = model.new_block(MAX_LEN, 4)
    for i, c in enumerate(block.caches[:4]):
        model(torch.arange(3 + 2 * i, device=device)[None] + 11 * i, c)
    batched = []
    for feeds in ([1, 1, 1, 1], [5, 1, 3, 2], [1, 1, 1]):
        outs = model.forward_batch([torch.arange(n, device=device) + 20 for n in feeds], block.caches[: len(feeds)])
        batched.append([o[0].argmax(-1).tolist() for o in outs])
    return {"tokens": tokens, "last": logits[0, -1].float().cpu(), "batched": batched,
            "captured": 0 if graphs is None else len(graphs)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(90, exit=True, file=sys.stderr)  # armed through the teardown too
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120), device_id=torch.device("cuda", rank))
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        args = ModelArgs.from_hf(SHAPES["tiny"])
        model = dummy_model(args, 0, 0.0, torch.float32, torch.device("cuda", rank), rank, WORLD).eval()
        print(f"rank {rank}: eager", file=sys.stderr, flush=True)
        eager = _run(model, None)
        print(f"rank {rank}: graphs", file=sys.stderr, flush=True)
        graphs = _run(model, CudaGraphs())
        torch.save({"eager": eager, "graphs": graphs}, Path(out_dir) / f"rank{rank}.pt")
        # The captured graphs (their NCCL kernels) go before the communicator does.
        model.graphs = None
        torch.cuda.synchronize()
        dist.barrier()
        print(f"rank {rank}: done", file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("tp-graphs")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_tp2_captured_passes_give_the_eager_greedy_output(ranks):
    for runs in ranks:
        assert runs["graphs"]["captured"] > 0  # graphs were captured for real, NCCL all-reduces inside
        assert runs["graphs"]["tokens"] == runs["eager"]["tokens"]
        assert runs["graphs"]["batched"] == runs["eager"]["batched"]
        torch.testing.assert_close(runs["graphs"]["last"], runs["eager"]["last"], rtol=1e-4, atol=1e-4)


def test_tp2_ranks_agree(ranks):
    assert ranks[0]["graphs"]["tokens"] == ranks[1]["graphs"]["tokens"]
    assert ranks[0]["graphs"]["batched"] == ranks[1]["graphs"]["batched"]
