"""head.pooling: the masked mean the head reads, how `auto` decides, and what is refused."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from clients.task.choices import TASK_FILE
from clients.task.data import Example
from clients.task.errors import ConfigError, ModelError
from clients.task.model import ModelSpec, build_model, quiet_transformers, save_adapter
from clients.task.pooling import MeanPooler, declared_pooling, resolve_pooling
from clients.task.train import encode, head_inputs
from tests.tiny_models import make_tiny_bert

quiet_transformers()

LABELS = ("greet", "bye")
SHORT = Example(text="hello", label="greet")
LONG = Example(text="goodbye and see you again tomorrow morning my friend", label="bye")


def _declare(base: Path, **modes: bool) -> Path:
    """Give ``base`` a sentence-transformers pooling declaration."""
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (base / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (base / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": 64} | {f"pooling_mode_{k}": v for k, v in modes.items()}
    (base / "1_Pooling" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return base


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), dropout=0.0)


@pytest.fixture(scope="module")
def mean_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = make_tiny_bert(tmp_path_factory.mktemp("mean-bert"), dropout=0.0)
    return _declare(base, mean_tokens=True, cls_token=False)


def test_mean_pooler_ignores_masked_positions() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    pooler = MeanPooler()
    pooler.set_mask(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    out = pooler(hidden)
    torch.testing.assert_close(out[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(out[1], hidden[1].mean(0))
    pooler.set_mask(None)  # no mask: every position
    torch.testing.assert_close(pooler(hidden)[0], hidden[0].mean(0))


def test_mean_pooler_mask_is_per_thread() -> None:
    hidden = torch.ones(1, 2, 1) * torch.tensor([1.0, 3.0]).reshape(1, 2, 1)
    pooler = MeanPooler()
    pooler.set_mask(torch.tensor([[1, 0]]))
    seen: list[torch.Tensor] = []
    other = threading.Thread(target=lambda: seen.append(pooler(hidden)))
    other.start()
    other.join()
    assert float(pooler(hidden)) == 1.0  # this thread's mask
    assert float(seen[0]) == 2.0  # the other thread set none: the plain mean


def test_declared_pooling(tmp_path: Path) -> None:
    assert declared_pooling(tmp_path) is None  # not a sentence-transformers directory
    assert declared_pooling(_declare(tmp_path, mean_tokens=True, cls_token=False)) == "mean"
    assert declared_pooling(_declare(tmp_path, mean_tokens=False, cls_token=True)) == "cls_token"
    (tmp_path / "1_Pooling" / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="unreadable sentence-transformers pooling config"):
        declared_pooling(tmp_path)


def test_auto_follows_the_declaration(bert: Path, mean_bert: Path, tiny_llama: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    assert resolve_pooling("auto", model=plain, path=bert) == "model"
    assert resolve_pooling("auto", model=plain, path=mean_bert) == "mean"
    assert resolve_pooling("mean", model=plain, path=bert) == "mean"
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    assert resolve_pooling("auto", model=llama, path=tiny_llama) == "model"
    with pytest.raises(ModelError, match=r"head\.pooling='mean': LlamaForSequenceClassification"):
        resolve_pooling("mean", model=llama, path=tiny_llama)


def test_spec_refuses_an_unknown_pooling() -> None:
    with pytest.raises(ConfigError, match=r"head\.pooling='max' must be one of auto, model, mean"):
        ModelSpec(labels=LABELS, pooling="max")


def _logits(loaded, examples: list[Example]) -> torch.Tensor:
    inputs = encode(loaded, examples, max_length=32)
    inputs.pop("labels")
    with torch.no_grad():
        return loaded.model(**inputs).logits


def test_mean_pooling_reads_the_masked_mean_and_ignores_padding(mean_bert: Path) -> None:
    loaded = build_model(ModelSpec(base=str(mean_bert), labels=LABELS, lora_r=4, pooling="auto"))
    assert loaded.pooling == "mean"
    loaded.model.eval()
    # SHORT padded next to LONG gives the logits it gives alone: padding is not averaged in.
    torch.testing.assert_close(_logits(loaded, [SHORT, LONG])[0], _logits(loaded, [SHORT])[0])
    # The head reads the masked mean of the last hidden states.
    inputs = encode(loaded, [SHORT, LONG], max_length=32)
    inputs.pop("labels")
    with torch.no_grad():
        hidden = loaded.model.get_base_model().bert(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    features, _ = head_inputs(loaded, [SHORT, LONG], max_length=32)
    torch.testing.assert_close(torch.from_numpy(features).float(), expected)


def test_model_pooling_is_unchanged(mean_bert: Path) -> None:
    own = build_model(ModelSpec(base=str(mean_bert), labels=LABELS, lora_r=4, pooling="model"))
    mean = build_model(ModelSpec(base=str(mean_bert), labels=LABELS, lora_r=4, pooling="mean"))
    assert own.pooling == "model"
    assert type(own.model.get_base_model().bert.pooler).__name__ == "BertPooler"
    own.model.eval(), mean.model.eval()
    assert not torch.allclose(_logits(own, [SHORT]), _logits(mean, [SHORT]))


def test_the_adapter_records_its_pooling(mean_bert: Path, tmp_path: Path) -> None:
    loaded = build_model(ModelSpec(base=str(mean_bert), labels=LABELS, lora_r=4, pooling="auto"))
    save_adapter(loaded, tmp_path / "adapter")
    task = json.loads((tmp_path / "adapter" / TASK_FILE).read_text(encoding="utf-8"))
    assert task["pooling"] == "mean"  # resolved, not "auto"


def test_a_deep_copy_pools_with_its_own_mask(mean_bert: Path) -> None:
    import copy

    loaded = build_model(ModelSpec(base=str(mean_bert), labels=LABELS, lora_r=4, pooling="mean"))
    loaded.model.eval()
    twin = copy.deepcopy(loaded)
    assert twin.model.get_base_model().bert.pooler is not loaded.model.get_base_model().bert.pooler
    torch.testing.assert_close(_logits(twin, [SHORT, LONG])[0], _logits(twin, [SHORT])[0])
    torch.testing.assert_close(_logits(twin, [SHORT, LONG]), _logits(loaded, [SHORT, LONG]))


def test_dp_sgd_through_the_mean_pooler_is_plain_training_at_zero_noise(mean_bert: Path) -> None:
    """Opacus' per-example gradients pass the parameter-free pooler and its mask hook."""
    import numpy as np

    from clients.task.dpsgd import SampleDP
    from clients.task.model import base_digest, trainable_state
    from clients.task.plan import TrainPlan
    from clients.task.train import train_local

    examples = [Example(text=f"text {i} " * (1 + i % 3), label=LABELS[i % 2]) for i in range(8)]
    states = []
    for dp in (None, SampleDP(noise_multiplier=0.0, max_grad_norm=1e6)):
        spec = ModelSpec(base=str(mean_bert), labels=LABELS, lora_r=4, pooling="mean")
        loaded = build_model(spec)
        plan = TrainPlan(spec=spec, base_digest=base_digest(spec.base), local_steps=4,
                         batch_size=4, learning_rate=0.01, max_length=16)  # fmt: skip
        train_local(loaded, examples, plan=plan, generator=torch.Generator().manual_seed(0), dp=dp)
        states.append(trainable_state(loaded.model))
    for name in states[0]:
        np.testing.assert_allclose(states[1][name], states[0][name], rtol=1e-4, atol=1e-6)


