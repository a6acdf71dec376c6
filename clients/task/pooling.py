"""What a classifier's head reads: the base's own pooling, or the mean of its token states.

A BERT-type sequence classifier feeds its head the *pooler output*: the first token's
hidden state through a dense layer and tanh, trained by BERT's next-sentence objective.
A sentence-embedding base such as all-MiniLM-L6-v2 (fedlora's default) was trained
instead to be read as the attention-masked **mean of its last hidden states**
(Reimers and Gurevych 2019, "Sentence-BERT", Sec. 3; the base declares it in
sentence-transformers' ``modules.json`` / ``1_Pooling/config.json``); its pooler weights
were never trained for that. ``pooling = "mean"`` swaps the pooler for that mean, so the
head (and the LDA head's statistics) read the features the base was made to produce.

``head.pooling`` values:

- ``auto`` (the default): ``mean`` when the base's directory declares sentence-
  transformers mean pooling and the model has a pooler to replace, else ``model``.
- ``model``: the model class's own pooling (BERT's pooler; Llama's last token).
- ``mean``: the masked mean; needs a base whose classifier reads a ``pooler`` module
  (BERT-type), otherwise `ModelError`.

The mean pooler has no parameters, so the adapter's tensors and names are the same as
with the model's own pooling except that ``pooler.dense`` is no longer a layer LoRA can
target. A release records the pooling it was trained with (``fedlora_task.json``), and
the edge node builds its base the same way.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
from pathlib import Path
from typing import Any

import torch

from clients.task.choices import POOLINGS
from clients.task.errors import ModelError


class MeanPooler(torch.nn.Module):
    """Masked mean of the last hidden states: (batch, seq, hidden) -> (batch, hidden).

    Stands in a BERT-type model's ``pooler``, which its model calls with the hidden states
    only; the attention mask of the same forward reaches it through a pre-hook on the
    backbone (`_bind_mask`), kept per thread (the edge node's batcher and a site's training
    each run a forward in one thread). Without a mask every position counts.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self._local.mask = mask

    # A thread-local can be neither copied nor pickled: a copy starts with no mask.
    def __deepcopy__(self, memo: dict) -> MeanPooler:
        copy = MeanPooler()
        copy.train(self.training)
        memo[id(self)] = copy
        return copy

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raises:
        ModelError: If ``hidden`` is not (batch, seq, hidden) or the mask does not match it.
        """
        if hidden.dim() != 3:
            raise ModelError(
                f"head.pooling='mean': the pooler got shape {tuple(hidden.shape)}, expected "
                "(batch, seq, hidden): this model's pooler does not read the token states"
            )
        mask = getattr(self._local, "mask", None)
        if mask is None:
            return hidden.mean(dim=1)
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ModelError(
                f"head.pooling='mean': attention mask {tuple(mask.shape)} does not match the "
                f"token states {tuple(hidden.shape[:2])}"
            )
        weights = mask.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
        total = (hidden.float() * weights).sum(dim=1)  # float32: fp16 sums and 1e-9 underflow
        return (total / weights.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)


def declared_pooling(path: str | Path) -> str | None:
    """The pooling a sentence-transformers base directory declares: ``mean``, another
    mode's name (``cls``, ``max``, ...), or None when it declares none.

    Reads ``modules.json`` for the ``sentence_transformers.models.Pooling`` module and its
    ``config.json`` (``pooling_mode_mean_tokens`` and friends).

    Raises:
        ModelError: If those files exist but cannot be read, naming the file.
    """
    root = Path(path)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelError(f"{modules_file}: expected a JSON list of objects")
    entry = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if entry is None:
        return None
    where = entry.get("path", "")
    if not isinstance(where, str) or Path(where).is_absolute() or ".." in Path(where).parts:
        raise ModelError(
            f"{modules_file}: the Pooling module's path {where!r} must lie inside the base"
        )
    config_file = root / where / "config.json"
    config = _json(config_file)
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    modes = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith(
        "pooling_mode_") and v is True]  # fmt: skip
    if modes == ["mean_tokens"]:
        return "mean"
    return ",".join(modes) or None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable sentence-transformers pooling config: {exc}") from exc


def _backbone(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding a replaceable ``pooler``, or None.

    Only BERT's ``BertPooler`` and transformers' copies of it (``...Pooler`` classes, which
    read the (batch, seq, hidden) token states and take the first token) qualify: ALBERT's
    and BigBird's ``pooler`` is a plain ``Linear`` fed the first token's vector, which a
    mean cannot stand in for.
    """
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    pooler = getattr(backbone, "pooler", None)
    if _mask_position(backbone) is not None and (
        isinstance(pooler, MeanPooler)
        or (
            isinstance(pooler, torch.nn.Module)
            and not isinstance(pooler, torch.nn.Linear)
            and type(pooler).__name__.endswith("Pooler")
        )
    ):
        return backbone
    return None


