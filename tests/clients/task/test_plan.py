from __future__ import annotations

import pytest

from clients.task.dpsgd import SampleDP
from clients.task.errors import ConfigError
from clients.task.model import ModelSpec
from clients.task.plan import TrainPlan


def test_plan_round_trips_through_a_flat_config() -> None:
    plan = TrainPlan(
        spec=ModelSpec(labels=("x", "y,z", ' "quoted" ', "a=b", "\\", "日本")),
        base_digest="sha256:00",
        server_round=4,
        learning_rate=0.1,
        proximal_mu=0.5,
    )
    config = plan.to_config()
    # What a Flower ConfigRecord carries: scalars, and lists of strings.
    assert all(
        isinstance(v, int | float | str | bool)
        or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        for v in config.values()
    )
    assert config["spec.labels"] == list(plan.spec.labels)  # a list, never a joined string
    assert TrainPlan.from_config(config) == plan


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch-size=0"),
        ({"learning_rate": -1.0}, "learning-rate=-1.0"),
        ({"local_epochs": 0, "local_steps": 0}, "one of them must be >= 1"),
        ({"surprise": 1}, "unknown fields \\['surprise'\\]"),
        ({"spec.labels": "not json"}, "spec.labels is not a list of strings"),
        ({"spec.labels": "a,b"}, "spec.labels is not a list of strings"),
        ({"spec.labels": ["a", 3]}, "spec.labels is not a list of strings"),
        ({"site_dp_trainable": "lora"}, "site-dp.trainable='lora' must be one of all, head"),
        ({"site_dp_trainable": "head"}, "site-dp.trainable='head' needs sample-level DP"),
        (
            {"site_dp_adapter_clip_share": 0.6},
            "site-dp.adapter-clip-share=0.6 needs sample-level DP",
        ),
        (
            {"site_dp_noise_multiplier": 1.0, "site_dp_adapter_clip_share": 1.0},
            r"site-dp.adapter-clip-share=1.0 must be in \[0, 1\)",
        ),
        # NaN compares false with 0, so it would read as "off": no DP-SGD, no clipping.
        ({"site_dp_noise_multiplier": float("nan")}, "site-dp.noise-multiplier=nan must be"),
        ({"clip_norm": float("nan")}, "clip-norm=nan must be finite"),
        ({"site_dp_target_epsilon": 1e300}, "site-dp.target-epsilon=1e\\+300 must be at most"),
        # Checked without DP-SGD too: refused, not carried on.
        ({"site_dp_delta": float("nan")}, r"site-dp.delta=nan must be in \(0, 1\)"),
        ({"site_dp_delta": -1.0}, r"site-dp.delta=-1.0 must be in \(0, 1\)"),
        ({"site_dp_max_grad_norm": -5.0}, "site-dp.max-grad-norm=-5.0 must be > 0"),
        ({"site_dp_max_grad_norm": float("inf")}, "site-dp.max-grad-norm=inf must be > 0"),
    ],
)
def test_bad_plan_is_refused_by_the_site(change: dict, message: str) -> None:
    config = TrainPlan(spec=ModelSpec(labels=("a", "b")), base_digest="d").to_config() | change
    with pytest.raises(ConfigError, match=message):
        TrainPlan.from_config(config)


@pytest.mark.integration  # ~3 s of RDP noise solving: outside the one-minute unit run
def test_under_a_target_each_site_solves_its_noise_for_the_whole_planned_run() -> None:
    from clients.task.dpsgd import site_epsilon

    plan = TrainPlan(
        spec=ModelSpec(task="causal-lm"),
        base_digest="d",
        batch_size=4,
        site_dp_target_epsilon=8.0,
        planned_rounds=5,
    )
    small, large = plan.sample_dp(16), plan.sample_dp(400)
    assert small is not None and large is not None
    # Rate 4/16 for 4 steps a round vs 4/400 for 100: each lands just under 8 over 5 rounds.
    for dp, rate, steps in ((small, 0.25, 4), (large, 0.01, 100)):
        assert 7.98 <= site_epsilon([(dp.noise_multiplier, rate, 5 * steps)], delta=1e-5) <= 8.0
    assert small.noise_multiplier != large.noise_multiplier
    fixed = TrainPlan(
        spec=ModelSpec(task="causal-lm"), base_digest="d", site_dp_noise_multiplier=1.3
    )
    assert fixed.sample_dp(16) == fixed.sample_dp(400) == SampleDP(1.3, 1.0)
    assert TrainPlan(spec=ModelSpec(task="causal-lm"), base_digest="d").sample_dp(16) is None


