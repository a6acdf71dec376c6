"""sweep_quality: the SCAFFOLD knob's maths on made-up tensors (no training); --config parsing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import sweep_quality as sq


class _Loaded:
    """The one attribute the hook reads: a model whose trainable tensors are w and a head."""

    def __init__(self) -> None:
        self.model = torch.nn.Module()
        self.model.w = torch.nn.Parameter(torch.zeros(3))
        self.model.register_parameter(
            "modules_to_save", torch.nn.Parameter(torch.zeros(2))
        )  # a head tensor by name (HEAD_MARK)


def test_option_ii_controls_are_each_sites_mean_direction_and_the_server_their_mean() -> None:
    x = {"w": np.zeros(3, np.float32)}
    controls: dict = {"server": {}}
    total: dict = {}
    k_lr = 0.5  # K steps x learning rate
    # Round 1, no correction yet: site a moved by -K lr [1, 2, 3], site b by -K lr [3, 2, 1].
    sq._scaffold_update(controls, total, "a", x, {"w": x["w"] - k_lr * np.array([1, 2, 3])}, k_lr)
    sq._scaffold_update(controls, total, "b", x, {"w": x["w"] - k_lr * np.array([3, 2, 1])}, k_lr)

    np.testing.assert_allclose(controls["a"]["w"], [1, 2, 3])
    np.testing.assert_allclose(total["w"], [4, 4, 4])  # the sum of c_i+ - c_i (c_i = 0)
    controls["server"]["w"] = total["w"] / 2  # c <- c + (1/N) sum (as run_federated)

    # Round 2: a's corrected step y = x - K lr (d + c - c_a); its new c_a is its own d.
    d = np.array([0.5, -1.0, 2.0])
    c, ca = controls["server"]["w"], controls["a"]["w"]
    total = {}
    sq._scaffold_update(controls, total, "a", x, {"w": x["w"] - k_lr * (d + c - ca)}, k_lr)
    np.testing.assert_allclose(controls["a"]["w"], d)
    np.testing.assert_allclose(total["w"], d - ca)


@pytest.mark.parametrize(("mode", "head_moves"), [("all", True), ("body", False)])
def test_the_hook_steps_each_tensor_by_lr_times_c_minus_ci(mode: str, head_moves: bool) -> None:
    loaded = _Loaded()
    controls = {
        "server": {"w": np.array([2.0, 2.0, 2.0]), "modules_to_save": np.array([1.0, 1.0])},
        "a": {"w": np.array([1.0, 2.0, 3.0]), "modules_to_save": np.array([0.0, 0.0])},
    }
    hook = sq._scaffold_hook(loaded, controls, "a", 0.1, sq.SIM_KEYS | {"sim.scaffold": mode})

    hook(1, 2)
    hook(2, 2)

    np.testing.assert_allclose(loaded.model.w.detach().numpy(), [-0.2, 0.0, 0.2], atol=1e-7)
    head = loaded.model.modules_to_save.detach().numpy()
    np.testing.assert_allclose(head, [-0.2, -0.2] if head_moves else [0.0, 0.0], atol=1e-7)


def test_no_hook_before_the_server_has_a_control() -> None:
    hook = sq._scaffold_hook(
        _Loaded(), {"server": {}}, "a", 0.1, sq.SIM_KEYS | {"sim.scaffold": "all"}
    )
    assert hook is None


def test_a_config_keeps_commas_inside_a_quoted_value() -> None:
    name, overrides = sq.parse_config('all:lora.target-modules="query,value,dense",batch-size=4')
    assert name == "all"
    assert overrides == {"lora.target-modules": "query,value,dense", "batch-size": 4}
