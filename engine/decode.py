"""The in-process engine: autoregressive, standard speculative and judge decoding of one request at a time.

The speculative step reads like the paper: draft -> verify -> judge -> accept -> advance, one named call
each. Both KV caches always hold a prefix of the sequence; after a step each is cut back to the emitted
length, and whatever a model has not yet seen (the last emitted token; after a bonus also d_K for the
draft) is fed at the start of its next call.

Not for: batching many requests, Ray or gRPC (actors/ and cluster/ wrap these same calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from engine.config import Config, Mode
from engine.cuda_graphs import graphs_for
from engine.judge import JudgeHead, load_judge
from engine.model import KVCache, Transformer
from engine.output import FinishReason, Output
from engine.sampling import SamplingParams, next_token, probabilities, sample
from engine.tokenizer import ChatMessage
from engine.trace import AcceptanceHook, replayer_for
from engine.verify import (
    Accepted,
    DraftBlock,
    Provenance,
    accept,
    accepted_length,
    final_token,
    greedy_matched,
    judge_accept,
    standard_accept,
)
from engine.weights import LoadedModel, load_model


# Greedy autoregressive tokens one step decodes where passes run asynchronously (CUDA graphs): each pass is
# fed the argmax of the one before on the device, and the host reads the run back once, so the GPU does not
# wait for the host between tokens (the served path's serve.ar_tokens_per_call does the same per Ray call).
# A run that meets a stop wastes at most AR_RUN - 1 passes; the first token after the prompt is never in one.
AR_RUN = 8


class RequestError(ValueError):
    """A request that cannot run as given (the message names the field); maps to INVALID_ARGUMENT."""


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    mode: Mode
    draft_tokens: int  # K
    threshold: float  # judge threshold; ignored unless mode is JUDGE


@dataclass(frozen=True)
class StepEvent:
    tokens: list[int]
    provenance: list[Provenance]
    text: str  # the text these tokens added (may be empty while a character is incomplete)


@dataclass
class Timings:
    draft_s: float = 0.0
    verify_s: float = 0.0  # target passes: prefill, verification, and autoregressive decodes
    prefill_s: float = 0.0  # of verify_s: the prompt's target pass (so that per-step figures can leave it out)
    judge_s: float = 0.0
    total_s: float = 0.0
    overhead_s: float = 0.0  # the rest of total_s: acceptance bookkeeping, detokenizing, stop rules

    def close(self, total_s: float) -> None:
        self.total_s = total_s
        self.overhead_s = max(0.0, total_s - self.draft_s - self.verify_s - self.judge_s)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    provenance: list[Provenance]
    finish_reason: FinishReason
    prompt_tokens: int
    mode: Mode
    steps: int  # target forward passes, the prefill included
    speculative_steps: int
    draft_tokens_proposed: int
    draft_tokens_accepted: int  # matched + judge-accepted
    judge_accepted_tokens: int  # accepted by the judge only (the lossy part)
    timings: Timings = field(default_factory=Timings)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_accepted_per_step(self) -> float:
        """Draft tokens accepted per speculative step (n in DESIGN.md; tokens emitted per step is n + 1)."""
        return self.draft_tokens_accepted / self.speculative_steps if self.speculative_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.timings.total_s if self.timings.total_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "provenance": [p.name.lower() for p in self.provenance],
            "finish_reason": self.finish_reason.value,
            "mode": self.mode.value,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "steps": self.steps,
            "mean_accepted_per_step": round(self.mean_accepted_per_step, 4),
            "judge_accepted_tokens": self.judge_accepted_tokens,
            "tokens_per_second": round(self.tokens_per_second, 3),
            "wall_seconds": round(self.timings.total_s, 4),
            "timings": {k: round(v, 4) for k, v in vars(self.timings).items()},
        }


class _Sequence:
    """One request's running state: the tokens so far and how much of them each cache holds."""

    def __init__(self, prompt: Sequence[int], target_cache: KVCache, draft_cache: KVCache | None):
        self.ids = list(prompt)
        self.target_cache, self.draft_cache = target_cache, draft_cache
        self.target_cache.length = 0
        if draft_cache is not None:
            draft_cache.length = 0


