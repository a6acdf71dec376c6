"""Fast in-process federated simulator, to compare training methods side by side.

The same maths as a real run, without Flower, Ray or MLflow: one MiniLM in this process
plays every site in turn (load the global adapter, `train_local` with the site's own seeded
generator, read the trainable tensors back), then the run's strategy and server optimiser
(`RunSettings.strategy()`, `RunSettings.server_optimizer`) aggregate, exactly as
server/loop.py does; before round 1 the head is set from the sites' summed statistics
when ``head.init`` says so (server/head_init.py). A configuration is a set of run-config
overrides (the keys of ``fedlora train --set``), so what wins here is what a user sets.

Choices are made on the validation split (CLINC150's ``val``, or rows held out of a file);
the test split's accuracy is recorded beside it but must not be used to choose. The
centralized reference trains `train_local` on the union of the sites' training rows for
the same passes, once per data set and centralized setting.

A 2,000-row, 10-site, 5-round configuration takes about a minute on 2 cores (MiniLM, short
texts, ~6 ms per training example); the confirming benchmark is scripts/bench_quality.py.

Usage::

    python scripts/sweep_quality.py --out /tmp/sweep.jsonl \\
        --config fedavg: --config 'slr3:server.learning-rate=3'
    python scripts/sweep_quality.py --data /tmp/supersense.jsonl --per-label 50 ...
    python scripts/sweep_quality.py --summary /tmp/sweep.jsonl      # table of a results file
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quality as bq


def _generator(seed: int, server_round: int, site: str):
    """The site's generator, derived exactly as clients/site/app.py derives it."""
    import torch

    src = f"{seed}:{server_round}:{site}".encode()
    return torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(src).digest()[:8], "big") >> 1
    )


def _examples(rows: Sequence[dict[str, str]]) -> list[Any]:
    from clients.task.data import Example

    return [Example(text=r["text"], label=r["label"]) for r in rows]


def _settings(overrides: dict[str, Any], *, labels: Sequence[str], rounds: int, sites: int):
    from server.settings import RunSettings

    base = {
        "num-server-rounds": rounds,
        "labels": ",".join(labels),
        "min-fit-clients": sites,
        "min-available-clients": sites,
        "out-dir": tempfile.gettempdir(),
    }
    return RunSettings.from_config(base | overrides)


_MODELS: dict[Any, Any] = {}


def _model(spec: Any) -> Any:
    from clients.task.model import build_model, quiet_transformers

    if spec not in _MODELS:
        quiet_transformers()
        _MODELS.clear()  # one model in memory at a time
        _MODELS[spec] = build_model(spec, device="cpu")
    return _MODELS[spec]


def _accuracy(loaded: Any, state: dict, examples: list[Any], max_length: int) -> float:
    from clients.task.model import load_trainable_state
    from clients.task.train import evaluate

    load_trainable_state(loaded.model, state)
    return evaluate(loaded, examples, batch_size=64, max_length=max_length).accuracy


HEAD_MARK = "modules_to_save"  # PEFT's name part of the classification head's tensors


def _norms(state: dict, init: dict) -> dict[str, float]:
    """L2 distance from the initial adapter, of the LoRA tensors and of the head."""
    import numpy as np

    def dist(head: bool) -> float:
        return float(
            np.sqrt(
                sum(
                    float(np.sum((state[k].astype(np.float64) - init[k]) ** 2))
                    for k in state
                    if (HEAD_MARK in k) == head
                )
            )
        )

    return {"b_norm": dist(False), "head_norm": dist(True)}


def _per_label(loaded: Any, state: dict, examples: list[Any], max_length: int) -> dict:
    """label -> [correct, total] on `examples` (the final round's diagnosis)."""
    import torch

    from clients.task.model import load_trainable_state
    from clients.task.train import encode

    load_trainable_state(loaded.model, state)
    loaded.model.eval()
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            inputs = encode(loaded, chunk, max_length=max_length)
            pred = loaded.model(**inputs).logits.argmax(-1)
            for example, ok in zip(chunk, (pred == inputs["labels"]).tolist(), strict=True):
                out[example.label][0] += int(ok)
                out[example.label][1] += 1
    return dict(out)


