"""The demo's plot and closing lines (the whole demo runs in tests/integration)."""

from __future__ import annotations

import shlex
from pathlib import Path

from server.demo import history_figure, next_steps


def _row(round_: int, accuracy: float, sites: dict[str, float]) -> dict:
    return {
        "round": round_,
        "accuracy": accuracy,
        "loss": 1.0 - accuracy,
        "site_eval": {s: {"accuracy": a, "eval-examples": 5} for s, a in sites.items()},
    }


HISTORY = [
    _row(1, 0.40, {"site-1": 0.3, "site-2": 0.5}),
    _row(2, 0.90, {"site-1": 0.8, "site-2": 0.95}),
    _row(3, 0.70, {"site-1": 0.6, "site-2": 0.75}),
]


def _labels(fig) -> list[str]:
    return fig.axes[0].get_legend_handles_labels()[1]


def test_the_plot_shows_chance_each_site_and_the_kept_adapter() -> None:
    fig = history_figure(HISTORY, chance=0.125)

    labels = _labels(fig)
    assert "chance (0.125)" in labels
    assert {"site-1", "site-2", "global (held-out)"} <= set(labels)
    chance = next(line for line in fig.axes[0].lines if line.get_label().startswith("chance"))
    assert set(chance.get_ydata()) == {0.125}
    # Without the run's keep rule the kept adapter is the last round's; the best is marked.
    assert "kept adapter: round 3 (last round)" in labels and "best round: 2" in labels


def test_the_plot_marks_the_adapter_the_run_kept() -> None:
    fig = history_figure(HISTORY, chance=0.125, kept={"rule": "best", "round": 2})

    labels = _labels(fig)
    assert "kept adapter: round 2 (best)" in labels
    assert not any(label.startswith("best round") for label in labels)


def test_the_next_steps_are_three_runnable_commands(tmp_path: Path) -> None:
    out = tmp_path / "demo dir"
    steps = next_steps(out=out, tracking_uri=f"sqlite:///{out}/run/mlflow.db")

    assert len(steps) == 3
    assert [shlex.split(s)[:2] for s in steps] == [
        ["mlflow", "ui"],
        ["fedlora", "edge"],
        ["fedlora", "train"],
    ]
    assert shlex.split(steps[1])[shlex.split(steps[1]).index("--trust") + 1] == f"{out}/trust"
