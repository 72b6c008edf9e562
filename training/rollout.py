"""Model passes that mining and feature extraction need beyond the engine's one-request loop: a teacher-forced
pass over prompt + answer, and many greedy continuations of one prompt run together as a batch.

Both compute every row the way engine.decode does, so that labels and features match what the engine sees
when it serves: the prompt as one prefill, everything after it in passes of at most
`Transformer.EXACT_MAX_ROWS` tokens, which take the model's row-exact path on the CPU (docs/engine.md). A
row's result then does not depend on how the tokens after the prompt were split into passes; in bfloat16 it
also does not depend on the batch size (a matrix product gives a row the same bits for every M >= 3), in
float32 it can differ in the last bits.

Hidden states are the model's last-layer output after the final norm (what Transformer.forward returns,
what the LM head reads and what Engine._verify hands the judge), taken at the input position of the token
they describe: the feature of token x_j is hidden[j] of a pass that feeds x_j.

Not for: sampling (greedy only), serving, or sequences of different prompts in one batch (every row shares
its positions, so a batch is many continuations of one shared prefix).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from engine.model import KVCache, Transformer


@dataclass
class TeacherForced:
    predictions: list[int]  # [n] argmax for answer token j given prompt + answer[:j]
    hidden: torch.Tensor  # [n, hidden] the hidden state of answer token j at its own input position
    cache: KVCache  # batch 1, holding prompt + answer


@dataclass
class Continuation:
    tokens: list[int]  # generated after the forced tokens, ending with EOS or at the length limit
    hidden: torch.Tensor  # [hidden] the hidden state of the last forced token (at its input position)


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


def _take_rows(model: Transformer, cache: KVCache, rows: list[int]) -> KVCache:
    """A new cache holding only `rows` of `cache` (finished continuations stop costing compute)."""
    out = model.new_cache(cache.max_len, batch=len(rows))
    index = torch.tensor(rows, device=cache.k.device)
    n = cache.length
    out.k[:, :, :, :n] = cache.k[:, index, :, :n]
    out.v[:, :, :, :n] = cache.v[:, index, :, :n]
    out.length = n
    return out


@torch.inference_mode()
def continue_greedy(
    model: Transformer,
    prefix_cache: KVCache,
    start: int,
    forced: Sequence[Sequence[int]],
    *,
    end: int,
    eos_ids: Collection[int],
) -> list[Continuation]:
    """Greedy continuations of one shared prefix, all rows in one batch.

    prefix_cache: batch 1; its first `start` positions hold the shared prefix.
    forced[r]: the tokens row r takes at positions start, start + 1, ... (non-empty); then it continues
        greedily until it emits an EOS or its sequence reaches `end` tokens.
    Rows advance in lock step, one position per pass, so they share positions and need no padding or mask:
    a row still in its forced tokens just feeds the next one. All rows stop by `end`, so a batch costs
    about as many passes as its longest continuation from `start`.
    """
    if not forced or any(not f for f in forced) or start + max(map(len, forced)) > end:
        raise ValueError("every row needs 1 .. end - start forced tokens")
    device = prefix_cache.k.device
    cache = model.new_cache(end, batch=len(forced))
    cache.k[:, :, :, :start] = prefix_cache.k[:, :1, :, :start]  # broadcast the shared prefix to every row
    cache.v[:, :, :, :start] = prefix_cache.v[:, :1, :, :start]
    cache.length = start
    generated: list[list[int]] = [[] for _ in forced]
    features: list[torch.Tensor | None] = [None] * len(forced)
    feed = [f[0] for f in forced]  # the token each active row feeds next
    active = list(range(len(forced)))  # cache row j belongs to continuation active[j]
    while active:
        pos = cache.length  # the position every active row feeds now
        logits, hidden = model(torch.tensor([[feed[r]] for r in active], device=device), cache)
        best = logits[:, -1].argmax(-1).tolist()  # [rows]
        keep = []
        for j, r in enumerate(active):
            fed = pos - start  # index of the fed token within row r's tokens from `start`
            if fed < len(forced[r]) - 1:
                feed[r] = forced[r][fed + 1]
                keep.append(j)
                continue
            if fed == len(forced[r]) - 1:
                features[r] = hidden[j, -1].clone()
            if feed[r] in eos_ids or pos + 1 >= end:
                continue  # the sequence ended with the token just fed
            generated[r].append(best[j])
            if best[j] in eos_ids or pos + 2 >= end:
                continue  # the new token ends it: no need to feed it
            feed[r] = best[j]
            keep.append(j)
        if len(keep) < len(active) and keep:
            cache = _take_rows(model, cache, keep)
        active = [active[j] for j in keep]
    return [Continuation(g, h) for g, h in zip(generated, features)]
