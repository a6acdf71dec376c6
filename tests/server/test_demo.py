"""The demo's output directory, plot and closing lines (the whole demo runs in
tests/integration)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from clients.task.errors import ConfigError
from server.demo import DEMO_MARK, claim_out, history_figure, next_steps, run_demo
from server.demo_data import generate
from server.train import site_files


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


def test_the_next_train_command_trains_on_the_demos_sites_and_evaluates_on_its_eval_file(
    tmp_path: Path,
) -> None:
    out = tmp_path / "demo dir"
    site_paths, eval_path, _ = generate(out / "data", sites=3)

    train = shlex.split(next_steps(out=out, tracking_uri="sqlite:///x.db")[2])

    sites = Path(train[train.index("--sites") + 1])
    assert site_files(sites) == site_paths
    assert Path(train[train.index("--eval") + 1]) == eval_path


def test_the_demo_refuses_an_out_dir_holding_what_it_did_not_write(tmp_path: Path) -> None:
    # README's names for a real signing key and trust store are the demo's names too.
    (tmp_path / "keys").mkdir()
    key = tmp_path / "keys" / "signing-key.pem"
    key.write_bytes(b"the user's real key")
    (tmp_path / "trust").mkdir()

    with pytest.raises(
        ConfigError, match=r"--out '.*' holds keys, trust, which no earlier `fedlora demo` wrote"
    ):
        run_demo(out=tmp_path)

    assert key.read_bytes() == b"the user's real key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "trust"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"sites": 0}, r"^--sites 0 must be >= 1$"),
        ({"sites": -2}, r"^--sites -2 must be >= 1$"),
        ({"rounds": 0}, r"^--rounds 0 must be >= 1$"),
        ({"seed": -1}, r"^--seed -1 must be >= 0 and below 2\*\*63$"),
        ({"seed": 2**63}, r"^--seed 9223372036854775808 must be >= 0 and below 2\*\*63$"),
    ],
)
def test_demo_arguments_out_of_range_are_refused_before_anything_is_written(
    tmp_path: Path, args: dict, message: str
) -> None:
    # `fedlora demo --sites 0` wrote keys and data, then ended in "error: IndexError: list
    # index out of range"; `--seed -1` in numpy's "ValueError: expected non-negative
    # integer"; `--rounds 0` named num-server-rounds, a key the user never typed.
    out = tmp_path / "demo"
    with pytest.raises(ConfigError, match=message):
        run_demo(out=out, **args)
    assert not out.exists()


def test_the_demo_refuses_an_out_path_that_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("mine")

    with pytest.raises(ConfigError, match=r"is a file"):
        claim_out(out)

    assert out.read_text() == "mine"


def test_a_new_or_empty_out_dir_is_marked_as_the_demos(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "demo", tmp_path / "empty"):
        assert claim_out(out) is False
        assert [p.name for p in out.iterdir()] == [DEMO_MARK]


def test_a_rerun_replaces_everything_an_earlier_demo_wrote_and_nothing_else(
    tmp_path: Path,
) -> None:
    claim_out(tmp_path)
    # An earlier (perhaps interrupted) demo's outputs, and a file the user put beside them.
    for name in ("data/sites", "run/checkpoint", "keys", "trust", "edge-cache"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "data" / "sites" / "site-6.jsonl").write_text("{}\n")
    for name in ("metrics.png", "edge.log", "notes.txt"):
        (tmp_path / name).write_text("old")

    assert claim_out(tmp_path) is True

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DEMO_MARK, "notes.txt"])
    assert claim_out(tmp_path) is False  # nothing left to replace


def _old_demo_output(out: Path) -> None:
    """What `fedlora demo` wrote before it marked its --out (its _demo_keys layout)."""
    from registry.keys import generate_keypair

    pair = generate_keypair(out / "keys")
    (out / "trust").mkdir()
    (out / "trust" / "demo.pub").write_bytes(pair.public_path.read_bytes())
    for name in ("data/sites", "run"):
        (out / name).mkdir(parents=True)
    (out / "metrics.png").write_text("old")


def test_a_demo_output_from_before_the_mark_is_still_replaced(tmp_path: Path) -> None:
    _old_demo_output(tmp_path)

    assert claim_out(tmp_path) is True
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_MARK]


@pytest.mark.parametrize("layout", ["real-keys", "no-trust", "other-trust", "encrypted"])
def test_an_unmarked_directory_is_taken_for_a_demos_only_on_proof_from_its_keys(
    tmp_path: Path, layout: str
) -> None:
    # A user's own layout as the README writes it (keys generate --out keys/, train --out
    # run/) must never pass for an old demo's output by its names alone.
    from registry.keys import generate_keypair

    if layout == "encrypted":
        generate_keypair(tmp_path / "keys", passphrase="s3cret")
        (tmp_path / "trust").mkdir()
        (tmp_path / "trust" / "demo.pub").write_bytes(
            (tmp_path / "keys" / "signing-key.pub").read_bytes()
        )
    else:
        _old_demo_output(tmp_path)
        if layout == "real-keys":
            (tmp_path / "trust" / "demo.pub").write_text("another key")
        elif layout == "no-trust":
            shutil.rmtree(tmp_path / "trust")
        else:
            (tmp_path / "trust" / "ops.pub").write_text("the operator's key")
    (tmp_path / "run").mkdir(exist_ok=True)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    with pytest.raises(ConfigError, match="which no earlier `fedlora demo` wrote"):
        claim_out(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_mark_that_is_a_link_arms_nothing(tmp_path: Path) -> None:
    # Someone who can write the directory plants the mark as a link to any file.
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / DEMO_MARK).symlink_to(tmp_path / "elsewhere")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing-key.pem").write_text("the user's real key")

    with pytest.raises(ConfigError, match="which no earlier `fedlora demo` wrote"):
        claim_out(tmp_path)
    assert (tmp_path / "keys" / "signing-key.pem").read_text() == "the user's real key"
