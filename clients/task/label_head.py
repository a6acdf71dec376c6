"""A classifier head read off the label names: the base's embedding of each label's name.

A sentence-embedding base (fedlora's default, all-MiniLM-L6-v2) places a request near the
words that name its intent, so the head whose row for label ``c`` is the base's own
embedding of ``c``'s name (``card_arrival`` read as "card arrival") classifies before any
training: zero-shot classification by semantic similarity to the label names (Veeranna et
al. 2016, "Using semantic similarity for multi-label zero-shot classification of text
documents", ESANN), the zero-shot head that fine-tuning then starts from (Wortsman et al.
2022, "Robust fine-tuning of zero-shot models"; Kumar et al. 2022, LP-FT).
The label set is part of the run's task and of every release, not a site's data, so this
start reveals nothing about any row and needs no privacy budget: it works the same under
SecAgg+, client-level DP and DP-SGD at the sites, where a head fitted from the sites'
statistics (``head.init=lda``) is refused.

Each row is ``scale · e_c / |e_c|²``, so a text whose head input is ``x`` gets logits
``scale · |x|/|e_c| · cos(x, e_c)``: where ``|x| = |e_c|``, ``scale`` is the logit of one
unit of cosine. It is not a pure cosine classifier: a label whose name embeds with a small
norm gets larger logits. Two labels whose names embed alike (``a_b`` and ``A-B`` on an
uncased base) start with the same row; that is logged. Names that say nothing (``0``,
``1``, ``label_7``) give rows that are nearly the same vector, hence nearly equal logits,
which softmax reads as little preference (a spread below 1.5 logits at scale 10 on the
default base, tests/clients/task/test_label_head.py).
"""

from __future__ import annotations

import logging
import numbers
import re

import numpy as np
import torch

from clients.task.data import Example
from clients.task.errors import ModelError
from clients.task.model import LoadedModel, is_head_tensor
from clients.task.train import head_inputs

log = logging.getLogger(__name__)
_SEPARATORS = re.compile(r"[_\-./:]+")


def label_text(label: str) -> str:
    """The text a label's name is read as: ``card_arrival`` → "card arrival".

    Underscores, hyphens, dots, slashes and colons become spaces and a camelCase name is
    split at each lower-to-upper case change, in any script (``cardArrival`` → "card
    Arrival", ``étatCivil`` → "état Civil"); a name that is only separators stays as it is.
    """
    words = _SEPARATORS.sub(" ", _split_camel(label)).strip()
    return words or label


def _split_camel(name: str) -> str:
    """``name`` with a space before each upper-case letter that follows a lower-case one
    (Unicode's cases, ``str.islower``/``isupper``: ``re`` has no class for them)."""
    return "".join(
        f" {ch}" if i and ch.isupper() and name[i - 1].islower() else ch
        for i, ch in enumerate(name)
    )