def test_the_plan_carries_only_a_resolved_pooling() -> None:
    mean = TrainPlan(spec=ModelSpec(labels=("a", "b"), pooling="mean"), base_digest="d")
    assert TrainPlan.from_config(mean.to_config()).spec.pooling == "mean"
    # The model's own pooling travels as no field, which a site from before the key reads
    # as it always did; a new site reads a plan without the field the same way.
    plain = TrainPlan(spec=ModelSpec(labels=("a", "b"), pooling="model"), base_digest="d")
    assert "spec.pooling" not in plain.to_config()
    assert TrainPlan.from_config(plain.to_config()).spec.pooling == "model"
    # A site never resolves "auto" from its own copy of the base.
    with pytest.raises(ConfigError, match=r"spec\.pooling='auto': expected one of model, mean"):
        TrainPlan.from_config(mean.to_config() | {"spec.pooling": "auto"})


def test_the_plan_carries_the_dp_optimizer_only_where_it_is_plain_sgd() -> None:
    spec = ModelSpec(labels=("a", "b"))
    sgd = TrainPlan(
        spec=spec, base_digest="d", site_dp_noise_multiplier=1.0, site_dp_optimizer="sgd"
    )
    assert TrainPlan.from_config(sgd.to_config()).site_dp_optimizer == "sgd"
    # AdamW travels as no field: a site from before site-dp.optimizer takes such a plan
    # (and refuses an sgd plan as an unknown field rather than run AdamW at SGD's rate).
    for adam in (
        TrainPlan(spec=spec, base_digest="d"),
        TrainPlan(spec=spec, base_digest="d", site_dp_noise_multiplier=1.0),
    ):
        assert "site_dp_optimizer" not in adam.to_config()
        assert TrainPlan.from_config(adam.to_config()).site_dp_optimizer == "adamw"
    # Plain training is AdamW; a plan asking for SGD without DP is refused, naming the key.
    with pytest.raises(ConfigError, match=r"site-dp\.optimizer='sgd' needs sample-level DP"):
        TrainPlan(spec=spec, base_digest="d", site_dp_optimizer="sgd")


def test_the_plan_carries_group_wise_clipping_only_where_it_is_on() -> None:
    spec = ModelSpec(labels=("a", "b"))
    grouped = TrainPlan(
        spec=spec, base_digest="d", site_dp_noise_multiplier=1.0, site_dp_adapter_clip_share=0.6
    )
    wire = TrainPlan.from_config(grouped.to_config())
    assert wire.site_dp_adapter_clip_share == 0.6
    assert wire.sample_dp(100).adapter_clip_share == 0.6  # what the site trains with
    # Flat clipping travels as no field: a site from before the key takes such a plan (and
    # refuses a grouped one as an unknown field rather than clip flat unannounced).
    flat = TrainPlan(spec=spec, base_digest="d", site_dp_noise_multiplier=1.0)
    assert "site_dp_adapter_clip_share" not in flat.to_config()
    assert TrainPlan.from_config(flat.to_config()).sample_dp(100).adapter_clip_share == 0.0
    # Where a site would clip flat anyway (no head, or the head alone), the key is refused
    # rather than recorded as if it had applied.
    for change in (
        {"site_dp_trainable": "head"},
        {"spec": ModelSpec(task="causal-lm")},
    ):
        with pytest.raises(ConfigError, match=r"site-dp\.adapter-clip-share=0\.6 applies to seq"):
            TrainPlan(
                **{
                    "spec": spec,
                    "base_digest": "d",
                    "site_dp_noise_multiplier": 1.0,
                    "site_dp_adapter_clip_share": 0.6,
                    **change,
                }
            )
