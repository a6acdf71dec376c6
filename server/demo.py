"""``fedlora demo``: synthetic non-IID sites, a federated run on MiniLM, a summary and a plot."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from clients.task.errors import ConfigError, FedloraError
from clients.task.files import write_atomic
from server.console import round_table
from server.demo_data import generate
from server.harness.edge import EdgeNodeProcess
from server.run_config import FLOWER_INT_LIMIT
from server.train import run_train

DEMO_MODEL = "demo-intents"
# The demo key is unencrypted; this variable is never set, so a passphrase the user keeps
# in FEDLORA_KEY_PASSPHRASE for real keys is not applied to it.
DEMO_PASSPHRASE_ENV = "FEDLORA_DEMO_KEY_PASSPHRASE_UNUSED"
# Everything the demo writes under OUT. A re-run replaces exactly these, and only in a
# directory that holds DEMO_MARK: `keys/` and `trust/` are README's names for a real
# signing key and trust store too.
DEMO_OUTPUTS = ("data", "run", "keys", "trust", "edge-cache", "metrics.png", "edge.log")
DEMO_MARK = ".fedlora-demo"
_MARK_NOTE = f"written by `fedlora demo`; a re-run replaces {', '.join(DEMO_OUTPUTS)} here\n"


def plot_history(
    history: list[dict], path: Path, *, chance: float, kept: dict[str, Any] | None = None
) -> None:
    """`history_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = history_figure(history, chance=chance, kept=kept)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def history_figure(history: list[dict], *, chance: float, kept: dict[str, Any] | None = None):
    """Accuracy (global and per site) and loss per round, side by side.

    The accuracy panel marks chance (1 / number of labels) and the round whose adapter
    the run kept as ``OUT/adapter``: metrics.json's ``adapter`` (the run's keep rule),
    else the last round, with the best round marked when it is another one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    sites = sorted({site for r in history for site in r.get("site_eval", {})})
    for site in sites:
        points = [
            (r["round"], r["site_eval"][site]["accuracy"])
            for r in history
            if site in r.get("site_eval", {})
        ]
        ax_acc.plot(*zip(*points, strict=True), lw=0.8, alpha=0.5, marker=".", label=site)
    accuracy = [r["accuracy"] for r in history]
    ax_acc.plot(rounds, accuracy, marker="o", lw=2, color="black", label="global (held-out)")
    ax_acc.axhline(chance, ls="--", color="grey", label=f"chance ({chance:.3f})")
    kept_round = (kept or {}).get("round") or rounds[-1]
    valid = [(a, r) for r, a in zip(rounds, accuracy, strict=True) if a is not None]
    best_round = max(valid)[1] if valid else kept_round
    rule = (kept or {}).get("rule", "last round")
    kept_acc = accuracy[rounds.index(kept_round)]
    ax_acc.scatter([kept_round], [kept_acc], s=160, facecolors="none", edgecolors="tab:green",
                   lw=2, zorder=5, label=f"kept adapter: round {kept_round} ({rule})")  # fmt: skip
    if best_round != kept_round:
        best_acc = accuracy[rounds.index(best_round)]
        ax_acc.scatter([best_round], [best_acc], marker="*", s=140, color="tab:orange",
                       zorder=5, label=f"best round: {best_round}")  # fmt: skip
    ax_acc.set(xlabel="round", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    ax_acc.legend(fontsize=7, loc="lower right")
    ax_loss.plot(rounds, [r["loss"] for r in history], marker="o", color="tab:red")
    ax_loss.set(xlabel="round", ylabel="loss (held-out)", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.set_xticks(rounds)
    fig.tight_layout()
    return fig


def next_steps(*, out: Path, tracking_uri: str) -> list[str]:
    """The three commands a demo user runs next: look, serve, train on their own data."""
    return [
        f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}",
        f"fedlora edge serve --model {DEMO_MODEL}@production --trust {shlex.quote(str(out))}"
        f"/trust --registry {shlex.quote(tracking_uri)} --port 8080",
        f"fedlora train --sites {shlex.quote(str(out / 'data' / 'sites'))} --rounds 5 "
        f"--out my-run --eval {shlex.quote(str(out / 'data' / 'eval.jsonl'))}",
    ]


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


def claim_out(out: Path) -> bool:
    """Make ``out`` the demo's: a new or empty directory, or an earlier demo's output.

    A new or empty directory gets DEMO_MARK first, so an interrupted demo is recognised
    by the next one. In a marked directory every entry of DEMO_OUTPUTS is removed (an
    interrupted run's plot or log is not left beside the new run); anything else there
    is left alone.

    Returns:
        Whether an earlier demo's output was removed.

    Raises:
        ConfigError: If ``out`` is a file, or a directory without the mark that holds
            anything; nothing is touched then.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a directory")
    mark = out / DEMO_MARK
    if not _is_mark(mark) and _unmarked_demo_output(out):
        write_atomic(mark, _MARK_NOTE.encode())  # written before the mark existed
    if not _is_mark(mark):
        found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if found:
            shown = ", ".join(found[:5]) + (", …" if len(found) > 5 else "")
            raise ConfigError(
                f"--out {str(out)!r} holds {shown}, which no earlier `fedlora demo` wrote (it "
                f"has no {DEMO_MARK} file); the demo writes {', '.join(DEMO_OUTPUTS)} there and "
                "replaces them when re-run, so give it a new or empty directory"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(mark, _MARK_NOTE.encode())
        return False
    replaced = False
    for name in DEMO_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        replaced = True
    return replaced


def _is_mark(mark: Path) -> bool:
    """Whether ``mark`` is a DEMO_MARK this user's demo wrote: a regular file (not a link)
    owned by this user, so no one else who can write the directory can arm a deletion."""
    try:
        st = mark.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def _unmarked_demo_output(out: Path) -> bool:
    """Whether ``out`` is what a demo before DEMO_MARK wrote, proven by its keys: only demo
    outputs with ``run`` among them, ``keys/`` holding exactly the unencrypted key pair
    `_demo_keys` writes, and ``trust/`` exactly ``demo.pub``, a byte copy of its public
    key. Names alone would take a user's own ``keys/`` and ``run/`` for the demo's."""
    try:
        names = {p.name for p in out.iterdir()}
        keys, trust = out / "keys", out / "trust"
        if not ("run" in names and names <= set(DEMO_OUTPUTS)):
            return False
        if {p.name for p in keys.iterdir()} != {"signing-key.pem", "signing-key.pub"}:
            return False
        if {p.name for p in trust.iterdir()} != {"demo.pub"}:
            return False
        files = (keys / "signing-key.pem", keys / "signing-key.pub", trust / "demo.pub")
        if any(f.is_symlink() or not f.is_file() for f in files):
            return False
        return b"ENCRYPTED" not in files[0].read_bytes() and (
            files[1].read_bytes() == files[2].read_bytes()
        )
    except OSError:  # not a directory, unreadable: not provably the demo's
        return False


def _demo_keys(out: Path) -> tuple[Path, Path]:
    """A fresh, unencrypted demo signing key and a trust store holding its public key."""
    from registry.keys import generate_keypair

    pair = generate_keypair(out / "keys")
    (out / "trust").mkdir()
    shutil.copy(pair.public_path, out / "trust" / "demo.pub")
    return pair.private_path, out / "trust"


def _check_args(*, sites: int, rounds: int, seed: int) -> None:
    """Refuse the demo's own arguments out of range, before its output directory is
    touched: later, ``--sites 0`` failed as an IndexError, a negative ``--seed`` in numpy's
    generator, and ``--rounds 0`` named a run-config key the user never typed.

    Raises:
        ConfigError: Naming the option and its value.
    """
    for flag, value in (("--sites", sites), ("--rounds", rounds)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if not 0 <= seed < FLOWER_INT_LIMIT:  # numpy's generator takes no negative seed
        raise ConfigError(f"--seed {seed} must be >= 0 and below 2**63")


def run_demo(
    *, out: Path, sites: int = 4, rounds: int = 5, seed: int = 0, verbose: bool = False
) -> int:
    from registry.keys import TrustStore
    from registry.lifecycle import SigningKey, promote
    from registry.mlflow_store import MlflowStore
    from registry.policy import Policy

    _check_args(sites=sites, rounds=rounds, seed=seed)
    console = Console()
    if claim_out(out):  # a re-run starts over, it never resumes
        console.print(f"replaced the previous demo output in {out}")
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
        verbose=verbose,
    )
    summary = json.loads(result.metrics_path.read_text(encoding="utf-8"))
    plot = out / "metrics.png"
    plot_history(result.history, plot, chance=1 / len(labels), kept=summary.get("adapter"))
    console.print(round_table(result.history))
    final = summary.get("final") or result.history[-1]
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
    console.print("\n[bold]Next[/bold]: look at the run, serve the release, train on your data:")
    for command in next_steps(out=out, tracking_uri=result.tracking_uri):
        console.print(Text(f"  {command}"), soft_wrap=True)
    return 0
