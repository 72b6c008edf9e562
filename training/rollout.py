"""Model passes that mining and feature extraction need beyond the engine's one-request loop: a teacher-forced
pass over prompt + answer, and many greedy sequences run together as one batch (answers to several prompts,
continuations from many positions of several answers), each over its own cache.

Both compute every row the way engine.decode does, so that labels and features match what the engine sees
when it serves: the prompt as one prefill, everything after it in passes of at most
`Transformer.EXACT_MAX_ROWS` tokens, which take the model's row-exact path on the CPU (docs/engine.md). A
row's result then does not depend on how the tokens after the prompt were split into passes; in bfloat16 it
also does not depend on the batch size (a matrix product gives a row the same bits for every M >= 3), in
float32 it can differ in the last bits.

Hidden states are the model's last-layer output after the final norm (what Transformer.forward returns,
what the LM head reads and what Engine._verify hands the judge), taken at the input position of the token
they describe: the feature of token x_j is hidden[j] of a pass that feeds x_j.

Not for: sampling (greedy only) or serving.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from engine.model import KVCache, Transformer


@dataclass
class TeacherForced:
    predictions: list[int]  # [n] argmax for answer token j given prompt + answer[:j]
    hidden: torch.Tensor  # [n, hidden] the hidden state of answer token j at its own input position
    cache: KVCache  # batch 1, holding prompt + answer


@torch.inference_mode()
def teacher_forced(model: Transformer, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> TeacherForced:
    """One pass of `model` over prompt + answer; the answer goes in row-exact chunks as the engine's decode
    and verification passes would feed it."""
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(len(prompt_ids) + len(answer_ids))
    logits, _ = model(torch.tensor([list(prompt_ids)], device=device), cache, last_only=True)
    predictions = [int(logits[0, -1].argmax())]
    hidden = []
    chunk = Transformer.EXACT_MAX_ROWS
    for s in range(0, len(answer_ids), chunk):
        piece = torch.tensor([list(answer_ids[s : s + chunk])], device=device)
        logits, h = model(piece, cache)  # logits row r predicts answer token s + r + 1; h row r is token s + r
        predictions.extend(logits[0].argmax(-1).tolist())
        hidden.append(h[0])
    width = model.args.hidden_size
    hidden_all = torch.cat(hidden) if hidden else torch.empty(0, width, dtype=cache.k.dtype, device=device)
    return TeacherForced(predictions[: len(answer_ids)], hidden_all, cache)


@dataclass
class Row:
    """One greedy sequence of a batch: it starts from the first `start` positions of `prefix` (None: an empty
    cache), feeds `feed` in one pass, then its own argmax one token per pass, until it emits an EOS or holds
    `end` tokens."""

    prefix: KVCache | None
    start: int
    feed: list[int]
    end: int


@dataclass
class Continuation:
    tokens: list[int]  # generated after the fed tokens, ending with EOS or at the length limit
    hidden: torch.Tensor  # [hidden] the hidden state of the last fed token (at its input position)
    cache: KVCache | None  # with keep_caches: prefix, fed tokens and every generated token but the last


@torch.inference_mode()
def greedy_rows(
    model: Transformer,
    rows: Sequence[Row],
    *,
    eos_ids: Collection[int],
    width: int,
    keep_caches: bool = False,
    done: Callable[[int], None] | None = None,
) -> list[Continuation]:
    """Greedy continuations of many rows, each over its own cache (rows of different prompts and positions),
    at most `width` of them per pass: continuous batching, a finished row's place goes to the next waiting one.

    A row's cache is made when it starts (a copy of its prefix's first `start` positions). A one-token feed
    joins the batch at once; a longer one (a prompt) is a prefill pass of its own, as the engine's is. Every
    later pass is one Transformer.forward_batch over the active rows, one token each. `done(i)` hears when
    row i finishes. Results in the rows' order.
    """
    device = model.model.embed_tokens.weight.device
    out: list[Continuation | None] = [None] * len(rows)
    caches: dict[int, KVCache] = {}
    generated: dict[int, list[int]] = {}
    features: dict[int, torch.Tensor] = {}
    waiting, active, feed = deque(range(len(rows))), [], {}

    def advance(i: int, fed: int, best: int, hidden: torch.Tensor) -> None:
        """Row i fed `fed` (the last of its feed, or its own last token) and its argmax is `best`."""
        if i not in features:
            features[i] = hidden.clone()
        cache, end = caches[i], rows[i].end
        if fed not in eos_ids and cache.length < end:  # else the sequence ended with the token just fed
            generated[i].append(best)
            if best not in eos_ids and cache.length + 1 < end:
                feed[i] = best
                active.append(i)
                return
        kept = caches.pop(i)
        out[i] = Continuation(generated.pop(i), features.pop(i), kept if keep_caches else None)
        if done is not None:
            done(i)

    while waiting or active:
        while waiting and len(active) < width:
            i = waiting.popleft()
            row = rows[i]
            if not row.feed or row.start + len(row.feed) > row.end:
                raise ValueError(f"row {i}: needs 1 .. end - start tokens to feed")
            cache = caches[i] = model.new_cache(row.end)
            if row.prefix is not None:
                cache.k[:, :, :, : row.start] = row.prefix.k[:, :1, :, : row.start]
                cache.v[:, :, :, : row.start] = row.prefix.v[:, :1, :, : row.start]
                cache.length = row.start
            generated[i] = []
            if len(row.feed) == 1:
                feed[i] = row.feed[0]
                active.append(i)
            else:  # a prompt: its prefill alone, only the last position's logits
                logits, hidden = model(torch.tensor([row.feed], device=device), cache, last_only=True)
                advance(i, row.feed[-1], int(logits[0, -1].argmax()), hidden[0, -1])
        if not active:
            continue
        batch, active[:] = list(active), []
        tokens = [torch.tensor([feed[i]], device=device) for i in batch]
        passes = model.forward_batch(tokens, [caches[i] for i in batch])
        best = torch.stack([logits[-1] for logits, _ in passes]).argmax(-1).tolist()
        for i, b, (_, hidden) in zip(batch, best, passes):
            advance(i, feed[i], b, hidden[-1])
    return out  # type: ignore[return-value]
