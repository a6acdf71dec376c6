"""Causal-LM rows whose prompt fills max-length: counted by site check, skipped by training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from clients.task.data import Example
from clients.task.errors import DataError
from clients.task.model import LoadedModel, ModelSpec, build_model, quiet_transformers
from clients.task.plan import TrainPlan
from clients.task.train import evaluate, response_tokens, train_local
from server.cli import main

MAX = 8
PROMPT = "one two three four five six seven eight nine ten"
LONG = Example(text=PROMPT + " blue", prompt=PROMPT, response=" blue")
SHORT = Example(text="Q: colour? blue", prompt="Q: colour?", response=" blue")
PLAIN = Example(text="once upon a time")


@pytest.fixture(scope="module")
def lm(tiny_llama: Path) -> LoadedModel:
    quiet_transformers()
    return build_model(ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=2))


def test_a_prompt_that_fills_max_length_leaves_no_response_token(lm: LoadedModel) -> None:
    assert response_tokens(lm.tokenizer, LONG, max_length=MAX) == 0
    assert response_tokens(lm.tokenizer, SHORT, max_length=MAX) == 1  # "blue"
    assert response_tokens(lm.tokenizer, PLAIN, max_length=MAX) is None


def test_training_and_evaluation_skip_those_rows_and_log_how_many(
    lm: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    plan = TrainPlan(spec=lm.spec, base_digest="d", local_steps=1, batch_size=4, max_length=MAX)
    with caplog.at_level(logging.WARNING, logger="clients.task.train"):
        result = train_local(lm, [LONG, SHORT, LONG, PLAIN], plan=plan,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
        evaluated = evaluate(lm, [LONG, SHORT], max_length=MAX)

    assert result.num_examples == 2 and evaluated.num_examples == 1
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped[0].startswith("skipping 2 of 4 rows whose prompt fills max-length=8")
    assert skipped[1].startswith("skipping 1 of 2 rows")


def test_a_site_whose_every_row_is_truncated_away_is_refused(lm: LoadedModel) -> None:
    plan = TrainPlan(spec=lm.spec, base_digest="d", local_steps=1, batch_size=2, max_length=MAX)
    with pytest.raises(DataError, match="every row's prompt fills max-length=8"):
        train_local(lm, [LONG, LONG], plan=plan, generator=torch.Generator())


def _lm_file(path: Path, examples: list[Example]) -> Path:
    rows = [{"prompt": e.prompt, "response": e.response} if e.prompt else {"text": e.text}
            for e in examples]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_site_check_counts_them_with_their_lines(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _lm_file(tmp_path / "lm.jsonl", [SHORT, LONG, PLAIN])
    args = ["site", "check", "--data", str(path), "--task", "causal-lm",
            "--base-model", str(tiny_llama), "--max-length", str(MAX)]  # fmt: skip

    assert main(args) == 0
    assert "1 row whose prompt fills max-length=8 tokens (lines 2): training skips them" in (
        capsys.readouterr().out
    )
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated_rows"] == [2]

    _lm_file(path, [LONG, LONG])
    assert main([*args, "--json"]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert "every row's prompt fills max-length=8 tokens" in problem