@dataclass(frozen=True)
class DraftAsk:
    """One request's part of a draft call: `feed` (what the draft has not seen) into `cache`, then K tokens;
    with `guess`, first the draft's argmax guess of the target's next token (see draft_blocks)."""

    cache: KVCache
    feed: list[int]
    k: int
    params: SamplingParams
    gen: torch.Generator | None
    guess: bool = False


@torch.inference_mode()
def draft_blocks(model: Transformer, asks: Sequence[DraftAsk]) -> list[tuple[list[int], torch.Tensor | None, int | None]]:
    """One draft pass per token for every request at once (a batch of one is the plain pass, graphs and
    all), the first pass also feeding each request's `feed`; a request leaves the batch when its block is
    complete. Per request: (d_1..d_K, q [K, vocab] float32 on the CPU or None when greedy, the guess or None).

    With `guess`, the first pass yields the draft's argmax guess of the target's next token (argmax even
    when sampling: the guess only has to be likely, it is never emitted unchecked) and the block follows it.
    """
    return [read_block(ask, tokens, q) for ask, (tokens, q) in zip(asks, draft_on_device(model, asks))]


def read_block(ask: DraftAsk, tokens: torch.Tensor, q: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None, int | None]:
    """One request's draft_on_device result read back: (d_1..d_K, q on the CPU or None, the guess or None)."""
    ids = tokens.tolist()  # greedy: the block's one sync
    first = ids.pop(0) if ask.guess else None
    return ids, q.cpu() if q is not None else None, first


