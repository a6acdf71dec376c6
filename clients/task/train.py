"""Local training and evaluation loops for both tasks.

`train_local` runs the site's epochs (or a fixed number of steps) with AdamW (under DP-SGD
the plan's ``site-dp.optimizer``, plain SGD by default) over the trainable tensors,
optionally with the FedProx proximal term (Li et al. 2020, "Federated Optimization in
Heterogeneous Networks") and, for classification, FedRS's restricted
softmax (Li and Zhan 2021, "FedRS: Federated Learning with Restricted Softmax for Label
Distribution Non-IID Data"): the logits of labels the site has no example of are scaled
by ``fedrs_alpha`` during local training, so a site stops pushing down classes it never
sees, which is what drags label-skewed federations behind. `evaluate` returns the mean
loss and accuracy (label accuracy for classification, next-token accuracy on the loss
tokens for causal LM).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clients.task.data import Example
from clients.task.dpsgd import SampleDP, private
from clients.task.errors import ConfigError, DataError, ModelError
from clients.task.model import HEAD_MODULES, LoadedModel, is_head_tensor
from clients.task.plan import TrainPlan

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    num_examples: int
    seconds: float
    # The AdamW state after training (moments, step counts), for a site that keeps it.
    optimizer_state: dict | None = None


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def encode(
    loaded: LoadedModel, examples: Sequence[Example], *, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize examples into model inputs with labels for the task."""
    tok = loaded.tokenizer
    spec = loaded.spec
    texts = [e.text for e in examples]
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if spec.task == "sequence-classification":
        index = {label: i for i, label in enumerate(spec.labels)}
        batch["labels"] = torch.tensor([index[e.label] for e in examples])  # (batch,)
        return dict(batch)
    labels = batch["input_ids"].clone()  # (batch, seq)
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    for row, example in enumerate(examples):
        if example.prompt is not None:
            # Loss on the response only: mask the prompt's tokens.
            labels[row, : _prompt_tokens(tok, example.prompt, max_length)] = IGNORE_INDEX
    batch["labels"] = labels
    return dict(batch)


def _prompt_tokens(tok, prompt: str, max_length: int) -> int:
    """Leading tokens of a prompt/response row that belong to the prompt."""
    ids = tok(prompt, truncation=True, max_length=max_length)["input_ids"]
    # The tokenizer may close the prompt alone with special tokens ([SEP], </s>) that the
    # whole row has only after its response.
    special = set(tok.all_special_ids)
    while ids and ids[-1] in special:
        ids = ids[:-1]
    return len(ids)


def response_tokens(tokenizer, example: Example, *, max_length: int) -> int | None:
    """Response tokens of a prompt/response row left after truncation to ``max_length``.

    None for a row without a prompt. 0 means the prompt fills ``max_length``: the row
    would train on the closing special token only, so training and evaluation skip it
    (`without_truncated`) and ``fedlora site check`` counts it.
    """
    if example.prompt is None:
        return None
    ids = tokenizer(example.text, truncation=True, max_length=max_length)["input_ids"]
    special = set(tokenizer.all_special_ids)
    response = ids[_prompt_tokens(tokenizer, example.prompt, max_length) :]
    return sum(1 for t in response if t not in special)