def test_the_mask_reaches_the_pooler_when_passed_positionally(mean_bert: Path) -> None:
    loaded = build_model(ModelSpec(base=str(mean_bert), labels=LABELS, lora_r=4, pooling="mean"))
    loaded.model.eval()
    inputs = encode(loaded, [SHORT, LONG], max_length=32)
    bert = loaded.model.get_base_model().bert
    with torch.no_grad():
        by_name = bert(inputs["input_ids"], attention_mask=inputs["attention_mask"])
        by_place = bert(inputs["input_ids"], inputs["attention_mask"])
        alone = bert(**{k: v[:1, :3] for k, v in inputs.items() if k != "labels"})
    torch.testing.assert_close(by_place.pooler_output, by_name.pooler_output)
    torch.testing.assert_close(by_place.pooler_output[0], alone.pooler_output[0])


def test_only_a_declaration_of_mean_alone_is_mean(tmp_path: Path) -> None:
    both = declared_pooling(_declare(tmp_path, mean_tokens=True, max_tokens=True))
    assert both == "mean_tokens,max_tokens"  # concatenated embeddings: not a mean


@pytest.mark.parametrize("where", ["/etc", "../elsewhere", 3])
def test_a_pooling_module_path_outside_the_base_is_refused(tmp_path: Path, where: object) -> None:
    _declare(tmp_path, mean_tokens=True)
    (tmp_path / "modules.json").write_text(
        json.dumps([{"path": where, "type": "sentence_transformers.models.Pooling"}]),
        encoding="utf-8",
    )
    with pytest.raises(ModelError, match=r"modules\.json: the Pooling module's path"):
        declared_pooling(tmp_path)


