"""engine.decode.Engine on the tiny random pair (config/tiny.yaml): lossless modes equal autoregressive
decoding, the judge's ends, seeded sampling, stop rules, streaming, request validation, judge files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import Mode, load_config
from engine.decode import Completion, Engine, RequestError
from engine.judge import JudgeError, JudgeHead, load_judge
from engine.output import FinishReason
from engine.sampling import SamplingParams
from engine.verify import Provenance

PROMPTS = ["def fib(n):", "The quick brown fox", "Hello"]
SPECULATED = {Provenance.MATCHED, Provenance.JUDGE}


def _greedy(max_tokens: int = 80, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def _run(engine: Engine, prompt: str, params: SamplingParams, mode: Mode, **kw) -> Completion:
    return engine.generate(engine.make_request(prompt=prompt, params=params, mode=mode, **kw))


def _with_judge(engine: Engine, bias: float, threshold: float = 0.5, seed: int = 0) -> Engine:
    """The same target and draft with a judge head for this target (random direction, chosen bias)."""
    hidden = engine.target.args.hidden_size
    weight = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    head = JudgeHead(weight, bias, threshold, engine.target.name, engine.target.fingerprint)
    return Engine(engine.config, engine.target, engine.draft, head)


@pytest.fixture(scope="module")
def ar_outputs(tiny_engine) -> dict[str, Completion]:
    return {p: _run(tiny_engine, p, _greedy(), Mode.AR) for p in PROMPTS}


@pytest.fixture(scope="module")
def judge_engine(tiny_engine) -> Engine:
    return _with_judge(tiny_engine, bias=0.0)


# ---- lossless modes ------------------------------------------------------------------------------------


def test_autoregressive_provenance_and_steps(ar_outputs):
    out = ar_outputs[PROMPTS[0]]
    assert len(out.token_ids) == 80 and out.finish_reason is FinishReason.LENGTH
    assert out.provenance == [Provenance.TARGET] * 80
    assert out.steps == 80 and out.speculative_steps == 0
    assert 0 < out.timings.prefill_s < out.timings.verify_s  # the prompt's pass, of the 80 target passes


@pytest.fixture(scope="module", params=[2, 8], ids=["run2", "run8"])
def run_engine(request, tiny_engine) -> Engine:
    """The tiny pair with greedy autoregressive steps of `run` tokens chained on the device (as with CUDA
    graphs; engine.decode.AR_RUN), in its own caches."""
    engine = Engine(tiny_engine.config, tiny_engine.target, tiny_engine.draft, None)
    engine.ar_run = request.param
    return engine


def test_greedy_autoregressive_runs_equal_one_token_steps(run_engine, ar_outputs):
    for prompt in PROMPTS:
        out = _run(run_engine, prompt, _greedy(), Mode.AR)
        assert out.token_ids == ar_outputs[prompt].token_ids
        assert out.provenance == [Provenance.TARGET] * 80
        assert out.steps == 1 + -(-79 // run_engine.ar_run)  # the prompt's token alone, then runs
    # the cache holds every emitted token but the last, as after one-token steps
    prompt_len = len(run_engine.make_request(prompt=prompt).prompt_ids)
    assert run_engine._target_cache.length == prompt_len + len(out.token_ids) - 1


def test_greedy_autoregressive_runs_stop_where_one_token_steps_stop(run_engine, ar_outputs):
    reference = ar_outputs[PROMPTS[2]]
    stop_id = reference.token_ids[10]
    out = _run(run_engine, PROMPTS[2], _greedy(stop_token_ids=(stop_id,)), Mode.AR)
    assert out.token_ids == reference.token_ids[: reference.token_ids.index(stop_id) + 1]
    out = _run(run_engine, PROMPTS[2], _greedy(max_tokens=13), Mode.AR)
    assert out.token_ids == reference.token_ids[:13] and out.finish_reason is FinishReason.LENGTH
    stop, index = _stop_string_case(reference)
    events, completion = _stream(run_engine, PROMPTS[2], _greedy(stop=(stop,)), Mode.AR, 1)
    assert "".join(e.text for e in events) == completion.text == reference.text[:index]
    assert max(len(e.tokens) for e in events) <= run_engine.ar_run


def test_sampled_autoregressive_steps_stay_one_token(run_engine):
    out = _run(run_engine, PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=3), Mode.AR)
    assert out.steps == 12


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_greedy_standard_equals_autoregressive(tiny_engine, ar_outputs, k):
    accepted = 0
    for prompt in PROMPTS:
        out = _run(tiny_engine, prompt, _greedy(), Mode.STANDARD, draft_tokens=k)
        expected = ar_outputs[prompt]
        assert out.token_ids == expected.token_ids, f"K={k}, prompt {prompt!r}"
        assert out.text == expected.text
        assert out.judge_accepted_tokens == 0 and Provenance.JUDGE not in out.provenance
        assert out.draft_tokens_accepted == sum(p is Provenance.MATCHED for p in out.provenance)
        assert out.mean_accepted_per_step <= k
        accepted += out.draft_tokens_accepted
    assert accepted > 0, "the draft never agreed with the target: the test exercises nothing"


@pytest.fixture(scope="module", params=[False, True], ids=["as-loaded", "stacked"])
def bf16_engine(request) -> Engine:
    """Also with q/k/v and gate/up stacked (runtime.stack_projections), which the config applies to both models."""
    tiny = Path(__file__).resolve().parents[2] / "config" / "tiny.yaml"
    overrides = {"target.dtype": "bfloat16", "draft.dtype": "bfloat16", "runtime.stack_projections": request.param}
    engine = Engine.from_config(load_config(tiny, overrides))
    assert engine.target.model.stacked == engine.draft.model.stacked == request.param
    return engine


@pytest.mark.parametrize("k", [1, 4, 16])
def test_greedy_standard_equals_autoregressive_bf16(bf16_engine, k):
    """The shipped real pair runs in bfloat16: exact_rows must keep greedy speculative output equal to
    autoregressive output there too, not only in float32."""
    for prompt in PROMPTS:
        ar = _run(bf16_engine, prompt, _greedy(), Mode.AR)
        out = _run(bf16_engine, prompt, _greedy(), Mode.STANDARD, draft_tokens=k)
        first = next((i for i, (a, b) in enumerate(zip(out.token_ids, ar.token_ids)) if a != b), None)
        assert first is None, f"K={k}, prompt {prompt!r}: differs from autoregressive at output token {first}"


@pytest.mark.parametrize("k", [4, 16])
def test_judge_threshold_one_equals_standard(tiny_engine, judge_engine, k):
    for prompt in PROMPTS:
        standard = _run(tiny_engine, prompt, _greedy(), Mode.STANDARD, draft_tokens=k)
        judged = _run(judge_engine, prompt, _greedy(), Mode.JUDGE, draft_tokens=k, threshold=1.0)
        assert judged.token_ids == standard.token_ids
        assert judged.provenance == standard.provenance
        assert judged.judge_accepted_tokens == 0


def test_judge_head_with_huge_bias_at_threshold_one_still_equals_standard(tiny_engine):
    engine = _with_judge(tiny_engine, bias=1e30, threshold=1.0)
    standard = _run(tiny_engine, PROMPTS[1], _greedy(), Mode.STANDARD, draft_tokens=8)
    judged = _run(engine, PROMPTS[1], _greedy(), Mode.JUDGE, draft_tokens=8)  # the head's own threshold
    assert judged.token_ids == standard.token_ids and judged.provenance == standard.provenance


# ---- the judge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 7])
def test_judge_threshold_zero_accepts_every_draft_token(judge_engine, k):
    steps = 9
    params = _greedy(max_tokens=1 + steps * (k + 1))  # the prefill's token, then `steps` full steps
    out = _run(judge_engine, PROMPTS[0], params, Mode.JUDGE, draft_tokens=k, threshold=0.0)
    assert out.provenance[0] is Provenance.TARGET  # the prefill's token
    for s in range(steps):
        block = out.provenance[1 + s * (k + 1) : 1 + (s + 1) * (k + 1)]
        assert set(block[:k]) <= SPECULATED, f"step {s}: {block}"
        assert block[k] is Provenance.BONUS, f"step {s}: {block}"
    assert out.speculative_steps == steps
    assert out.mean_accepted_per_step == k
    assert out.draft_tokens_proposed == out.draft_tokens_accepted == steps * k


def test_judge_accepted_tokens_are_lossy_and_counted(tiny_engine, ar_outputs):
    engine = _with_judge(tiny_engine, bias=1e4, threshold=0.5)
    prompt = PROMPTS[2]
    out = _run(engine, prompt, _greedy(), Mode.JUDGE, draft_tokens=8)
    judged = sum(p is Provenance.JUDGE for p in out.provenance)
    assert judged > 0
    assert out.judge_accepted_tokens == judged
    assert out.token_ids != ar_outputs[prompt].token_ids  # the lossy part
    # Every standard reject was judge-accepted, so every step ended with a bonus.
    assert Provenance.CORRECTION not in out.provenance
    assert len(out.token_ids) == 80


@torch.no_grad()
def test_judge_output_is_target_greedy_except_judge_accepted_tokens(tiny_engine):
    """With a head that fires on some tokens only: every MATCHED, CORRECTION and BONUS token is the target's
    argmax given the output so far (which contains the judge-accepted tokens), and every JUDGE token is not."""
    engine = _with_judge(tiny_engine, bias=3.0, seed=0)  # picked so that the run below mixes both outcomes
    prompt = PROMPTS[0]
    out = _run(engine, prompt, _greedy(), Mode.JUDGE, draft_tokens=6, threshold=0.5)
    kinds = set(out.provenance)
    assert {Provenance.JUDGE, Provenance.CORRECTION} <= kinds, f"want a mixed run, got {kinds}"
    prompt_ids = tiny_engine.tokenizer.encode(prompt)
    sequence = torch.tensor([prompt_ids + out.token_ids])
    model = tiny_engine.target.model
    logits, _ = model(sequence, model.new_cache(tiny_engine.max_seq_len))
    greedy = logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist()  # the target's choice for each output token
    for i, (token, prov) in enumerate(zip(out.token_ids, out.provenance)):
        if prov is Provenance.JUDGE:
            assert token != greedy[i], f"token {i} is the target's own choice but marked JUDGE"
        else:
            assert token == greedy[i], f"token {i} ({prov.name}) is not the target's argmax"
    assert out.judge_accepted_tokens == sum(p is Provenance.JUDGE for p in out.provenance)


# ---- seeded sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.AR, Mode.STANDARD])
def test_seeded_sampling_is_reproducible(tiny_engine, mode):
    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=seed, ignore_eos=True)
        return _run(tiny_engine, PROMPTS[0], params, mode, draft_tokens=4).token_ids

    first = run(123)
    assert run(123) == first
    assert run(124) != first
    assert len(first) == 40


def test_speculative_sampling_runs_and_emits_valid_tokens(tiny_engine):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=5, ignore_eos=True)
    out = _run(tiny_engine, PROMPTS[1], params, Mode.STANDARD, draft_tokens=6)
    vocab = tiny_engine.target.args.vocab_size
    assert len(out.token_ids) == 60 and out.finish_reason is FinishReason.LENGTH
    assert all(0 <= t < vocab for t in out.token_ids)
    assert out.provenance[0] is Provenance.TARGET
    # TARGET after the first token: a last step with room for one token only is a plain target step.
    assert set(out.provenance[1:]) <= {Provenance.MATCHED, Provenance.CORRECTION, Provenance.BONUS, Provenance.TARGET}
    assert Provenance.TARGET not in out.provenance[1:-1]
    assert out.speculative_steps > 0 and out.draft_tokens_accepted > 0


# ---- stop rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.AR, Mode.STANDARD])
def test_stop_token_id_ends_output_after_it(tiny_engine, ar_outputs, mode):
    reference = ar_outputs[PROMPTS[0]].token_ids
    index = 10
    stop = reference[index]
    first = reference.index(stop)  # the output ends at its first occurrence
    out = _run(tiny_engine, PROMPTS[0], _greedy(stop_token_ids=(stop,)), mode, draft_tokens=8)
    assert out.token_ids == reference[: first + 1]
    assert out.finish_reason is FinishReason.STOP


@pytest.mark.parametrize("mode", [Mode.AR, Mode.STANDARD])
@pytest.mark.parametrize("max_tokens", [1, 2, 13])
def test_max_tokens_gives_length(tiny_engine, ar_outputs, mode, max_tokens):
    out = _run(tiny_engine, PROMPTS[0], _greedy(max_tokens=max_tokens), mode, draft_tokens=8)
    assert len(out.token_ids) == max_tokens
    assert out.finish_reason is FinishReason.LENGTH
    assert out.token_ids == ar_outputs[PROMPTS[0]].token_ids[:max_tokens]


def _stop_string_case(reference: Completion) -> tuple[str, int]:
    """An ASCII stop string of 3 characters taken from the greedy output, and where it first occurs."""
    text = reference.text
    for i in range(5, len(text) - 3):
        candidate = text[i : i + 3]
        if candidate.isascii() and candidate.isprintable():
            return candidate, text.index(candidate)
    raise AssertionError(f"no printable ASCII run of 3 in {text!r}")


# One token per step (AR), two (K = 1: the stop string spans steps) and up to nine (K = 8).
STOP_CASES = [(Mode.AR, 1), (Mode.STANDARD, 1), (Mode.STANDARD, 8)]


@pytest.mark.parametrize(("mode", "k"), STOP_CASES)
def test_stop_string_cuts_text_before_it(tiny_engine, ar_outputs, mode, k):
    reference = ar_outputs[PROMPTS[2]]
    stop, index = _stop_string_case(reference)
    out = _run(tiny_engine, PROMPTS[2], _greedy(stop=(stop,)), mode, draft_tokens=k)
    assert out.finish_reason is FinishReason.STOP
    assert out.text == reference.text[:index], f"stop string {stop!r}: the text must end before it"
    assert stop not in out.text
    # The ids end with the token that completed the stop string.
    assert out.token_ids == reference.token_ids[: len(out.token_ids)]
    assert stop in tiny_engine.tokenizer.decode(out.token_ids)
    assert stop not in tiny_engine.tokenizer.decode(out.token_ids[:-1])


def _stream(engine: Engine, prompt: str, params: SamplingParams, mode: Mode, k: int):
    events = []
    gen = engine.stream(engine.make_request(prompt=prompt, params=params, mode=mode, draft_tokens=k))
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            return events, done.value


@pytest.mark.parametrize("mode", [Mode.AR, Mode.STANDARD])
def test_streamed_deltas_join_to_completion_text(tiny_engine, ar_outputs, mode):
    events, completion = _stream(tiny_engine, PROMPTS[0], _greedy(), mode, 5)
    assert "".join(e.text for e in events) == completion.text
    assert [t for e in events for t in e.tokens] == completion.token_ids
    assert [p for e in events for p in e.provenance] == completion.provenance
    assert completion.text == ar_outputs[PROMPTS[0]].text


@pytest.mark.parametrize(("mode", "k"), STOP_CASES)
def test_streamed_deltas_with_stop_string_never_show_the_stop_string(tiny_engine, ar_outputs, mode, k):
    reference = ar_outputs[PROMPTS[2]]
    stop, index = _stop_string_case(reference)
    events, completion = _stream(tiny_engine, PROMPTS[2], _greedy(stop=(stop,)), mode, k)
    streamed = "".join(e.text for e in events)
    assert streamed == completion.text
    assert streamed == reference.text[:index]
    assert [t for e in events for t in e.tokens] == completion.token_ids


def test_deltas_join_to_decoded_ids_with_partial_utf8(tiny_engine):
    # The byte tokenizer emits one byte per token and the random model emits many bytes >= 0x80, so deltas
    # are taken while characters are incomplete: they must still join to the decoded ids.
    events, completion = _stream(tiny_engine, "héllo wörld €", _greedy(max_tokens=40), Mode.STANDARD, 4)
    joined = "".join(e.text for e in events)
    assert joined == completion.text == tiny_engine.tokenizer.decode(completion.token_ids)


# ---- requests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt_ids": []}, "prompt"),
        ({"prompt": "x" * 500, "params": SamplingParams(max_tokens=13)}, "max_tokens"),
        ({"prompt_ids": [1, 2, 272]}, "prompt_ids"),
        ({"prompt_ids": [-1]}, "prompt_ids"),
        ({"prompt": "hi", "mode": Mode.JUDGE}, "mode"),
        ({"prompt": "hi", "draft_tokens": 0}, "draft_tokens"),
        ({"prompt": "hi", "draft_tokens": 129}, "draft_tokens"),
        ({"prompt": "hi", "threshold": 1.5}, "threshold"),
        ({"prompt": "hi", "prompt_ids": [1]}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_make_request_errors(tiny_engine, kwargs, field):
    with pytest.raises(RequestError, match=field):
        tiny_engine.make_request(**kwargs)


def test_make_request_fills_defaults(tiny_engine, tiny_config):
    req = tiny_engine.make_request(prompt="hi")
    assert req.prompt_ids == tuple(b"hi")
    assert req.mode is tiny_config.decoding.mode
    assert req.draft_tokens == tiny_config.decoding.draft_tokens
    assert req.params.max_tokens == tiny_config.decoding.max_new_tokens
    assert req.threshold == 1.0  # no judge: standard


def test_prompt_plus_max_tokens_at_the_limit_runs(tiny_engine):
    n = tiny_engine.max_seq_len
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    request = tiny_engine.make_request(prompt_ids=[65] * (n - 20), params=params, mode=Mode.STANDARD, draft_tokens=16)
    out = tiny_engine.generate(request)
    assert len(out.token_ids) == 20


# ---- judge files -------------------------------------------------------------------------------------------


def _load_for(path, target):
    """load_judge for the LoadedModel `target`."""
    return load_judge(
        path, target_name=target.name, target_fingerprint=target.fingerprint, hidden_size=target.args.hidden_size
    )


def test_judge_file_round_trips(tmp_path, tiny_engine):
    target = tiny_engine.target
    weight = torch.randn(target.args.hidden_size)
    head = JudgeHead(weight, -0.75, 0.3, target.name, target.fingerprint, {"trained": "unit test"})
    path = tmp_path / "judges" / "head.safetensors"
    head.save(path)
    loaded = _load_for(path, target)
    assert torch.equal(loaded.weight, head.weight)
    assert loaded.bias == -0.75 and loaded.threshold == 0.3
    assert loaded.target_fingerprint == target.fingerprint and loaded.target_name == target.name
    assert loaded.notes == {"trained": "unit test"}


def test_judge_for_another_target_is_refused(tmp_path, tiny_engine):
    target, draft = tiny_engine.target, tiny_engine.draft
    assert draft.fingerprint != target.fingerprint
    head = JudgeHead(torch.randn(draft.args.hidden_size), 0.0, 0.5, "other-target", draft.fingerprint)
    path = tmp_path / "foreign.safetensors"
    head.save(path)
    with pytest.raises(JudgeError) as err:
        _load_for(path, target)
    assert draft.fingerprint in str(err.value) and target.fingerprint in str(err.value)


def test_judge_file_with_wrong_hidden_size_is_refused(tmp_path, tiny_engine):
    target = tiny_engine.target
    JudgeHead(torch.randn(32), 0.0, 0.5, target.name, target.fingerprint).save(tmp_path / "h.safetensors")
    with pytest.raises(JudgeError, match="hidden size"):
        _load_for(tmp_path / "h.safetensors", target)


def test_missing_or_damaged_judge_file_is_refused(tmp_path):
    with pytest.raises(JudgeError, match="does not exist"):
        load_judge(tmp_path / "none.safetensors", target_name="t", target_fingerprint="f", hidden_size=64)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(JudgeError, match="not a judge file"):
        load_judge(bad, target_name="t", target_fingerprint="f", hidden_size=64)


# ---- KV state ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 16])
@torch.no_grad()
def test_kv_caches_after_generation_equal_fresh_prefill(tiny_engine, k):
    """After rejected steps, each cache's valid prefix is what a fresh prefill of the emitted sequence
    (less the last token, which is fed at the next step) computes."""
    prompt = PROMPTS[1]
    out = _run(tiny_engine, prompt, _greedy(max_tokens=50), Mode.STANDARD, draft_tokens=k)
    assert Provenance.CORRECTION in out.provenance, "no rejected step: nothing rolled back"
    sequence = list(tiny_engine.tokenizer.encode(prompt)) + out.token_ids
    pairs = ((tiny_engine.target, tiny_engine._target_cache), (tiny_engine.draft, tiny_engine._draft_cache))
    for loaded, cache in pairs:
        length = cache.length
        assert length <= len(sequence) - 1
        if loaded is tiny_engine.target:
            assert length == len(sequence) - 1
        fresh = loaded.model.new_cache(tiny_engine.max_seq_len)
        loaded.model(torch.tensor([sequence[:length]]), fresh)
        torch.testing.assert_close(cache.k[:, :, :, :length], fresh.k[:, :, :, :length], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, :, :, :length], fresh.v[:, :, :, :length], atol=1e-5, rtol=1e-5)
