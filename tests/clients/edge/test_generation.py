"""Per-row stops, budgets and streams of `clients.edge.generation.Row`, token by token.

Tokens are characters here (decode joins them), so each case can be worked out by hand.
"""

from __future__ import annotations

import pytest
import torch

from clients.edge.generation import Row, RowSampling, Sampling

EOS = frozenset({0})


def feed(row: Row, text: str) -> list[str]:
    pieces: list[str] = []
    row.on_text = pieces.append
    for char in text:
        if row.done:
            break
        row.push(ord(char), eos=EOS, decode=lambda ids: "".join(map(chr, ids)))
    return pieces


@pytest.mark.parametrize(
    ("sampling", "generated", "text", "finish", "streamed"),
    [
        (Sampling(max_tokens=4), "abcdefg", "abcd", "length", ["a", "b", "c", "d"]),
        (Sampling(max_tokens=20, stop=("cd",)), "abcdef", "ab", "stop", ["a", "b"]),
        # "c" might begin the stop "cx": held back, then shown once "ce" rules it out
        (Sampling(max_tokens=20, stop=("cx",)), "abce", "abce", "length", ["a", "b", "ce"]),
        (Sampling(max_tokens=20, stop=("b", "bc")), "abc", "a", "stop", ["a"]),
        (Sampling(max_tokens=20), "ab\x00cd", "ab", "stop", ["a", "b"]),  # \x00 is EOS
    ],
)
def test_a_row_ends_at_its_stop_budget_or_eos_and_never_streams_a_stop_string(
    sampling: Sampling, generated: str, text: str, finish: str, streamed: list[str]
) -> None:
    row = Row(prompt_ids=[1, 2, 3], sampling=sampling)

    pieces = feed(row, generated)
    if not row.done:  # what run_generate does when the whole call ran out of tokens
        row.finish_reason = "length"
        row._emit()

    result = row.result()
    assert (result.text, result.finish_reason) == (text, finish)
    assert pieces == streamed and "".join(pieces) == text
    assert result.prompt_tokens == 3


def test_row_sampling_keeps_only_the_argmax_for_greedy_rows_and_the_nucleus_for_others() -> None:
    rows = [Row([1], Sampling(max_tokens=1, temperature=0.0)),
            Row([1], Sampling(max_tokens=1, temperature=1.0, top_p=0.5))]  # fmt: skip
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]]))

    out = RowSampling(rows, torch.device("cpu"))(torch.zeros(2, 1, dtype=torch.long), scores)

    assert torch.isfinite(out).tolist() == [[False, True, False], [False, True, False]]
    rows[1] = Row([1], Sampling(max_tokens=1, temperature=1.0, top_p=0.8))
    out = RowSampling(rows, torch.device("cpu"))(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.isfinite(out[1]).tolist() == [False, True, True]  # 0.6 < 0.8: add 0.3


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 1e-6])  # float32 subnormals, tiny
def test_a_tiny_temperature_samples_the_argmax_and_leaves_other_rows_sampleable(
    temperature: float,
) -> None:
    rows = [Row([1], Sampling(max_tokens=1, temperature=temperature)),
            Row([1], Sampling(max_tokens=1, temperature=1.0))]  # fmt: skip
    scores = torch.tensor([[-3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])

    out = RowSampling(rows, torch.device("cpu"))(torch.zeros(2, 1, dtype=torch.long), scores)

    probs = out.softmax(dim=-1)  # what generate samples from
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert probs[1].tolist() == pytest.approx(torch.tensor([0.0, 1.0, 2.0]).softmax(-1).tolist())
    assert torch.multinomial(probs, 1).shape == (2, 1)  # raised for the whole batch before


def test_a_row_with_nothing_to_sample_falls_back_to_its_argmax_alone() -> None:
    rows = [Row([1], Sampling(max_tokens=1, temperature=1.0)) for _ in range(3)]
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[nan, 1.0, 2.0], [-inf, -inf, -inf], [0.0, inf, 1.0]])

    out = RowSampling(rows, torch.device("cpu"))(torch.zeros(3, 1, dtype=torch.long), scores)

    probs = out.softmax(dim=-1)
    # NaN is never drawn, the rest as softmax([1, 2]); all -inf and +inf: the argmax
    assert probs[0].tolist() == pytest.approx([0.0, 0.2689, 0.7311], abs=1e-4)
    assert probs[1:].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert torch.multinomial(probs, 1).shape == (3, 1)


def test_a_stream_that_fails_ends_its_own_row_only() -> None:
    # The stream's consumer can go away under the batcher (its event loop closed): the
    # row stops there, and the other rows of the batched generate call go on.
    def broken(text: str) -> None:
        raise RuntimeError("Event loop is closed")

    failing = Row(prompt_ids=[1], sampling=Sampling(max_tokens=5), on_text=broken)
    other = Row(prompt_ids=[1], sampling=Sampling(max_tokens=5))

    for row in (failing, other):
        for char in "abc":
            if not row.done:
                row.push(ord(char), eos=EOS, decode=lambda ids: "".join(map(chr, ids)))

    assert failing.cancelled and failing.done and failing.text == "a"
    assert not other.done and other.text == "abc"
