"""The draft's greedy blocks handed to target rank 0 on the device, not through the step graph's channel.

With the draft worker on rank 0's GPU (serve.draft_placement share_gpu, TP=1), a step's verification must
follow its drafting on that one GPU. Through the channel, the GPU idles from the draft's last pass until the
shard has its block: the draft reads its tokens back, the block crosses a Compiled Graph hop (0.3-0.5 ms
once the shard has waited a block's drafting), and the shard copies it in before it launches its pass.
Handed off, the draft worker writes its blocks into a buffer rank 0 opened once (CUDA IPC) and records an
interprocess event; its node's output says only where the blocks are, so it leaves while the GPU still
drafts. Rank 0 queues a wait on that event and its verification behind it: the GPU runs the pass as soon as
the drafting ends, and the hop is taken while the GPU is busy (bench.hops --handoff on an H200: 0.52 ms a
step saved; served, 0.7% more tokens/s on an H100 and 1.5% on an H200: docs/performance.md, measurement 4).
The draft worker reads its tokens back afterwards, in its `speculate` node, for the scheduler
(actors.step_graph).

Greedy blocks only: a sampled block's q goes to rank 0 as a CPU tensor anyway. On CPU the buffer is a file
in shared memory and needs no event (a CPU node has written its block when it returns); serve.block_handoff
turns it on there too, for the tests (the two actors must share a node).

Not for: which steps hand off (the scheduler's DraftInput.handoff), the passes (engine/).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

MAX_BLOCK = 128  # the largest K a request may ask for (cluster.server checks draft_tokens)


class BlockHandoff:
    """rows x MAX_BLOCK token ids shared by the draft worker (writes row i for plan i of a step's batch) and
    target rank 0 (reads them), and on CUDA the event that orders the reads after the writes."""

    def __init__(self, blocks: torch.Tensor, ready: torch.cuda.Event | None, handles: dict[str, Any]):
        self.blocks, self.ready, self._handles = blocks, ready, handles

    @classmethod
    def create(cls, device: torch.device, rows: int) -> "BlockHandoff":
        """The draft worker's side: the buffer and its handles for `open`."""
        if device.type == "cuda":
            blocks = torch.zeros(rows, MAX_BLOCK, dtype=torch.long, device=device)
            ready = torch.cuda.Event(interprocess=True)  # timing off: an interprocess event cannot time
            return cls(blocks, ready, {"cuda": reduce_tensor(blocks)[1], "event": ready.ipc_handle()})
        path = os.path.join(tempfile.gettempdir(), f"judgeserve-handoff-{uuid.uuid4().hex}")
        return cls(_mapped(path, rows), None, {"path": path, "rows": rows})

    def handles(self) -> dict[str, Any]:
        return self._handles

    @classmethod
    def open(cls, handles: dict[str, Any]) -> "BlockHandoff":
        """Target rank 0's side, on the draft's GPU (or node). On CPU the file goes once both have it mapped."""
        if "cuda" in handles:
            blocks = rebuild_cuda_tensor(*handles["cuda"])
            return cls(blocks, torch.cuda.Event.from_ipc_handle(blocks.device, handles["event"]), handles)
        blocks = _mapped(handles["path"], handles["rows"])
        os.unlink(handles["path"])
        return cls(blocks, None, handles)

    @property
    def rows(self) -> int:
        return self.blocks.shape[0]

    def put(self, blocks: dict[int, torch.Tensor]) -> None:
        """Row i <- blocks[i] (its K tokens, on the device), queued after the passes that drew them; then the
        event that `take` waits on."""
        for row, tokens in blocks.items():
            self.blocks[row, : tokens.shape[0]].copy_(tokens, non_blocking=True)
        if self.ready is not None:
            self.ready.record()

    def take(self, row: int, k: int) -> torch.Tensor:
        """Row `row`'s K tokens as the next work on this process's stream sees them: after the draft's `put`.
        The stream waits from here on, so a copy from the host queued after this call waits for the drafting
        too (take the blocks after such copies)."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
        return self.blocks[row, :k]

    def since_taken(self) -> Callable[[], float] | None:
        """On CUDA, after the `take`s: a clock of the work queued from here on, so the verification reports its
        own time and not the drafting it waited for (which the draft worker reports); None on CPU, where
        `take` does not wait."""
        if self.ready is None:
            return None
        begun = torch.cuda.Event(enable_timing=True)
        begun.record()

        def seconds() -> float:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            ended.synchronize()
            return begun.elapsed_time(ended) / 1e3

        return seconds


def _mapped(path: str, rows: int) -> torch.Tensor:
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=rows * MAX_BLOCK * 8)
    return torch.empty(0, dtype=torch.long).set_(storage, 0, (rows, MAX_BLOCK))
