from __future__ import annotations

from clients.site.wire import plan_config
from strategies.secagg import MAX_WEIGHT_KEY, NAMES_KEY, PRG_KEY


def test_plan_config_drops_every_secagg_transport_key() -> None:
    # Regression: the mask generator's key reached TrainPlan, which refuses unknown fields,
    # so every SecAgg+ site failed on the Deployment Engine.
    plan = {"local_steps": 2, "spec.task": "causal-lm"}
    config = plan | {NAMES_KEY: "[]", MAX_WEIGHT_KEY: 1, PRG_KEY: "aes-ctr"}
    assert plan_config(config) == plan
