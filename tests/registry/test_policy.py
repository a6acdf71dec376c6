from __future__ import annotations

import re
from pathlib import Path

import pytest

from registry.artifact import Provenance
from registry.errors import PromotionRefused, RegistryError, VerificationError
from registry.policy import LocalPolicy, Policy


def _provenance(*, accuracy: float | None = 0.9, privacy: dict | None = None) -> Provenance:
    return Provenance(
        model_name="m", release=1, created_at="2026-01-01T00:00:00+00:00",
        fedlora_version="0", base_model="b", base_digest="0" * 64, task="t", labels=[],
        lora={}, adapter_digest="1" * 64,
        metrics={} if accuracy is None else {"accuracy": accuracy},
        privacy=privacy or {},
    )  # fmt: skip


CLIENT_DP = {"client-level": {"epsilon": 6.0, "delta": 1e-5}}
SITE_DP = {"sample-level": {"sites": {"a": {"epsilon": 2.0}, "b": {"epsilon": 9.5}}}}


@pytest.mark.parametrize(
    ("policy", "provenance", "gate"),
    [
        (Policy(min_metric=0.95), _provenance(accuracy=0.9), "min-metric"),
        (Policy(min_metric=0.5), _provenance(accuracy=None), "min-metric"),
        (Policy(max_epsilon=5.0), _provenance(privacy=CLIENT_DP), "max-epsilon"),
        (Policy(max_epsilon=9.0), _provenance(privacy=SITE_DP), "max-epsilon"),
        (Policy(require_dp=True), _provenance(), "require-dp"),
        (Policy(min_metric=0.5, max_epsilon=8.0), _provenance(privacy=CLIENT_DP), None),
        (Policy(max_epsilon=1.0), _provenance(), "max-epsilon"),  # no DP: ε is unbounded
    ],
)
def test_gates(policy: Policy, provenance: Provenance, gate: str | None) -> None:
    if gate is None:
        policy.check(provenance)
        return
    with pytest.raises(PromotionRefused) as err:
        policy.check(provenance)
    assert err.value.gate == gate


def test_policy_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[gates]\nmin-metric = 0.8\nmax-epsilon = 8\nmetric = "accuracy"\n')
    assert Policy.load(path) == Policy(min_metric=0.8, max_epsilon=8.0)

    path.write_text("[gates]\nmax-epsilson = 8\n")
    with pytest.raises(RegistryError, match="unknown key 'max-epsilson'"):
        Policy.load(path)
    path.write_text('[gates]\nmin-metric = "high"\n')
    with pytest.raises(RegistryError, match=r"gates\.min-metric='high' must be a finite number"):
        Policy.load(path)


NAN, INF = float("nan"), float("inf")
# A value that is NaN, infinite, negative, missing, not a number or an integer past float
# range (JSON reads one exactly): every gate refuses.
BROKEN = [NAN, INF, -INF, -1.0, "missing", "0.1", 10**400]
BROKEN_IDS = ["nan", "inf", "-inf", "negative", "missing", "string", "10**400"]


def _broken_guarantee(value: object) -> dict:
    return {} if value == "missing" else {"epsilon": value}


@pytest.mark.parametrize("value", BROKEN, ids=BROKEN_IDS)
def test_min_metric_fails_closed(value: object) -> None:
    provenance = _provenance(accuracy=None if value == "missing" else value)  # type: ignore[arg-type]
    with pytest.raises(PromotionRefused) as err:
        Policy(min_metric=0.5).check(provenance)
    assert err.value.gate == "min-metric"


@pytest.mark.parametrize("where", ["client-level", "site"])
@pytest.mark.parametrize("value", BROKEN, ids=BROKEN_IDS)
def test_max_epsilon_fails_closed(value: object, where: str) -> None:
    entry = _broken_guarantee(value)
    privacy = (
        {"client-level": entry}
        if where == "client-level"
        else {"sample-level": {"sites": {"a": {"epsilon": 1.0}, "b": entry}}}
    )
    with pytest.raises(PromotionRefused) as err:
        Policy(max_epsilon=8.0).check(_provenance(privacy=privacy))
    assert err.value.gate == "max-epsilon"
    with pytest.raises(VerificationError) as refused:
        LocalPolicy(max_epsilon=8.0).check(_provenance(privacy=privacy))
    assert refused.value.reason == "policy"