def without_truncated(
    loaded: LoadedModel, examples: Sequence[Example], *, max_length: int
) -> list[Example]:
    """The examples minus prompt/response rows whose response truncation cuts away whole;
    the count skipped is logged."""
    if loaded.spec.task != "causal-lm":
        return list(examples)
    kept = [e for e in examples if response_tokens(loaded.tokenizer, e, max_length=max_length) != 0]
    if len(kept) < len(examples):
        log.warning(
            "skipping %d of %d rows whose prompt fills max-length=%d tokens (no response "
            "token left to learn)",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
    return kept


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train_local(
    loaded: LoadedModel,
    examples: Sequence[Example],
    *,
    plan: TrainPlan,
    generator: torch.Generator,
    on_step: Callable[[int, int], None] | None = None,
    dp: SampleDP | None = None,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Train the trainable tensors on local examples.

    Args:
        loaded: The model with the global adapter already loaded.
        examples: The site's training examples.
        plan: Epochs or steps, batch size, learning rate, proximal mu.
        generator: Source of the shuffling order (injected for reproducibility; under
            DP-SGD the caller seeds it from the OS, see clients/site/app.py).
        on_step: Called with (step, total_steps) after each optimiser step.
        dp: Train with DP-SGD (clipped, noised per-example gradients; clients/task/dpsgd.py);
            its noise is always drawn from the OS CSPRNG, whatever ``generator`` is.
        optimizer_state: An AdamW ``state_dict`` from this site's previous round, to
            continue its moments instead of starting them at zero (ignored where the
            optimiser is plain SGD, which keeps no state).
    """
    examples = without_truncated(loaded, examples, max_length=plan.max_length)
    if not examples:
        raise DataError(
            f"every row's prompt fills max-length={plan.max_length} tokens; nothing to train on"
        )
    model = loaded.model
    with _dp_frozen(model, frozen=dp is not None and plan.site_dp_trainable == "head"):
        return _train(
            loaded,
            examples,
            plan=plan,
            generator=generator,
            on_step=on_step,
            dp=dp,
            optimizer_state=optimizer_state,
        )


@contextlib.contextmanager
def _dp_frozen(model: torch.nn.Module, *, frozen: bool) -> Iterator[None]:
    """Under ``site-dp.trainable = head``, freeze every trainable tensor but the head's
    for the duration of training (the cached model gets them back after).

    DP linear probing (Tramèr and Boneh 2021, "Differentially Private Learning Needs
    Better Features (or Much More Data)"): with few rows per site, DP-SGD's noise on
    every trainable coordinate drowns the LoRA matrices, whose per-example gradients are
    a small share of the clipped norm (README "Quality under DP"); training the head
    alone spends the privacy budget where the signal is. Frozen tensors get no
    per-example gradients from Opacus and leave the site unchanged.
    """
    if not frozen:
        yield
        return
    params = [p for n, p in model.named_parameters() if p.requires_grad and not is_head_tensor(n)]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _train(
    loaded: LoadedModel,
    examples: Sequence[Example],
    *,
    plan: TrainPlan,
    generator: torch.Generator,
    on_step: Callable[[int, int], None] | None,
    dp: SampleDP | None,
    optimizer_state: dict | None,
) -> TrainResult:
    import time

    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if plan.proximal_mu > 0 else []
    optimizer = _optimizer(params, plan, private=dp is not None)
    if optimizer_state is not None:
        if isinstance(optimizer, torch.optim.AdamW):
            optimizer.load_state_dict(optimizer_state)
        else:
            log.warning("optimizer_state ignored: plain SGD keeps no state across rounds")
    logit_scale = _fedrs_scale(loaded, examples, plan)
    logit_shift = _fedlc_shift(loaded, examples, plan)
    steps_per_epoch = math.ceil(len(examples) / plan.batch_size)
    total = plan.local_steps or plan.local_epochs * steps_per_epoch
    model.train()
    started = time.perf_counter()
    step, losses = 0, []
    # Drawn in both modes, so DP-SGD and plain training shuffle the same batches.
    dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with (
        _seeded_dropout(dropout_seed, loaded.device) if dp is None else contextlib.nullcontext(),
        # A batch is never larger than the site's rows: Opacus divides the noised sum by
        # this expected size, which is then the size of every full-batch step.
        private(
            model,
            optimizer,
            dp=dp,
            batch_size=min(plan.batch_size, len(examples)),
            is_head=is_head_tensor,
        )
        if dp is not None
        else contextlib.nullcontext((model, optimizer)) as (forward, opt),
    ):
        while step < total:
            for idx in _batches(len(examples), plan.batch_size, generator):
                inputs = encode(loaded, [examples[i] for i in idx], max_length=plan.max_length)
                inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
                if logit_scale is None and logit_shift is None:
                    loss = forward(**inputs).loss
                else:
                    labels = inputs.pop("labels")
                    logits = forward(**inputs).logits  # (batch, labels)
                    if logit_scale is not None:
                        logits = logits * logit_scale
                    if logit_shift is not None:
                        logits = logits - logit_shift
                    loss = torch.nn.functional.cross_entropy(logits, labels)
                if anchor:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = loss + 0.5 * plan.proximal_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                if on_step:
                    on_step(step, total)
                if step >= total:
                    break
    model.eval()
    return TrainResult(
        loss=float(np.mean(losses)) if losses else float("nan"),
        steps=step,
        num_examples=len(examples),
        seconds=time.perf_counter() - started,
        optimizer_state=optimizer.state_dict(),
    )


def _optimizer(
    params: list[torch.nn.Parameter], plan: TrainPlan, *, private: bool
) -> torch.optim.Optimizer:
    """AdamW, or under DP-SGD the plan's ``site-dp.optimizer``: plain SGD (no momentum,
    no weight decay) or AdamW, at the plan's learning rate.

    Plain SGD is DP-SGD as Abadi et al. 2016 state it: the step is the learning rate
    times the noised mean of clipped per-example gradients (norm at most ``C`` before
    the noise), so it shrinks with the signal and the noise. AdamW divides
    each coordinate by its own scale: its first step is ``lr · sign(g)`` on every
    coordinate, signal or noise, so with little noise (a large ε, or a site with many
    rows) a rate tuned for noisy steps overshoots (README "Quality under DP").
    """
    if plan.site_dp_optimizer == "sgd":
        if not private:  # AdamW at SGD's rate (10) would wreck the model
            raise ConfigError(
                "the plan asks for site-dp.optimizer='sgd' (DP-SGD) but the site trains "
                "without DP; pass its SampleDP to train_local"
            )
        return torch.optim.SGD(params, lr=plan.learning_rate, momentum=0.0, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)


@contextlib.contextmanager
def _seeded_dropout(seed: int, device: torch.device) -> Iterator[None]:
    """Draw dropout masks from `seed` (taken from the run's generator), then restore torch's RNG.

    Dropout samples from torch's global generator, which nothing seeds: without this, two
    runs with the same data, seed and settings train different adapters. Under DP-SGD it
    is not used, so nothing derived from the run seed can reach the global generator from
    which privacy noise might be drawn.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _fedrs_scale(
    loaded: LoadedModel, examples: Sequence[Example], plan: TrainPlan
) -> torch.Tensor | None:
    """Per-label logit scale (1 for labels in the site's data, alpha for the others)."""
    if plan.fedrs_alpha >= 1.0:  # TrainPlan allows < 1 for classification only
        return None
    index = {label: i for i, label in enumerate(plan.spec.labels)}
    scale = torch.full((len(index),), plan.fedrs_alpha, device=loaded.device)
    scale[[index[e.label] for e in examples if e.label in index]] = 1.0
    return scale


def _fedlc_shift(
    loaded: LoadedModel, examples: Sequence[Example], plan: TrainPlan
) -> torch.Tensor | None:
    """FedLC's per-label logit calibration ``τ · n_c^(-1/4)`` for the site's label counts.

    FedLC (Zhang et al. 2022, "Federated Learning with Label Distribution Skew via Logits
    Calibration") trains on ``f_c(x) - τ · n_c^(-1/4)``, where ``n_c`` counts the site's
    examples of label c: a pairwise label margin that pushes the site's rare labels up
    and keeps its frequent ones from dominating the shared head. A label the site has no
    example of (``n_c = 0``) gets an infinite shift, i.e. it leaves the site's softmax, as
    in the paper's code. Only the local loss changes; evaluation uses the plain logits.
    """
    if plan.fedlc_tau <= 0 or plan.spec.task != "sequence-classification":
        return None
    index = {label: i for i, label in enumerate(plan.spec.labels)}
    counts = torch.zeros(len(index), device=loaded.device)
    for example in examples:
        if example.label in index:
            counts[index[example.label]] += 1
    # (labels,); inf where the site has no example, which cross-entropy treats as exp(-inf) = 0
    return plan.fedlc_tau * counts.pow(-0.25)


@torch.no_grad()
def head_inputs(
    loaded: LoadedModel, examples: Sequence[Example], *, batch_size: int = 64, max_length: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """What the classification head reads, for each example, under the current adapter.

    Captured by a forward pre-hook on the head (peft's ``modules_to_save`` wrapper): for a
    BERT-style model the pooled output, (batch, hidden); for a Llama-style one the hidden
    state of the last token that is not padding, as the model's own pooling picks it. The
    model runs in eval mode (no dropout).

    Returns:
        (features (rows, hidden) float64, label indices (rows,) int64).

    Raises:
        ModelError: If the task is not sequence classification or the model has no head.
    """
    if loaded.spec.task != "sequence-classification":
        raise ModelError(f"task={loaded.spec.task!r}: only a classifier has a head to fit")
    heads = [
        module
        for name, module in loaded.model.named_modules()
        if name.rsplit(".", 1)[-1] in HEAD_MODULES and hasattr(module, "modules_to_save")
    ]
    if len(heads) != 1:
        names = "/".join(HEAD_MODULES)
        raise ModelError(f"expected one trained head ({names}); found {len(heads)}")
    captured: list[torch.Tensor] = []
    hook = heads[0].register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    model = loaded.model
    model.eval()
    feats, labels = [], []
    try:
        for start in range(0, len(examples), batch_size):
            inputs = encode(loaded, examples[start : start + batch_size], max_length=max_length)
            labels.append(inputs.pop("labels"))
            inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
            captured.clear()
            model(**inputs)
            x = captured[-1].float()
            if x.dim() == 3:  # (batch, seq, hidden): the last token that is not padding
                # the id the model's own pooling compares with: its config's, which
                # may differ from the tokenizer's pad id
                pad = model.config.get_text_config().pad_token_id
                ids = inputs["input_ids"]
                positions = torch.arange(ids.shape[1], device=ids.device)
                last = ((ids != pad).int() * positions).argmax(-1)  # (batch,)
                x = x[torch.arange(x.shape[0], device=x.device), last]
            feats.append(x.double().cpu())
    finally:
        hook.remove()
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def evaluate(
    loaded: LoadedModel, examples: Sequence[Example], *, batch_size: int = 32, max_length: int = 64
) -> EvalResult:
    """Mean loss and accuracy of the current adapter on examples."""
    examples = without_truncated(loaded, examples, max_length=max_length)
    model = loaded.model
    model.eval()
    total_loss, weight, correct, counted = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = encode(loaded, chunk, max_length=max_length)
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        out = model(**inputs)
        labels = inputs["labels"]
        if loaded.spec.task == "sequence-classification":
            n = labels.numel()
            correct += int((out.logits.argmax(-1) == labels).sum())
        else:
            shifted = labels[:, 1:]  # (batch, seq-1): token t predicts t+1
            mask = shifted != IGNORE_INDEX
            preds = out.logits[:, :-1].argmax(-1)
            n = int(mask.sum())
            correct += int(((preds == shifted) & mask).sum())
        total_loss += float(out.loss) * n
        weight += n
        counted += n
    return EvalResult(
        loss=total_loss / max(weight, 1),
        accuracy=correct / max(counted, 1),
        num_examples=len(examples),
    )