def probe(
    loaded: Any,
    state: dict,
    *,
    union: list[Any],
    val: list[Any],
    max_length: int,
    epochs: Sequence[int] = (5, 50),
    learning_rate: float = 5e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """How good are the LoRA features of `state`, apart from its head?

    A linear probe: the body (base + the state's LoRA tensors) is frozen, its pooled
    features computed once, and a freshly initialised head (the run's seeded init) is
    trained on the union with AdamW at the run's lr and batch size; validation accuracy
    after each of `epochs`. Also the accuracy of the state's own head on those features.
    """
    import torch

    from clients.task.model import _seeded_init, load_trainable_state
    from clients.task.train import encode

    load_trainable_state(loaded.model, state)
    model = loaded.model.eval()
    inner = model.base_model.model  # BertForSequenceClassification

    def features(examples: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        with torch.no_grad():
            for start in range(0, len(examples), 64):
                inputs = encode(loaded, examples[start : start + 64], max_length=max_length)
                labels.append(inputs.pop("labels"))
                feats.append(inner.bert(**inputs).pooler_output)  # (batch, hidden)
        return torch.cat(feats), torch.cat(labels)

    xtr, ytr = features(union)
    xva, yva = features(val)
    head = inner.classifier.modules_to_save["default"]
    with torch.no_grad():
        own = float((head(xva).argmax(-1) == yva).float().mean())
    saved = {k: v.detach().clone() for k, v in head.state_dict().items()}
    _seeded_init(model, seed=seed)  # the run's initial head (and B, reloaded below)
    linear = torch.nn.Linear(xtr.shape[1], len(loaded.spec.labels))
    linear.load_state_dict({k: v.detach().clone() for k, v in head.state_dict().items()})
    head.load_state_dict(saved)
    load_trainable_state(loaded.model, state)
    opt = torch.optim.AdamW(linear.parameters(), lr=learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    out = {"own_head": own}
    for epoch in range(1, max(epochs) + 1):
        for idx in torch.randperm(len(ytr), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(linear(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in epochs:
            with torch.no_grad():
                out[f"probe_{epoch}"] = float((linear(xva).argmax(-1) == yva).float().mean())
    return out


# Experimental knobs the simulator understands before they are run-config keys
# (``--config 'NAME:sim.lora-lr=3'``); removed from the overrides before RunSettings.
SIM_KEYS: dict[str, Any] = {
    "sim.keep-optimizer": False,  # sites keep their AdamW state across rounds
    "sim.lora-lr": 1.0,  # server lr on the LoRA tensors' pseudo-gradient (head unchanged)
    "sim.lora-weighting": "",  # "examples" or "uniform": the LoRA mean's weights
    "sim.lora-adam": 0.0,  # > 0: FedAdam (this η) on the LoRA tensors only
    "sim.lora-adam-tau": 1e-3,
    "sim.lora-adam-beta1": 0.9,
    "sim.lora-yogi": False,  # Yogi's second moment in the LoRA FedAdam
    "sim.lora-momentum": 0.0,  # > 0: heavy-ball momentum (FedAvgM) on the LoRA tensors only
    # SCAFFOLD control variates on the local steps: "" off, "all" or "body" (not the head)
    "sim.scaffold": "",
    # The head before round 1: "" as the run config says (head.init; the round loop's
    # server/head_init.py), or "ridge" (Fed3R's ridge regression, λ = head.shrinkage·tr/d).
    # The centralized reference starts from the seeded head unless head.init="lda".
    "sim.head-init": "",
    # The frozen LoRA A under FFA: "" seeded uniform; "principal" PiSSA's sqrt(S_r) V_r^T of
    # the base weight (Meng et al. 2024; under FFA, PiSSA's residual base and B0 cancel);
    # "principal-norm" V_r^T rescaled to the seeded A's norm; "minor" MiLoRA's last r
    # right-singular vectors at the seeded A's norm (Wang et al. 2024).
    "sim.a-init": "",
}


def _a_init(model: Any, kind: str) -> None:
    """Set every lora_A from its base layer's SVD (see SIM_KEYS["sim.a-init"])."""
    import torch

    if not kind:
        return
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            a = module.lora_A["default"].weight  # (r, in)
            w = module.get_base_layer().weight.float()  # (out, in)
            _u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = a.shape[0]
            if kind == "principal":
                new = s[:r].sqrt()[:, None] * vh[:r]
            elif kind in ("principal-norm", "minor"):
                rows = vh[:r] if kind == "principal-norm" else vh[-r:]
                new = rows * (a.float().norm() / rows.norm())
            else:
                raise SystemExit(f"sim.a-init={kind!r}: principal, principal-norm or minor")
            a.copy_(new.to(a.dtype))


def _label_head(loaded: Any, settings: Any) -> None:
    """The head from the label names, as server/app.py starts a run with head.init=label-names."""
    if settings.head_init == "label-names":
        from clients.task.label_head import set_label_name_head

        set_label_name_head(loaded, scale=settings.head_label_scale, max_length=settings.max_length)


def _head_init(
    loaded: Any, state: dict, sites: list, labels: Sequence[str], *, kind: str, settings: Any
) -> dict:
    """`state` with its head set from the sites' summed statistics, as server/head_init.py
    sets it (without its checks and bounds: every site here is honest)."""
    import numpy as np

    from clients.task.model import load_trainable_state
    from clients.task.train import head_inputs
    from strategies.lda_head import HeadStatistics, lda_head

    load_trainable_state(loaded.model, state)
    parts = []
    for _site, examples in sites:  # each site's own sums; the server adds them
        x, y = head_inputs(loaded, examples, max_length=settings.max_length)
        parts.append(HeadStatistics.of(x, y, num_labels=len(labels)))
    total = sum(parts[1:], parts[0])
    if kind == "ridge":
        d = total.gram.shape[0]
        lam = settings.head_shrinkage * np.trace(total.gram) / d
        w = np.linalg.solve(total.gram + lam * np.eye(d), total.class_sum.T).T
        b = np.zeros(len(labels))
    else:
        w, b = lda_head(total, shrinkage=settings.head_shrinkage)
    out = dict(state)
    for k in state:
        if HEAD_MARK in k and k.endswith("weight"):
            out[k] = w.astype(state[k].dtype)
        elif HEAD_MARK in k and k.endswith("bias"):
            out[k] = b.astype(state[k].dtype)
    return out


def _lora_step(
    state: dict,
    new: dict,
    updates: list[Any],
    sim: dict[str, Any],
    moments: dict[str, Any],
) -> dict:
    """The LoRA tensors' server step of the experimental knobs (head: `new` as given)."""
    import numpy as np

    if sim["sim.lora-weighting"]:
        w = np.array(
            [u.num_examples if sim["sim.lora-weighting"] == "examples" else 1 for u in updates],
            dtype=np.float64,
        )
        w = w / w.sum()
    out = dict(new)
    for k in state:
        if HEAD_MARK in k:
            continue
        old = state[k].astype(np.float64)
        if sim["sim.lora-weighting"]:
            mean = sum(wi * u.state[k].astype(np.float64) for wi, u in zip(w, updates, strict=True))
        else:
            mean = new[k].astype(np.float64)
        delta = mean - old
        if sim["sim.lora-adam"] > 0:
            b1 = sim["sim.lora-adam-beta1"]
            m = b1 * moments.get("m" + k, 0.0) + (1 - b1) * delta
            v_prev = moments.get("v" + k, np.zeros_like(delta))
            if sim["sim.lora-yogi"]:
                v = v_prev - (1 - 0.99) * delta**2 * np.sign(v_prev - delta**2)
            else:
                v = 0.99 * v_prev + (1 - 0.99) * delta**2
            moments["m" + k], moments["v" + k] = m, v
            step = sim["sim.lora-adam"] * m / (np.sqrt(v) + sim["sim.lora-adam-tau"])
        elif sim["sim.lora-momentum"] > 0:
            m = sim["sim.lora-momentum"] * moments.get("m" + k, 0.0) + delta
            moments["m" + k] = m
            step = sim["sim.lora-lr"] * m
        else:
            step = sim["sim.lora-lr"] * delta
        out[k] = (old + step).astype(state[k].dtype)
    return out


def _scaffold_hook(loaded: Any, controls: dict, site: str, lr: float, sim: dict[str, Any]):
    """SCAFFOLD's drift correction (Karimireddy et al. 2020), on the local optimiser's steps.

    SCAFFOLD steps ``y <- y - lr (g - c_i + c)``. The sites train with AdamW, whose step is
    ``lr * direction``: the correction is applied to the parameters after each step,
    ``y <- y - lr (c - c_i)``, with c and c_i in the same direction units (option II below).
    """
    import torch

    if not sim["sim.scaffold"] or not controls["server"]:
        return None
    c, ci = controls["server"], controls.get(site, {})
    params = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    corr = {
        n: torch.from_numpy((lr * (c[n] - ci.get(n, 0.0))).astype("float32"))
        for n in params
        if sim["sim.scaffold"] == "all" or HEAD_MARK not in n
    }

    def hook(step: int, total: int) -> None:
        with torch.no_grad():
            for n, t in corr.items():
                params[n].sub_(t)

    return hook


def _scaffold_update(
    controls: dict, control_sum: dict, site: str, start: dict, local: dict, k_lr: float
) -> None:
    """Option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; adds ``c_i+ - c_i`` to the sum."""
    c, ci = controls["server"], controls.get(site, {})
    new = {}
    for n in start:
        new[n] = (
            ci.get(n, 0.0)
            - c.get(n, 0.0)
            + (start[n].astype("float64") - local[n].astype("float64")) / k_lr
        )
        control_sum[n] = control_sum.get(n, 0.0) + new[n] - ci.get(n, 0.0)
    controls[site] = new


def run_federated(
    overrides: dict[str, Any],
    *,
    sites: list[tuple[str, list[Any]]],
    val: list[Any],
    test: list[Any],
    labels: Sequence[str],
    rounds: int,
) -> dict[str, Any]:
    """One federated run; accuracy on val and test after every round."""
    from clients.task.model import load_trainable_state, trainable_state
    from clients.task.plan import TrainPlan
    from clients.task.train import train_local
    from strategies.strategy import SiteUpdate

    sim = SIM_KEYS | {k: v for k, v in overrides.items() if k in SIM_KEYS}
    overrides = {k: v for k, v in overrides.items() if k not in SIM_KEYS}
    inert = ("sim.keep-optimizer", "sim.head-init", "sim.a-init")  # not in the server step
    experimental = any(sim[k] != SIM_KEYS[k] for k in SIM_KEYS if k not in inert)
    settings = _settings(overrides, labels=labels, rounds=rounds, sites=len(sites))
    loaded = _model(settings.spec)
    from clients.task.model import _seeded_init

    site_optimizers: dict[str, Any] = {}
    moments: dict[str, Any] = {}
    controls: dict[str, dict[str, Any]] = {"server": {}}  # SCAFFOLD: c and each c_i
    _seeded_init(loaded.model, seed=settings.spec.seed)  # fresh start for every config
    _a_init(loaded.model, sim["sim.a-init"])
    _label_head(loaded, settings)
    state = trainable_state(loaded.model)
    kind = sim["sim.head-init"] or ("lda" if settings.lda_head else "")
    if kind:
        state = _head_init(loaded, state, sites, labels, kind=kind, settings=settings)
        print(
            f"    head init: val {_accuracy(loaded, state, val, settings.max_length):.3f}",
            file=sys.stderr,
        )
    init = {k: v.astype("float64") for k, v in state.items()}
    strategy = settings.bounded(settings.strategy())  # robust.* as the round loop applies it
    optimizer = settings.server_optimizer
    server_state: dict[str, Any] = {}
    history = []
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        plan = TrainPlan.from_config(
            settings.plan(server_round).to_config() | strategy.client_config()
        )
        updates = []
        control_sum: dict[str, Any] = {}
        for site, examples in sites:
            load_trainable_state(loaded.model, state)
            hook = _scaffold_hook(loaded, controls, site, plan.learning_rate, sim)
            result = train_local(
                loaded,
                examples,
                plan=plan,
                generator=_generator(settings.spec.seed, server_round, site),
                optimizer_state=site_optimizers.get(site),
                on_step=hook,
            )
            if sim["sim.keep-optimizer"]:
                site_optimizers[site] = result.optimizer_state
            local = trainable_state(loaded.model)
            if sim["sim.scaffold"]:
                _scaffold_update(
                    controls, control_sum, site, state, local, result.steps * plan.learning_rate
                )
            updates.append(
                SiteUpdate(
                    site=site,
                    state=local,
                    num_examples=result.num_examples,
                    metrics={"train-loss": result.loss},
                )
            )
        for k, d in control_sum.items():  # c <- c + (1/N) sum_i (c_i+ - c_i)
            controls["server"][k] = controls["server"].get(k, 0.0) + d / len(sites)
        outcome = strategy.aggregate(server_round, state, updates)
        new, server_state = optimizer.step(
            state,
            outcome.state,
            server_state,
            spread=outcome.spread,
            num_updates=len(outcome.accepted),
        )
        state = _lora_step(state, new, updates, sim, moments) if experimental else new
        eta = float(server_state["eta"][0]) if "eta" in server_state else None
        history.append(
            {
                "round": server_round,
                "val": _accuracy(loaded, state, val, settings.max_length),
                "test": _accuracy(loaded, state, test, settings.max_length),
                "train_loss": statistics.fmean(u.metrics["train-loss"] for u in updates),
                "eta": eta,
            }
            | _norms(state, init)
        )
        print(
            f"    round {server_round}: val {history[-1]['val']:.3f} "
            f"test {history[-1]['test']:.3f} loss {history[-1]['train_loss']:.3f} eta {eta}",
            file=sys.stderr,
        )
    return {"history": history, "seconds": time.perf_counter() - started, "state": state}


def run_centralized(
    overrides: dict[str, Any],
    *,
    union: list[Any],
    val: list[Any],
    test: list[Any],
    labels: Sequence[str],
    passes: int,
) -> dict[str, Any]:
    """`train_local` on the union for `passes` epochs; val and test after every epoch."""
    import torch

    from clients.task.model import _seeded_init, trainable_state
    from clients.task.plan import TrainPlan
    from clients.task.train import train_local

    sim = SIM_KEYS | {k: v for k, v in overrides.items() if k in SIM_KEYS}
    overrides = {k: v for k, v in overrides.items() if k not in SIM_KEYS}
    settings = _settings(overrides, labels=labels, rounds=1, sites=2)
    loaded = _model(settings.spec)
    _seeded_init(loaded.model, seed=settings.spec.seed)
    _a_init(loaded.model, sim["sim.a-init"])
    _label_head(loaded, settings)
    kind = sim["sim.head-init"] or ("lda" if settings.head_init == "lda" else "")
    if kind:
        from clients.task.model import load_trainable_state

        head = _head_init(
            loaded, trainable_state(loaded.model), [("all", union)], labels, kind=kind,
            settings=settings,
        )  # fmt: skip
        load_trainable_state(loaded.model, head)
    init = {k: v.astype("float64") for k, v in trainable_state(loaded.model).items()}
    plan = TrainPlan.from_config(
        settings.plan(1).to_config() | {"local_epochs": passes, "local_steps": 0}
    )
    per_epoch = -(-len(union) // plan.batch_size)
    history: list[dict[str, float]] = []

    def on_step(step: int, total: int) -> None:
        if step % per_epoch and step != total:
            return
        state = trainable_state(loaded.model)
        history.append(
            {
                "round": len(history) + 1,
                "val": _accuracy(loaded, state, val, plan.max_length),
                "test": _accuracy(loaded, state, test, plan.max_length),
            }
            | _norms(state, init)
        )
        print(f"    epoch {len(history)}: val {history[-1]['val']:.3f}", file=sys.stderr)
        loaded.model.train()

    started = time.perf_counter()
    train_local(
        loaded,
        union,
        plan=plan,
        generator=torch.Generator().manual_seed(settings.spec.seed),
        on_step=on_step,
    )
    return {
        "history": history,
        "seconds": time.perf_counter() - started,
        "state": trainable_state(loaded.model),
    }


def finish(
    row: dict[str, Any],
    overrides: dict[str, Any],
    *,
    save_dir: Path | None,
    diagnose: bool,
    labels: Sequence[str],
    union: list[Any],
    val: list[Any],
) -> dict[str, Any]:
    """Take the final tensors out of a run's row: save them, diagnose them."""
    state = row.pop("state")
    if save_dir is not None:
        import numpy as np

        save_dir.mkdir(parents=True, exist_ok=True)
        np.savez(save_dir / f"{row['data']}-{row['seed']}-{row['config']}.npz", **state)
    if diagnose:
        plain = {k: v for k, v in overrides.items() if k not in SIM_KEYS}
        settings = _settings(plain, labels=labels, rounds=1, sites=2)
        loaded = _model(settings.spec)
        row["per_label"] = _per_label(loaded, state, val, settings.max_length)
        row["probe"] = probe(
            loaded,
            state,
            union=union,
            val=val,
            max_length=settings.max_length,
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
            seed=row["seed"],
        )
        print(f"    probe {row['probe']}", file=sys.stderr)
    return row


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> (NAME, overrides); values are TOML.

    A comma inside a double-quoted value belongs to the value
    (``lora.target-modules="query,value,dense"``).
    """
    from server.run_config import parse_overrides

    name, _, rest = text.partition(":")
    pairs = [p for p in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', rest) if p.strip()]
    return name, parse_overrides(pairs)


def summary(path: Path) -> None:
    """Mean (over seeds) best and final val accuracy per data set and config, as ratios."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["data"], row["config"])].append(row)
    for data in sorted({d for d, _ in groups}):
        cen = [
            max(h["val"] for h in r["history"])
            for (d, c), rs in groups.items()
            if d == data and c.startswith("central")
            for r in rs
        ]
        ref = statistics.fmean(cen) if cen else float("nan")
        print(f"\n{data}: centralized best val {ref:.3f}")
        print(f"{'config':34} n  final  best  ratio(final) ratio(best)  min-round-delta")
        for (d, config), rs in sorted(groups.items()):
            if d != data:
                continue
            final = statistics.fmean(r["history"][-1]["val"] for r in rs)
            best = statistics.fmean(max(h["val"] for h in r["history"]) for r in rs)
            drop = min(
                min((b["val"] - a["val"] for a, b in itertools.pairwise(r["history"])), default=0)
                for r in rs
            )
            print(
                f"{config:34} {len(rs)}  {final:.3f}  {best:.3f}  {final / ref:.3f}        "
                f"{best / ref:.3f}        {drop:+.3f}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Compare federated training methods in-process (no Flower/MLflow).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="clinc150", help="clinc150, or a JSONL/CSV text/label file")
    p.add_argument("--data-dir", type=Path, default=bq.DEFAULT_DATA, help="CLINC150 directory")
    p.add_argument("--max-labels", type=int, default=77, help="random label subset (0: all)")
    p.add_argument("--per-label", type=int, default=0, help="training rows per label cap")
    p.add_argument("--train-rows", type=int, default=2000, help="training rows (random)")
    p.add_argument("--val-rows", type=int, default=1000, help="validation rows")
    p.add_argument("--test-rows", type=int, default=1000, help="test rows")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--rounds", type=int, default=5, help="rounds (= centralized passes)")
    p.add_argument("--seeds", default="0", help="comma-separated data/model seeds")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="NAME:key=value,... federated run config (repeatable; 'NAME:' is defaults)",
    )
    p.add_argument(
        "--central",
        action="append",
        default=[],
        help="NAME:key=value,... centralized run (its lr/batch/max-length), repeatable",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out/sweep_quality.jsonl"))
    p.add_argument("--tag", default="", help="data-set name suffix in the results")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--summary", type=Path, default=None, help="print a results file's table")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also record per-label val accuracy and a linear probe of each run's features",
    )
    p.add_argument(
        "--save-states", type=Path, default=None, help="directory for each run's final tensors"
    )
    args = p.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return 0

    import torch

    from clients.site.split import SplitSpec, split_rows
    from server.console import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        data = bq.load_data(
            data=args.data,
            data_dir=args.data_dir,
            eval_file=None,
            max_labels=args.max_labels,
            per_label=args.per_label,
            train_rows=args.train_rows,
            test_per_label=0,
            test_rows=args.test_rows,
            val_rows=args.val_rows,
            seed=seed,
        )
        labels = data.labels
        parts = split_rows(
            data.train,
            spec=SplitSpec(sites=args.sites, alpha=args.alpha, seed=seed, min_per_site=10),
        ).parts
        # Each site holds out 10% as the ClientApp does (clients/site/app.py `_data`).
        sites = []
        for i, rows in enumerate(parts):
            site = f"site-{i:02d}"
            order = list(range(len(rows)))
            random.Random(site).shuffle(order)
            keep = order[int(len(rows) * 0.1) :]
            sites.append((site, _examples([rows[j] for j in sorted(keep)])))
        union = [e for _, ex in sites for e in ex]
        val, test = _examples(data.val), _examples(data.test)
        name = data.name + (f"-{args.tag}" if args.tag else "")
        print(
            f"{name} seed {seed}: {len(labels)} labels, {len(union)} training rows over "
            f"{args.sites} sites ({min(len(s) for _, s in sites)}-{max(len(s) for _, s in sites)}"
            f"), val {len(val)}, test {len(test)}",
            file=sys.stderr,
        )
        common = {
            "data": name,
            "seed": seed,
            "sites": args.sites,
            "alpha": args.alpha,
            "rounds": args.rounds,
            "labels": len(labels),
            "train_rows": len(union),
        }
        if args.diagnose:
            holders: dict[str, set[str]] = defaultdict(set)
            for site, ex in sites:
                for e in ex:
                    holders[e.label].add(site)
            common["label_sites"] = {k: len(v) for k, v in sorted(holders.items())}
            common["label_count"] = dict(sorted(Counter(e.label for e in union).items()))

        keep = {
            "save_dir": args.save_states,
            "diagnose": args.diagnose,
            "labels": labels,
            "union": union,
            "val": val,
        }
        for text in args.central:
            cname, overrides = parse_config(text)
            print(f"  centralized {cname} {overrides}", file=sys.stderr)
            torch.manual_seed(seed)
            result = run_centralized(
                overrides | {"seed": seed},
                union=union,
                val=val,
                test=test,
                labels=labels,
                passes=args.rounds,
            )
            row = common | {"config": f"central-{cname}", "overrides": overrides} | result
            row = finish(row, overrides | {"seed": seed}, **keep)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"    best val {max(h['val'] for h in result['history']):.3f}", file=sys.stderr)
        for text in args.config:
            cname, overrides = parse_config(text)
            print(f"  federated {cname} {overrides}", file=sys.stderr)
            torch.manual_seed(seed)
            result = run_federated(
                overrides | {"seed": seed},
                sites=sites,
                val=val,
                test=test,
                labels=labels,
                rounds=args.rounds,
            )
            row = common | {"config": cname, "overrides": overrides} | result
            row = finish(row, overrides | {"seed": seed}, **keep)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
