"""Reproducibility of local training on a tiny in-code BERT with dropout on."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from clients.task import train as train_module
from clients.task.data import Example
from clients.task.model import (
    ModelSpec,
    base_digest,
    build_model,
    is_head_tensor,
    load_trainable_state,
    quiet_transformers,
    trainable_state,
)
from clients.task.plan import TrainPlan
from clients.task.train import train_local
from tests.tiny_models import make_tiny_bert

quiet_transformers()

EXAMPLES = [
    Example(text=f"{word} number {i}", label=label)
    for i in range(4)
    for word, label in (("hello", "greet"), ("goodbye", "bye"), ("thanks", "thank"))
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    base = make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.3)
    spec = ModelSpec(base=str(base), labels=("greet", "bye", "thank"), lora_r=4)
    return build_model(spec, device="cpu")


def _train(loaded, *, seed: int) -> dict[str, np.ndarray]:
    plan = TrainPlan(spec=loaded.spec, base_digest=base_digest(loaded.spec.base), batch_size=4)
    load_trainable_state(loaded.model, _initial(loaded))
    train_local(loaded, EXAMPLES, plan=plan, generator=torch.Generator().manual_seed(seed))
    return trainable_state(loaded.model)


def _initial(loaded) -> dict[str, np.ndarray]:
    if not hasattr(loaded, "_initial"):
        loaded._initial = trainable_state(loaded.model)
    return loaded._initial


def test_same_generator_seed_gives_a_bit_identical_adapter_despite_dropout(loaded) -> None:
    # Arrange: something else draws from torch's global generator between the two runs,
    # as other work in a site process would.
    first = _train(loaded, seed=7)
    torch.rand(1000)
    rng_before = torch.get_rng_state()

    # Act
    second = _train(loaded, seed=7)

    # Assert: the same adapter, and the global generator left as it was found.
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_dropout_masks_come_from_the_generator(loaded) -> None:
    # With dropout on, another seed changes the masks (and the order), hence the adapter.
    a, b = _train(loaded, seed=7), _train(loaded, seed=8)

    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_fedlc_shift_is_tau_over_the_fourth_root_of_the_counts() -> None:
    from types import SimpleNamespace

    from clients.task.train import _fedlc_shift

    spec = ModelSpec(labels=("a", "b", "c"))
    plan = TrainPlan(spec=spec, base_digest="sha256:x", fedlc_tau=2.0)
    examples = [Example(text="x", label="a")] * 16 + [Example(text="y", label="b")]

    shift = _fedlc_shift(SimpleNamespace(device=torch.device("cpu")), examples, plan)

    # 2·16^(-1/4) = 1, 2·1^(-1/4) = 2, and no example of "c": out of the site's softmax.
    assert shift is not None
    np.testing.assert_allclose(shift[:2].numpy(), [1.0, 2.0])
    assert torch.isinf(shift[2])


def test_fedlc_with_an_absent_label_still_trains_to_finite_tensors(loaded) -> None:
    plan = TrainPlan(
        spec=loaded.spec, base_digest=base_digest(loaded.spec.base), batch_size=4, fedlc_tau=1.0
    )
    load_trainable_state(loaded.model, _initial(loaded))
    only_two = [e for e in EXAMPLES if e.label != "thank"]

    result = train_local(loaded, only_two, plan=plan, generator=torch.Generator().manual_seed(0))

    assert np.isfinite(result.loss)
    assert all(np.all(np.isfinite(v)) for v in trainable_state(loaded.model).values())


def _dp_plan(loaded, *, trainable: str, share: float = 0.0) -> TrainPlan:
    return TrainPlan(
        spec=loaded.spec,
        base_digest=base_digest(loaded.spec.base),
        batch_size=64,  # above the 12 rows: one full-batch step per epoch
        learning_rate=0.05,
        site_dp_noise_multiplier=1.0,
        site_dp_trainable=trainable,
        site_dp_adapter_clip_share=share,
    )


@pytest.mark.parametrize(("trainable", "share"), [("all", 0.6), ("head", 0.0), ("all", 0.0)])
def test_dp_sgd_clips_the_head_and_the_lora_tensors_as_groups_when_asked(
    loaded, monkeypatch: pytest.MonkeyPatch, trainable: str, share: float
) -> None:
    # The groups come from the real model's tensor names (PEFT's head copy, the LoRA
    # matrices): a spy on the DP-SGD wrapper (a pure unit seam) reads the optimiser's.
    seen: list[tuple] = []
    original = train_module.private

    @contextlib.contextmanager
    def spy(model, optimizer, **kwargs):
        with original(model, optimizer, **kwargs) as (forward, opt):
            named = {id(p): n for n, p in model.named_parameters()}
            pairs = zip(opt.params, opt.group_of, strict=True)
            seen.append((opt.group_bounds, [(named[id(p)], g) for p, g in pairs]))
            yield forward, opt

    monkeypatch.setattr(train_module, "private", spy)
    plan = _dp_plan(loaded, trainable=trainable, share=share)
    load_trainable_state(loaded.model, _initial(loaded))
    train_local(loaded, EXAMPLES, plan=plan, generator=torch.Generator(), dp=plan.sample_dp(12))
    [(bounds, groups)] = seen
    if trainable == "all" and share:
        assert bounds == pytest.approx((0.6, 0.8))  # of site-dp.max-grad-norm 1
        assert {g for n, g in groups if is_head_tensor(n)} == {1}
        assert {g for n, g in groups if "lora_B" in n} == {0} and len(groups) > 2
    else:  # the head alone, or flat: one group at the whole bound
        assert bounds == (1.0,) and {g for _, g in groups} == {0}


@pytest.mark.parametrize("trainable", ["head", "all"])
def test_dp_sgd_trains_the_head_alone_when_asked(loaded, trainable: str) -> None:
    # Arrange
    start = _initial(loaded)
    load_trainable_state(loaded.model, start)
    plan = _dp_plan(loaded, trainable=trainable)
    dp = plan.sample_dp(len(EXAMPLES))

    # Act
    result = train_local(loaded, EXAMPLES, plan=plan, generator=torch.Generator(), dp=dp)
    after = trainable_state(loaded.model)

    # Assert: every trainable tensor still travels; under "head" only the head moved.
    assert result.steps == 1 and plan.sampling_rate(len(EXAMPLES)) == 1.0
    assert after.keys() == start.keys()
    heads = {k for k in after if is_head_tensor(k)}
    lora = {k for k in after if "lora_B" in k}
    assert heads and lora and heads.isdisjoint(lora)
    assert all(not np.array_equal(after[k], start[k]) for k in heads)
    assert all(np.array_equal(after[k], start[k]) for k in lora) == (trainable == "head")
    # The cached model gets its trainable tensors back, without Opacus' attributes.
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == set(start)
    assert not any(hasattr(p, "grad_sample") for p in loaded.model.parameters())


def test_a_full_batch_dp_step_averages_over_the_rows_the_site_has(
    loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a batch above the site's rows, Opacus must divide the noised sum by the rows
    # trained on, not by the planned batch. AdamW's step is invariant to that scale, so
    # the weights cannot show it: a spy on the DP-SGD wrapper (a pure unit seam) does.
    seen: list[int] = []
    original = train_module.private

    def spy(model, optimizer, *, dp, batch_size, **kwargs):
        seen.append(batch_size)
        return original(model, optimizer, dp=dp, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(train_module, "private", spy)
    plan = _dp_plan(loaded, trainable="all")
    load_trainable_state(loaded.model, _initial(loaded))
    train_local(loaded, EXAMPLES, plan=plan, generator=torch.Generator(), dp=plan.sample_dp(12))
    assert plan.batch_size == 64 and seen == [len(EXAMPLES)]


@pytest.mark.parametrize("read", ["evaluate", "head_inputs"])
def test_evaluation_and_head_inputs_build_no_autograd_graph(loaded, read: str) -> None:
    # Both only read the model: tracking gradients would cost memory and time per batch.
    seen: list[bool] = []
    hook = loaded.model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        getattr(train_module, read)(loaded, EXAMPLES, max_length=16)
    finally:
        hook.remove()
    assert seen and not any(seen)