def label_name_head(
    loaded: LoadedModel, *, scale: float, max_length: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """The head whose rows are the base's embeddings of the label names.

    Args:
        loaded: A sequence classifier; its current adapter (at the start, LoRA's identity)
            gives the head inputs of the label texts.
        scale: Logit of one unit of cosine (see the module docstring); > 0.
        max_length: Token limit of a label text.

    Returns:
        (weight (labels, hidden), bias (labels,)), float64; the bias is zero.

    Raises:
        ModelError: If the task has no classifier head, ``scale`` is not a positive finite
            number, or a label's embedding is not finite or is zero (it names the label),
            or the scaled head overflows the head's dtype.
    """
    if not (
        isinstance(scale, numbers.Real)
        and not isinstance(scale, bool)
        and np.isfinite(scale)
        and scale > 0
    ):
        raise ModelError(f"head.label-scale={scale!r} must be a positive finite number")
    labels = loaded.spec.labels
    texts = [Example(text=label_text(label), label=label) for label in labels]
    x, _ = head_inputs(loaded, texts, max_length=max_length)
    norms = np.linalg.norm(x, axis=1)
    for label, row, norm in zip(labels, x, norms, strict=True):
        if not (np.all(np.isfinite(row)) and norm > 0):
            raise ModelError(
                f"head.init='label-names': the embedding of label {label!r} "
                f"(read as {label_text(label)!r}) is not usable (norm {norm!r})"
            )
    _warn_alike(labels, x / norms[:, None])
    return scale * x / (norms**2)[:, None], np.zeros(len(labels))


def _warn_alike(labels: tuple[str, ...], unit: np.ndarray, *, shown: int = 5) -> None:
    """Log the groups of labels whose names embed alike (cosine above 1 - 1e-5): their rows
    start (nearly) the same, a tie the training must break. The embeddings are compared,
    not the texts, so names the tokenizer reads alike (``a_b`` / ``A-B``, ``café`` /
    ``cafe`` on an uncased base, or names it maps to ``[UNK]``) are caught too.

    Compared 1,024 rows at a time (memory ~4 kB · labels per block); each label joins the
    group of the first label it is alike to.
    """
    unit = unit.astype(np.float32, copy=False)
    group = np.arange(len(labels))
    for start in range(0, len(labels), 1024):
        alike = unit[start : start + 1024] @ unit.T > 1 - 1e-5
        first = np.argmax(alike, axis=1)  # a row is alike to itself: first <= its index
        for i, j in enumerate(first, start=start):
            group[i] = group[j] if j < i else i
    members: dict[int, list[str]] = {}
    for label, g in zip(labels, group, strict=True):
        members.setdefault(int(g), []).append(label)
    groups = [names for names in members.values() if len(names) > 1]
    if groups:
        log.warning(
            "head.init='label-names': %d group(s) of labels embed alike, so each group's rows "
            "start (nearly) the same and the training must tell them apart: %s%s",
            len(groups),
            "; ".join(_some(names, shown) for names in groups[:shown]),
            "; …" if len(groups) > shown else "",
        )


def _some(names: list[str], shown: int) -> str:
    listed = ", ".join(map(repr, names[:shown]))
    return listed if len(names) <= shown else f"{listed}, … ({len(names)} in all)"


def set_label_name_head(loaded: LoadedModel, *, scale: float, max_length: int = 64) -> None:
    """Write `label_name_head` into the model's trained head (peft's ``modules_to_save``).

    Args:
        loaded: A sequence classifier whose head has one weight and one bias.
        scale: As `label_name_head`.
        max_length: As `label_name_head`.

    Raises:
        ModelError: As `label_name_head`, or if the model has not exactly one trained head
            weight and bias of the expected shapes.
    """
    weight, bias = label_name_head(loaded, scale=scale, max_length=max_length)
    params = {n: p for n, p in loaded.model.named_parameters() if is_head_tensor(n)}
    weights = [p for n, p in params.items() if n.endswith(".weight")]
    biases = [p for n, p in params.items() if n.endswith(".bias")]
    if len(weights) != 1 or len(biases) != 1:
        raise ModelError(
            f"head.init='label-names' needs one trained head weight and bias; found "
            f"{sorted(params)}"
        )
    if tuple(weights[0].shape) != weight.shape or tuple(biases[0].shape) != bias.shape:
        raise ModelError(
            f"head.init='label-names': head of shape {tuple(weights[0].shape)} does not "
            f"take the label embeddings {weight.shape}"
        )
    cast = torch.from_numpy(weight).to(weights[0].dtype)
    if not bool(torch.isfinite(cast).all()):
        raise ModelError(
            f"head.label-scale={scale!r}: the head does not fit in {weights[0].dtype} "
            "(a value overflows); use a smaller scale"
        )
    with torch.no_grad():
        weights[0].copy_(cast)
        biases[0].copy_(torch.from_numpy(bias).to(biases[0].dtype))