def test_an_unreadable_declaration_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ModelError, match=r"modules\.json: unreadable"):
        declared_pooling(tmp_path)


def test_a_pooler_that_reads_only_the_first_token_is_not_replaced(tmp_path: Path) -> None:
    # ALBERT's (and BigBird's) pooler is a Linear fed the first token's vector: a mean
    # cannot stand in for it, so auto keeps it and mean is refused.
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=16)  # fmt: skip
    albert = AlbertForSequenceClassification(config)
    declared = _declare(tmp_path, mean_tokens=True)
    assert resolve_pooling("auto", model=albert, path=declared) == "model"
    with pytest.raises(ModelError, match="has no pooler to replace"):
        resolve_pooling("mean", model=albert, path=declared)
    with pytest.raises(ModelError, match=r"expected \(batch, seq, hidden\)"):
        MeanPooler()(torch.zeros(2, 16))


def test_auto_on_a_declared_base_without_a_pooler_is_the_models(
    tiny_llama: Path, tmp_path: Path
) -> None:
    import shutil

    base = tmp_path / "llama"
    shutil.copytree(tiny_llama, base)
    _declare(base, mean_tokens=True)
    loaded = build_model(ModelSpec(base=str(base), labels=LABELS, lora_r=4, pooling="auto"))
    assert loaded.pooling == "model"


def test_half_precision_and_an_empty_mask_row_stay_finite() -> None:
    pooler = MeanPooler()
    hidden = torch.full((2, 3, 4), 1000.0, dtype=torch.float16)  # its sum overflows in fp16
    pooler.set_mask(torch.tensor([[1, 1, 1], [0, 0, 0]]))
    out = pooler(hidden)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert float(out[0, 0]) == 1000.0 and float(out[1, 0]) == 0.0


def test_a_pooler_pickles_without_its_mask() -> None:
    import pickle

    pooler = MeanPooler()
    pooler.set_mask(torch.tensor([[1, 0]]))
    again = pickle.loads(pickle.dumps(pooler))
    assert float(again(torch.tensor([[[1.0], [3.0]]]))) == 2.0  # no mask came along


def test_a_mask_that_does_not_match_the_token_states_is_refused() -> None:
    pooler = MeanPooler()
    pooler.set_mask(torch.ones(2, 5))
    with pytest.raises(ModelError, match=r"attention mask \(2, 5\) does not match"):
        pooler(torch.zeros(2, 4, 3))


def test_a_backbone_without_an_attention_mask_is_not_mean_pooled(tmp_path: Path) -> None:
    # FNet mixes tokens by Fourier transform and takes no attention mask: a mean would
    # count the padding, so its pooler is not replaced.
    from transformers import FNetConfig, FNetForSequenceClassification

    config = FNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, intermediate_size=16)
    fnet = FNetForSequenceClassification(config)
    declared = _declare(tmp_path, mean_tokens=True)
    assert resolve_pooling("auto", model=fnet, path=declared) == "model"
