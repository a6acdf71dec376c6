"""`head_inputs` captures exactly what the classification head reads (BERT and Llama)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clients.task.data import Example
from clients.task.errors import ModelError
from clients.task.model import ModelSpec, build_model, quiet_transformers
from clients.task.train import encode, head_inputs
from tests.tiny_models import make_tiny_bert

quiet_transformers()

LABELS = ("greet", "bye", "thank")
# Lengths differ, so the batch is padded: the Llama case must pick each row's last token.
EXAMPLES = [
    Example(text="hello", label="greet"),
    Example(text="goodbye and see you again tomorrow", label="bye"),
    Example(text="thanks a lot", label="thank"),
    Example(text="hi there", label="greet"),
]


def _check(loaded, *, batch_size: int = 3) -> None:
    features, labels = head_inputs(loaded, EXAMPLES, batch_size=batch_size, max_length=32)
    inputs = encode(loaded, EXAMPLES, max_length=32)
    loaded.model.eval()
    with torch.no_grad():
        logits = loaded.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    head = next(m for n, m in loaded.model.named_modules() if n.endswith(("classifier", "score"))
                and hasattr(m, "modules_to_save"))  # fmt: skip

    again = head(torch.from_numpy(features).float())

    assert features.shape[0] == len(EXAMPLES) and labels.tolist() == [0, 1, 2, 0]
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)


def test_bert_pooled_output(tmp_path: Path) -> None:
    base = make_tiny_bert(tmp_path / "bert", dropout=0.3)
    _check(build_model(ModelSpec(base=str(base), labels=LABELS, lora_r=4), device="cpu"))


def test_llama_last_token_that_is_not_padding(tiny_llama: Path) -> None:
    _check(build_model(ModelSpec(base=str(tiny_llama), labels=LABELS, lora_r=4), device="cpu"))


def test_llama_left_padded(tiny_llama: Path) -> None:
    loaded = build_model(ModelSpec(base=str(tiny_llama), labels=LABELS, lora_r=4), device="cpu")
    loaded.tokenizer.padding_side = "left"
    _check(loaded)


def test_llama_whose_config_names_another_pad_token(tiny_llama: Path, tmp_path: Path) -> None:
    # The model pools at the last token that is not *its config's* pad id; a base whose
    # config.json names another id than its tokenizer pads with must be read the same way.
    # (Its pooled token then depends on the batch's padding: one batch, as the reference.)
    base = tmp_path / "llama"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "config.json").read_text())
    config["pad_token_id"] = 100  # [UNK] in the WordPiece vocabulary; the tokenizer pads with 0
    (base / "config.json").write_text(json.dumps(config))
    loaded = build_model(ModelSpec(base=str(base), labels=LABELS, lora_r=4), device="cpu")
    assert loaded.tokenizer.pad_token_id != 100

    _check(loaded, batch_size=len(EXAMPLES))


def test_a_causal_lm_has_no_head_to_fit(tiny_llama: Path) -> None:
    loaded = build_model(ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4), device="cpu")
    with pytest.raises(ModelError, match="only a classifier"):
        head_inputs(loaded, EXAMPLES)