@torch.inference_mode()
def draft_on_device(model: Transformer, asks: Sequence[DraftAsk]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """draft_blocks' passes, nothing read back: per request its drawn tokens (the guess first, if any) as one
    tensor on the model's device, and q [K, vocab] there (None when greedy). Greedy passes are only queued:
    each feeds the next its argmax on the device."""
    device = next(model.parameters()).device
    fed = [torch.tensor(a.feed, device=device) for a in asks]
    drawn: list[list[torch.Tensor]] = [[] for _ in asks]  # the guess (if any), then d_1..d_K, 0-d on the device
    probs: list[list[torch.Tensor]] = [[] for _ in asks]
    passes = [a.k + int(a.guess) for a in asks]
    for i in range(max(passes, default=0)):
        rows = [b for b, n in enumerate(passes) if i < n]
        outs = model.forward_batch([fed[b] for b in rows], [asks[b].cache for b in rows], last_only=True)
        for b, (logits, _) in zip(rows, outs):
            ask, row = asks[b], logits[-1]  # [vocab]
            if (ask.guess and i == 0) or ask.params.greedy:  # the argmax stays on the device
                token = row.argmax()
            else:
                q = probabilities(row, ask.params)  # [vocab]
                token = torch.tensor(int(sample(q, ask.gen)), device=device)
                probs[b].append(q)
            drawn[b].append(token)
            fed[b] = token.view(1)
    empty = torch.empty(0, dtype=torch.long, device=device)
    return [(torch.stack(tokens) if tokens else empty, torch.stack(q) if q else None) for tokens, q in zip(drawn, probs)]


@torch.inference_mode()
def target_passes(
    model: Transformer,
    caches: Sequence[KVCache],
    feeds: Sequence[list[int] | torch.Tensor],
    *,
    last_only: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One target pass for several requests (Transformer.forward_batch): feed b (ids, or a tensor of them
    already on the device) into caches[b] -> (logits [T_b or 1, vocab], hidden) each, on the model's device.
    For a verification the feed is [t_last, d_1..d_K]: its last K+1 logits and last K hidden states are the
    block's; a prefill (or an autoregressive step) needs only the last position's (`last_only`)."""
    device = caches[0].k.device
    return model.forward_batch([torch.as_tensor(f, device=device) for f in feeds], list(caches), last_only=last_only)


def draft_block(
    model: Transformer,
    cache: KVCache,
    feed: list[int],
    k: int,
    params: SamplingParams,
    gen: torch.Generator | None,
    guess: bool,
) -> tuple[list[int], torch.Tensor | None, int | None]:
    """draft_blocks for one request."""
    return draft_blocks(model, [DraftAsk(cache, feed, k, params, gen, guess)])[0]


class Engine:
    """Owns a target, an optional draft and judge, and one KV cache per model (one request at a time)."""

    def __init__(self, config: Config, target: LoadedModel, draft: LoadedModel | None, judge: JudgeHead | None):
        if draft is not None and draft.args.vocab_size != target.args.vocab_size:
            raise ValueError(
                f"draft vocabulary ({draft.args.vocab_size}) differs from the target's ({target.args.vocab_size})"
            )
        self.config, self.target, self.draft, self.judge = config, target, draft, judge
        self.tokenizer = target.tokenizer  # the pair shares one vocabulary; the target's template rules
        self.max_seq_len = config.decoding.max_seq_len
        self._target_cache = target.model.new_cache(self.max_seq_len)
        self._draft_cache = draft.model.new_cache(self.max_seq_len) if draft is not None else None
        self.device = self._target_cache.k.device
        # tokens per greedy autoregressive step (AR_RUN): on a CPU each pass ends before the host goes on anyway
        self.ar_run = AR_RUN if target.model.graphs is not None else 1
        # engine.trace.TraceRecorder or TraceReplayer: sees (and a replayer replaces) each speculative step's
        # verdicts (matched, judged) before acceptance; None in normal serving
        self.acceptance_hook: AcceptanceHook | None = None

    @classmethod
    def from_config(cls, config: Config) -> "Engine":
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
        dev, n, stack = config.runtime.device, config.decoding.max_seq_len, config.runtime.stack_projections
        target = load_model(config.target, device=dev, max_seq_len=n, graphs=graphs_for(config.runtime), stack=stack)
        draft = load_model(config.draft, device=dev, max_seq_len=n, graphs=graphs_for(config.runtime), stack=stack)
        judge = None
        if config.judge.path is not None:
            judge = load_judge(
                config.judge.path,
                target_name=target.name,
                target_fingerprint=target.fingerprint,
                hidden_size=target.args.hidden_size,
            )
        engine = cls(config, target, draft, judge)
        engine.acceptance_hook = replayer_for(config.decoding)
        return engine

    # ---- requests -----------------------------------------------------------------------------------

    def default_threshold(self) -> float:
        if self.config.judge.threshold is not None:
            return self.config.judge.threshold
        return self.judge.threshold if self.judge is not None else 1.0

    def make_request(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        prompt_ids: Sequence[int] | None = None,
        params: SamplingParams | None = None,
        mode: Mode | None = None,
        draft_tokens: int | None = None,
        threshold: float | None = None,
    ) -> Request:
        """Validates and tokenizes one request. Exactly one of prompt (raw text), messages (chat, with the
        target's template) or prompt_ids. Raises RequestError naming the offending field."""
        given = [x is not None for x in (prompt, messages, prompt_ids)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, messages or prompt_ids")
        params = params or SamplingParams(max_tokens=self.config.decoding.max_new_tokens)
        if prompt is not None:
            ids = self.tokenizer.encode(prompt)
        elif messages is not None:
            ids = self.tokenizer.chat(messages)
        else:
            ids = list(prompt_ids)
            if any(not (0 <= t < self.target.args.vocab_size) for t in ids):
                raise RequestError(f"prompt_ids: every id must be in [0, {self.target.args.vocab_size})")
        if not ids:
            raise RequestError("prompt: empty prompt")
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise RequestError(
                f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"window of {self.max_seq_len} tokens"
            )
        mode = mode or self.config.decoding.mode
        if mode.is_speculative and self.draft is None:
            raise RequestError(f"mode: {mode.value} needs a draft model, and none is loaded")
        if mode is Mode.JUDGE and self.judge is None:
            raise RequestError("mode: judge needs a judge head (judge.path in the config); use standard")
        k = draft_tokens if draft_tokens is not None else self.config.decoding.draft_tokens
        if not 1 <= k <= 128:
            raise RequestError("draft_tokens: must be in [1, 128]")
        t = self.default_threshold() if threshold is None else threshold
        if not 0.0 <= t <= 1.0:
            raise RequestError("judge_threshold: must be in [0, 1]")
        return Request(tuple(ids), params, mode, k, t)

    def generate(self, request: Request) -> Completion:
        events = self.stream(request)
        while True:
            try:
                next(events)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()
    def stream(self, request: Request) -> Iterator[StepEvent]:
        """Yields a StepEvent per step; the generator's return value is the Completion. Closing the
        generator (a cancelled request) stops the work after the current step."""
        t0 = time.perf_counter()
        seq = _Sequence(request.prompt_ids, self._target_cache, self._draft_cache)
        if self.acceptance_hook is not None:
            self.acceptance_hook.start()
        out = Output(self.tokenizer, request.params)
        gen = request.params.generator()
        stats = Completion("", [], [], FinishReason.STOP, len(request.prompt_ids), request.mode, 0, 0, 0, 0, 0)
        timings = stats.timings
        while out.finish is None:
            k = self._draft_length(request, seq, out)
            if not request.mode.is_speculative or k == 0 or seq.target_cache.length == 0:
                step = self._target_step(seq, request.params, gen, timings, self._run_length(request, seq, out))
            else:
                step = self._speculative_step(seq, request, k, gen, timings)
                stats.speculative_steps += 1
                stats.draft_tokens_proposed += k
                stats.draft_tokens_accepted += step.draft_accepted
                stats.judge_accepted_tokens += sum(p is Provenance.JUDGE for p in step.provenance)
            stats.steps += 1
            before = len(out.token_ids)
            text = out.extend(step.tokens, step.provenance)
            # A stop rule may drop the step's later tokens (and a stop string even earlier ones).
            before = min(before, len(out.token_ids))
            yield StepEvent(out.token_ids[before:], out.provenance[before:], text)
        timings.close(time.perf_counter() - t0)
        stats.text, stats.token_ids, stats.provenance, stats.finish_reason = out.text, out.token_ids, out.provenance, out.finish
        # Tokens cut by a stop rule were never emitted: keep the judge count consistent with the output.
        stats.judge_accepted_tokens = min(stats.judge_accepted_tokens, sum(p is Provenance.JUDGE for p in out.provenance))
        return stats

    def _draft_length(self, request: Request, seq: _Sequence, out: Output) -> int:
        """K, clipped so that the step cannot overrun max_tokens or the cache (0: take a plain step)."""
        left = request.params.max_tokens - len(out.token_ids)
        room = self.max_seq_len - len(seq.ids)
        return max(0, min(request.draft_tokens, left - 1, room))

    def _run_length(self, request: Request, seq: _Sequence, out: Output) -> int:
        """Tokens an autoregressive step decodes: up to ar_run for a greedy AR request past its prompt,
        clipped so that the run cannot overrun max_tokens or the cache; else 1."""
        if request.mode is not Mode.AR or not request.params.greedy or seq.target_cache.length == 0:
            return 1
        left = request.params.max_tokens - len(out.token_ids)
        return max(1, min(self.ar_run, left, self.max_seq_len - len(seq.ids)))

    # ---- the steps ----------------------------------------------------------------------------------

    def _target_step(
        self, seq: _Sequence, params: SamplingParams, gen: torch.Generator, timings: Timings, run: int = 1
    ) -> Accepted:
        """Target passes over what its cache lacks (the prompt, or the last token), then `run` - 1 more, each
        fed the argmax before it on the device (greedy only): autoregressive."""
        t, prefill = time.perf_counter(), seq.target_cache.length == 0
        pending = seq.ids[seq.target_cache.length :]
        ((logits, _),) = target_passes(self.target.model, [seq.target_cache], [pending], last_only=True)
        if run == 1:
            tokens = [next_token(logits[-1], params, gen)]
        else:
            tops = [logits[-1].argmax()]
            for _ in range(run - 1):
                ((logits, _),) = self.target.model.forward_batch([tops[-1].view(1)], [seq.target_cache], last_only=True)
                tops.append(logits[-1].argmax())
            tokens = torch.stack(tops).tolist()  # the run's one read-back
        seconds = time.perf_counter() - t
        timings.verify_s += seconds
        if prefill:
            timings.prefill_s += seconds
        self._advance(seq, tokens)
        return Accepted(tokens, [Provenance.TARGET] * len(tokens))

    def _speculative_step(
        self, seq: _Sequence, request: Request, k: int, gen: torch.Generator, timings: Timings
    ) -> Accepted:
        t0 = time.perf_counter()
        block = self._draft(seq, k, request.params, gen)
        t1 = time.perf_counter()
        target_logits, hidden = self._verify(seq, block)
        tops = None
        if request.params.greedy:  # K+1 argmaxes read back at once: the verdicts and each n's next token
            tops = target_logits.argmax(-1).tolist()
            matched, target_probs = greedy_matched(block.tokens.tolist(), tops), None
        else:  # sampling reads whole distributions on the host
            target_logits = target_logits.cpu()
            matched, target_probs = standard_accept(block, target_logits, request.params, gen)
        t2 = time.perf_counter()
        judged = self._judge(hidden, request) if request.mode is Mode.JUDGE else None
        if self.acceptance_hook is not None:
            matched, judged = self.acceptance_hook(matched, judged)
        t3 = time.perf_counter()
        n = accepted_length(matched, judged)
        last = tops[n] if tops is not None else final_token(n, block, target_logits, target_probs, request.params, gen)
        step = accept(block, matched, judged, last)
        self._advance(seq, step.tokens)
        timings.draft_s += t1 - t0
        timings.verify_s += t2 - t1 + time.perf_counter() - t3
        timings.judge_s += t3 - t2
        return step

    def _draft(self, seq: _Sequence, k: int, params: SamplingParams, gen: torch.Generator) -> DraftBlock:
        """K draft tokens, one draft pass each; the first pass also feeds what the draft has not seen."""
        cache = seq.draft_cache
        tokens, q, _ = draft_block(self.draft.model, cache, seq.ids[cache.length :], k, params, gen, guess=False)
        return DraftBlock(torch.tensor(tokens), q)

    def _verify(self, seq: _Sequence, block: DraftBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """One target pass over [t_last, d_1..d_K] -> logits [K+1, vocab], hidden of d_1..d_K [K, hidden], on the
        model's device."""
        k = block.tokens.shape[0]
        pending = seq.ids[seq.target_cache.length :] + block.tokens.tolist()
        ((logits, hidden),) = target_passes(self.target.model, [seq.target_cache], [pending])
        return logits[-(k + 1) :], hidden[-k:]

    def _judge(self, hidden: torch.Tensor, request: Request) -> torch.Tensor:
        """hidden: [K, hidden] -> [K] bool: the judge's verdict on each draft token."""
        return judge_accept(self.judge.scores(hidden).cpu(), request.threshold)

    def _advance(self, seq: _Sequence, tokens: list[int]) -> None:
        """Appends the emitted tokens and rolls both caches back to what is still on the sequence."""
        seq.ids.extend(tokens)
        keep = len(seq.ids) - 1  # the last emitted token is fed at the next step
        for cache in (seq.target_cache, seq.draft_cache):
            if cache is not None and cache.length > keep:
                cache.truncate(keep)
