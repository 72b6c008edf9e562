"""engine.output's incremental text: every step's delta equals the one decoding the whole output would
give (the behaviour before the anchor), and a step decodes a bounded number of ids however long the output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import fetch
from engine.output import Output
from engine.sampling import SamplingParams
from engine.tokenizer import ByteTokenizer, HFTokenizer
from engine.verify import Provenance


class WholeOutput(Output):
    """The reference: decodes every id at every step."""

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.token_ids)


class PieceTokenizer:
    """A SentencePiece-like vocabulary: a piece's leading space is dropped at the start of the decoded text,
    so a token's text depends on whether a token comes before it."""

    PIECES = (" the", " cat", "s", " é", "\u20ac", " sat", ".", "\n", "on", " mat")
    eos_ids = ()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.PIECES[i] for i in ids).removeprefix(" ")


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        super().__init__(300)
        self.decoded = 0

    def decode(self, ids: Sequence[int]) -> str:
        self.decoded += len(ids)
        return super().decode(ids)


def _steps(tokenizer, ids: list[int], sizes: list[int], stop: tuple[str, ...]) -> tuple[list[str], list[str], Output]:
    """Feeds `ids` in steps of `sizes` (cycled) to an Output and to the reference; the deltas of each."""
    params = SamplingParams(max_tokens=max(1, len(ids)), ignore_eos=True, stop=stop)  # the last step finishes
    out, ref = Output(tokenizer, params), WholeOutput(tokenizer, params)
    got, want, i, n = [], [], 0, 0
    while i < len(ids) and out.finish is None:
        step = ids[i : i + sizes[n % len(sizes)]]
        got.append(out.extend(step, [Provenance.TARGET] * len(step)))
        want.append(ref.extend(step, [Provenance.TARGET] * len(step)))
        assert (out.finish, out.token_ids) == (ref.finish, ref.token_ids)
        i, n = i + len(step), n + 1
    return got, want, out


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.one_of(st.integers(0, 255), st.sampled_from([0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 270])), max_size=80),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    stop=st.sampled_from([(), ("ab",), ("\u20ac",), ("x", "yz")]),
)
def test_byte_deltas_equal_whole_decoding(ids, sizes, stop):
    # bytes of multibyte characters, split anywhere; invalid sequences; ids that decode to nothing
    got, want, out = _steps(ByteTokenizer(300), ids, sizes, stop)
    assert got == want
    if not stop and ids:  # finished: nothing held back
        assert "".join(got) == out.text == out.tokenizer.decode(out.token_ids)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, len(PieceTokenizer.PIECES) - 1), max_size=60),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    stop=st.sampled_from([(), ("cats",), ("at.",)]),
)
def test_pieces_whose_text_depends_on_the_token_before(ids, sizes, stop):
    got, want, _ = _steps(PieceTokenizer(), ids, sizes, stop)
    assert got == want


def test_a_step_decodes_a_bounded_number_of_ids():
    tokenizer = CountingTokenizer()
    ids = list("na\u00efve caf\u00e9 \u20ac ".encode() * 200)  # 3,400 ids, multibyte characters among them
    out = Output(tokenizer, SamplingParams(max_tokens=len(ids), ignore_eos=True))
    for i in ids:
        out.extend([i], [Provenance.TARGET])
    # each one-token step decodes the context twice and its own id (a few more inside a character), not
    # the output so far: whole decoding would be about len(ids)^2 / 2 = 5.8 million ids
    assert tokenizer.decoded < 16 * len(ids)
    assert out.text == tokenizer.decode(ids)


QWEN = "qwen2.5-coder-1.5b-instruct"


@pytest.mark.skipif(fetch.cached_model_dir(QWEN) is None, reason=f"{QWEN} not fetched (make fetch)")
def test_qwen_tokenizer_one_token_steps_equal_whole_decoding():
    tokenizer = HFTokenizer(fetch.cached_model_dir(QWEN), ())
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()[:6000] + " 数学 ✓ 🙂 naïve"
    ids = tokenizer.encode(text)
    got, want, out = _steps(tokenizer, ids, [1, 3, 1, 7], ())
    assert got == want and "".join(got) == out.text == tokenizer.decode(ids)