@pytest.mark.parametrize("value", BROKEN, ids=BROKEN_IDS)
def test_require_dp_fails_closed(value: object) -> None:
    provenance = _provenance(privacy={"client-level": _broken_guarantee(value)})
    with pytest.raises(PromotionRefused) as err:
        Policy(require_dp=True).check(provenance)
    assert err.value.gate == "require-dp"


def test_site_reported_dp_never_satisfies_require_dp() -> None:
    # DP-SGD runs at the sites, which the server cannot watch: a release with only
    # sample-level DP (however small its ε) is not "trained with DP" for the gate.
    small = {"sample-level": {"sites": {"a": {"epsilon": 0.1}}, "verified": False}}
    with pytest.raises(PromotionRefused) as err:
        Policy(require_dp=True).check(_provenance(privacy=small))
    assert err.value.gate == "require-dp"
    Policy(require_dp=True, max_epsilon=8.0).check(_provenance(privacy={**small, **CLIENT_DP}))


def test_epsilon_is_nan_whatever_the_order_of_guarantees() -> None:
    # max() over [nan, 2.0] and [2.0, nan] differ; a NaN anywhere must win.
    for privacy in (
        {"client-level": {"epsilon": NAN}, "sample-level": {"sites": {"a": {"epsilon": 2.0}}}},
        {"sample-level": {"sites": {"a": {"epsilon": 2.0}}}, "client-level": {"epsilon": NAN}},
    ):
        epsilon = _provenance(privacy=privacy).epsilon()
        assert epsilon is not None and epsilon != epsilon


@pytest.mark.parametrize(
    ("key", "value"),
    [("min-metric", "nan"), ("max-epsilon", "inf"), ("min-metric", "1" + "0" * 400),
     ("max-epsilon", "1" + "0" * 400)],
    ids=["nan", "inf", "min-metric-10**400", "max-epsilon-10**400"],
)  # fmt: skip
def test_a_policy_file_with_a_non_finite_bound_is_refused(
    tmp_path: Path, key: str, value: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f"[gates]\n{key} = {value}\n")
    with pytest.raises(RegistryError, match=f"gates.{key}="):
        Policy.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"[gates]\nmin-metric = 1" + b"0" * 5000 + b"\n",
        b"[gates]\nmetric = '\xff'\n",
        b"[gates]\nmin-metric = " + b"[" * 100_000 + b"\n",
    ],
    ids=["5001-digits", "not-utf-8", "nested-deep"],
)
def test_a_policy_file_python_cannot_read_is_a_registry_error_naming_it(
    tmp_path: Path, content: bytes
) -> None:
    # tomllib raised ValueError past Python's 4,300-digit integer limit, and read_text
    # UnicodeDecodeError: both escaped Policy.load as tracebacks.
    path = tmp_path / "policy.toml"
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=f"policy {re.escape(str(path))} is not valid TOML"):
        Policy.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gates = 1\n", "policy .*: 'gates' must be a table .*, not int"),
        ('gates = "min-metric"\n', "policy .*: 'gates' must be a table .*, not str"),
        ("min-metric = 0.8\n", r"policy .*: min-metric must be under \[gates\]"),
        (
            "[gates]\nmetric = 5\nmin-metric = 0.5\n",
            r"policy gates\.metric=5 must be a metric name",
        ),
        ('[gates]\nmetric = ""\nmin-metric = 0.5\n', r"policy gates\.metric='' must be a metric"),
    ],
    ids=["int", "string", "no-table", "metric-int", "metric-empty"],
)
def test_a_policy_file_of_the_wrong_shape_is_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    # `gates = 1` raised TypeError; a gate above [gates] was "unknown" though listed as
    # known; a metric that is no name was turned into one ("5").
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=message):
        Policy.load(path)
