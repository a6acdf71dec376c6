"""``fedlora demo``: synthetic non-IID sites, a federated run on MiniLM, a summary and a plot."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from server.demo_data import generate


def plot_history(history: list[dict], path: Path) -> None:
    """Accuracy and loss per round, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_acc.plot(rounds, [r["accuracy"] for r in history], marker="o")
    ax_acc.set(xlabel="round", ylabel="accuracy (held-out)", ylim=(0, 1), title="accuracy")
    ax_loss.plot(rounds, [r["loss"] for r in history], marker="o", color="tab:red")
    ax_loss.set(xlabel="round", ylabel="loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.set_xticks(rounds)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(*, out: Path, sites: int = 4, rounds: int = 5, seed: int = 0) -> int:
    from server.cli import _round_table, run_train

    console = Console()
    if (out / "run").exists():  # the demo owns OUT: a re-run starts over, it never resumes
        console.print(f"replacing the previous demo output in {out}")
        shutil.rmtree(out / "run")
    data_dir = out / "data"
    site_paths, eval_path, labels = generate(data_dir, sites=sites, seed=seed)
    console.print(
        f"[bold]fedlora demo[/bold]: {sites} sites, {len(labels)} intents, non-IID "
        f"(Dirichlet α=0.5), base model all-MiniLM-L6-v2 + LoRA, {rounds} rounds"
    )
    result = run_train(
        sites_dir=site_paths[0].parent,
        rounds=rounds,
        out=out / "run",
        eval_file=eval_path,
        overrides={"seed": seed, "learning-rate": 0.01, "local-epochs": 2},
    )
    plot = out / "metrics.png"
    plot_history(result.history, plot)
    console.print(_round_table(result.history))
    final = result.history[-1]
    console.print(
        f"final accuracy {final['accuracy']:.3f} on {eval_path.name} (chance {1 / len(labels):.3f})"
    )
    console.print(f"adapter: {result.adapter_dir}")
    console.print(f"plot:    {plot}")
    console.print(f"MLflow:  {result.tracking_uri} (run {result.run_id})", soft_wrap=True)
    return 0