def _mask_position(backbone: Any) -> int | None:
    """Where ``attention_mask`` sits among the backbone's positional arguments (1 for
    BertModel, 2 for LayoutLM's after ``bbox``), or None when it takes no mask (FNet):
    without one the mean would count the padding."""
    if not isinstance(backbone, torch.nn.Module):
        return None
    return _mask_position_of(type(backbone))


@functools.lru_cache(maxsize=64)
def _mask_position_of(cls: type) -> int | None:  # once per class: the hook runs every forward
    try:
        names = list(inspect.signature(cls.forward).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return None
    return names.index("attention_mask") if "attention_mask" in names else None


def resolve_pooling(requested: str, *, model: torch.nn.Module, path: str | Path) -> str:
    """``model`` or ``mean``: what ``requested`` (one of `POOLINGS`) means for this base.

    Raises:
        ModelError: If ``mean`` is asked of a model without a pooler to replace, or the
            value is unknown.
    """
    if requested not in POOLINGS:
        raise ModelError(f"head.pooling={requested!r} must be one of {', '.join(POOLINGS)}")
    has_pooler = _backbone(model) is not None
    if requested == "auto":
        return "mean" if has_pooler and declared_pooling(path) == "mean" else "model"
    if requested == "mean" and not has_pooler:
        raise ModelError(
            f"head.pooling='mean': {type(model).__name__} has no pooler to replace "
            "(only BERT-type classifiers read one); use 'model' or 'auto'"
        )
    return requested


def pooling_of_base(requested: str, *, path: str | Path, task: str) -> str:
    """``model`` or ``mean``: `resolve_pooling` for the base at ``path`` without loading its
    weights (its classifier is built on torch's meta device), so a run's settings can fix
    the pooling once and send the sites the resolved value.

    Raises:
        ModelError: As `resolve_pooling`; also ``mean`` for a task without a classifier, and
            a base whose config cannot be read.
    """
    if requested not in POOLINGS:
        raise ModelError(f"head.pooling={requested!r} must be one of {', '.join(POOLINGS)}")
    if task != "sequence-classification":
        if requested == "mean":
            raise ModelError(f"head.pooling='mean': task={task!r} has no classifier head")
        return "model"
    if requested == "model" or (requested == "auto" and declared_pooling(path) != "mean"):
        return "model"  # nothing to build: auto picks mean only where the base declares it
    return _pooling_of_base(requested, str(path))


@functools.lru_cache(maxsize=16)
def _pooling_of_base(requested: str, path: str) -> str:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:  # transformers raises assorted errors for unusable configs
        raise ModelError(
            f"{path}: cannot build its classifier to resolve head.pooling: {exc}"
        ) from exc
    return resolve_pooling(requested, model=model, path=path)


def apply_pooling(model: torch.nn.Module, pooling: str) -> None:
    """Make ``model``'s classifier read ``pooling`` (resolved: ``model`` or ``mean``).

    Call it on the transformers model before peft wraps it. ``model`` leaves it as is.

    Raises:
        ModelError: If ``mean`` cannot apply (see `resolve_pooling`).
    """
    if pooling == "model":
        return
    backbone = _backbone(model)
    if pooling != "mean" or backbone is None:
        raise ModelError(f"head.pooling={pooling!r} cannot apply to {type(model).__name__}")
    backbone.pooler = MeanPooler()
    backbone.register_forward_pre_hook(_bind_mask, with_kwargs=True)


def _bind_mask(backbone: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the backbone: hand this forward's attention mask to its pooler
    (looked up on the module called, so a deep copy of the model binds its own pooler)."""
    mask = kwargs.get("attention_mask")
    where = _mask_position(backbone)
    if mask is None and where is not None and len(args) > where:  # passed by position
        mask = args[where]
    backbone.pooler.set_mask(mask)
