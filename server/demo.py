"""``fedlora demo``: synthetic non-IID sites, a federated run on MiniLM, a summary and a plot."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

from clients.task.errors import FedloraError
from server.console import round_table
from server.demo_data import generate
from server.harness.edge import EdgeNodeProcess
from server.train import run_train

DEMO_MODEL = "demo-intents"
# The demo key is unencrypted; this variable is never set, so a passphrase the user keeps
# in FEDLORA_KEY_PASSPHRASE for real keys is not applied to it.
DEMO_PASSPHRASE_ENV = "FEDLORA_DEMO_KEY_PASSPHRASE_UNUSED"


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


def _http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:  # /healthz answers 503 with the reasons
        return int(exc.code), dict(json.loads(exc.read() or b"{}"))


def ask_edge_node(
    *, registry: str, trust: Path, cache: Path, text: str, log: Path
) -> dict[str, Any]:
    """Start ``fedlora edge serve`` on the production alias, ask one prediction, stop it.

    The node is its own process, as on an edge machine: it pulls and verifies the release
    from the demo's registry before it answers.

    Raises:
        FedloraError: If the node does not start, or has nothing verified to serve.
    """
    node = EdgeNodeProcess(
        models=[f"{DEMO_MODEL}@production"],
        trust=trust,
        cache=cache,
        log_path=log,
        registry=registry,
        poll_seconds=3600,
    )
    with node:
        status, health = _http(f"{node.url}/healthz")
        if status != 200:
            raise FedloraError(f"the edge node serves nothing ({health}); see {log}")
        _, answer = _http(f"{node.url}/v1/predict", {"texts": [text]})
        return {"url": node.url, "health": health["status"], **answer}


def _demo_keys(out: Path) -> tuple[Path, Path]:
    """A fresh, unencrypted demo signing key and a trust store holding its public key."""
    from registry.keys import generate_keypair

    for name in ("keys", "trust", "edge-cache"):
        shutil.rmtree(out / name, ignore_errors=True)
    pair = generate_keypair(out / "keys")
    (out / "trust").mkdir()
    shutil.copy(pair.public_path, out / "trust" / "demo.pub")
    return pair.private_path, out / "trust"


def run_demo(*, out: Path, sites: int = 4, rounds: int = 5, seed: int = 0) -> int:
    from registry.keys import TrustStore
    from registry.lifecycle import SigningKey, promote
    from registry.mlflow_store import MlflowStore
    from registry.policy import Policy

    console = Console()
    if (out / "run").exists():  # the demo owns OUT: a re-run starts over, it never resumes
        console.print(f"replacing the previous demo output in {out}")
        shutil.rmtree(out / "run")
    signing_key, trust = _demo_keys(out)
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
        overrides={
            "seed": seed,
            "learning-rate": 0.01,
            "local-epochs": 2,
            "registry.model-name": DEMO_MODEL,
            "registry.signing-key": str(signing_key),
            "registry.passphrase-env": DEMO_PASSPHRASE_ENV,
        },
    )
    plot = out / "metrics.png"
    plot_history(result.history, plot)
    console.print(round_table(result.history))
    final = result.history[-1]
    console.print(
        f"final accuracy {final['accuracy']:.3f} on {eval_path.name} (chance {1 / len(labels):.3f})"
    )
    console.print(f"adapter: {result.adapter_dir}")
    console.print(f"plot:    {plot}")
    console.print(f"MLflow:  {result.tracking_uri} (run {result.run_id})", soft_wrap=True)

    assert result.published is not None
    store = MlflowStore(result.tracking_uri)
    promote(
        store,
        model=DEMO_MODEL,
        version=result.published.version,
        key=SigningKey(signing_key),
        trust=TrustStore.load(trust),
        policy=Policy(min_metric=1 / len(labels)),  # better than chance, or it is not shipped
    )
    console.print(
        f"registry: {DEMO_MODEL} version {result.published.version} signed "
        f"(key {result.published.key_id[:12]}) and promoted to production",
        soft_wrap=True,
    )
    text = json.loads(eval_path.read_text(encoding="utf-8").splitlines()[0])["text"]
    console.print("edge:    starting a local edge node on the production alias …")
    answer = ask_edge_node(
        registry=result.tracking_uri,
        trust=trust,
        cache=out / "edge-cache",
        text=text,
        log=out / "edge.log",
    )
    top = answer["predictions"][0]
    console.print(
        f"edge:    {answer['url']} ({answer['health']}) served version {answer['version']}: "
        f"{text!r} → {top['label']} ({top['scores'][top['label']]:.2f})",
        soft_wrap=True,
    )
    return 0
