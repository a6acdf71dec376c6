"""Run settings: the run config parsed once into frozen, validated dataclasses.

`RunSettings.from_config` reads the raw config through server/run_config.py (the keys,
their types and defaults), builds the settings of each part, each of which checks its own
fields (`ModelSpec`, `ServerOptimizer`, `ClientDPSettings`, `SecAggSettings`, the sites'
`TrainPlan`), and `RunSettings` then checks its own fields and the rules that tie parts
together. Every message names the run-config key and the value.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from clients.task.choices import (
    LEGACY_SITE_DP_OPTIMIZER,
    SITE_DP_LEARNING_RATES,
    SITE_DP_OPTIMIZERS,
    SITE_DP_TRAINABLE,
)
from clients.task.data import not_a_file
from clients.task.dpsgd import check_target_epsilon
from clients.task.errors import ConfigError, ModelError
from clients.task.labels import format_label_set, parse_label_set
from clients.task.model import (
    ModelSpec,
    base_digest,
    check_lora_rank,
    check_max_length,
    resolve_base,
)
from clients.task.numbers import check_delta
from clients.task.plan import TrainPlan
from clients.task.pooling import pooling_of_base
from registry.errors import RegistryError
from registry.mlflow_store import check_alias
from server.run_config import KEYS, param_value, read_config, split_list
from server.selection import chosen_round
from strategies.bounded import BoundedInfluence
from strategies.dp import ClientLevelDP
from strategies.fedavg import FedAvg, FedProx
from strategies.lda_head import DEFAULT_SHRINKAGE
from strategies.sampling import sample_size
from strategies.secagg import SecAggSettings
from strategies.server_opt import AGGREGATES, HEAD_MARK, ServerOptimizer
from strategies.strategy import Strategy

log = logging.getLogger(__name__)

ON_ROUND_FAILURE = ("stop", "skip")
ROBUST_MODES = ("auto", "bounded", "off")
HEAD_INITS = ("seeded", "lda", "label-names")
# update.max-norm's ceiling: far above any honest update, and float32 sums of updates
# under it stay finite for any number of sites a federation has.
MAX_UPDATE_NORM = 1e6
# The longest experiment name: the column of MLflow's SQL stores (its own check allows 500).
MAX_EXPERIMENT_NAME = 256


# The run-config key(s) behind each field of `RunSettings.fingerprint` (the field names are
# what checkpoints store), so a resume that changed one names what the user typed.
FINGERPRINT_KEYS = {
    "rounds": "num-server-rounds",
    "spec": "one of base-model, task, labels, lora.*, aggregation, quantization, head.pooling "
    "or seed",
    "local_epochs": "local-epochs",
    "local_steps": "local-steps",
    "batch_size": "batch-size",
    "learning_rate": "learning-rate",
    "max_length": "max-length",
    "proximal_mu": "proximal-mu",
    "fedrs_alpha": "fedrs.alpha",
    "fedlc_tau": "fedlc.tau",
    "fraction_train": "fraction-train",
    "fraction_evaluate": "fraction-evaluate",
    "min_fit_clients": "min-fit-clients",
    "min_available_clients": "min-available-clients",
    "on_round_failure": "on-round-failure",
    "max_norm": "update.max-norm",
    "server_optimizer": "one of server.*",
    "eval_file": "eval-file",
    "experiment": "experiment",
    "client_dp": "one of dp.*",
    "secagg": "one of secagg.*",
    "site_dp_noise_multiplier": "site-dp.noise-multiplier",
    "site_dp_target_epsilon": "site-dp.target-epsilon",
    "site_dp_max_grad_norm": "site-dp.max-grad-norm",
    "site_dp_delta": "site-dp.delta",
    "site_dp_batch_size": "site-dp.batch-size",
    "site_dp_learning_rate": "site-dp.learning-rate",
    "site_dp_optimizer": "site-dp.optimizer",
    "site_dp_trainable": "site-dp.trainable",
    "site_dp_adapter_clip_share": "site-dp.adapter-clip-share",
    "keep_adapter": "adapter.keep",
    "robust": "one of robust.*",
}

# The site-dp.* settings that shape a round only under site DP (`RunSettings._plan`): a
# non-private run's fingerprint leaves them out, so a changed default of one of them does
# not refuse its resume. Listed, not matched by prefix: a new site-dp.* setting stays
# fingerprinted (a refused resume) until it is added here.
SITE_DP_ONLY = frozenset(
    {
        "site_dp_max_grad_norm",
        "site_dp_delta",
        "site_dp_batch_size",
        "site_dp_learning_rate",
        "site_dp_optimizer",
        "site_dp_trainable",
        "site_dp_adapter_clip_share",
    }
)


@dataclass(frozen=True)
class PublishSettings:
    """Where and how the final adapter is published when ``registry.model-name`` is set."""

    model_name: str
    signing_key: Path
    passphrase_env: str
    alias: str

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> PublishSettings | None:
        if not v["registry.model-name"]:
            return None
        if not v["registry.signing-key"]:
            raise ConfigError(
                f"registry.model-name={v['registry.model-name']!r} needs registry.signing-key"
            )
        key = Path(v["registry.signing-key"]).expanduser()
        if not key.is_file():
            raise ConfigError(f"registry.signing-key={v['registry.signing-key']!r} does not exist")
        if not v["registry.alias"]:
            raise ConfigError("registry.alias='' must name an alias")
        try:  # before the run trains, not at its publish
            check_alias(v["registry.alias"])
        except RegistryError as exc:
            raise ConfigError(f"registry.alias={v['registry.alias']!r}: {exc}") from None
        return cls(v["registry.model-name"], key, v["registry.passphrase-env"], v["registry.alias"])

    @property
    def passphrase(self) -> str | None:
        return os.environ.get(self.passphrase_env) or None


@dataclass(frozen=True)
class ClientDPSettings:
    """Client-level central DP (DP-FedAvg); fields named after the ``dp.*`` keys.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is set (> 0); with a
    target, the round loop solves ``z`` once the number of connected sites is known.
    The bounds of ``clip_norm`` and ``noise_multiplier`` are the mechanism's own
    (`strategies.dp.ClientLevelDP`); the rest are checked here.
    """

    clip_norm: float
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        ClientLevelDP(clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier)
        check_target_epsilon("dp.target-epsilon", self.target_epsilon)
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ConfigError(
                f"dp.clip-norm={self.clip_norm!r} needs exactly one of dp.noise-multiplier "
                f"(got {self.noise_multiplier!r}) and dp.target-epsilon "
                f"(got {self.target_epsilon!r}) > 0"
            )
        check_delta("dp.delta", self.delta)
        if not 0 <= self.max_epsilon < math.inf:  # NaN too; 0 is off
            raise ConfigError(f"dp.max-epsilon={self.max_epsilon!r} must be finite and >= 0")

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> ClientDPSettings | None:
        """The ``dp.*`` keys as settings; None when ``dp.clip-norm`` is 0 (DP off)."""
        if v["dp.clip-norm"] == 0.0:
            for key in ("dp.noise-multiplier", "dp.target-epsilon", "dp.max-epsilon"):
                if v[key] != 0.0:
                    raise ConfigError(f"{key}={v[key]!r} needs dp.clip-norm > 0")
            check_delta("dp.delta", v["dp.delta"])  # off too: a bad value is refused, not kept
            return None
        return cls(
            clip_norm=v["dp.clip-norm"],
            noise_multiplier=v["dp.noise-multiplier"],
            target_epsilon=v["dp.target-epsilon"],
            delta=v["dp.delta"],
            max_epsilon=v["dp.max-epsilon"],
        )


def _robust(v: Mapping[str, Any], *, secure: bool) -> tuple[float, float] | None:
    """The ``robust.*`` keys as (max weight ratio, max norm ratio); None when off."""
    mode = v["robust.mode"]
    if mode not in ROBUST_MODES:
        raise ConfigError(f"robust.mode={mode!r} must be one of {', '.join(ROBUST_MODES)}")
    if mode == "bounded" and secure:
        raise ConfigError(
            "robust.mode='bounded' needs single updates and cannot apply with "
            "secagg.enabled=true (SecAgg+ reveals only the sum); use robust.mode='auto', "
            "which relies on secagg.max-weight and secagg.clipping-range there"
        )
    ratios = (v["robust.max-weight-ratio"], v["robust.max-norm-ratio"])
    BoundedInfluence(FedAvg(), max_weight_ratio=ratios[0], max_norm_ratio=ratios[1])  # validates
    if mode == "off" or (mode == "auto" and secure) or ratios == (0.0, 0.0):
        return None
    return ratios


def _resolved_pooling(spec: ModelSpec) -> ModelSpec:
    """``spec`` with ``head.pooling`` resolved to ``model`` or ``mean`` for its base, once,
    on the server: the round plan carries the resolved value, so every site pools the same
    way whatever its copy of the base declares, and a resume compares it (fingerprint).

    Raises:
        ConfigError: Naming ``head.pooling`` when it cannot apply or the base is unusable.
    """
    if spec.pooling == "model" or (
        spec.pooling == "auto" and spec.task != "sequence-classification"
    ):
        return replace(spec, pooling="model")
    try:
        path = resolve_base(spec.base)
    except ModelError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        pooling = pooling_of_base(spec.pooling, path=path, task=spec.task)
    except ModelError as exc:
        raise ConfigError(
            str(exc) if "head.pooling" in str(exc) else f"head.pooling: {exc}"
        ) from exc
    return replace(spec, pooling=pooling)


def _aggregate(value: str, spec: ModelSpec, *, capped: bool) -> str:
    """``server.aggregate``, with ``auto`` resolved: ``mean`` (FedAvg) when the head reads
    the base's mean-pooled sentence embedding (``head.pooling``, resolved), else ``sum-head``.

    Summing the head's updates lets a head that starts at random over features made for
    another objective (BERT's pooler) move at the pace of the pooled data; over features
    that already separate the labels the summed step overshoots and accuracy swings from
    round to round (README, "Quality"). The mean is weighted by the sites' row counts only
    where bounded influence caps each site's weight (``capped``: ``robust.max-weight-ratio``
    in plain rounds, without client-level DP); otherwise (SecAgg+, the cap off, client-level
    DP) the mean is uniform (``uniform-mean``; under SecAgg+ a weight below
    ``secagg.max-weight`` would also coarsen each update's quantisation).

    Raises:
        ConfigError: If ``value`` is not ``auto`` or one of `AGGREGATES`.
    """
    if value != "auto":
        if value not in AGGREGATES:
            raise ConfigError(
                f"server.aggregate={value!r} must be auto or one of {', '.join(AGGREGATES)}"
            )
        return value
    if spec.pooling != "mean":
        return "sum-head"
    return "mean" if capped else "uniform-mean"


def _set_back(name: str, value: Any) -> str:
    """A refused resume's way out for one changed setting named by a single run-config key:
    `` (set site-dp.learning-rate=0.05 again to resume)``; empty otherwise."""
    key = FINGERPRINT_KEYS.get(name, "")
    if not key or " " in key or isinstance(value, bool) or value in (None, "None"):
        return ""  # several keys, or an unset path (fingerprinted as "None")
    if isinstance(value, str):
        value = json.dumps(value)  # a TOML basic string, as --set and --run-config read it
    elif not isinstance(value, int | float):
        return ""
    flag = f": --rounds {value} with fedlora train" if key == "num-server-rounds" else ""
    return f" (set {key}={value} again to resume{flag})"  # train refuses a --set --rounds sets


def _head_init(value: str, spec: ModelSpec) -> str:
    """``head.init``, with ``auto`` resolved: ``label-names`` when the head reads the base's
    mean-pooled sentence embedding (``head.pooling``, resolved), the space that base was
    trained to place a text and the words naming its meaning close in; else ``seeded``.

    Raises:
        ConfigError: Any other value than ``auto`` or one of `HEAD_INITS`.
    """
    if value != "auto":
        if value not in HEAD_INITS:
            raise ConfigError(f"head.init={value!r} must be auto or one of {', '.join(HEAD_INITS)}")
        return value
    return "label-names" if spec.pooling == "mean" else "seeded"


def _own_rate(optimizer: str, max_grad_norm: float) -> float:
    """The DP learning rate ``site-dp.learning-rate=0`` stands for (`SITE_DP_LEARNING_RATES`,
    measured at ``site-dp.max-grad-norm`` 1). Plain SGD's step is the rate times a mean of
    gradients clipped to C, so its rate is 10/C; AdamW's step does not depend on C."""
    own = SITE_DP_LEARNING_RATES[optimizer]
    if optimizer == "sgd" and 0 < max_grad_norm < math.inf:  # else SampleDP names the key
        own /= max_grad_norm
    return own


def _secagg(v: Mapping[str, Any], *, site_clip: float) -> SecAggSettings | None:
    """The ``secagg.*`` keys as settings (a clipping range of 0 is ``site_clip``); None
    when ``secagg.enabled`` is false, after the same checks of each key's own range, so a
    bad value is refused rather than kept for a run that turns SecAgg+ on."""
    enabled = v["secagg.enabled"]
    settings = SecAggSettings(
        num_shares=v["secagg.num-shares"],
        reconstruction_threshold=v["secagg.reconstruction-threshold"],
        # Off, 0 stands for nothing: the range's own default takes its place.
        clipping_range=v["secagg.clipping-range"]
        or (site_clip if enabled else SecAggSettings.clipping_range),
        quantization_range=v["secagg.quantization-range"],
        max_weight=v["secagg.max-weight"],
        prg=v["secagg.prg"],
    )
    _check_clipping_ceiling(v["secagg.clipping-range"])  # the value given: 0 passes
    return settings if enabled else None


def _check_clipping_ceiling(clipping_range: float) -> None:
    # No coordinate exceeds the update's norm, itself at most MAX_UPDATE_NORM; a larger
    # range only coarsens quantization and lets float32 sums overflow.
    if clipping_range > MAX_UPDATE_NORM:
        raise ConfigError(
            f"secagg.clipping-range={clipping_range!r} must be at most {MAX_UPDATE_NORM:g} "
            "(update.max-norm's ceiling: no coordinate of an accepted update is larger)"
        )


@dataclass(frozen=True)
class RunSettings:
    """The validated settings of one training run.

    Built by `from_config`; building one directly runs the same checks
    (``__post_init__``), so no invalid combination exists as a `RunSettings`.
    """

    rounds: int
    spec: ModelSpec
    local_epochs: int
    local_steps: int
    batch_size: int
    learning_rate: float
    max_length: int
    proximal_mu: float
    fedrs_alpha: float
    fedlc_tau: float
    fraction_train: float
    fraction_evaluate: float
    min_fit_clients: int
    min_available_clients: int
    round_timeout: float
    on_round_failure: str
    max_norm: float
    server_optimizer: ServerOptimizer
    eval_file: Path | None
    out_dir: Path
    tracking_uri: str
    experiment: str
    resume: bool
    publish: PublishSettings | None = None
    client_dp: ClientDPSettings | None = None
    secagg: SecAggSettings | None = None
    site_dp_noise_multiplier: float = 0.0
    site_dp_target_epsilon: float = 0.0
    site_dp_max_grad_norm: float = 1.0
    site_dp_delta: float = 1e-5
    # Under site DP these replace batch-size and learning-rate in the round plan.
    site_dp_batch_size: int = 512
    # 0 is the optimiser's own rate (SITE_DP_LEARNING_RATES), resolved in __post_init__:
    # plain DP-SGD and DP-Adam step on scales a hundred times apart.
    site_dp_learning_rate: float = 0.0
    site_dp_optimizer: str = "sgd"
    site_dp_trainable: str = "all"
    # Group-wise clipping: the adapter's share of site-dp.max-grad-norm (0 is flat).
    site_dp_adapter_clip_share: float = 0.0
    # The enrolled sites (server/roster.py); None: every connected node is a site.
    roster: Path | None = None
    keep_adapter: str = "best"
    # Bounded influence (robust.*): None when off, else (max weight ratio, max norm ratio).
    robust: tuple[float, float] | None = None
    head_init: str = "seeded"  # resolved: from_config turns head.init=auto into one of these
    head_shrinkage: float = DEFAULT_SHRINKAGE
    head_label_scale: float = 10.0

    def __post_init__(self) -> None:
        """Each field's own range, then the rules between fields (one place each)."""
        if self.rounds < 1:
            raise ConfigError(f"num-server-rounds={self.rounds!r} must be >= 1")
        for key, value in (
            ("fraction-train", self.fraction_train),
            ("fraction-evaluate", self.fraction_evaluate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}={value!r} must be in [0, 1]")
        if self.fraction_train == 0.0:
            raise ConfigError("fraction-train=0.0 would train no site")
        if self.min_fit_clients < 1:
            raise ConfigError(f"min-fit-clients={self.min_fit_clients!r} must be >= 1")
        if not 0 < self.round_timeout < math.inf:
            raise ConfigError(f"round-timeout={self.round_timeout!r} must be finite and > 0")
        if self.on_round_failure not in ON_ROUND_FAILURE:
            raise ConfigError(f"on-round-failure={self.on_round_failure!r} must be stop or skip")
        # inf would accept any update; a bound past float32's range accepts updates whose
        # float32 mean overflows to inf.
        if not 0 < self.max_norm <= MAX_UPDATE_NORM:
            raise ConfigError(
                f"update.max-norm={self.max_norm!r} must be finite, > 0 and at most "
                f"{MAX_UPDATE_NORM:g} (the largest L2 norm accepted from a site's update)"
            )
        chosen_round(rule=self.keep_adapter, best_round=0, last_round=0)  # names adapter.keep
        # MLflow refuses an empty name only as the run opens, after OUT/mlflow.db is written.
        if not self.experiment.strip() or len(self.experiment) > MAX_EXPERIMENT_NAME:
            raise ConfigError(
                f"experiment={self.experiment[:80]!r} must name an MLflow experiment: not "
                f"blank, at most {MAX_EXPERIMENT_NAME} characters"
            )
        if self.site_dp_batch_size < 1:
            raise ConfigError(f"site-dp.batch-size={self.site_dp_batch_size!r} must be >= 1")
        if self.site_dp_optimizer not in SITE_DP_OPTIMIZERS:
            raise ConfigError(
                f"site-dp.optimizer={self.site_dp_optimizer!r} must be one of "
                f"{', '.join(SITE_DP_OPTIMIZERS)}"
            )
        own = _own_rate(self.site_dp_optimizer, self.site_dp_max_grad_norm)
        if self.site_dp_learning_rate == 0:  # frozen: set once, here, on every path
            object.__setattr__(self, "site_dp_learning_rate", own)
        if not 0 < self.site_dp_learning_rate < math.inf:
            raise ConfigError(
                f"site-dp.learning-rate={self.site_dp_learning_rate!r} must be 0 (the "
                "optimiser's own) or finite and > 0"
            )
        if self.site_dp and not own / 10 <= self.site_dp_learning_rate <= own * 10:
            log.warning(
                "site-dp.learning-rate=%g is on another scale than site-dp.optimizer=%r, "
                "whose own rate here is %g%s: set site-dp.learning-rate=0 for it",
                self.site_dp_learning_rate,
                self.site_dp_optimizer,
                own,
                " (a config from before site-dp.optimizer ran adamw)"
                if self.site_dp_optimizer == "sgd"
                else "",
            )
        if self.site_dp_trainable not in SITE_DP_TRAINABLE:
            raise ConfigError(
                f"site-dp.trainable={self.site_dp_trainable!r} must be one of "
                f"{', '.join(SITE_DP_TRAINABLE)}"
            )
        if not 0 <= self.site_dp_adapter_clip_share < 1:  # NaN too
            raise ConfigError(
                f"site-dp.adapter-clip-share={self.site_dp_adapter_clip_share!r} must be in "
                "[0, 1) (0 is flat clipping)"
            )
        if self.eval_file is not None and (why := not_a_file(self.eval_file)):
            raise ConfigError(f"eval-file={str(self.eval_file)!r} {why}")
        # The sites' fields and their combinations (local-epochs or local-steps, site-dp.*,
        # proximal-mu with site-dp, fedrs.alpha with the task) are the round plan's own
        # checks, which every site runs again on what it receives.
        self._plan(server_round=1, digest="")
        self._check_sampling()
        self._check_privacy()
        self._check_head()

    def _check_sampling(self) -> None:
        if self.min_available_clients < self.min_fit_clients:
            raise ConfigError(
                f"min-available-clients={self.min_available_clients!r} must be >= "
                f"min-fit-clients={self.min_fit_clients!r}"
            )
        if self.secagg is not None:
            # Every round must give each site a full neighbourhood of num-shares sites.
            fewest = sample_size(
                self.min_available_clients,
                fraction=self.fraction_train,
                minimum=self.min_fit_clients,
            )
            if self.secagg.num_shares > fewest:
                raise ConfigError(
                    f"secagg.num-shares={self.secagg.num_shares!r} exceeds the {fewest} "
                    "site(s) a round may sample (min-fit-clients, fraction-train x "
                    "min-available-clients)"
                )

    def _check_privacy(self) -> None:
        if self.secagg is not None and self.server_optimizer.needs_spread:
            raise ConfigError(
                f"server.optimizer={self.server_optimizer.kind!r} cannot be combined with "
                "secagg.enabled=true: its step size needs each site's update norm, and "
                "SecAgg+ shows the server only the sum of the updates"
            )
        if self.secagg is not None and self.secagg.clipping_range < self.site_clip_norm:
            raise ConfigError(
                f"secagg.clipping-range={self.secagg.clipping_range!r} does not cover the "
                f"sites' clip norm {self.site_clip_norm!r} (dp.clip-norm, else update.max-norm)"
            )
        if self.secagg is not None:
            _check_clipping_ceiling(self.secagg.clipping_range)
        if self.client_dp is not None and self.client_dp.clip_norm > self.max_norm:
            raise ConfigError(
                f"dp.clip-norm={self.client_dp.clip_norm!r} exceeds "
                f"update.max-norm={self.max_norm!r}; the server would reject clipped updates"
            )
        if self.robust is not None and self.secagg is not None:
            raise ConfigError(
                "robust.* bounds need single updates and cannot apply with secagg.enabled=true"
            )

    def _check_head(self) -> None:
        if self.head_init == "auto":  # the settings hold a resolved value
            raise ConfigError(
                "head.init='auto' is resolved by RunSettings.from_config; settings built "
                f"directly take one of {', '.join(HEAD_INITS)}"
            )
        if self.head_init not in HEAD_INITS:
            choices = ", ".join(HEAD_INITS)
            raise ConfigError(f"head.init={self.head_init!r} must be one of {choices}")
        if not 0 < self.head_shrinkage <= 1:
            raise ConfigError(f"head.shrinkage={self.head_shrinkage!r} must be in (0, 1]")
        if self.head_init == "lda" and (why := self._lda_blocker()):
            raise ConfigError(f"head.init='lda' cannot apply: {why}")
        if not (math.isfinite(self.head_label_scale) and 0 < self.head_label_scale <= 1000):
            raise ConfigError(
                f"head.label-scale={self.head_label_scale!r} must be in (0, 1000] (logits "
                "per unit of cosine)"
            )
        if self.head_init == "label-names" and self.spec.task != "sequence-classification":
            raise ConfigError(
                f"head.init='label-names' cannot apply: task={self.spec.task!r} has no "
                "classification head"
            )
        if self.head_init == "label-names" and self.spec.pooling != "mean":
            raise ConfigError(
                "head.init='label-names' cannot apply: it reads the label names as sentence "
                f"embeddings, which needs head.pooling='mean' (this run's is "
                f"{self.spec.pooling!r})"
            )

    def _lda_blocker(self) -> str | None:
        """Why this run cannot start from the closed-form head, or None."""
        if self.spec.task != "sequence-classification":
            return f"task={self.spec.task!r} has no classification head"
        if self.secagg is not None:
            return (
                "with secagg.enabled=true each site's head statistics would reach the "
                "server unmasked (SecAgg+ covers the training rounds only)"
            )
        if self.client_dp is not None:
            return "the head statistics carry no noise, so dp.* would not cover them"
        if self.site_dp_noise_multiplier > 0 or self.site_dp_target_epsilon > 0:
            return "the head statistics carry no noise, so site-dp.* would not cover them"
        return None

    @property
    def lda_head(self) -> bool:
        """Whether round 1 starts from the LDA head of the sites' statistics (head.init)."""
        return self.head_init == "lda"

    @property
    def site_clip_norm(self) -> float:
        """L2 bound each site applies to its update: C under client-level DP; else the
        server's update bound (``update.max-norm``) under SecAgg+, where the server cannot
        check it, and under site DP, where a site of a few rows has an update of mostly noise
        that the server would reject after the site paid the round's ε (clipping the DP
        output is post-processing: it costs no privacy); 0 (none) otherwise."""
        if self.client_dp is not None:
            return self.client_dp.clip_norm
        return self.max_norm if self.secagg is not None or self.site_dp else 0.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Validate a flat run config (Flower's run_config or CLI overrides) into settings.

        Raises:
            ConfigError: Naming the unknown key (with a suggestion) or the bad value.
        """
        v = read_config(config)
        spec = ModelSpec(
            base=v["base-model"],
            task=v["task"],
            labels=parse_label_set(v["labels"]),
            lora_r=v["lora.r"],
            lora_alpha=v["lora.alpha"],
            lora_dropout=v["lora.dropout"],
            target_modules=split_list(v["lora.target-modules"]),
            aggregation=v["aggregation"],
            quantization=v["quantization"],
            pooling=v["head.pooling"],
            seed=v["seed"],
        )
        spec = _resolved_pooling(spec)  # the sites get "model" or "mean", never "auto"
        try:  # here, where the base is known: a longer plan fails inside every site's forward
            check_max_length(v["max-length"], base=spec.base)
            check_lora_rank(spec.lora_r, base=spec.base)
        except ModelError as exc:
            raise ConfigError(str(exc)) from exc
        client_dp = ClientDPSettings.from_values(v)
        secagg = _secagg(
            v, site_clip=client_dp.clip_norm if client_dp is not None else v["update.max-norm"]
        )
        robust = _robust(v, secure=secagg is not None)
        # Sites weigh by their row counts only where each one's weight is bounded (and not
        # under client-level DP, whose sensitivity bound needs alike weights).
        capped = robust is not None and robust[0] > 0 and client_dp is None
        return cls(
            rounds=v["num-server-rounds"],
            spec=spec,
            local_epochs=v["local-epochs"],
            local_steps=v["local-steps"],
            batch_size=v["batch-size"],
            learning_rate=v["learning-rate"],
            max_length=v["max-length"],
            proximal_mu=v["proximal-mu"],
            fedrs_alpha=v["fedrs.alpha"],
            fedlc_tau=v["fedlc.tau"],
            fraction_train=v["fraction-train"],
            fraction_evaluate=v["fraction-evaluate"],
            min_fit_clients=v["min-fit-clients"],
            min_available_clients=v["min-available-clients"],
            round_timeout=v["round-timeout"],
            on_round_failure=v["on-round-failure"],
            max_norm=v["update.max-norm"],
            server_optimizer=ServerOptimizer(  # validates its fields, naming the keys
                kind=v["server.optimizer"],
                learning_rate=v["server.learning-rate"],
                momentum=v["server.momentum"],
                aggregate=_aggregate(v["server.aggregate"], spec, capped=capped),
                lora_scale=v["server.lora-scale"],
            ),
            eval_file=Path(v["eval-file"]).expanduser() if v["eval-file"] else None,
            out_dir=Path(v["out-dir"]).expanduser(),
            tracking_uri=v["tracking-uri"],
            experiment=v["experiment"],
            resume=v["resume"],
            publish=PublishSettings.from_values(v),
            client_dp=client_dp,
            secagg=secagg,
            site_dp_noise_multiplier=v["site-dp.noise-multiplier"],
            site_dp_target_epsilon=v["site-dp.target-epsilon"],
            site_dp_max_grad_norm=v["site-dp.max-grad-norm"],
            site_dp_delta=v["site-dp.delta"],
            site_dp_batch_size=v["site-dp.batch-size"],
            site_dp_learning_rate=v["site-dp.learning-rate"],
            site_dp_optimizer=v["site-dp.optimizer"],
            site_dp_trainable=v["site-dp.trainable"],
            site_dp_adapter_clip_share=v["site-dp.adapter-clip-share"],
            roster=Path(v["roster"]).expanduser() if v["roster"] else None,
            keep_adapter=v["adapter.keep"],
            robust=robust,
            head_init=_head_init(v["head.init"], spec),
            head_shrinkage=v["head.shrinkage"],
            head_label_scale=v["head.label-scale"],
        )

    def bounded(self, strategy: Strategy) -> Strategy:
        """``strategy`` wrapped in `BoundedInfluence` when ``robust.*`` asks for it."""
        if self.robust is None:
            return strategy
        weight_ratio, norm_ratio = self.robust
        # Under sum-head the step counts the head n times: it is bounded on its own.
        summed = HEAD_MARK if self.server_optimizer.aggregate == "sum-head" else None
        return BoundedInfluence(
            strategy, max_weight_ratio=weight_ratio, max_norm_ratio=norm_ratio, summed=summed
        )

    def strategy(self) -> FedAvg:
        """The plain strategy; the round loop wraps it in `DifferentiallyPrivate` under DP."""
        weighting = "uniform" if self.uniform_weight else "examples"
        if self.proximal_mu > 0:
            return FedProx(
                max_norm=self.max_norm,
                min_fit_clients=self.min_fit_clients,
                weighting=weighting,
                proximal_mu=self.proximal_mu,
            )
        return FedAvg(
            max_norm=self.max_norm, min_fit_clients=self.min_fit_clients, weighting=weighting
        )

    @property
    def uniform_weight(self) -> bool:
        """Every site's update weighs the same: under client-level DP (the sensitivity
        bound needs it) and for every ``server.aggregate`` but ``mean`` (the sums and
        ``uniform-mean``)."""
        return self.client_dp is not None or self.server_optimizer.aggregate != "mean"

    def plan(self, server_round: int) -> TrainPlan:
        """The round plan sent to sites, with the base model's digest."""
        return self._plan(server_round=server_round, digest=base_digest(self.spec.base))

    @property
    def site_dp(self) -> bool:
        """Sites train with sample-level DP-SGD (``site-dp.noise-multiplier`` or
        ``site-dp.target-epsilon`` set)."""
        return self.site_dp_noise_multiplier > 0 or self.site_dp_target_epsilon > 0

    def _plan(self, *, server_round: int, digest: str) -> TrainPlan:
        # Under site DP the plan carries the site-dp.* batch size, learning rate and
        # trainable tensors (README "Quality under DP" says why they differ); the sites'
        # sampling rate and steps, hence every ε the sites and the server account, follow
        # from the plan, so both ends solve and check the same noise multiplier.
        dp = self.site_dp
        return TrainPlan(
            spec=self.spec,
            base_digest=digest,
            server_round=server_round,
            local_epochs=self.local_epochs,
            local_steps=self.local_steps,
            batch_size=self.site_dp_batch_size if dp else self.batch_size,
            learning_rate=self.site_dp_learning_rate if dp else self.learning_rate,
            max_length=self.max_length,
            proximal_mu=self.proximal_mu,
            fedrs_alpha=self.fedrs_alpha,
            fedlc_tau=self.fedlc_tau,
            clip_norm=self.site_clip_norm,
            uniform_weight=self.uniform_weight,
            site_dp_noise_multiplier=self.site_dp_noise_multiplier,
            site_dp_target_epsilon=self.site_dp_target_epsilon,
            site_dp_max_grad_norm=self.site_dp_max_grad_norm,
            site_dp_delta=self.site_dp_delta,
            site_dp_trainable=self.site_dp_trainable if dp else "all",
            site_dp_adapter_clip_share=self.site_dp_adapter_clip_share if dp else 0.0,
            site_dp_optimizer=self.site_dp_optimizer if dp else LEGACY_SITE_DP_OPTIMIZER,
            planned_rounds=self.rounds,
        )

    def changed_since(self, fingerprint: Mapping[str, Any]) -> list[str]:
        """What differs from an earlier `fingerprint`, each named by its run-config key(s)
        ("learning-rate was 0.005, now 0.01"), sorted; empty when nothing does."""
        now = self.fingerprint()
        hint = ""
        spec = fingerprint.get("spec")
        if isinstance(spec, str) and "pooling=" not in spec and ", seed=" in spec:
            # A checkpoint from before head.pooling: its head read the model's own pooling.
            head, _, tail = spec.rpartition(", seed=")
            fingerprint = {**fingerprint, "spec": f"{head}, pooling='model', seed={tail}"}
            if "pooling='model'" not in now["spec"]:
                hint = " (a run from before head.pooling: resume with head.pooling=model)"
        if "site_dp_learning_rate" in fingerprint and "site_dp_optimizer" not in fingerprint:
            # A checkpoint from before site-dp.optimizer: its sites ran DP-Adam.
            fingerprint = {**fingerprint, "site_dp_optimizer": LEGACY_SITE_DP_OPTIMIZER}
        if any(
            isinstance(v, int | float) and v > 0
            for v in (
                fingerprint.get("site_dp_noise_multiplier"),
                fingerprint.get("site_dp_target_epsilon"),
            )
        ):  # A site-DP checkpoint from before site-dp.adapter-clip-share clipped flat.
            fingerprint = {"site_dp_adapter_clip_share": 0.0, **fingerprint}
        return sorted(
            f"{FINGERPRINT_KEYS.get(name, name)} was {fingerprint.get(name)!r}, now {now[name]!r}"
            + (hint if name == "spec" else _set_back(name, fingerprint.get(name)))
            for name in now
            # Turning site DP on is named by site-dp.noise-multiplier / target-epsilon
            # alone, not by the SITE_DP_ONLY keys a non-private fingerprint leaves out.
            if fingerprint.get(name) != now[name]
            and (name in fingerprint or name not in SITE_DP_ONLY)
        )

    def fingerprint(self) -> dict[str, Any]:
        """Settings that must not change across a resume (everything but bookkeeping)."""
        # A roster may change between a run and its resume (a site revoked meanwhile).
        # The head's start (head.init, its scale, the LDA fit's shrinkage: server/loop.py
        # fits only a fresh run) shapes round 1 only, and a resume starts after a
        # checkpointed round.
        skip = {"resume", "tracking_uri", "out_dir", "round_timeout", "publish", "roster"}
        skip |= {"head_init", "head_label_scale", "head_shrinkage"}
        if not self.site_dp:
            skip |= SITE_DP_ONLY  # e.g. site-dp.learning-rate's default went 0.05 -> 0.1
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value) if not isinstance(value, int | float | str) else value
        return out

    def to_config(self) -> dict[str, Any]:
        """The run config these settings stand for, every key of `KEYS` as users type it.

        The inverse of `from_config` (tests/server/test_settings.py round-trips it): what
        MLflow records as the run's params and as its ``run-config.toml``.
        """
        spec, opt, dp, sa, pub = (
            self.spec,
            self.server_optimizer,
            self.client_dp,
            self.secagg,
            self.publish,
        )
        default = {key: value for key, (_, value, _) in KEYS.items()}
        return {
            "num-server-rounds": self.rounds,
            "task": spec.task,
            "labels": format_label_set(spec.labels) if spec.labels else "",
            "base-model": spec.base,
            "quantization": spec.quantization,
            "aggregation": spec.aggregation,
            "seed": spec.seed,
            "local-epochs": self.local_epochs,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "max-length": self.max_length,
            "proximal-mu": self.proximal_mu,
            "fedrs.alpha": self.fedrs_alpha,
            "fedlc.tau": self.fedlc_tau,
            "fraction-train": self.fraction_train,
            "fraction-evaluate": self.fraction_evaluate,
            "min-fit-clients": self.min_fit_clients,
            "min-available-clients": self.min_available_clients,
            "round-timeout": self.round_timeout,
            "on-round-failure": self.on_round_failure,
            "eval-file": str(self.eval_file) if self.eval_file else "",
            "out-dir": str(self.out_dir),
            "tracking-uri": self.tracking_uri,
            "experiment": self.experiment,
            "resume": self.resume,
            "roster": str(self.roster) if self.roster else "",
            "adapter.keep": self.keep_adapter,
            "lora.r": spec.lora_r,
            "lora.alpha": spec.lora_alpha,
            "lora.dropout": spec.lora_dropout,
            "lora.target-modules": ",".join(spec.target_modules),
            "update.max-norm": self.max_norm,
            "server.optimizer": opt.kind,
            "server.learning-rate": opt.learning_rate,
            "server.momentum": opt.momentum,
            "server.aggregate": opt.aggregate,
            "server.lora-scale": opt.lora_scale,
            "registry.model-name": pub.model_name if pub else "",
            "registry.signing-key": str(pub.signing_key) if pub else "",
            "registry.passphrase-env": pub.passphrase_env
            if pub
            else default["registry.passphrase-env"],
            "registry.alias": pub.alias if pub else default["registry.alias"],
            "dp.clip-norm": dp.clip_norm if dp else 0.0,
            "dp.noise-multiplier": dp.noise_multiplier if dp else 0.0,
            "dp.target-epsilon": dp.target_epsilon if dp else 0.0,
            "dp.delta": dp.delta if dp else default["dp.delta"],
            "dp.max-epsilon": dp.max_epsilon if dp else 0.0,
            "secagg.enabled": sa is not None,
            "secagg.num-shares": sa.num_shares if sa else default["secagg.num-shares"],
            "secagg.reconstruction-threshold": sa.reconstruction_threshold
            if sa
            else default["secagg.reconstruction-threshold"],
            "secagg.clipping-range": sa.clipping_range if sa else 0.0,
            "secagg.quantization-range": sa.quantization_range
            if sa
            else default["secagg.quantization-range"],
            "secagg.max-weight": sa.max_weight if sa else default["secagg.max-weight"],
            "secagg.prg": sa.prg if sa else default["secagg.prg"],
            "site-dp.noise-multiplier": self.site_dp_noise_multiplier,
            "site-dp.target-epsilon": self.site_dp_target_epsilon,
            "site-dp.max-grad-norm": self.site_dp_max_grad_norm,
            "site-dp.delta": self.site_dp_delta,
            "site-dp.batch-size": self.site_dp_batch_size,
            "site-dp.optimizer": self.site_dp_optimizer,
            "site-dp.learning-rate": self.site_dp_learning_rate,
            "site-dp.trainable": self.site_dp_trainable,
            "site-dp.adapter-clip-share": self.site_dp_adapter_clip_share,
            "head.init": self.head_init,
            "head.pooling": spec.pooling,
            "head.shrinkage": self.head_shrinkage,
            "head.label-scale": self.head_label_scale,
            # Bounded influence: "auto" stands for both plain "bounded" and secure "off".
            "robust.mode": "auto" if self.robust is not None or sa is not None else "off",
            "robust.max-weight-ratio": self.robust[0]
            if self.robust
            else default["robust.max-weight-ratio"],
            "robust.max-norm-ratio": self.robust[1]
            if self.robust
            else default["robust.max-norm-ratio"],
        }

    def as_params(self) -> dict[str, str]:
        """MLflow params: the run-config keys users type (``batch-size``), valued as typed.

        ``tracking-uri`` is left out: the run lives in that store, and a URI may carry
        credentials.
        """
        config = self.to_config()
        config.pop("tracking-uri")
        return {key: param_value(value) for key, value in config.items()}
